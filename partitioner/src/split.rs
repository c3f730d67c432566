//! Contiguous pipeline splits of a layer chain.
//!
//! Invariants of every split returned here: stages are contiguous, cover every node
//! exactly once, keep graph order (so the embedding is on stage 0 and the head on the
//! last stage), and every stage holds at least one transformer block (`required` node).
//!
//! The exact solver ([`optimal_split`]) minimises the largest stage cost subject to a
//! per-stage memory cap, where stage `k`'s memory is `static + in_flight[k] · activations`
//! of its nodes (so the cap depends on the stage's position, as with 1F1B). Because every
//! node cost is non-negative, a stage's cost and memory only grow when it is extended, so
//! from each start `i` the admissible ends form an interval `[first block after i, hi_k(i)]`
//! with `hi_k` non-decreasing in `i`. For a bound `T`, the set of positions reachable after
//! `k` stages is then computed in `O(n)` per stage (two pointers and a difference array),
//! which decides "is there a split with every stage ≤ T and under the cap?" in `O(K·n)`.
//! That predicate is monotone in `T`, and the optimum is one of the computed segment costs,
//! so bisecting over the bit patterns of non-negative `f64`s (at most 64 rounds) finds the
//! smallest feasible `T` exactly — the optimum among all contiguous splits, with costs
//! summed as prefix-sum differences. Total `O(64 · K · n)`: about a millisecond for
//! 1,000 layers into 64 stages. Brute force over all splits checks it in the tests.

use crate::error::{Error, Result};
use crate::graph::LayerGraph;
use serde::{Deserialize, Serialize};

/// Stage boundaries: stage `i` owns nodes `bounds[i]..bounds[i + 1]`.
pub type Bounds = Vec<usize>;

/// How `parallel.partition` splits the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionMethod {
    /// Equal numbers of transformer blocks per stage (embedding first, head last).
    Uniform,
    /// Min-max of parameters per stage.
    Parameters,
    /// Min-max of training FLOPs per stage.
    Flops,
    /// Min-max of measured time per stage (needs a profile file).
    Profile,
    /// Min-max of predicted time per stage under the memory cap.
    Optimal,
}

impl PartitionMethod {
    /// Every method, in the order of the docs.
    pub const ALL: [PartitionMethod; 5] = [
        PartitionMethod::Uniform,
        PartitionMethod::Parameters,
        PartitionMethod::Flops,
        PartitionMethod::Profile,
        PartitionMethod::Optimal,
    ];

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            PartitionMethod::Uniform => "uniform",
            PartitionMethod::Parameters => "parameters",
            PartitionMethod::Flops => "flops",
            PartitionMethod::Profile => "profile",
            PartitionMethod::Optimal => "optimal",
        }
    }

    /// Parses `parallel.partition`.
    pub fn parse(s: &str) -> Result<PartitionMethod> {
        PartitionMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| Error::BadValue {
                field: "parallel.partition",
                value: s.to_string(),
                reason: "unknown partition method".into(),
                fix: "use one of uniform, parameters, flops, profile, optimal".into(),
            })
    }
}

/// Per-node inputs of the exact solver.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChainCosts {
    /// The objective weight of each node (seconds, FLOPs, parameters…), non-negative.
    pub cost: Vec<f64>,
    /// Bytes held regardless of microbatches (weights, gradients, optimizer state).
    pub static_bytes: Vec<u64>,
    /// Bytes stashed per microbatch in flight.
    pub act_bytes: Vec<u64>,
    /// Nodes of which every stage needs at least one (transformer blocks).
    pub required: Vec<bool>,
}

/// A per-stage memory cap: stage `k` may hold at most `cap` bytes, counting
/// `in_flight[k]` microbatches of activations.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryCap {
    pub cap: u64,
    pub in_flight: Vec<u64>,
}

/// Why the solver found no split.
#[derive(Clone, Debug, PartialEq)]
pub enum NoSplit {
    /// Fewer required nodes than stages.
    TooManyStages { required: usize },
    /// No split fits the cap; `stage` is the worst stage of the split that minimises the
    /// largest memory/cap excess, needing `need` bytes.
    OverCap { stage: usize, need: u64 },
}

/// Reachable flags per stage count, and `hi[k][i]` per stage.
type Reach = (Vec<Vec<bool>>, Vec<Vec<usize>>);

