//! Step-time prediction: the plan's schedule simulated action by action with the
//! calibrated [`CostModel`], then what every rank does after it (gradient reductions,
//! norm, optimizer). The formulas are in [`crate::cost`].
//!
//! Invariant: the prediction of a plan whose schedule builds is the simulation's
//! makespan plus the tail, and each part is finite and non-negative.

use crate::cost::CostModel;
use crate::error::Result;
use crate::ids::Rank;
use crate::plan::Plan;
use crate::schedule::{simulate_messages, ActionKind, Delivery, Schedule, ScheduleKind};
use serde::{Deserialize, Serialize};

/// What a step costs, predicted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepPrediction {
    /// Seconds per optimizer step.
    pub step_s: f64,
    /// Makespan of the simulated schedule.
    pub pipeline_s: f64,
    /// Per pipeline rank: busy compute seconds in the schedule.
    pub compute_s: Vec<f64>,
    /// Per pipeline rank: idle fraction of the schedule.
    pub bubble: Vec<f64>,
    /// Per pipeline rank: seconds after the schedule (reductions, norm, optimizer).
    pub tail_s: Vec<f64>,
}

/// Options of a step that the plan does not record.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepOptions {
    /// `train.grad_clip` is set (the global norm is computed, all-reduced and applied).
    pub grad_clip: bool,
    /// `model.tie_embeddings` (gradients summed over the pipeline group when split).
    pub tied: bool,
}

/// Predicts one training step of `plan` (see the module docs).
pub fn predict_step(plan: &Plan, model: &CostModel, opts: StepOptions) -> Result<StepPrediction> {
    let kind = ScheduleKind::from_name(&plan.schedule).unwrap_or(ScheduleKind::OneFOneB);
    let schedule =
        Schedule::build_virtual(kind, plan.pp, plan.virtual_stages, plan.microbatches)?.lower()?;
    let sp = plan.policy.sequence_parallel && plan.tp > 1;
    let bytes = plan.stages[0].send_bytes_per_microbatch / if sp { plan.tp as u64 } else { 1 };
    let msg = model.message(bytes);
    let sim = simulate_messages(
        &schedule,
        |a| match a.kind {
            ActionKind::SendAct | ActionKind::SendGrad => msg.send_s,
            ActionKind::RecvAct | ActionKind::RecvGrad => msg.recv_s,
            _ => plan.action_time(a, 0.0),
        },
        |_| Delivery {
            transit_s: msg.transit_s,
            needs_sender_progress: msg.needs_sender_progress,
        },
    )?;
    let ends: Vec<f64> = sim
        .spans
        .iter()
        .map(|s| s.last().map_or(0.0, |x| x.1))
        .collect();
    let tail = Tail::of(plan, model, opts);
    Ok(StepPrediction {
        step_s: tail.step_s(&ends),
        pipeline_s: sim.makespan,
        compute_s: sim.busy.clone(),
        bubble: (0..plan.pp).map(|r| sim.bubble(r)).collect(),
        tail_s: (0..plan.pp).map(|r| tail.rank_s(r)).collect(),
    })
}

/// Per-rank work after the schedule: before the gradient-norm barrier, the barrier's
/// all-reduce, and after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Tail {
    pub before: Vec<f64>,
    pub sync: f64,
    pub after: Vec<f64>,
}

impl Tail {
    /// The tail of every pipeline rank of `plan`.
    pub fn of(plan: &Plan, model: &CostModel, opts: StepOptions) -> Tail {
        let mut tail = Tail {
            before: Vec::new(),
            sync: 0.0,
            after: Vec::new(),
        };
        for r in 0..plan.pp {
            let chunks = plan.chunks_of(Rank(r));
            let elements: u64 =
                chunks.iter().map(|s| s.grad_bytes).sum::<u64>() / plan.dtype_bytes as u64;
            // Flat buffer groups: decay and no decay, and at tp > 1 owned and not.
            let groups = if plan.tp > 1 { 4 } else { 2 };
            let tied = if opts.tied && plan.stages.len() > 1 {
                let wte = (plan.tp_plan.padded_vocab / plan.tp * plan.model.d_model * 4) as u64;
                model.group_all_reduce_s(wte, plan.pp)
            } else {
                0.0
            };
            let (norm, scalar, rest) = model.optimizer_s(groups, elements, opts.grad_clip);
            tail.before
                .push(tied + model.dp_all_reduce_s(4 * elements, plan.dp) + norm);
            tail.after.push(rest);
            tail.sync = tail.sync.max(scalar);
        }
        tail
    }

