//! AdamW with decoupled weight decay (Loshchilov & Hutter), written out explicitly so its
//! state is ours to checkpoint, shard and resume. Matches `torch.optim.AdamW`:
//!
//! ```text
//! p ← p − lr·λ·p                       (only parameters with decay)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! p ← p − lr · (m / (1 − β1ᵗ)) / (sqrt(v / (1 − β2ᵗ)) + ε)
//! ```
//!
//! Invariant: parameters without a gradient are left untouched (their moments too).

use crate::error::{Error, Result};
use crate::model::Param;
use tch::Tensor;

/// Hyper-parameters of AdamW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW state for one stage's parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    step: i32,
    /// First and second moments, parallel to the parameter list.
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(params: &[Param], cfg: AdamWConfig) -> Result<AdamW> {
        let moments = params
            .iter()
            .map(|p| {
                let z = || p.tensor.f_zeros_like().map_err(Error::torch("adamw state"));
                Ok((z()?, z()?))
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            moments,
        })
    }

    /// Applies one update with learning rate `lr` and zeroes the gradients.
    pub fn step(&mut self, params: &[Param], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step);
        let bc2 = 1.0 - c.beta2.powi(self.step);
        let torch = Error::torch("adamw step");
        tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
            for (p, (m, v)) in params.iter().zip(self.moments.iter_mut()) {
                let mut g = p.tensor.grad();
                if !g.defined() {
                    continue;
                }
                let mut w = p.tensor.shallow_clone();
                if p.decay && c.weight_decay > 0.0 {
                    let _ = w.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let _ = m
                    .f_mul_scalar_(c.beta1)?
                    .f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
                let _ = v
                    .f_mul_scalar_(c.beta2)?
                    .f_add_(&g.f_square()?.f_mul_scalar(1.0 - c.beta2)?)?;
                let denom = v.f_div_scalar(bc2)?.f_sqrt()?.f_add_scalar(c.eps)?;
                let update = m.f_div_scalar(bc1)?.f_div(&denom)?.f_mul_scalar(lr)?;
                let _ = w.f_sub_(&update)?;
                let _ = g.f_zero_()?;
            }
            Ok(())
        })
        .map_err(torch)
    }
}

/// Scales every gradient by `factor` (for global-norm clipping).
pub fn scale_grads(params: &[Param], factor: f64) -> Result<()> {
    tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
        for p in params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.f_mul_scalar_(factor)?;
            }
        }
        Ok(())
    })
    .map_err(Error::torch("gradient clipping"))
}
