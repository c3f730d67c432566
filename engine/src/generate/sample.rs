//! Choosing the next token from a row of logits: greedy, or sampled with temperature,
//! top-k and top-p (nucleus) filtering, from Strata's own seeded generator.
//!
//! Invariants: the draw for token `t` of prompt `p` comes from the stream keyed by
//! `(seed, p, t)` alone ([`crate::rng::Rng::from_key`]), never from libtorch's global
//! generator, so the same `--seed` gives the same text on any layout, microbatching or
//! number of prompts; greedy picks the lowest id among equal maxima (as `torch.argmax`).

use crate::error::{Error, Result};
use crate::rng::Rng;

/// How tokens are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 is greedy; otherwise logits are divided by it before the softmax.
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (None: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches `p`.
    pub top_p: Option<f64>,
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
        }
    }
}

impl Sampling {
    pub fn greedy() -> Sampling {
        Sampling::default()
    }

    /// Checks the knobs; errors name the flag and the fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, problem: String, fix: &str| Error::usage(flag, problem, fix);
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(bad(
                "--temperature",
                format!("{} is not a finite number >= 0", self.temperature),
                "use 0 for greedy decoding or a positive temperature such as 0.8",
            ));
        }
        if self.top_k == Some(0) {
            return Err(bad(
                "--top-k",
                "0 keeps no token".into(),
                "use a positive k, or leave --top-k out to keep every token",
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(bad(
                    "--top-p",
                    format!("{p} is outside (0, 1]"),
                    "use a probability such as 0.9, or leave --top-p out",
                ));
            }
        }
        Ok(())
    }

    /// The next token of prompt `prompt` at generated position `t` from `logits`.
    pub fn pick(&self, logits: &[f32], prompt: usize, t: usize) -> usize {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let mut rng = Rng::from_key(&[self.seed, prompt as u64, t as u64]);
        self.draw(logits, rng.uniform())
    }

    /// The token at cumulative probability `u` of the filtered distribution.
    fn draw(&self, logits: &[f32], u: f64) -> usize {
        let inv_t = 1.0 / self.temperature;
        // Candidates by descending logit (ties: lower id first), then top-k.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if let Some(k) = self.top_k {
            order.truncate(k.max(1));
        }
        let top = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - top) * inv_t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if let Some(p) = self.top_p {
            // The smallest prefix whose mass reaches p (at least one token).
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, q) in probs.iter().enumerate() {
                mass += q;
                if mass >= p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let target = u * total;
        let mut acc = 0.0;
        for (&id, q) in order.iter().zip(&probs) {
            acc += q;
            if target < acc {
                return id;
            }
        }
        *order.last().unwrap_or(&0)
    }
}

/// Index of the largest value (the first of equal maxima; NaN never wins).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] || xs[best].is_nan() {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> Sampling {
        Sampling {
            temperature,
            top_k,
            top_p,
            seed: 3,
        }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
        assert_eq!(Sampling::greedy().pick(&[0.0, 2.0, 1.0], 0, 0), 1);
    }

    #[test]
    fn filters_keep_the_right_tokens() {
        let logits = [0.0f32, 3.0, 2.0, 1.0];
        // top-k 2 keeps ids 1 and 2 only, whatever the draw.
        let s = sampler(1.0, Some(2), None);
        for u in [0.0, 0.3, 0.7, 0.999] {
            assert!([1, 2].contains(&s.draw(&logits, u)));
        }
        // top-p small keeps the most likely token only.
        let s = sampler(1.0, None, Some(0.1));
        assert_eq!(s.draw(&logits, 0.99), 1);
        // Without filters the draw walks the sorted distribution.
        let s = sampler(1.0, None, None);
        assert_eq!(s.draw(&logits, 0.0), 1);
        assert_eq!(s.draw(&logits, 0.9999), 0);
    }

    #[test]
    fn draws_follow_the_softmax_and_repeat_with_the_seed() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()];
        let s = sampler(1.0, None, None);
        let mut counts = [0usize; 3];
        for t in 0..6000 {
            counts[s.pick(&logits, 0, t)] += 1;
        }
        for (c, want) in counts.iter().zip([1000.0, 2000.0, 3000.0]) {
            assert!((*c as f64 - want).abs() < 150.0, "{counts:?}");
        }
        let a: Vec<usize> = (0..50).map(|t| s.pick(&logits, 4, t)).collect();
        let b: Vec<usize> = (0..50).map(|t| s.pick(&logits, 4, t)).collect();
        assert_eq!(a, b);
        let other = Sampling { seed: 4, ..s };
        let c: Vec<usize> = (0..50).map(|t| other.pick(&logits, 4, t)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn bad_knobs_are_refused_by_flag() {
        let e = sampler(-1.0, None, None)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--temperature") && e.contains("fix:"), "{e}");
        let e = sampler(1.0, Some(0), None)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--top-k"), "{e}");
        let e = sampler(1.0, None, Some(1.5))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--top-p"), "{e}");
    }
}