struct Prefix {
    cost: Vec<f64>,
    stat: Vec<u64>,
    act: Vec<u64>,
    /// next_req[i]: index of the first required node at or after i (n if none).
    next_req: Vec<usize>,
}

impl Prefix {
    fn new(c: &ChainCosts) -> Prefix {
        let n = c.cost.len();
        let mut p = Prefix {
            cost: vec![0.0; n + 1],
            stat: vec![0; n + 1],
            act: vec![0; n + 1],
            next_req: vec![n; n + 1],
        };
        for i in 0..n {
            p.cost[i + 1] = p.cost[i] + c.cost[i];
            p.stat[i + 1] = p.stat[i] + c.static_bytes.get(i).copied().unwrap_or(0);
            p.act[i + 1] = p.act[i] + c.act_bytes.get(i).copied().unwrap_or(0);
        }
        for i in (0..n).rev() {
            p.next_req[i] = if c.required[i] { i } else { p.next_req[i + 1] };
        }
        p
    }
    fn mem(&self, i: usize, j: usize, in_flight: u64) -> u64 {
        (self.stat[j] - self.stat[i]) + in_flight * (self.act[j] - self.act[i])
    }
}

/// Reachability for a bound: `fits(k, i, j)` must be monotone (true for `(i, j)` implies
/// true for `(i', j')` with `i ≤ i' < j' ≤ j`). Returns, when the chain end is reachable in
/// `stages` stages, the reachable flags per stage count and `hi[k][i]` (both empty unless
/// `keep`, which backtracking needs).
fn reach(
    p: &Prefix,
    stages: usize,
    fits: &impl Fn(usize, usize, usize) -> bool,
    keep: bool,
) -> Option<Reach> {
    let n = p.next_req.len() - 1;
    let mut kept_reach = Vec::new();
    let mut kept_his = Vec::new();
    let mut cur = vec![false; n + 1];
    let mut next = vec![false; n + 1];
    let mut his = vec![0usize; n + 1];
    cur[0] = true;
    let (mut first, mut last) = (0usize, 0usize);
    let mut diff = vec![0i32; n + 2];
    for k in 0..stages {
        diff[first..].iter_mut().for_each(|d| *d = 0);
        let mut j = first;
        let (mut lo_any, mut hi_any) = (usize::MAX, 0usize);
        for i in first..=last.min(n - 1) {
            // hi_k(i): largest j > i with fits(k, i, j), or i if none.
            if j < i {
                j = i;
            }
            while j < n && fits(k, i, j + 1) {
                j += 1;
            }
            his[i] = j;
            if !cur[i] {
                continue;
            }
            let lo = p.next_req[i] + 1;
            if lo <= j {
                diff[lo] += 1;
                diff[j + 1] -= 1;
                lo_any = lo_any.min(lo);
                hi_any = hi_any.max(j);
            }
        }
        if lo_any == usize::MAX {
            return None;
        }
        next.iter_mut().for_each(|r| *r = false);
        let mut run = 0;
        for pos in lo_any..=hi_any {
            run += diff[pos];
            next[pos] = run > 0;
        }
        if keep {
            kept_reach.push(cur.clone());
            kept_his.push(his.clone());
        }
        std::mem::swap(&mut cur, &mut next);
        (first, last) = (lo_any, hi_any);
    }
    if !cur[n] {
        return None;
    }
    if keep {
        kept_reach.push(cur);
    }
    Some((kept_reach, kept_his))
}

fn backtrack(p: &Prefix, stages: usize, reachable: &[Vec<bool>], his: &[Vec<usize>]) -> Bounds {
    let n = p.next_req.len() - 1;
    let mut bounds = vec![n];
    let mut j = n;
    for k in (0..stages).rev() {
        let i = (0..j)
            .rev()
            .find(|&i| reachable[k][i] && p.next_req[i] < j && j <= his[k][i])
            .expect("a reachable end has a reachable predecessor");
        bounds.push(i);
        j = i;
    }
    bounds.reverse();
    bounds
}

/// Smallest `T` (by bisection over `f64` bit patterns) for which `feasible(T)` holds,
/// given that `feasible(upper)` does.
fn bisect(upper: f64, feasible: impl Fn(f64) -> bool) -> f64 {
    if feasible(0.0) {
        return 0.0;
    }
    let (mut lo, mut hi) = (0u64, upper.to_bits());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if feasible(f64::from_bits(mid)) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    f64::from_bits(hi)
}

