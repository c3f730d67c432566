//! The memory model: the peak resident memory of each pipeline rank (one device of the
//! tensor- and data-parallel group), broken down into what holds it.
//!
//! ```text
//! peak_r = process + data + weights_r + grads_r + optimizer_r
//!          + max(activations_r + backward_r, optimizer_step_r, dp_reduce_r)
//! ```
//!
//! * `process`: an idle rank (libtorch, MPI, thread pools), measured by `strata profile`
//!   (`calibration.memory.baseline_bytes`), else [`DEFAULT_PROCESS_BYTES`].
//! * `data`: the dataset every rank holds (int64 tokens of both splits).
//! * `weights`, `grads`, `optimizer`: the rank's chunks' parameters (one tensor-parallel
//!   shard), their gradients and AdamW's two moments.
//! * `activations`: the most the rank's schedule holds at once, found by walking its
//!   actions in order: each forward stashes what its chunk's layers keep
//!   ([`crate::activation`], scaled by the measured allocator residency) plus the chunk's
//!   output on non-last chunks (kept for its backward seed), released by its backward; a
//!   zero-bubble `I` trades that for what the `W` needs, released by the `W`. The engine
//!   posts every receive of a step when the step starts, so each receive's buffer is
//!   held from then until that receive completes.
//! * `backward`: the working set of one microbatch's backward: the gradients of one
//!   block's activations while its own are still held, and recomputation
//!   (`selective`/`full`) rebuilding one block's activations: twice one block's full
//!   activation bytes, plus two pipeline messages in transit.
//! * `optimizer_step`: AdamW runs on the flat parameter buffers and holds two temporaries
//!   of a buffer group's size at once (the bias-corrected second moment and the update):
//!   twice the rank's weights at most; `dp_reduce`: the send copy of a data-parallel
//!   bucket (`parallel.dp_bucket_mb`, at most the rank's gradients).
//!
//! Invariant: every figure is in bytes per device; `peak` is their sum as above, and a
//! config whose largest `peak` exceeds the machine cannot run.

use crate::activation::{
    layer_activation_bytes, layer_weight_grad_bytes, ActivationPolicy, ActivationShape,
};
use crate::graph::{LayerGraph, LayerKind};
use crate::plan::StagePlan;
use crate::schedule::{ActionKind, Schedule};
use serde::{Deserialize, Serialize};

/// Resident bytes of an idle CPU rank (libtorch 2.11 and MPICH initialised, one small
/// autograd pass run), as `strata profile` measures it on a 2-core x86 machine.
pub const DEFAULT_PROCESS_BYTES: u64 = 380 << 20;

/// Header of a pipeline message on the wire (magic, dtype, rank, chunk, microbatch, dims).
pub const WIRE_HEADER_BYTES: u64 = 12 + 3 * 8;

/// The default data-parallel gradient bucket (`parallel.dp_bucket_mb: 25`).
pub const DP_BUCKET_BYTES: u64 = 25 << 20;

/// One pipeline rank's peak memory and what holds it (bytes, per device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankMemory {
    pub rank: usize,
    pub process: u64,
    pub data: u64,
    pub weights: u64,
    pub grads: u64,
    pub optimizer: u64,
    /// Stashed activations at the schedule's peak.
    pub activations: u64,
    /// The working set on top of the stash (the largest of backward, optimizer step and
    /// data-parallel reduction).
    pub working: u64,
    pub peak: u64,
}

/// What the memory model needs besides the stages.
#[derive(Clone, Copy, Debug)]
pub struct MemoryInputs<'a> {
    pub graph: &'a LayerGraph,
    /// The lowered training schedule; without one, each chunk holds its closed-form
    /// in-flight count.
    pub schedule: Option<&'a Schedule>,
    /// Resident bytes per counted activation byte (allocator overhead, measured).
    pub residency: f64,
    pub pp: usize,
    pub dp: usize,
    /// Resident bytes of an idle rank.
    pub process_bytes: u64,
    /// Dataset bytes each rank holds.
    pub data_bytes: u64,
    /// The data-parallel gradient bucket (`parallel.dp_bucket_mb`).
    pub dp_bucket_bytes: u64,
}

