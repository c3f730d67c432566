//! Small timing helpers shared by the calibration measurements: medians, timing a closure,
//! and agreeing on a time across the ranks of a group.
//!
//! Invariant: every helper that talks to a communicator is collective: all ranks of the
//! group call it in the same order.

use crate::comm::{Communicator, ReduceOp};
use crate::error::Result;
use std::time::Instant;

/// The median of `v` (0 for an empty list).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// Seconds `f` takes.
pub fn seconds<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t0 = Instant::now();
    let out = f()?;
    Ok((t0.elapsed().as_secs_f64(), out))
}

/// The largest of every rank's `value` (collective over `comm`).
pub fn max_over(comm: &mut dyn Communicator, value: f64) -> Result<f64> {
    let mut v = [value as f32];
    comm.all_reduce_f32(&mut v, ReduceOp::Max)?;
    Ok(f64::from(v[0]))
}

/// Runs `f` `warmup + runs` times on every rank of `comm`, each time after a barrier, and
/// returns the median over the timed runs of the slowest rank's time (collective).
pub fn collective_median(
    comm: &mut dyn Communicator,
    warmup: usize,
    runs: usize,
    mut f: impl FnMut(&mut dyn Communicator) -> Result<()>,
) -> Result<f64> {
    let mut times = Vec::with_capacity(runs);
    for rep in 0..warmup + runs {
        comm.barrier()?;
        let t0 = Instant::now();
        f(comm)?;
        let dt = max_over(comm, t0.elapsed().as_secs_f64())?;
        if rep >= warmup {
            times.push(dt);
        }
    }
    Ok(median(times))
}
