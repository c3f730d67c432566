//! Preemption: SIGTERM or SIGINT (a scheduler preempting the job, Ctrl-C) asks the job to
//! stop cleanly. The signal only sets a [`StopFlag`]; at the next step boundary every rank
//! all-reduces its flag over the world (MAX), so all ranks agree on the step at which they
//! stop even when the signal reached some of them a step late; the training loop ORs the
//! answer into its `stop` flag, so the job checkpoints (`trainer::Checkpointer`) and
//! exits 0 with "preempted at step N; checkpoint saved to DIR; resume with ...". A second
//! signal exits at once (see the worker).
//!
//! Invariant: every rank calls [`stop_agreed`] at the same step boundaries (it is a
//! collective on the world).

use crate::comm::{Communicator, ReduceOp};
use crate::error::Result;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set by a signal handler; read at step boundaries.
pub type StopFlag = Arc<AtomicBool>;

/// True on every rank if any rank's `flag` is set (collective over `world`). Without a
/// flag (in-process runs) nothing is exchanged and the answer is no.
pub fn stop_agreed(flag: Option<&StopFlag>, world: &mut dyn Communicator) -> Result<bool> {
    let Some(flag) = flag else {
        return Ok(false);
    };
    let mut v = [if flag.load(Ordering::SeqCst) {
        1.0
    } else {
        0.0
    }];
    world.all_reduce_f32(&mut v, ReduceOp::Max)?;
    Ok(v[0] > 0.0)
}

/// The message of a job stopped at a step boundary after `step` completed steps, with the
/// checkpoint saved there (none when the run writes no files).
pub fn preempted_message(step: usize, checkpoint: Option<&Path>) -> String {
    match checkpoint {
        Some(dir) => format!(
            "preempted at step {step}; checkpoint saved to {}; resume with `train.resume: latest` in the config and the same `strata launch`",
            dir.display()
        ),
        None => format!("preempted at step {step}; no checkpoint was written (the run writes no files), so a rerun starts from step 0"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::on_ranks;

    #[test]
    fn one_rank_signalled_stops_every_rank() {
        let ranks = on_ranks(3, |r, c| {
            let flag: StopFlag = Arc::new(AtomicBool::new(r == 2));
            Ok((stop_agreed(None, c)?, stop_agreed(Some(&flag), c)?))
        });
        for agreed in ranks {
            assert_eq!(agreed.unwrap(), (false, true));
        }
    }
}