/// The most bytes each rank of a lowered `schedule` holds at once: every receive's
/// buffer of `message` bytes from the step's start until the receive; a forward of chunk
/// `c` adds `fwd[c]`, its backward releases it; an `I` swaps `fwd[c]` for `wgrad[c]`,
/// which its `W` releases.
pub fn stash_peaks(schedule: &Schedule, fwd: &[u64], wgrad: &[u64], message: u64) -> Vec<u64> {
    schedule
        .ranks
        .iter()
        .map(|actions| {
            let receives = actions
                .iter()
                .filter(|a| matches!(a.kind, ActionKind::RecvAct | ActionKind::RecvGrad))
                .count() as u64;
            let mut live = receives * message;
            let mut peak = live;
            for a in actions {
                let c = a.stage.0;
                match a.kind {
                    ActionKind::Forward => live += fwd[c],
                    ActionKind::Backward => live -= fwd[c],
                    ActionKind::InputGrad => live = live - fwd[c] + wgrad[c],
                    ActionKind::WeightGrad => live -= wgrad[c],
                    ActionKind::RecvAct | ActionKind::RecvGrad => live -= message,
                    _ => {}
                }
                peak = peak.max(live);
            }
            peak
        })
        .collect()
}

/// Peak memory per pipeline rank of `stages` (see the module docs).
pub fn rank_memory(stages: &[StagePlan], m: &MemoryInputs<'_>) -> Vec<RankMemory> {
    let g = m.graph;
    let shape = ActivationShape {
        shape: g.shape.clone(),
        micro_batch_size: g.micro_batch_size,
        dtype_bytes: g.dtype_bytes,
        tp: g.tp,
        padded_vocab: g.padded_vocab,
    };
    let full_block =
        layer_activation_bytes(&shape, LayerKind::Block(0), ActivationPolicy::default());
    let sp = g.policy.sequence_parallel && g.tp > 1;
    let message = g.nodes[0].cost.output_bytes / if sp { g.tp as u64 } else { 1 };
    let last = stages.len().saturating_sub(1);
    let fwd: Vec<u64> = stages
        .iter()
        .map(|s| s.activation_bytes_per_microbatch + if s.stage.0 == last { 0 } else { message })
        .collect();
    let wgrad: Vec<u64> = stages
        .iter()
        .map(|s| {
            let counted: u64 = s
                .layers
                .iter()
                .map(|&l| layer_weight_grad_bytes(&shape, l, g.policy))
                .sum();
            (counted as f64 * m.residency).round() as u64
        })
        .collect();
    let walked = m
        .schedule
        .map(|sched| stash_peaks(sched, &fwd, &wgrad, message + WIRE_HEADER_BYTES));
    (0..m.pp)
        .map(|r| {
            let mine: Vec<&StagePlan> = stages.iter().filter(|s| s.rank.0 == r).collect();
            let sum = |f: &dyn Fn(&StagePlan) -> u64| mine.iter().map(|s| f(s)).sum::<u64>();
            let activations = match &walked {
                Some(peaks) => peaks[r],
                None => sum(&|s| fwd[s.stage.0] * s.in_flight_microbatches as u64),
            };
            let grads = sum(&|s| s.grad_bytes);
            let backward = ((2 * full_block) as f64 * m.residency) as u64;
            let weights = sum(&|s| s.param_bytes);
            let dp_reduce = if m.dp > 1 {
                grads.min(m.dp_bucket_bytes)
            } else {
                0
            };
            let working = (activations + backward).max(2 * weights).max(dp_reduce);
            let mut mem = RankMemory {
                rank: r,
                process: m.process_bytes,
                data: m.data_bytes,
                weights,
                grads,
                optimizer: sum(&|s| s.optim_bytes),
                activations,
                working: working - activations.min(working),
                peak: 0,
            };
            mem.peak = mem.process
                + mem.data
                + mem.weights
                + mem.grads
                + mem.optimizer
                + mem.activations
                + mem.working;
            mem
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Recompute;
    use crate::cost::PipeSchedule;
    use crate::graph::ModelShape;
    use crate::plan::{Plan, PlanSpec};
    use crate::schedule::ScheduleKind;
    use proptest::prelude::*;

    fn lowered(kind: ScheduleKind, pp: usize, m: usize) -> Schedule {
        Schedule::build_virtual(kind, pp, 1, m)
            .and_then(|s| s.lower())
            .unwrap()
    }

    #[test]
    fn stash_walk_by_hand() {
        // Chunk 0 stashes 10 per forward, chunk 1 20; messages are 1; W keeps 3 and 7.
        let (fwd, w) = ([10, 20], [3, 7]);
        // GPipe: rank 0 holds all 4 forwards and its 4 gradient buffers (posted at the
        // start, received in the backward phase).
        let g = stash_peaks(&lowered(ScheduleKind::Gpipe, 2, 4), &fwd, &w, 1);
        assert_eq!(g, vec![44, 80]);
        // 1F1B: rank 0 holds 2 forwards; the last rank one forward, and three of its four
        // activation buffers when it runs it.
        let f = stash_peaks(&lowered(ScheduleKind::OneFOneB, 2, 4), &fwd, &w, 1);
        assert_eq!(f, vec![2 * 10 + 4, 20 + 3]);
        // ZB-H1: what an I keeps for its W is held until the W runs.
        let z = stash_peaks(&lowered(ScheduleKind::ZbH1, 2, 4), &fwd, &[30, 70], 1);
        assert!(z[0] > f[0] && z[1] > f[1], "{z:?}");
    }

    fn spec(tp: usize, policy: ActivationPolicy, seq: usize) -> PlanSpec {
        let mut s = PlanSpec::new(ModelShape::gpt(65, seq, 256, 8, 8, 1024), 2, 8, 8);
        s.tp = tp;
        s.policy = policy;
        s.schedule = PipeSchedule::Gpipe;
        s
    }

    #[test]
    fn a_hundred_thousand_tokens_do_not_fit_this_machine() {
        // The README demo (d 128, 4 heads, 4 layers, micro-batch 16) at seq_len 100000:
        // activations alone are tens of GiB per rank, far over a 24 GiB machine.
        let mut s = PlanSpec::new(ModelShape::gpt(65, 100_000, 128, 4, 4, 512), 2, 4, 16);
        s.schedule = PipeSchedule::OneFOneB;
        let plan = Plan::build(&s).unwrap();
        assert!(plan.peak_memory_bytes() > 24 << 30, "{:?}", plan.memory);
        // And the demo itself fits in well under a GiB per rank.
        s.shape.seq_len = 64;
        assert!(Plan::build(&s).unwrap().peak_memory_bytes() < 1 << 30);
    }

    proptest! {
        /// Recomputation and sequence parallelism only ever lower each rank's peak (and
        /// strictly lower its stashed activations), and every part of the breakdown adds
        /// up to the peak.
        #[test]
        fn policies_lower_the_peak(tp in prop::sample::select(vec![1usize, 2, 4, 8]), seq in 16usize..512) {
            let mem = |recompute, sequence_parallel| {
                let plan = Plan::build(&spec(tp, ActivationPolicy { recompute, sequence_parallel }, seq)).unwrap();
                for m in &plan.memory {
                    assert_eq!(m.peak, m.process + m.data + m.weights + m.grads + m.optimizer + m.activations + m.working);
                }
                plan.memory
            };
            let none = mem(Recompute::None, false);
            let sel = mem(Recompute::Selective, false);
            let full = mem(Recompute::Full, false);
            for r in 0..2 {
                prop_assert!(full[r].peak <= sel[r].peak && sel[r].peak <= none[r].peak);
                prop_assert!(full[r].activations < sel[r].activations);
                prop_assert!(sel[r].activations < none[r].activations);
            }
            if tp > 1 {
                for rc in Recompute::ALL {
                    let sp = mem(rc, true);
                    let no = mem(rc, false);
                    for r in 0..2 {
                        prop_assert!(sp[r].peak <= no[r].peak, "{rc}: {sp:?} vs {no:?}");
                        prop_assert!(sp[r].activations < no[r].activations, "{rc}: {sp:?} vs {no:?}");
                    }
                }
            }
        }
    }
}
