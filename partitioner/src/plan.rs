//! The serializable pipeline [`Plan`]: which layers each stage (model chunk) owns, on which
//! pipeline rank it runs, and what it costs in FLOPs, memory and predicted time. This is
//! the schema the engine consumes (`plan.json` in every run directory).
//!
//! Representation: `stages` has `pp · virtual_stages` entries in model order;
//! `stages[c].stage == StageId(c)` is the chunk index and `stages[c].rank == Rank(c % pp)`
//! the pipeline rank that runs it (round-robin, as in interleaved 1F1B). `pp` is the number
//! of pipeline ranks. Sizes (`param_bytes`, `memory_bytes`, …) are per device, i.e. for one
//! tensor-parallel shard; `params` counts the whole (unsharded) layers.
//!
//! Invariant: `stages[i].layers` are contiguous in graph order, non-empty, each contains
//! at least one block, and together they cover the graph exactly once; with a memory cap
//! and `partition: optimal`, every rank's memory is at most the cap.

use crate::activation::ActivationPolicy;
use crate::cost::{CostModel, Hardware, PipeSchedule, TimeSource};
use crate::error::{Error, Result};
use crate::graph::{LayerCost, LayerGraph, LayerKind, LayerNode, ModelShape};
use crate::ids::{Rank, StageId};
use crate::memory::{rank_memory, MemoryInputs, RankMemory, DEFAULT_PROCESS_BYTES};
use crate::profile::Profile;
use crate::schedule::Schedule;
use crate::split::{self, Bounds, ChainCosts, MemoryCap, NoSplit, PartitionMethod};
use crate::tp::TpPlan;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Largest `pp · virtual_stages · microbatches` whose schedule the memory model walks.
const WALKED_ACTIONS: usize = 1024;

/// One pipeline stage (model chunk) of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    /// Chunk index in model order, `0..pp · virtual_stages`.
    pub stage: StageId,
    /// The pipeline rank that runs this chunk: `stage % pp`.
    pub rank: Rank,
    pub layers: Vec<LayerKind>,
    /// Parameters of these layers (whole, unsharded).
    pub params: u64,
    /// Parameter bytes on one device (one tensor-parallel shard).
    pub param_bytes: u64,
    pub grad_bytes: u64,
    /// AdamW state bytes on one device.
    pub optim_bytes: u64,
    /// Forward FLOPs per microbatch, on one device.
    pub fwd_flops: f64,
    /// Backward FLOPs per microbatch, on one device.
    pub bwd_flops: f64,
    /// Activation bytes stashed per microbatch in flight.
    pub activation_bytes_per_microbatch: u64,
    /// Microbatches the schedule keeps in flight on this chunk at its peak.
    pub in_flight_microbatches: usize,
    /// `activation_bytes_per_microbatch · in_flight_microbatches`.
    pub activation_bytes: u64,
    /// Weights + gradients + optimizer state + activations.
    pub memory_bytes: u64,
    /// Bytes this stage sends downstream per microbatch.
    pub send_bytes_per_microbatch: u64,
    /// Predicted forward + backward seconds per microbatch (compute and tensor-parallel
    /// all-reduces; measured time with a profile).
    pub time_s: f64,
    /// Of `time_s`: the forward, the backward, and of the backward the weight gradients
    /// (a zero-bubble `W`).
    #[serde(default)]
    pub fwd_s: f64,
    #[serde(default)]
    pub bwd_s: f64,
    #[serde(default)]
    pub weight_grad_s: f64,
    /// A zero-bubble `I` (the input gradients): `bwd_s − weight_grad_s`, or the split's
    /// own measured share of the backward when the profile has one
    /// ([`crate::profile::LayerSet::split_scale`]; `I + W` then exceeds `bwd_s`).
    #[serde(default)]
    pub input_grad_s: f64,
}

/// A pipeline plan for one model and parallel layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The partition method (`uniform`, `parameters`, `flops`, `profile`, `optimal`).
    pub method: String,
    pub model: ModelShape,
    /// Pipeline ranks.
    pub pp: usize,
    /// Model chunks per pipeline rank (`stages.len() == pp · virtual_stages`).
    pub virtual_stages: usize,
    pub tp: usize,
    pub dp: usize,
    /// The schedule family the memory model assumed.
    pub schedule: String,
    pub microbatches: usize,
    pub micro_batch_size: usize,
    pub dtype_bytes: usize,
    /// Parameters of the whole model (unsharded, vocabulary unpadded).
    pub total_params: u64,
    /// Largest stage's predicted time divided by the mean (1.0 is perfect balance).
    pub imbalance: f64,
    /// Per-device memory cap (`parallel.memory_gib`), if any.
    pub memory_cap_bytes: Option<u64>,
    /// Tensor-parallel sharding of every layer kind.
    pub tp_plan: TpPlan,
    /// Activation recomputation and sequence parallelism the memory model assumed.
    #[serde(default)]
    pub policy: ActivationPolicy,
    pub stages: Vec<StagePlan>,
    /// Peak memory of each pipeline rank and what holds it ([`crate::memory`]).
    #[serde(default)]
    pub memory: Vec<RankMemory>,
}

