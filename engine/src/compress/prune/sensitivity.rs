//! Sensitivity pruning (the founding brief's method): scan each pruned weight's
//! validation-loss increase at several sparsities (that weight alone magnitude-pruned,
//! every other weight dense), then give each weight the sparsity that meets the global
//! target at the least total increase.
//!
//! The allocation treats the increases as additive and solves the resulting
//! multiple-choice knapsack exactly by dynamic programming over pruned entries counted in
//! 1/[`UNITS`] of the total; rounding is repaired by raising the cheapest weight one level
//! until the target is met. Each weight's increase curve is made non-decreasing first (a
//! higher sparsity never counts as cheaper than a lower one).
//!
//! Invariant: the allocation prunes at least `target` of the pruned weights' entries.

use super::select;
use crate::compress::eval::{whole_model, ValSet};
use crate::compress::Trained;
use crate::error::{Error, Result};
use serde::Serialize;
use tch::Tensor;

/// The sparsities each weight is scanned at (0 is the dense model).
pub const LEVELS: [f64; 10] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95];

/// Resolution of the allocation.
const UNITS: usize = 2000;

/// The scan of every pruned weight.
#[derive(Clone, Debug, Serialize)]
pub struct Scan {
    pub names: Vec<String>,
    pub params: Vec<usize>,
    /// Validation loss of the dense model.
    pub base_loss: f64,
    /// `increase[w][j]`: loss increase with weight `w` alone at `LEVELS[j]`.
    pub increase: Vec<Vec<f64>>,
    /// The sparsity given to each weight (after [`Scan::allocate`]).
    pub chosen: Vec<f64>,
}

/// Scans every weight of `names` (whose dense values are `weights`) on `batches`
/// validation batches.
pub fn scan(t: &Trained, names: &[String], weights: &[Tensor], batches: usize) -> Result<Scan> {
    let val = ValSet::load(t, batches, "--method sensitivity")?;
    let model = whole_model(t)?;
    let base_loss = val.loss(&model)?;
    let mut increase = Vec::with_capacity(names.len());
    for (name, w) in names.iter().zip(weights) {
        let p = model
            .params()
            .iter()
            .find(|p| &p.name == name)
            .ok_or_else(|| Error::Internal(format!("{name} is not a parameter")))?;
        let mut row = Vec::with_capacity(LEVELS.len());
        for &s in &LEVELS {
            let mask = select::magnitude(w, s)?;
            set(&p.tensor, &w.f_mul(&mask).map_err(Error::torch("masking"))?)?;
            row.push(val.loss(&model)? - base_loss);
        }
        set(&p.tensor, w)?;
        increase.push(row);
    }
    Ok(Scan {
        names: names.to_vec(),
        params: weights.iter().map(Tensor::numel).collect(),
        base_loss,
        increase,
        chosen: Vec::new(),
    })
}

fn set(dst: &Tensor, src: &Tensor) -> Result<()> {
    tch::no_grad(|| dst.shallow_clone().f_copy_(src)).map_err(Error::torch("setting a weight"))
}

impl Scan {
    /// Non-decreasing, non-negative cost of weight `w` at level `j` (0 = dense).
    fn cost(&self, w: usize, j: usize) -> f64 {
        if j == 0 {
            return 0.0;
        }
        self.increase[w][..j].iter().fold(0.0f64, |a, &b| a.max(b))
    }

    fn sparsity(j: usize) -> f64 {
        if j == 0 {
            0.0
        } else {
            LEVELS[j - 1]
        }
    }

