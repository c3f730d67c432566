//! Contiguous pipeline splits of a [`LayerGraph`].
//!
//! Invariants of every split returned here: stages are contiguous, cover every node
//! exactly once, keep graph order (so the embedding is on stage 0 and the head on the
//! last stage), and every stage holds at least one transformer block.

use crate::error::{Error, Result};
use crate::graph::{LayerGraph, LayerKind};

/// Stage boundaries: stage `i` owns nodes `bounds[i]..bounds[i + 1]`.
pub type Bounds = Vec<usize>;

/// Splits `graph` into `pp` stages minimising the largest per-stage training FLOPs
/// (forward + backward), by dynamic programming over all contiguous splits in which each
/// stage holds at least one block. Exact: `O(pp · n²)` for `n` nodes.
pub fn balanced_by_flops(graph: &LayerGraph, pp: usize) -> Result<Bounds> {
    let costs: Vec<f64> = graph.nodes.iter().map(|n| n.cost.train_flops()).collect();
    let is_block: Vec<bool> = graph
        .nodes
        .iter()
        .map(|n| matches!(n.kind, LayerKind::Block(_)))
        .collect();
    min_max_split(&costs, &is_block, pp, graph.shape.n_layers)
}

/// Exact min-max contiguous split of `costs` into `pp` parts, each containing at least
/// one node flagged in `required`. Ties go to the split whose cut points come first.
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
    if pp > n_required {
        return Err(Error::TooManyStages {
            pp,
            n_layers: n_required,
        });
    }
    let n = costs.len();
    let mut prefix = vec![0.0; n + 1];
    let mut req_prefix = vec![0usize; n + 1];
    for i in 0..n {
        prefix[i + 1] = prefix[i] + costs[i];
        req_prefix[i + 1] = req_prefix[i] + required[i] as usize;
    }
    let seg = |i: usize, j: usize| prefix[j] - prefix[i];
    let ok = |i: usize, j: usize| req_prefix[j] > req_prefix[i];
    // best[k][j]: minimal max-cost splitting nodes 0..j into k stages; arg[k][j]: last cut.
    let inf = f64::INFINITY;
    let mut best = vec![vec![inf; n + 1]; pp + 1];
    let mut arg = vec![vec![usize::MAX; n + 1]; pp + 1];
    best[0][0] = 0.0;
    for k in 1..=pp {
        for j in 1..=n {
            for i in (k - 1)..j {
                if best[k - 1][i] == inf || !ok(i, j) {
                    continue;
                }
                let c = best[k - 1][i].max(seg(i, j));
                if c < best[k][j] {
                    best[k][j] = c;
                    arg[k][j] = i;
                }
            }
        }
    }
    if best[pp][n] == inf {
        return Err(Error::TooManyStages {
            pp,
            n_layers: n_required,
        });
    }
    let mut bounds = vec![n];
    let mut j = n;
    for k in (1..=pp).rev() {
        j = arg[k][j];
        bounds.push(j);
    }
    bounds.reverse();
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over all cut positions.
    fn brute(costs: &[f64], required: &[bool], pp: usize) -> Option<f64> {
        let n = costs.len();
        fn rec(
            costs: &[f64],
            required: &[bool],
            start: usize,
            left: usize,
            worst: f64,
            best: &mut Option<f64>,
        ) {
            let n = costs.len();
            if left == 1 {
                if required[start..n].iter().any(|&r| r) {
                    let c: f64 = costs[start..n].iter().sum();
                    let w = worst.max(c);
                    if best.is_none_or(|b| w < b) {
                        *best = Some(w);
                    }
                }
                return;
            }
            for end in start + 1..n {
                if required[start..end].iter().any(|&r| r) {
                    let c: f64 = costs[start..end].iter().sum();
                    rec(costs, required, end, left - 1, worst.max(c), best);
                }
            }
        }
        let mut best = None;
        if n > 0 {
            rec(costs, required, 0, pp, 0.0, &mut best);
        }
        best
    }

    #[test]
    fn matches_brute_force_on_pseudo_random_chains() {
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..300 {
            let blocks = 1 + (next() % 7) as usize;
            let mut costs = vec![(next() % 5) as f64];
            costs.extend((0..blocks).map(|_| (1 + next() % 20) as f64));
            costs.push((next() % 30) as f64);
            let mut required = vec![false];
            required.extend(std::iter::repeat_n(true, blocks));
            required.push(false);
            for pp in 1..=blocks {
                let b = min_max_split(&costs, &required, pp, blocks).unwrap();
                let worst = b
                    .windows(2)
                    .map(|w| costs[w[0]..w[1]].iter().sum::<f64>())
                    .fold(0.0, f64::max);
                assert_eq!(
                    Some(worst),
                    brute(&costs, &required, pp),
                    "{costs:?} pp={pp}"
                );
                for w in b.windows(2) {
                    assert!(required[w[0]..w[1]].iter().any(|&r| r), "empty stage");
                }
            }
        }
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
}