    /// The step's end when pipeline rank `r` finishes its schedule at `ends[r]`: every
    /// rank meets at the norm's all-reduce, then finishes its own update.
    pub fn step_s(&self, ends: &[f64]) -> f64 {
        let barrier = ends
            .iter()
            .zip(&self.before)
            .map(|(e, b)| e + b)
            .fold(0.0, f64::max);
        barrier + self.sync + self.after.iter().cloned().fold(0.0, f64::max)
    }

    /// Rank `r`'s own seconds after its schedule.
    pub fn rank_s(&self, r: usize) -> f64 {
        self.before[r] + self.sync + self.after[r]
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cost::PipeSchedule;
    use crate::graph::ModelShape;
    use crate::plan::PlanSpec;
    use crate::profile::{
        Calibration, Curve, CurvePoint, GroupCurve, LayerSet, LayerTiming, P2pProfile, Profile,
        StepCosts,
    };

    fn flat(seconds: f64) -> Curve {
        Curve::new(vec![
            CurvePoint { bytes: 1, seconds },
            CurvePoint {
                bytes: 1 << 30,
                seconds,
            },
        ])
        .unwrap()
    }

    pub(crate) fn tiny() -> ModelShape {
        ModelShape::gpt(65, 128, 256, 8, 8, 1024)
    }

    /// A profile of gpt-tiny at micro-batch 8 where a block takes 1 s forward and 2 s
    /// backward (embedding and head free), a pipeline message costs its sender `send`,
    /// travels `transit` and costs its receiver `recv`, an all-reduce of any size takes
    /// `all_reduce`, and AdamW costs `adam` per element.
    pub(crate) fn profile(
        send: f64,
        transit: f64,
        recv: f64,
        all_reduce: f64,
        adam: f64,
    ) -> Profile {
        let layers: Vec<LayerTiming> = ["embed", "block", "head"]
            .iter()
            .map(|k| LayerTiming {
                kind: k.to_string(),
                fwd_s: if *k == "block" { 1.0 } else { 0.0 },
                bwd_s: if *k == "block" { 2.0 } else { 0.0 },
                runs: 1,
            })
            .collect();
        let sets = [1, 2]
            .iter()
            .map(|&tp| LayerSet {
                micro_batch_size: 8,
                tp,
                concurrent: 2,
                layers: layers
                    .iter()
                    .map(|l| LayerTiming {
                        fwd_s: l.fwd_s / tp as f64,
                        bwd_s: l.bwd_s / tp as f64,
                        ..l.clone()
                    })
                    .collect(),
                block_split: None,
                collectives: false,
                chunk_scale: None,
                chunk_depths: Vec::new(),
                split_scale: None,
                stash_scale: Vec::new(),
            })
            .collect();
        Profile {
            device: "cpu".into(),
            threads: 1,
            model: tiny(),
            micro_batch_size: 8,
            dtype_bytes: 4,
            layers,
            calibration: Calibration {
                world: 2,
                layer_sets: sets,
                p2p: Some(P2pProfile {
                    one_way: flat(transit),
                    send_overhead: flat(send),
                    recv_overhead: flat(recv),
                    stalls_above_bytes: None,
                    memcpy_bytes_s: 1e10,
                }),
                all_reduce: vec![GroupCurve {
                    group: "tp".into(),
                    size: 2,
                    all_reduce: flat(all_reduce),
                    tensor_all_reduce: None,
                    grad_all_reduce: Some(flat(all_reduce)),
                }],
                step: Some(StepCosts {
                    adamw_fixed_s: 0.0,
                    adamw_element_s: adam,
                    norm_fixed_s: 0.0,
                    norm_element_s: 0.0,
                    clip_fixed_s: 0.0,
                    clip_element_s: 0.0,
                    scalar_all_reduce_s: 0.0,
                }),
                ..Calibration::default()
            },
        }
    }

    fn spec(
        pp: usize,
        tp: usize,
        dp: usize,
        m: usize,
        schedule: PipeSchedule,
        p: Profile,
    ) -> PlanSpec {
        let mut s = PlanSpec::new(tiny(), pp, m, 8);
        s.tp = tp;
        s.dp = dp;
        s.schedule = schedule;
        s.method = crate::split::PartitionMethod::Uniform;
        s.profile = Some(p);
        s
    }

    fn predicted(s: &PlanSpec) -> StepPrediction {
        let plan = Plan::build(s).unwrap();
        predict_step(&plan, &s.cost_model(), StepOptions::default()).unwrap()
    }

    #[test]
    fn every_rank_meets_at_the_norm_all_reduce() {
        // Rank 0 finishes its schedule at 5 s, rank 1 at 10 s: rank 0's norm all-reduce
        // waits for rank 1 (the long "optimizer" span of a rank that finishes early), then
        // each rank updates on its own; the step ends with the slower update.
        let tail = Tail {
            before: vec![1.0, 1.0],
            sync: 0.5,
            after: vec![2.0, 3.0],
        };
        assert!((tail.step_s(&[5.0, 10.0]) - (10.0 + 1.0 + 0.5 + 3.0)).abs() < 1e-12);
    }

    #[test]
    fn one_stage_is_compute_plus_optimizer() {
        // pp = 1, 4 microbatches of 8 blocks at 1 + 2 s, and AdamW at 1 ns per element.
        let s = spec(
            1,
            1,
            2,
            4,
            PipeSchedule::OneFOneB,
            profile(0.0, 0.0, 0.0, 0.5, 1e-9),
        );
        let p = predicted(&s);
        let params = crate::graph::LayerGraph::new(&tiny(), 8, 4)
            .unwrap()
            .total_params();
        // + the data-parallel all-reduce of 0.5 s
        let want = 4.0 * 8.0 * 3.0 + 0.5 + params as f64 * 1e-9;
        assert!((p.step_s - want).abs() < 1e-9, "{} vs {want}", p.step_s);
        assert_eq!(p.bubble, vec![0.0]);
    }

    #[test]
    fn two_stage_1f1b_by_hand() {
        // Chunks of 4 blocks: F = 4 s, B = 8 s. Messages: the sender pays 0.5 s, they
        // travel 1 s, the receiver pays 0.25 s. 1F1B, pp = 2, m = 2:
        // rank 0: F0 [0, 4], send [4, 4.5] (there at 5.5), F1 [4.5, 8.5], send [8.5, 9]
        //         (there at 10), receive B0's gradient: sent at 18.25, there at 19.25,
        //         [19.25, 19.5], B0 [19.5, 27.5], receive B1's: there at 32, B1 [32.25, 40.25]
        // rank 1: receive [5.5, 5.75], F0 [5.75, 9.75], B0 [9.75, 17.75], send [17.75,
        //         18.25], receive [18.25, 18.5], F1 [18.5, 22.5], B1 [22.5, 30.5], send
        //         [30.5, 31] (there at 32).
        let s = spec(
            2,
            1,
            1,
            2,
            PipeSchedule::OneFOneB,
            profile(0.5, 1.0, 0.25, 0.0, 0.0),
        );
        let p = predicted(&s);
        assert!((p.pipeline_s - 40.25).abs() < 1e-9, "{p:?}");
        assert!((p.step_s - 40.25).abs() < 1e-9);
        // Free messages: (m + p − 1)(F + B) = 3 · 12.
        let s = spec(
            2,
            1,
            1,
            2,
            PipeSchedule::OneFOneB,
            profile(0.0, 0.0, 0.0, 0.0, 0.0),
        );
        assert!((predicted(&s).step_s - 36.0).abs() < 1e-9);
    }

    #[test]
    fn tensor_parallel_pays_four_all_reduces_per_block() {
        // tp = 2 halves the compute (the profile's tp set) and adds 4 all-reduces per
        // block per microbatch, plus the embedding's 1 and the head's 4.
        let ar = 0.01;
        let s = spec(
            1,
            2,
            1,
            2,
            PipeSchedule::OneFOneB,
            profile(0.0, 0.0, 0.0, ar, 0.0),
        );
        let p = predicted(&s);
        let want = 2.0 * (8.0 * 1.5 + (8.0 * 4.0 + 1.0 + 4.0) * ar);
        assert!((p.step_s - want).abs() < 1e-9, "{} vs {want}", p.step_s);
    }

    #[test]
    fn tp_sets_measured_with_their_collectives_are_not_charged_again() {
        // The profile's tp = 2 set was timed by a tp group running its shards through its
        // communicator: the all-reduces are inside the 0.5 + 1 s of a block already.
        let mut p = profile(0.0, 0.0, 0.0, 0.01, 0.0);
        for set in p.calibration.layer_sets.iter_mut().filter(|s| s.tp == 2) {
            set.collectives = true;
        }
        let s = spec(1, 2, 1, 2, PipeSchedule::OneFOneB, p);
        let step = predicted(&s).step_s;
        assert!((step - 2.0 * 8.0 * 1.5).abs() < 1e-9, "{step}");
        // At tp = 1 nothing changes: that set has no collectives to skip.
        let one = spec(
            1,
            1,
            2,
            2,
            PipeSchedule::OneFOneB,
            profile(0.0, 0.0, 0.0, 0.0, 0.0),
        );
        assert!((predicted(&one).step_s - 2.0 * 8.0 * 3.0).abs() < 1e-9);
    }

    #[test]
    fn the_measured_chunk_ratio_scales_every_layer() {
        // A chunk ran 1.1x its layers' sum forward and 1.2x backward: pp = 1, 2
        // microbatches of 8 blocks at 1.1 + 2.4 s.
        let mut p = profile(0.0, 0.0, 0.0, 0.0, 0.0);
        for set in &mut p.calibration.layer_sets {
            set.chunk_scale = Some((1.1, 1.2));
        }
        let s = spec(1, 1, 2, 2, PipeSchedule::OneFOneB, p);
        let step = predicted(&s).step_s;
        assert!((step - 2.0 * 8.0 * (1.1 + 2.4)).abs() < 1e-9, "{step}");
    }

    /// The tp = 1 layer set of a test profile (where the chunk curves are measured).
    fn tp1_set(p: &mut Profile) -> &mut LayerSet {
        p.calibration
            .layer_sets
            .iter_mut()
            .find(|s| s.tp == 1)
            .unwrap()
    }

    #[test]
    fn a_deeper_chunk_runs_at_its_measured_depth_ratio() {
        // Measured: a chunk of 4 blocks runs at its layers' sum, one of 8 blocks at 1.5x
        // forward and 1.2x backward (a single layer set at tp = 1 carries the curve).
        let mut p = profile(0.0, 0.0, 0.0, 0.0, 0.0);
        let tp1 = tp1_set(&mut p);
        tp1.chunk_depths = vec![
            crate::profile::ChunkScale {
                blocks: 4,
                fwd: 1.0,
                bwd: 1.0,
            },
            crate::profile::ChunkScale {
                blocks: 8,
                fwd: 1.5,
                bwd: 1.2,
            },
        ];
        // pp = 1: one chunk of 8 blocks, 2 microbatches at 8 · (1.5 + 2.4) s.
        let one = predicted(&spec(1, 1, 2, 2, PipeSchedule::OneFOneB, p.clone())).step_s;
        assert!((one - 2.0 * 8.0 * (1.5 + 2.4)).abs() < 1e-9, "{one}");
        // pp = 2: chunks of 4 blocks at their layers' sum, F = 4 s and B = 8 s.
        let plan = Plan::build(&spec(2, 1, 1, 2, PipeSchedule::OneFOneB, p.clone())).unwrap();
        assert!(
            (plan.stages[0].fwd_s - 4.0).abs() < 1e-9,
            "{:?}",
            plan.stages[0]
        );
        assert!(
            (plan.stages[1].bwd_s - 8.0).abs() < 1e-9,
            "{:?}",
            plan.stages[1]
        );
        // Between measured depths the ratio is linear in the blocks: 6 blocks at 1.25x.
        let c = &p.calibration;
        let (f, b) = c.chunk_scale_at(8, 1, 6);
        assert!(
            (f - 1.25).abs() < 1e-12 && (b - 1.1).abs() < 1e-12,
            "{f} {b}"
        );
        assert_eq!(c.chunk_scale_at(8, 1, 2), (1.0, 1.0));
        assert_eq!(c.chunk_scale_at(8, 1, 16), (1.5, 1.2));
    }

    #[test]
    fn a_chunk_holding_more_microbatches_runs_at_its_measured_stash_ratio() {
        // Measured: with 8 microbatches stashed a chunk runs 1.2x forward and 1.1x
        // backward its time with 2 stashed; with 1, as with 2.
        let mut p = profile(0.0, 0.0, 0.0, 0.0, 0.0);
        let tp1 = tp1_set(&mut p);
        let at = |blocks, fwd, bwd| crate::profile::ChunkScale { blocks, fwd, bwd };
        tp1.stash_scale = vec![at(1, 1.0, 1.0), at(2, 1.0, 1.0), at(8, 1.2, 1.1)];
        // GPipe holds all 8 microbatches on each chunk of 4 blocks (F 4 s, B 8 s alone).
        let gpipe = Plan::build(&spec(2, 1, 1, 8, PipeSchedule::Gpipe, p.clone())).unwrap();
        for st in &gpipe.stages {
            assert_eq!(st.in_flight_microbatches, 8);
            assert!(
                (st.fwd_s - 4.8).abs() < 1e-9 && (st.bwd_s - 8.8).abs() < 1e-9,
                "{st:?}"
            );
        }
        // 1F1B holds 2 on the first stage and 1 on the last: no change.
        let one = Plan::build(&spec(2, 1, 1, 8, PipeSchedule::OneFOneB, p)).unwrap();
        for st in &one.stages {
            assert!(
                (st.fwd_s - 4.0).abs() < 1e-9 && (st.bwd_s - 8.0).abs() < 1e-9,
                "{st:?}"
            );
        }
    }

    #[test]
    fn zero_bubble_uses_the_measured_split_of_the_backward() {
        // Measured: I takes 0.6 and W 0.45 of the fused backward (1.05x together).
        let mut p = profile(0.0, 0.0, 0.0, 0.0, 0.0);
        for set in &mut p.calibration.layer_sets {
            set.split_scale = Some((0.6, 0.45));
        }
        let s = spec(2, 1, 1, 4, PipeSchedule::ZbH1, p);
        let plan = Plan::build(&s).unwrap();
        for st in &plan.stages {
            // 4 blocks at 2 s backward.
            assert!((st.input_grad_s - 0.6 * 8.0).abs() < 1e-9, "{st:?}");
            assert!((st.weight_grad_s - 0.45 * 8.0).abs() < 1e-9, "{st:?}");
        }
        // Every rank runs 4 F (4 s), 4 I and 4 W: at least 4 · (4 + 8.4) s of work.
        let step = predicted(&s).step_s;
        assert!(step >= 4.0 * (4.0 + 1.05 * 8.0) - 1e-9, "{step}");
    }

    #[test]
    fn zero_bubble_splits_the_backward_by_weight_flops() {
        let s = spec(
            2,
            1,
            1,
            4,
            PipeSchedule::ZbH1,
            profile(0.0, 0.0, 0.0, 0.0, 0.0),
        );
        let plan = Plan::build(&s).unwrap();
        for st in &plan.stages {
            let g = crate::graph::LayerGraph::new(&tiny(), 8, 4).unwrap();
            let block = &g.nodes[1].cost;
            let share = block.weight_grad_flops / block.bwd_flops;
            assert!(
                (st.weight_grad_s - 4.0 * 2.0 * share).abs() < 1e-9,
                "{st:?}"
            );
        }
        let zb = predicted(&s).step_s;
        let one = predicted(&spec(
            2,
            1,
            1,
            4,
            PipeSchedule::OneFOneB,
            profile(0.0, 0.0, 0.0, 0.0, 0.0),
        ))
        .step_s;
        assert!(zb < one, "{zb} vs {one}");
    }

    #[test]
    fn old_profiles_still_load() {
        let old = r#"{"device": "cpu", "threads": 1,
            "model": {"vocab": 65, "seq_len": 128, "d_model": 256, "n_heads": 8,
                      "n_kv_heads": 8, "n_layers": 8, "d_ff": 1024},
            "micro_batch_size": 8, "dtype_bytes": 4,
            "layers": [{"kind": "embed", "fwd_s": 0.001, "bwd_s": 0.001, "runs": 5},
                       {"kind": "block", "fwd_s": 0.05, "bwd_s": 0.1, "runs": 5},
                       {"kind": "head", "fwd_s": 0.001, "bwd_s": 0.002, "runs": 5}]}"#;
        let p: Profile = serde_json::from_str(old).unwrap();
        assert!(p.calibration.is_empty());
        let s = spec(2, 1, 1, 8, PipeSchedule::OneFOneB, p);
        let step = predicted(&s).step_s;
        // solo timings scaled to nothing else: 9 slots of 4 blocks at 0.15 s, no messages
        // priced beyond the hardware defaults
        assert!((step - 9.0 * (0.6 + 0.003)).abs() < 0.01, "{step}");
    }
}