    /// The sparsity of each weight that prunes at least `target` of all entries at the
    /// least total increase.
    pub fn allocate(&self, target: f64) -> Vec<f64> {
        let total: usize = self.params.iter().sum();
        let n = LEVELS.len() + 1;
        let units = |w: usize, j: usize| {
            ((Self::sparsity(j) * self.params[w] as f64 / total as f64) * UNITS as f64).round()
                as usize
        };
        let goal = ((target * UNITS as f64).ceil() as usize).min(UNITS);
        // best[u]: least cost reaching min(u, goal) units; choice per weight for backtracking.
        let mut best = vec![f64::INFINITY; goal + 1];
        best[0] = 0.0;
        let mut picks: Vec<Vec<usize>> = Vec::with_capacity(self.params.len());
        for w in 0..self.params.len() {
            let mut next = vec![f64::INFINITY; goal + 1];
            let mut pick = vec![0usize; goal + 1];
            for (u, &c) in best.iter().enumerate().filter(|(_, c)| c.is_finite()) {
                for j in 0..n {
                    let v = (u + units(w, j)).min(goal);
                    let cost = c + self.cost(w, j);
                    if cost < next[v] {
                        next[v] = cost;
                        pick[v] = j * (goal + 1) + u;
                    }
                }
            }
            best = next;
            picks.push(pick);
        }
        let mut levels = vec![0usize; self.params.len()];
        let mut u = goal;
        for w in (0..self.params.len()).rev() {
            let p = picks[w][u];
            levels[w] = p / (goal + 1);
            u = p % (goal + 1);
        }
        self.repair(&mut levels, target, total);
        levels.into_iter().map(Self::sparsity).collect()
    }

    /// Raises the cheapest weight one level until `target` is met exactly.
    fn repair(&self, levels: &mut [usize], target: f64, total: usize) {
        let pruned = |levels: &[usize]| -> f64 {
            levels
                .iter()
                .zip(&self.params)
                .map(|(&j, &p)| Self::sparsity(j) * p as f64)
                .sum::<f64>()
                / total as f64
        };
        while pruned(levels) + 1e-12 < target {
            let up = (0..levels.len())
                .filter(|&w| levels[w] < LEVELS.len())
                .min_by(|&a, &b| {
                    let d = |w: usize| self.cost(w, levels[w] + 1) - self.cost(w, levels[w]);
                    d(a).total_cmp(&d(b))
                });
            match up {
                Some(w) => levels[w] += 1,
                None => break,
            }
        }
    }

    /// The per-weight table: params, increase at every level, chosen sparsity.
    pub fn table(&self) -> String {
        let mut s = format!("{:<28} {:>9}", "weight", "params");
        for l in LEVELS {
            s.push_str(&format!(" {:>7}", format!("@{:.0}%", l * 100.0)));
        }
        s.push_str(&format!(" {:>8}\n", "chosen"));
        for (w, name) in self.names.iter().enumerate() {
            s.push_str(&format!("{name:<28} {:>9}", self.params[w]));
            for d in &self.increase[w] {
                s.push_str(&format!(" {d:>+7.4}"));
            }
            let c = self.chosen.get(w).copied().unwrap_or(0.0);
            s.push_str(&format!(" {:>7.0}%\n", c * 100.0));
        }
        s.push_str(&format!(
            "(validation-loss increase with that weight alone pruned; dense validation loss {:.4})",
            self.base_loss
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(increase: Vec<Vec<f64>>, params: Vec<usize>) -> Scan {
        Scan {
            names: (0..params.len()).map(|i| format!("w{i}")).collect(),
            params,
            base_loss: 1.0,
            increase,
            chosen: Vec::new(),
        }
    }

    #[test]
    fn allocation_meets_the_target_at_least_cost() {
        // Weight 0 is insensitive, weight 1 sensitive: 50% overall goes mostly to 0.
        let cheap: Vec<f64> = LEVELS.iter().map(|s| 0.01 * s).collect();
        let dear: Vec<f64> = LEVELS.iter().map(|s| 1.0 * s * s).collect();
        let s = scan(vec![cheap, dear], vec![1000, 1000]);
        let c = s.allocate(0.5);
        let reached = (c[0] * 1000.0 + c[1] * 1000.0) / 2000.0;
        assert!(reached >= 0.5 - 1e-12, "{c:?}");
        assert_eq!(c, vec![0.9, 0.1], "{c:?}");
        // Equal curves split evenly.
        let same: Vec<f64> = LEVELS.iter().map(|s| s * s).collect();
        let s = scan(vec![same.clone(), same], vec![500, 500]);
        assert_eq!(s.allocate(0.5), vec![0.5, 0.5]);
    }
}
