//! The learning-rate schedule: linear warm-up, then constant or cosine decay to `min_lr`.
//!
//! Invariant: a pure function of (config, step), so a resumed run continues it exactly.

use crate::config::{Config, LrSchedule};

/// The learning rate of `step` (1-based).
pub fn lr_at(cfg: &Config, step: usize) -> f64 {
    let t = &cfg.train;
    if t.warmup_steps > 0 && step <= t.warmup_steps {
        return t.lr * step as f64 / t.warmup_steps as f64;
    }
    match t.lr_schedule {
        LrSchedule::Constant => t.lr,
        LrSchedule::Cosine => {
            let min_lr = t.min_lr.unwrap_or(t.lr / 10.0);
            let span = (*t.steps).saturating_sub(t.warmup_steps).max(1) as f64;
            let progress = ((step - t.warmup_steps.min(step)) as f64 / span).min(1.0);
            min_lr + 0.5 * (t.lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}