/// Everything [`Plan::build`] needs.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanSpec {
    pub shape: ModelShape,
    pub pp: usize,
    pub tp: usize,
    pub dp: usize,
    pub virtual_stages: usize,
    pub microbatches: usize,
    pub micro_batch_size: usize,
    pub dtype_bytes: usize,
    pub schedule: PipeSchedule,
    pub method: PartitionMethod,
    pub memory_cap_bytes: Option<u64>,
    pub hardware: Hardware,
    /// Measured layer times (required by `profile`, used by `optimal` when present).
    pub profile: Option<Profile>,
    /// `parallel.recompute` and `parallel.sequence_parallel`.
    pub policy: ActivationPolicy,
    /// Dataset bytes every rank holds in memory.
    pub data_bytes: u64,
    /// The data-parallel gradient bucket (`parallel.dp_bucket_mb`).
    pub dp_bucket_bytes: u64,
}

impl PlanSpec {
    /// A spec with tp = dp = v = 1, fp32, 1F1B memory model, `flops` split, no cap.
    pub fn new(
        shape: ModelShape,
        pp: usize,
        microbatches: usize,
        micro_batch_size: usize,
    ) -> PlanSpec {
        PlanSpec {
            shape,
            pp,
            tp: 1,
            dp: 1,
            virtual_stages: 1,
            microbatches,
            micro_batch_size,
            dtype_bytes: 4,
            schedule: PipeSchedule::OneFOneB,
            method: PartitionMethod::Flops,
            memory_cap_bytes: None,
            hardware: Hardware::default(),
            profile: None,
            policy: ActivationPolicy::default(),
            data_bytes: 0,
            dp_bucket_bytes: crate::memory::DP_BUCKET_BYTES,
        }
    }

    /// The cost model of this layout: its hardware figures and profile, with every rank
    /// of the `pp · tp · dp` job busy.
    pub fn cost_model(&self) -> CostModel {
        CostModel::new(
            self.hardware,
            self.profile.clone(),
            self.pp * self.tp * self.dp,
        )
    }

    /// Number of model chunks: `pp · virtual_stages`.
    pub fn chunks(&self) -> usize {
        self.pp * self.virtual_stages
    }

    /// Per-chunk in-flight microbatches for the schedule.
    pub fn in_flight(&self) -> Vec<usize> {
        (0..self.chunks())
            .map(|c| {
                self.schedule
                    .in_flight(c, self.pp, self.virtual_stages, self.microbatches)
            })
            .collect()
    }

    fn check(&self) -> Result<()> {
        for (field, v) in [
            ("parallel.pp", self.pp),
            ("parallel.tp", self.tp),
            ("parallel.dp", self.dp),
            ("parallel.virtual_stages", self.virtual_stages),
            ("parallel.microbatches", self.microbatches),
            ("parallel.micro_batch_size", self.micro_batch_size),
        ] {
            if v == 0 {
                return Err(Error::NotPositive { field, value: 0 });
            }
        }
        self.hardware.validate()?;
        if self.virtual_stages > 1 && !self.schedule.is_interleaved() {
            return Err(Error::BadValue {
                field: "parallel.virtual_stages",
                value: self.virtual_stages.to_string(),
                reason: format!(
                    "more than one model chunk per rank needs an interleaved schedule, but \
                     parallel.schedule = {}",
                    self.schedule
                ),
                fix: "set parallel.schedule: interleaved-1f1b, or parallel.virtual_stages: 1"
                    .into(),
            });
        }
        if self.memory_cap_bytes == Some(0) {
            return Err(Error::BadValue {
                field: "parallel.memory_gib",
                value: "0".into(),
                reason: "must be positive".into(),
                fix: "set parallel.memory_gib to the device memory in GiB, e.g. 80".into(),
            });
        }
        Ok(())
    }
}