/// The exact min-max contiguous split of `chain` into `stages` stages, each holding a
/// required node, with stage memory under `cap` when given.
pub fn optimal_split(
    chain: &ChainCosts,
    stages: usize,
    cap: Option<&MemoryCap>,
) -> std::result::Result<Bounds, NoSplit> {
    let required = chain.required.iter().filter(|&&r| r).count();
    if stages == 0 || stages > required {
        return Err(NoSplit::TooManyStages { required });
    }
    let p = Prefix::new(chain);
    let p = &p;
    let n = chain.cost.len();
    let mem_ok = |k: usize, i: usize, j: usize| match cap {
        None => true,
        Some(c) => p.mem(i, j, c.in_flight.get(k).copied().unwrap_or(1)) <= c.cap,
    };
    let upper = p.cost[n].max(0.0);
    let mem_ok = &mem_ok;
    let fits_at =
        |t: f64| move |k: usize, i: usize, j: usize| p.cost[j] - p.cost[i] <= t && mem_ok(k, i, j);
    if reach(p, stages, &fits_at(upper), false).is_none() {
        let cap = cap.expect("without a cap every split with a block per stage is feasible");
        return Err(min_peak_memory(p, stages, cap));
    }
    let t = bisect(upper, |t| reach(p, stages, &fits_at(t), false).is_some());
    let Some(cap) = cap else {
        let (reachable, his) =
            reach(p, stages, &fits_at(t), true).expect("bisection keeps hi feasible");
        return Ok(backtrack(p, stages, &reachable, &his));
    };
    // Second objective: among the time-optimal splits, the smallest peak stage memory.
    let flight = |k: usize| cap.in_flight.get(k).copied().unwrap_or(1);
    let flight = &flight;
    let mem_upper = (0..stages)
        .map(|k| p.mem(0, n, flight(k)).min(cap.cap) as f64)
        .fold(0.0, f64::max);
    let fits_mem = |m: f64| {
        move |k: usize, i: usize, j: usize| {
            p.cost[j] - p.cost[i] <= t && mem_ok(k, i, j) && p.mem(i, j, flight(k)) as f64 <= m
        }
    };
    let m = bisect(mem_upper, |m| {
        reach(p, stages, &fits_mem(m), false).is_some()
    });
    let (reachable, his) =
        reach(p, stages, &fits_mem(m), true).expect("bisection keeps hi feasible");
    Ok(backtrack(p, stages, &reachable, &his))
}

/// The split minimising the largest `memory − cap` excess; reports its worst stage.
fn min_peak_memory(p: &Prefix, stages: usize, cap: &MemoryCap) -> NoSplit {
    let n = p.next_req.len() - 1;
    let flight = |k: usize| cap.in_flight.get(k).copied().unwrap_or(1);
    let upper = (0..stages)
        .map(|k| p.mem(0, n, flight(k)) as f64)
        .fold(0.0, f64::max);
    let flight = &flight;
    let fits_at = |t: f64| move |k: usize, i: usize, j: usize| p.mem(i, j, flight(k)) as f64 <= t;
    let t = bisect(upper, |t| reach(p, stages, &fits_at(t), false).is_some());
    let (reachable, his) = reach(p, stages, &fits_at(t), true).expect("feasible at the optimum");
    let bounds = backtrack(p, stages, &reachable, &his);
    let (stage, need) = bounds
        .windows(2)
        .enumerate()
        .map(|(k, w)| (k, p.mem(w[0], w[1], flight(k))))
        .max_by_key(|&(_, m)| m)
        .expect("at least one stage");
    NoSplit::OverCap { stage, need }
}

/// Equal numbers of required nodes per stage (the first `r` stages get one more when
/// they do not divide), non-required nodes attached to the stage before them (leading
/// ones to stage 0).
pub fn uniform_split(required: &[bool], stages: usize) -> std::result::Result<Bounds, NoSplit> {
    let idx: Vec<usize> = (0..required.len()).filter(|&i| required[i]).collect();
    if stages == 0 || stages > idx.len() {
        return Err(NoSplit::TooManyStages {
            required: idx.len(),
        });
    }
    let (q, r) = (idx.len() / stages, idx.len() % stages);
    let mut bounds = vec![0];
    let mut taken = 0;
    for k in 0..stages - 1 {
        taken += q + usize::from(k < r);
        bounds.push(idx[taken]);
    }
    bounds.push(required.len());
    Ok(bounds)
}

