//! Executes one rank's row of a lowered, validated [`Schedule`] for one step.
//!
//! The executor interprets actions literally — it has no schedule-specific control flow —
//! so any schedule that passes validation and simulation in the partitioner runs here:
//! GPipe, 1F1B, interleaved 1F1B (several chunks per rank) and zero-bubble (I/W split).
//!
//! * Receives for the whole step are posted up front ([`Communicator::post_recv_tensor`]), in
//!   schedule order, so transfers can land while the rank computes ([`transfer`]).
//! * Activations in flight are stashed by (chunk, microbatch) ([`compute`]).
//! * An [`ActionObserver`] hears of every action's start and end: the data-parallel
//!   overlap ([`crate::dp::overlap`]) starts gradient buckets at a chunk's last backward
//!   action and lets started all-reduces progress (`MPI_Test`) between actions.
//! * `B` runs a chunk's whole backward. `I` runs the input-gradient pass only and stashes
//!   the chunk's [`WeightWork`]; the later `W` runs it. B and I + W leave the same
//!   gradients, on every layout (the same model code runs at tp = 1 and tp > 1).
//!
//! Invariants: every stashed microbatch is consumed by its backward (training) or never
//! stashed (forward-only); received tensors are checked for dtype, shape, chunk and
//! microbatch before use.
//!
//! [`Schedule`]: partitioner::Schedule
//! [`Communicator::post_recv_tensor`]: crate::comm::Communicator::post_recv_tensor
//! [`WeightWork`]: crate::model::tape::WeightWork

mod compute;
mod transfer;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::Model;
use partitioner::{Action, ActionKind, MicrobatchId, Rank, StageId};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tch::Tensor;

/// Where chunks live: chunk `c` is on rank `c % pp`, in slot `c / pp` of that rank.
#[derive(Clone, Copy, Debug)]
pub struct PipelineLayout {
    pub pp: usize,
    pub n_chunks: usize,
}

impl PipelineLayout {
    pub fn rank_of(&self, chunk: usize) -> Rank {
        Rank(chunk % self.pp)
    }
    pub fn slot_of(&self, chunk: usize) -> usize {
        chunk / self.pp
    }
    pub fn is_first(&self, chunk: usize) -> bool {
        chunk == 0
    }
    pub fn is_last(&self, chunk: usize) -> bool {
        chunk + 1 == self.n_chunks
    }
}

/// Per-microbatch data for this rank.
pub struct StepData {
    /// Token ids `[b, s]` per microbatch (rank holding chunk 0 only).
    pub tokens: Vec<Tensor>,
    /// Target ids `[b, s]` per microbatch (rank holding the last chunk only).
    pub targets: Vec<Tensor>,
    /// Shape of the hidden state exchanged between chunks, `[b, s, d]`.
    pub hidden_shape: Vec<i64>,
    /// Dtype of the hidden state exchanged between chunks.
    pub hidden_kind: tch::Kind,
    /// Microbatches in the step (the loss of each is divided by this).
    pub microbatches: usize,
    /// Forward-only steps: keep the last chunk's logits ([`StepStats::logits`]).
    pub keep_logits: bool,
}

/// A timed action, seconds since the step started.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub action: Action,
    pub start: f64,
    pub end: f64,
}

/// What one step on one rank measured.
#[derive(Debug, Default)]
pub struct StepStats {
    /// Sum of microbatch losses (rank holding the last chunk only).
    pub loss_sum: f64,
    /// Most (chunk, microbatch) pairs stashed for backward at once.
    pub peak_stash: usize,
    /// Time in F, B, I and W.
    pub compute_s: f64,
    /// Time waiting in receives.
    pub wait_s: f64,
    /// Wall-clock time (µs since the Unix epoch) at which the step started.
    pub start_unix_us: f64,
    pub spans: Vec<Span>,
    /// With [`StepData::keep_logits`]: (microbatch, this rank's logits `[b, s, n_local]`)
    /// on the rank holding the last chunk.
    pub logits: Vec<(usize, Tensor)>,
}