/// One node's predicted seconds per microbatch, before the chunk it lands in is known.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct NodeTime {
    /// Compute, forward and backward: the layer timed alone (or its FLOPs).
    pub fwd_s: f64,
    pub bwd_s: f64,
    /// Tensor-parallel collectives priced from the all-reduce curves, forward, backward.
    pub coll_fwd_s: f64,
    pub coll_bwd_s: f64,
    /// The weight gradients' share of the backward FLOPs.
    pub weight_share: f64,
    /// The compute was measured, so a chunk's measured ratio applies to it.
    pub measured: bool,
}

impl NodeTime {
    /// Forward plus backward, chunk ratios left out (what a split balances).
    pub fn total_s(&self) -> f64 {
        self.fwd_s + self.bwd_s + self.coll_fwd_s + self.coll_bwd_s
    }
}

/// Per-node predicted seconds per microbatch (see [`crate::cost`]).
fn node_times(graph: &LayerGraph, spec: &PlanSpec) -> Result<Vec<NodeTime>> {
    let model = spec.cost_model();
    let unsharded = if graph.tp > 1 {
        Some(LayerGraph::with_tp(
            &graph.shape,
            graph.micro_batch_size,
            graph.dtype_bytes,
            1,
        )?)
    } else {
        None
    };
    Ok(graph
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let whole = unsharded.as_ref().map_or(n, |g| &g.nodes[i]);
            let (f, b, source) = model.layer_s(n, whole, graph.micro_batch_size, graph.tp);
            let (cf, cb) = match source {
                TimeSource::WithCollectives => (0.0, 0.0),
                _ => model.tp_collectives_s(
                    &graph.shape,
                    n.kind,
                    graph.micro_batch_size,
                    graph.dtype_bytes,
                    graph.tp,
                ),
            };
            NodeTime {
                fwd_s: f,
                bwd_s: b,
                coll_fwd_s: cf,
                coll_bwd_s: cb,
                weight_share: if n.cost.bwd_flops > 0.0 {
                    (n.cost.weight_grad_flops / n.cost.bwd_flops).min(1.0)
                } else {
                    0.0
                },
                measured: source != TimeSource::Flops,
            }
        })
        .collect())
}

/// A chunk's (forward, backward, weight gradients, input gradients) seconds per
/// microbatch: its nodes' times, the measured compute scaled by the chunk ratio of a
/// chunk of its depth with `stash` microbatches in flight, and the zero-bubble split by the measured split ratios when the
/// profile has them, else by the weight gradients' FLOPs.
fn chunk_times(
    nodes: &[LayerNode],
    times: &[NodeTime],
    stash: usize,
    spec: &PlanSpec,
) -> (f64, f64, f64, f64) {
    let model = spec.cost_model();
    let blocks = nodes.iter().filter(|n| n.kind.is_block()).count();
    let (sf, sb) = model.chunk_scale(spec.micro_batch_size, spec.tp, blocks, stash);
    let scaled = |t: &NodeTime, x: f64, s: f64| if t.measured { x * s } else { x };
    let sum = |f: &dyn Fn(&NodeTime) -> f64| times.iter().map(f).sum::<f64>();
    let fwd = sum(&|t| scaled(t, t.fwd_s, sf) + t.coll_fwd_s);
    let compute_b = sum(&|t| scaled(t, t.bwd_s, sb));
    let bwd = compute_b + sum(&|t| t.coll_bwd_s);
    match model.split_scale(spec.micro_batch_size) {
        Some((i, w)) => (fwd, bwd, compute_b * w, bwd - compute_b * (1.0 - i)),
        None => {
            let w = sum(&|t| scaled(t, t.bwd_s, sb) * t.weight_share);
            (fwd, bwd, w, bwd - w)
        }
    }
}

/// The layer graph of `spec`, its block activations scaled by the allocator residency
/// the profile measured.
fn graph_of(spec: &PlanSpec) -> Result<LayerGraph> {
    let mut graph = LayerGraph::with_policy(
        &spec.shape,
        spec.micro_batch_size,
        spec.dtype_bytes,
        spec.tp,
        spec.policy,
    )?;
    if let Some(p) = &spec.profile {
        let k = p
            .calibration
            .residency(spec.policy, spec.tp, spec.micro_batch_size);
        for n in graph.nodes.iter_mut().filter(|n| n.kind.is_block()) {
            n.cost.activation_bytes = (n.cost.activation_bytes as f64 * k).round() as u64;
        }
    }
    Ok(graph)
}