/// Splits `graph` into `pp` stages minimising the largest per-stage training FLOPs
/// (forward + backward), exactly.
pub fn balanced_by_flops(graph: &LayerGraph, pp: usize) -> Result<Bounds> {
    let costs: Vec<f64> = graph.nodes.iter().map(|n| n.cost.train_flops()).collect();
    let is_block: Vec<bool> = graph.nodes.iter().map(|n| n.kind.is_block()).collect();
    min_max_split(&costs, &is_block, pp, graph.n_blocks())
}

/// Exact min-max contiguous split of `costs` into `pp` parts, each containing at least
/// one node flagged in `required`.
pub fn min_max_split(
    costs: &[f64],
    required: &[bool],
    pp: usize,
    n_required: usize,
) -> Result<Bounds> {
    if pp == 0 {
        return Err(Error::NotPositive {
            field: "parallel.pp",
            value: 0,
        });
    }
    let chain = ChainCosts {
        cost: costs.to_vec(),
        static_bytes: vec![0; costs.len()],
        act_bytes: vec![0; costs.len()],
        required: required.to_vec(),
    };
    optimal_split(&chain, pp, None).map_err(|_| Error::TooManyStages {
        pp,
        n_layers: n_required,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Every split of `n` nodes into `parts` non-empty contiguous parts, as bounds.
    fn all_splits(n: usize, parts: usize) -> Vec<Bounds> {
        fn rec(start: usize, n: usize, left: usize, cur: &mut Vec<usize>, out: &mut Vec<Bounds>) {
            if left == 1 {
                cur.push(n);
                out.push(cur.clone());
                cur.pop();
                return;
            }
            for end in start + 1..n {
                cur.push(end);
                rec(end, n, left - 1, cur, out);
                cur.pop();
            }
        }
        let mut out = Vec::new();
        if n >= parts && parts > 0 {
            rec(0, n, parts, &mut vec![0], &mut out);
        }
        out
    }

    fn stage_mem(chain: &ChainCosts, cap: &MemoryCap, k: usize, a: usize, b: usize) -> u64 {
        (a..b)
            .map(|i| chain.static_bytes[i] + cap.in_flight[k] * chain.act_bytes[i])
            .sum()
    }

    /// Brute force: the smallest max stage cost over all admissible splits.
    fn brute(chain: &ChainCosts, stages: usize, cap: Option<&MemoryCap>) -> Option<f64> {
        all_splits(chain.cost.len(), stages)
            .into_iter()
            .filter(|b| {
                b.windows(2).enumerate().all(|(k, w)| {
                    chain.required[w[0]..w[1]].iter().any(|&r| r)
                        && cap.is_none_or(|c| stage_mem(chain, c, k, w[0], w[1]) <= c.cap)
                })
            })
            .map(|b| worst(chain, &b))
            .min_by(|a, b| a.total_cmp(b))
    }

    fn worst(chain: &ChainCosts, b: &Bounds) -> f64 {
        b.windows(2)
            .map(|w| chain.cost[w[0]..w[1]].iter().sum::<f64>())
            .fold(0.0, f64::max)
    }

    fn random_chain(rng: &mut XorShift) -> ChainCosts {
        // embed, 1..=7 blocks, head; plus occasionally a non-block in the middle.
        let blocks = 1 + (rng.next() % 7) as usize;
        let mut required = vec![false];
        required.extend(std::iter::repeat_n(true, blocks));
        if rng.next().is_multiple_of(4) {
            let at = 1 + (rng.next() as usize % blocks);
            required.insert(at, false);
        }
        required.push(false);
        let n = required.len();
        ChainCosts {
            cost: (0..n).map(|_| (rng.next() % 20) as f64).collect(),
            static_bytes: (0..n).map(|_| rng.next() % 50).collect(),
            act_bytes: (0..n).map(|_| rng.next() % 10).collect(),
            required,
        }
    }

    #[test]
    fn matches_brute_force_on_pseudo_random_chains() {
        let mut rng = XorShift(0x9e3779b97f4a7c15);
        for _ in 0..300 {
            let chain = random_chain(&mut rng);
            let blocks = chain.required.iter().filter(|&&r| r).count();
            for pp in 1..=blocks {
                let b = min_max_split(&chain.cost, &chain.required, pp, blocks).unwrap();
                assert_eq!(
                    Some(worst(&chain, &b)),
                    brute(&chain, pp, None),
                    "{chain:?} pp={pp}"
                );
                for w in b.windows(2) {
                    assert!(chain.required[w[0]..w[1]].iter().any(|&r| r), "empty stage");
                }
            }
        }
    }

    #[test]
    fn memory_capped_optimal_matches_brute_force() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        let (mut fitted, mut refused) = (0, 0);
        for _ in 0..400 {
            let chain = random_chain(&mut rng);
            let blocks = chain.required.iter().filter(|&&r| r).count();
            for pp in 1..=blocks {
                // 1F1B-like in-flight counts (p - k), or GPipe's m for all.
                let m = 1 + rng.next() % 6;
                let in_flight: Vec<u64> = if rng.next().is_multiple_of(2) {
                    (0..pp).map(|k| ((pp - k) as u64).min(m)).collect()
                } else {
                    vec![m; pp]
                };
                let cap = MemoryCap {
                    cap: 20 + rng.next() % 250,
                    in_flight,
                };
                let expect = brute(&chain, pp, Some(&cap));
                match optimal_split(&chain, pp, Some(&cap)) {
                    Ok(b) => {
                        fitted += 1;
                        assert_eq!(Some(worst(&chain, &b)), expect, "{chain:?} {cap:?}");
                        // Among time-optimal splits under the cap, the least peak memory.
                        let peak = |b: &Bounds| {
                            b.windows(2)
                                .enumerate()
                                .map(|(k, w)| stage_mem(&chain, &cap, k, w[0], w[1]))
                                .max()
                                .unwrap()
                        };
                        let best_peak = all_splits(chain.cost.len(), pp)
                            .into_iter()
                            .filter(|s| {
                                s.windows(2).enumerate().all(|(k, w)| {
                                    chain.required[w[0]..w[1]].iter().any(|&r| r)
                                        && stage_mem(&chain, &cap, k, w[0], w[1]) <= cap.cap
                                }) && Some(worst(&chain, s)) == expect
                            })
                            .map(|s| peak(&s))
                            .min();
                        assert_eq!(Some(peak(&b)), best_peak, "{chain:?} {cap:?}");
                        assert_eq!((b[0], *b.last().unwrap()), (0, chain.cost.len()));
                        for (k, w) in b.windows(2).enumerate() {
                            assert!(w[0] < w[1]);
                            assert!(chain.required[w[0]..w[1]].iter().any(|&r| r), "empty");
                            assert!(
                                stage_mem(&chain, &cap, k, w[0], w[1]) <= cap.cap,
                                "over cap"
                            );
                        }
                    }
                    Err(NoSplit::OverCap { stage, need }) => {
                        refused += 1;
                        assert_eq!(expect, None, "{chain:?} {cap:?}");
                        assert!(need > cap.cap && stage < pp);
                        // `need` is the best achievable peak: no split does better.
                        let best_peak = all_splits(chain.cost.len(), pp)
                            .into_iter()
                            .filter(|b| {
                                b.windows(2)
                                    .all(|w| chain.required[w[0]..w[1]].iter().any(|&r| r))
                            })
                            .map(|b| {
                                b.windows(2)
                                    .enumerate()
                                    .map(|(k, w)| stage_mem(&chain, &cap, k, w[0], w[1]))
                                    .max()
                                    .unwrap()
                            })
                            .min()
                            .unwrap();
                        assert_eq!(need, best_peak);
                    }
                    Err(e) => panic!("{e:?}"),
                }
            }
        }
        assert!(
            fitted > 100 && refused > 100,
            "{fitted} fitted, {refused} refused"
        );
    }

    #[test]
    fn uniform_gives_equal_blocks() {
        let mut req = vec![false];
        req.extend(std::iter::repeat_n(true, 10));
        req.push(false);
        let b = uniform_split(&req, 4).unwrap();
        assert_eq!(b, vec![0, 4, 7, 9, 12]);
        assert!(uniform_split(&req, 11).is_err());
    }

    #[test]
    fn too_many_stages_is_an_error_naming_both_numbers() {
        let e = min_max_split(&[1.0, 1.0, 1.0], &[false, true, false], 2, 1).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("parallel.pp = 2") && msg.contains("model.n_layers = 1"),
            "{msg}"
        );
    }

    #[test]
    fn methods_parse_by_name() {
        for m in PartitionMethod::ALL {
            assert_eq!(PartitionMethod::parse(m.name()).unwrap(), m);
        }
        let e = PartitionMethod::parse("greedy").unwrap_err().to_string();
        assert!(e.starts_with("parallel.partition = greedy"), "{e}");
    }
}