type Key = (StageId, MicrobatchId);

/// One step's execution context on one rank.
pub(crate) struct Step<'a> {
    pub chunks: &'a [Model],
    pub comm: &'a mut dyn Communicator,
    pub tp: &'a mut dyn Communicator,
    pub layout: PipelineLayout,
    pub data: &'a StepData,
    pub training: bool,
    /// Zero-bubble schedules split the backward: forwards prepare for `I` and `W`.
    pub split_backward: bool,
    pub state: compute::State,
}

/// An error for a schedule that asks for something that is not there.
pub(crate) fn bug(what: &str, a: &Action) -> Error {
    Error::Internal(format!("{a}: no {what} (schedule bug)"))
}

/// Told before and after each action of a row (by its index in the row), on the thread
/// running it: the data-parallel overlap ([`crate::dp::GradSync`]) starts gradient
/// buckets from here and lets started collectives progress between actions.
pub trait ActionObserver {
    fn before(&self, index: usize) -> Result<()>;
    fn after(&self, index: usize) -> Result<()>;
}

/// Runs `actions` (this rank's lowered row) with `chunks[slot]` the model of each local
/// chunk; `tp` is the tensor-parallel group (of one rank without tensor parallelism). With
/// `training` false the schedule must be forward-only and nothing is stashed or
/// differentiated.
pub fn run_actions(
    actions: &[Action],
    chunks: &[Model],
    comm: &mut dyn Communicator,
    tp: &mut dyn Communicator,
    layout: PipelineLayout,
    data: &StepData,
    training: bool,
) -> Result<StepStats> {
    run_observed(actions, chunks, comm, tp, layout, data, training, None)
}

/// [`run_actions`], telling `observer` about every action.
#[allow(clippy::too_many_arguments)]
pub fn run_observed(
    actions: &[Action],
    chunks: &[Model],
    comm: &mut dyn Communicator,
    tp: &mut dyn Communicator,
    layout: PipelineLayout,
    data: &StepData,
    training: bool,
    observer: Option<&dyn ActionObserver>,
) -> Result<StepStats> {
    let t0 = Instant::now();
    let mut stats = StepStats {
        start_unix_us: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6),
        ..StepStats::default()
    };
    let mut step = Step {
        chunks,
        comm,
        tp,
        layout,
        data,
        training,
        split_backward: actions.iter().any(|a| a.kind == ActionKind::InputGrad),
        state: compute::State::default(),
    };
    transfer::post_receives(&mut step, actions)?;
    for (i, a) in actions.iter().enumerate() {
        let start = t0.elapsed().as_secs_f64();
        // The flight recorder's event for this action (left open if the action fails).
        let flight = step.comm.flight().map(|f| f.action(*a, !training));
        if let Some(o) = observer {
            o.before(i)?;
        }
        match a.kind {
            ActionKind::RecvAct | ActionKind::RecvGrad => transfer::recv(&mut step, a)?,
            ActionKind::SendAct | ActionKind::SendGrad => transfer::send(&mut step, a)?,
            ActionKind::Forward => stats.loss_sum += compute::forward(&mut step, a)?,
            ActionKind::Backward | ActionKind::InputGrad => compute::backward(&mut step, a)?,
            ActionKind::WeightGrad => compute::weight_grad(&mut step, a)?,
        }
        if let Some(f) = flight {
            f.end();
        }
        if let Some(o) = observer {
            o.after(i)?;
        }
        stats.peak_stash = stats.peak_stash.max(step.state.stashed());
        let end = t0.elapsed().as_secs_f64();
        if a.kind.is_compute() {
            stats.compute_s += end - start;
        } else if matches!(a.kind, ActionKind::RecvAct | ActionKind::RecvGrad) {
            stats.wait_s += end - start;
        }
        stats.spans.push(Span {
            action: *a,
            start,
            end,
        });
    }
    step.state.check_done()?;
    stats.logits = std::mem::take(&mut step.state.logits);
    Ok(stats)
}