impl Plan {
    /// Plans `pp` stages balanced by training FLOPs (exact min-max split), fp32, tp = 1,
    /// GPipe memory model (every microbatch in flight).
    pub fn balanced(
        shape: &ModelShape,
        pp: usize,
        microbatches: usize,
        micro_batch_size: usize,
        dtype_bytes: usize,
    ) -> Result<Plan> {
        let mut spec = PlanSpec::new(shape.clone(), pp, microbatches, micro_batch_size);
        spec.dtype_bytes = dtype_bytes;
        spec.schedule = PipeSchedule::Gpipe;
        Plan::build(&spec)
    }

    /// Builds the plan described by `spec`.
    pub fn build(spec: &PlanSpec) -> Result<Plan> {
        spec.check()?;
        let tp_plan = TpPlan::new(&spec.shape, spec.tp)?;
        let graph = graph_of(spec)?;
        let chunks = spec.chunks();
        let n_blocks = graph.n_blocks();
        if chunks > n_blocks {
            return Err(if spec.virtual_stages == 1 {
                Error::TooManyStages {
                    pp: spec.pp,
                    n_layers: n_blocks,
                }
            } else {
                Error::TooManyChunks {
                    pp: spec.pp,
                    v: spec.virtual_stages,
                    chunks,
                    n_layers: n_blocks,
                    max_v: (n_blocks / spec.pp).max(1),
                }
            });
        }
        if spec.method == PartitionMethod::Profile && spec.profile.is_none() {
            return Err(Error::BadValue {
                field: "parallel.partition",
                value: "profile".into(),
                reason: "needs measured layer times, but parallel.profile is not set".into(),
                fix: "run `strata profile CONFIG` and set parallel.profile to the file it writes"
                    .into(),
            });
        }
        let in_flight = spec.in_flight();
        let required: Vec<bool> = graph.nodes.iter().map(|n| n.kind.is_block()).collect();
        let cost_of = |f: &dyn Fn(&crate::graph::LayerNode) -> f64| -> Vec<f64> {
            graph.nodes.iter().map(f).collect()
        };
        let node_s = node_times(&graph, spec)?;
        let times: Vec<f64> = node_s.iter().map(NodeTime::total_s).collect();
        let solve = |cost: Vec<f64>, cap: Option<&MemoryCap>| -> Result<Bounds> {
            let chain = ChainCosts {
                cost,
                static_bytes: graph.nodes.iter().map(|n| n.cost.static_bytes()).collect(),
                act_bytes: graph
                    .nodes
                    .iter()
                    .map(|n| n.cost.activation_bytes)
                    .collect(),
                required: required.clone(),
            };
            split::optimal_split(&chain, chunks, cap)
                .map_err(|e| no_split_error(spec, &graph, &in_flight, e))
        };
        let bounds = match spec.method {
            PartitionMethod::Uniform => split::uniform_split(&required, chunks)
                .map_err(|e| no_split_error(spec, &graph, &in_flight, e))?,
            PartitionMethod::Parameters => solve(cost_of(&|n| n.full_params as f64), None)?,
            PartitionMethod::Flops => solve(cost_of(&|n| n.cost.train_flops()), None)?,
            PartitionMethod::Profile => solve(times.clone(), None)?,
            PartitionMethod::Optimal => {
                // With v chunks per rank, each chunk gets cap / v so that every rank fits.
                // Without a cap, the cap is unbounded: ties in time still go to the split
                // with the least peak memory.
                let cap = MemoryCap {
                    cap: spec
                        .memory_cap_bytes
                        .map_or(u64::MAX, |c| c / spec.virtual_stages as u64),
                    in_flight: in_flight.iter().map(|&f| f as u64).collect(),
                };
                solve(times.clone(), Some(&cap))?
            }
        };
        Ok(Self::assemble(
            spec, &graph, tp_plan, &bounds, &in_flight, &node_s,
        ))
    }

