//! AdamW with decoupled weight decay (Loshchilov & Hutter), written out explicitly so its
//! state is ours to checkpoint, shard and resume, and run on the flat buffers of
//! [`crate::flat`]: a handful of whole-buffer operations per group instead of one set per
//! parameter. Matches `torch.optim.AdamW`:
//!
//! ```text
//! p ← p − lr·λ·p                       (groups with decay)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! p ← p − lr · (m / (1 − β1ᵗ)) / (sqrt(v / (1 − β2ᵗ)) + ε)
//! ```
//!
//! Invariants: every operation is elementwise and separately rounded (no fused
//! multiply-add), so an element's update does not depend on which buffer or position it
//! occupies: every layout updates every parameter bit-identically.

use crate::error::{Error, Result};
use crate::flat::{FlatBuffers, FlatGroup};
use tch::Tensor;

/// Hyper-parameters of AdamW.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW state: first and second moments, one pair of flat buffers per group.
pub struct AdamW {
    cfg: AdamWConfig,
    step: i32,
    moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    pub fn new(flat: &FlatBuffers, cfg: AdamWConfig) -> Result<AdamW> {
        let moments = flat
            .groups
            .iter()
            .map(|g| {
                let z = || g.params.f_zeros_like().map_err(Error::torch("adamw state"));
                Ok((z()?, z()?))
            })
            .collect::<Result<_>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            moments,
        })
    }

    /// Optimizer steps taken so far (the bias-correction exponent).
    pub fn steps_taken(&self) -> i32 {
        self.step
    }

    /// Restores the step count (resuming from a checkpoint).
    pub fn set_steps_taken(&mut self, step: i32) {
        self.step = step;
    }

    /// The first and second moments of group `g`'s member `m` (views into the state), for
    /// checkpoints.
    pub fn moments_of(&self, flat: &FlatBuffers, g: usize, m: usize) -> Result<(Tensor, Tensor)> {
        let member = &flat.groups[g].members[m];
        let (exp_avg, exp_avg_sq) = &self.moments[g];
        Ok((
            FlatGroup::slice(exp_avg, member)?,
            FlatGroup::slice(exp_avg_sq, member)?,
        ))
    }

    /// Applies one update with learning rate `lr` and zeroes the gradients.
    pub fn step(&mut self, flat: &FlatBuffers, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step);
        let bc2 = 1.0 - c.beta2.powi(self.step);
        tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
            for (g, (m, v)) in flat.groups.iter().zip(self.moments.iter_mut()) {
                let (mut w, mut grad) = (g.params.shallow_clone(), g.grads.shallow_clone());
                if g.decay && c.weight_decay > 0.0 {
                    let _ = w.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
                }
                let _ = m
                    .f_mul_scalar_(c.beta1)?
                    .f_add_(&grad.f_mul_scalar(1.0 - c.beta1)?)?;
                let _ = v
                    .f_mul_scalar_(c.beta2)?
                    .f_add_(&grad.f_square()?.f_mul_scalar_(1.0 - c.beta2)?)?;
                let mut denom = v.f_div_scalar(bc2)?;
                let _ = denom.f_sqrt_()?.f_add_scalar_(c.eps)?;
                let mut update = m.f_div_scalar(bc1)?;
                let _ = update.f_div_(&denom)?.f_mul_scalar_(lr)?;
                let _ = w.f_sub_(&update)?;
                let _ = grad.f_zero_()?;
            }
            Ok(())
        })
        .map_err(Error::torch("adamw step"))
    }
}