    fn assemble(
        spec: &PlanSpec,
        graph: &LayerGraph,
        tp_plan: TpPlan,
        bounds: &[usize],
        in_flight: &[usize],
        times: &[NodeTime],
    ) -> Plan {
        let stages: Vec<StagePlan> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let nodes = &graph.nodes[w[0]..w[1]];
                let total = nodes
                    .iter()
                    .map(|n| n.cost)
                    .fold(LayerCost::default(), |a, c| a + c);
                let flight = in_flight[i];
                let act = total.activation_bytes * flight as u64;
                let (fwd_s, bwd_s, weight_grad_s, input_grad_s) =
                    chunk_times(nodes, &times[w[0]..w[1]], flight, spec);
                StagePlan {
                    stage: StageId(i),
                    rank: Rank(i % spec.pp),
                    layers: nodes.iter().map(|n| n.kind).collect(),
                    params: nodes.iter().map(|n| n.full_params).sum(),
                    param_bytes: total.param_bytes,
                    grad_bytes: total.grad_bytes,
                    optim_bytes: total.optim_bytes,
                    fwd_flops: total.fwd_flops,
                    bwd_flops: total.bwd_flops,
                    activation_bytes_per_microbatch: total.activation_bytes,
                    in_flight_microbatches: flight,
                    activation_bytes: act,
                    memory_bytes: total.static_bytes() + act,
                    send_bytes_per_microbatch: total.output_bytes,
                    time_s: fwd_s + bwd_s,
                    fwd_s,
                    bwd_s,
                    weight_grad_s,
                    input_grad_s,
                }
            })
            .collect();
        let t: Vec<f64> = stages.iter().map(|s| s.time_s).collect();
        let mean = t.iter().sum::<f64>() / t.len() as f64;
        let max = t.iter().cloned().fold(0.0, f64::max);
        let process_bytes = spec
            .profile
            .as_ref()
            .and_then(|p| p.calibration.memory)
            .map_or(DEFAULT_PROCESS_BYTES, |m| m.baseline_bytes);
        let residency = spec.profile.as_ref().map_or(1.0, |p| {
            p.calibration
                .residency(spec.policy, spec.tp, spec.micro_batch_size)
        });
        // The exact walk of the schedule's actions, when the schedule is small enough to
        // build in microseconds (the closed-form in-flight counts otherwise).
        let small = spec.pp * spec.virtual_stages * spec.microbatches <= WALKED_ACTIONS;
        let schedule = crate::schedule::ScheduleKind::from_name(spec.schedule.name())
            .filter(|_| small)
            .and_then(|k| {
                Schedule::build_virtual(k, spec.pp, spec.virtual_stages, spec.microbatches)
                    .and_then(|s| s.lower())
                    .ok()
            });
        let memory = rank_memory(
            &stages,
            &MemoryInputs {
                graph,
                schedule: schedule.as_ref(),
                residency,
                pp: spec.pp,
                dp: spec.dp,
                process_bytes,
                data_bytes: spec.data_bytes,
                dp_bucket_bytes: spec.dp_bucket_bytes,
            },
        );
        Plan {
            method: spec.method.name().to_string(),
            model: graph.shape.clone(),
            pp: spec.pp,
            virtual_stages: spec.virtual_stages,
            tp: spec.tp,
            dp: spec.dp,
            schedule: spec.schedule.name().to_string(),
            microbatches: spec.microbatches,
            micro_batch_size: graph.micro_batch_size,
            dtype_bytes: graph.dtype_bytes,
            total_params: graph.total_params(),
            imbalance: if mean > 0.0 { max / mean } else { 1.0 },
            memory_cap_bytes: spec.memory_cap_bytes,
            tp_plan,
            policy: spec.policy,
            stages,
            memory,
        }
    }

    /// Builds a plan from explicit stage boundaries over `graph`'s nodes (tp = 1, one
    /// chunk per rank, GPipe memory model, FLOP-predicted times).
    pub fn from_bounds(
        graph: &LayerGraph,
        bounds: &[usize],
        method: &str,
        microbatches: usize,
    ) -> Result<Plan> {
        let mut spec = PlanSpec::new(
            graph.shape.clone(),
            bounds.len() - 1,
            microbatches,
            graph.micro_batch_size,
        );
        spec.dtype_bytes = graph.dtype_bytes;
        spec.tp = graph.tp;
        spec.schedule = PipeSchedule::Gpipe;
        spec.policy = graph.policy;
        let tp_plan = TpPlan::new(&graph.shape, graph.tp)?;
        let times = node_times(graph, &spec)?;
        let mut plan = Self::assemble(&spec, graph, tp_plan, bounds, &spec.in_flight(), &times);
        plan.method = method.to_string();
        Ok(plan)
    }

    /// The stage (chunk) that owns `layer`.
    pub fn stage_of(&self, layer: LayerKind) -> Option<StageId> {
        self.stages
            .iter()
            .find(|s| s.layers.contains(&layer))
            .map(|s| s.stage)
    }

    /// The chunks that pipeline rank `rank` runs, in model order.
    pub fn chunks_of(&self, rank: Rank) -> Vec<&StagePlan> {
        self.stages.iter().filter(|s| s.rank == rank).collect()
    }

    /// Peak memory of each pipeline rank, per device: the memory model's truthful
    /// figure (process, data, model state, activations and working set; see
    /// [`crate::memory`]), comparable with the machine's memory.
    pub fn rank_memory_bytes(&self) -> Vec<u64> {
        if self.memory.len() == self.pp {
            return self.memory.iter().map(|m| m.peak).collect();
        }
        (0..self.pp)
            .map(|r| self.chunks_of(Rank(r)).iter().map(|s| s.memory_bytes).sum())
            .collect()
    }

    /// The largest [`Plan::rank_memory_bytes`].
    pub fn peak_memory_bytes(&self) -> u64 {
        self.rank_memory_bytes().into_iter().max().unwrap_or(0)
    }

    /// Predicted seconds of one schedule action on this plan's chunk: its forward, its
    /// backward, or a zero-bubble `I` (backward minus weight gradients) or `W`; `message_s`
    /// for a send, nothing for a receive (its wait is simulated).
    pub fn action_time(&self, action: &crate::schedule::Action, message_s: f64) -> f64 {
        use crate::schedule::ActionKind;
        let s = &self.stages[action.stage.0];
        match action.kind {
            ActionKind::Forward => s.fwd_s,
            ActionKind::Backward => s.bwd_s,
            // Plans written before `input_grad_s` existed read it as 0.
            ActionKind::InputGrad if s.input_grad_s <= 0.0 => s.bwd_s - s.weight_grad_s,
            ActionKind::InputGrad => s.input_grad_s,
            ActionKind::WeightGrad => s.weight_grad_s,
            ActionKind::SendAct | ActionKind::SendGrad => message_s,
            ActionKind::RecvAct | ActionKind::RecvGrad => 0.0,
        }
    }

    /// Predicted seconds per microbatch per pipeline rank (sum over its chunks).
    pub fn rank_time_s(&self) -> Vec<f64> {
        (0..self.pp)
            .map(|r| self.chunks_of(Rank(r)).iter().map(|s| s.time_s).sum())
            .collect()
    }

    /// A human-readable table: per stage layers, params, FLOPs, memory (weights,
    /// gradients, optimizer, activations) and predicted time, then the imbalance.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let chunks = if self.virtual_stages > 1 {
            format!(
                " ({} chunks, {} per rank)",
                self.stages.len(),
                self.virtual_stages
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "plan: {} model, {} params; pp {}{chunks}, tp {}, dp {}; {} split; {} microbatches x {} sequences, {} memory model",
            self.model.arch.name(),
            human(self.total_params as f64, ""),
            self.pp,
            self.tp,
            self.dp,
            self.method,
            self.microbatches,
            self.micro_batch_size,
            self.schedule,
        );
        let _ = writeln!(
            out,
            "{:>5} {:>4}  {:<22} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10}",
            "stage",
            "rank",
            "layers",
            "params",
            "fwd FLOP",
            "bwd FLOP",
            "weights",
            "grads",
            "optim",
            "activ (mb)",
            "memory",
            "time/mb"
        );
        for s in &self.stages {
            let over = match self.memory_cap_bytes {
                Some(c) if s.memory_bytes > c => "  OVER CAP",
                _ => "",
            };
            let _ = writeln!(
                out,
                "{:>5} {:>4}  {:<22} {:>9} {:>10} {:>10} {:>9} {:>9} {:>9} {:>11} {:>10} {:>10}{over}",
                s.stage.0,
                s.rank.0,
                layer_range(&s.layers),
                human(s.params as f64, ""),
                human(s.fwd_flops, ""),
                human(s.bwd_flops, ""),
                bytes(s.param_bytes),
                bytes(s.grad_bytes),
                bytes(s.optim_bytes),
                format!("{} ({})", bytes(s.activation_bytes), s.in_flight_microbatches),
                bytes(s.memory_bytes),
                seconds(s.time_s),
            );
        }
        let peak = self.rank_memory_bytes().into_iter().max().unwrap_or(0);
        let cap = match self.memory_cap_bytes {
            Some(c) => format!(" (cap {})", bytes(c)),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "imbalance (max/mean stage time): {:.3}; peak memory per device {}{cap}",
            self.imbalance,
            bytes(peak)
        );
        out
    }
}

/// The user-facing error for a failed split.
fn no_split_error(spec: &PlanSpec, graph: &LayerGraph, in_flight: &[usize], e: NoSplit) -> Error {
    match e {
        NoSplit::TooManyStages { required } if spec.virtual_stages == 1 => Error::TooManyStages {
            pp: spec.pp,
            n_layers: required,
        },
        NoSplit::TooManyStages { required } => Error::TooManyChunks {
            pp: spec.pp,
            v: spec.virtual_stages,
            chunks: spec.chunks(),
            n_layers: required,
            max_v: (required / spec.pp).max(1),
        },
        NoSplit::OverCap { stage, need } => {
            // With v chunks per rank each chunk is held to cap / v.
            let v = spec.virtual_stages as u64;
            let cap = spec.memory_cap_bytes.unwrap_or(0) / v;
            let per_chunk = if v > 1 {
                format!(", per chunk: cap / parallel.virtual_stages = {v}")
            } else {
                String::new()
            };
            let mut remedies = Vec::new();
            if spec.chunks() < graph.n_blocks() {
                remedies.push(format!("more pipeline stages (parallel.pp > {})", spec.pp));
            }
            let next_tp = spec.tp * 2;
            if crate::tp::check_divisibility(&spec.shape, next_tp).is_ok() {
                remedies.push(format!("tensor parallelism (parallel.tp: {next_tp})"));
            }
            if spec.micro_batch_size > 1 {
                remedies.push(format!(
                    "a smaller parallel.micro_batch_size (< {})",
                    spec.micro_batch_size
                ));
            }
            if spec.schedule == PipeSchedule::Gpipe {
                remedies.push("parallel.schedule: 1f1b (fewer microbatches in flight)".into());
            }
            if remedies.is_empty() {
                remedies.push("a larger parallel.memory_gib".into());
            }
            Error::MemoryCapTooSmall {
                stage,
                need_bytes: need,
                need_gib: need as f64 / GIB,
                cap_bytes: cap,
                cap_gib: cap as f64 / GIB,
                detail: format!(
                    "weights, grads and AdamW state plus activations of {} microbatches in flight{per_chunk}",
                    in_flight.get(stage).copied().unwrap_or(0)
                ),
                remedy: remedies.join(", or "),
            }
        }
    }
}

/// `embed, block.0-3` style summary of a contiguous layer list.
pub fn layer_range(layers: &[LayerKind]) -> String {
    let mut parts = Vec::new();
    let blocks: Vec<usize> = layers
        .iter()
        .filter_map(|l| match l {
            LayerKind::Block(i) => Some(*i),
            _ => None,
        })
        .collect();
    if layers.contains(&LayerKind::Embedding) {
        parts.push("embed".to_string());
    }
    match (blocks.first(), blocks.last()) {
        (Some(a), Some(b)) if a == b => parts.push(format!("block.{a}")),
        (Some(a), Some(b)) => parts.push(format!("block.{a}-{b}")),
        _ => {}
    }
    if layers.contains(&LayerKind::Head) {
        parts.push("head".to_string());
    }
    parts.join(", ")
}

/// Formats with k/M/G/T suffixes.
pub fn human(x: f64, unit: &str) -> String {
    let (v, s) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.2}{s}{unit}")
}

/// Formats bytes in binary units (KiB, MiB, GiB).
pub fn bytes(b: u64) -> String {
    let x = b as f64;
    if x >= GIB {
        format!("{:.2}GiB", x / GIB)
    } else if x >= 1024.0 * 1024.0 {
        format!("{:.2}MiB", x / 1024.0 / 1024.0)
    } else if x >= 1024.0 {
        format!("{:.1}KiB", x / 1024.0)
    } else {
        format!("{b}B")
    }
}

/// Formats seconds as s, ms or µs.
pub fn seconds(t: f64) -> String {
    if t >= 1.0 {
        format!("{t:.2}s")
    } else if t >= 1e-3 {
        format!("{:.2}ms", t * 1e3)
    } else {
        format!("{:.1}us", t * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelShape {
        ModelShape::gpt(65, 128, 256, 8, 8, 1024)
    }

    #[test]
    fn gpt_tiny_splits_evenly_with_embed_first_and_head_last() {
        let plan = Plan::balanced(&tiny(), 2, 8, 8, 4).unwrap();
        assert_eq!(plan.stages.len(), 2);
        assert_eq!(plan.stages[0].layers[0], LayerKind::Embedding);
        assert_eq!(*plan.stages[1].layers.last().unwrap(), LayerKind::Head);
        assert_eq!(plan.stages[0].layers.len(), 5);
        assert_eq!(plan.stage_of(LayerKind::Block(4)), Some(StageId(1)));
        let total: u64 = plan.stages.iter().map(|s| s.params).sum();
        assert_eq!(total, plan.total_params);
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    }

    #[test]
    fn every_stage_has_a_block_at_max_pp() {
        let plan = Plan::balanced(&tiny(), 8, 8, 8, 4).unwrap();
        for s in &plan.stages {
            assert!(s.layers.iter().any(|l| matches!(l, LayerKind::Block(_))));
        }
        let e = Plan::balanced(&tiny(), 9, 8, 8, 4).unwrap_err().to_string();
        assert!(
            e.contains("parallel.pp = 9") && e.contains("model.n_layers = 8"),
            "{e}"
        );
    }

    #[test]
    fn virtual_stages_are_round_robin_chunks() {
        let mut spec = PlanSpec::new(tiny(), 2, 8, 8);
        spec.virtual_stages = 2;
        spec.schedule = PipeSchedule::Interleaved1F1B;
        let plan = Plan::build(&spec).unwrap();
        assert_eq!((plan.pp, plan.virtual_stages, plan.stages.len()), (2, 2, 4));
        for (c, s) in plan.stages.iter().enumerate() {
            assert_eq!((s.stage, s.rank), (StageId(c), Rank(c % 2)));
            assert!(s.layers.iter().any(|l| l.is_block()));
        }
        assert_eq!(plan.chunks_of(Rank(1)).len(), 2);
        spec.virtual_stages = 5;
        let e = Plan::build(&spec).unwrap_err().to_string();
        assert!(
            e.contains("parallel.virtual_stages") && e.contains("= 10"),
            "{e}"
        );
        spec.virtual_stages = 2;
        spec.schedule = PipeSchedule::OneFOneB;
        let e = Plan::build(&spec).unwrap_err().to_string();
        assert!(e.contains("interleaved-1f1b"), "{e}");
    }

    #[test]
    fn every_method_builds_and_optimal_is_never_worse() {
        let shape = ModelShape::llama(32000, 512, 512, 8, 2, 12, 1376);
        for pp in [2, 3, 4, 6] {
            let mut worst = Vec::new();
            for method in [
                PartitionMethod::Uniform,
                PartitionMethod::Parameters,
                PartitionMethod::Flops,
                PartitionMethod::Optimal,
            ] {
                let mut spec = PlanSpec::new(shape.clone(), pp, 8, 1);
                spec.method = method;
                let plan = Plan::build(&spec).unwrap();
                assert_eq!(plan.method, method.name());
                worst.push(plan.stages.iter().map(|s| s.time_s).fold(0.0, f64::max));
            }
            let opt = worst[3];
            assert!(worst.iter().all(|&w| opt <= w * (1.0 + 1e-12)), "{worst:?}");
        }
    }

    #[test]
    fn memory_cap_is_respected_or_refused_with_numbers() {
        let shape = ModelShape::gpt(50257, 1024, 768, 12, 12, 3072);
        let mut spec = PlanSpec::new(shape, 4, 8, 4);
        spec.method = PartitionMethod::Optimal;
        let free = Plan::build(&spec).unwrap();
        let peak = free.stages.iter().map(|s| s.memory_bytes).max().unwrap();
        // A cap just below the unconstrained plan's peak still fits, under the cap.
        spec.memory_cap_bytes = Some(peak - 1);
        if let Ok(p) = Plan::build(&spec) {
            assert!(p.stages.iter().all(|s| s.memory_bytes < peak));
        }
        spec.memory_cap_bytes = Some(1 << 30);
        let e = Plan::build(&spec).unwrap_err().to_string();
        assert!(
            e.contains("parallel.memory_gib = 1.00")
                && e.contains("1073741824 bytes")
                && e.contains("needs at least")
                && e.contains("fix:")
                && e.contains("parallel.tp"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }

    #[test]
    fn profile_method_needs_a_profile() {
        let mut spec = PlanSpec::new(tiny(), 2, 8, 8);
        spec.method = PartitionMethod::Profile;
        let e = Plan::build(&spec).unwrap_err().to_string();
        assert!(e.contains("parallel.profile"), "{e}");
        spec.profile = Some(Profile {
            device: "cpu".into(),
            threads: 1,
            model: tiny(),
            micro_batch_size: 8,
            dtype_bytes: 4,
            layers: ["embed", "block", "head"]
                .iter()
                .map(|k| crate::profile::LayerTiming {
                    kind: k.to_string(),
                    fwd_s: if *k == "head" { 0.004 } else { 0.001 },
                    bwd_s: 0.002,
                    runs: 3,
                })
                .collect(),
            calibration: Default::default(),
        });
        let plan = Plan::build(&spec).unwrap();
        assert!(
            (plan.stages.iter().map(|s| s.time_s).sum::<f64>() - (0.003 * 9.0 + 0.006)).abs()
                < 1e-12
        );
    }
}
