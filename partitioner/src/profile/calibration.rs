//! What `strata profile` measures on the real ranks under MPI, besides the single-process
//! layer timings: layer timings taken on every rank at once (at several micro-batch sizes
//! and tensor-parallel degrees), the point-to-point and all-reduce curves of the engine's
//! transport, the sgemm peak, the per-step costs outside the schedule (AdamW, gradient
//! norm) and the memory a rank holds before it builds a model.
//!
//! Invariant: every part is optional ([`Calibration::default`] is an old profile without
//! one); a part that is present was measured by the engine's own code paths (its
//! communicators, its optimizer), so the planner prices what the engine really does.

use super::curve::Curve;
use super::LayerTiming;
use crate::activation::ActivationPolicy;
use serde::{Deserialize, Serialize};

/// Layer timings measured with `concurrent` ranks timing at once (as in a real run, where
/// every rank computes at the same time and they share the memory system).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerSet {
    pub micro_batch_size: usize,
    /// Tensor-parallel degree of the timed shard.
    pub tp: usize,
    /// Ranks that were timing at the same moment.
    pub concurrent: usize,
    pub layers: Vec<LayerTiming>,
    /// The zero-bubble split of one block's backward: seconds of `I` (input gradient) and
    /// `W` (weight gradient), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_split: Option<(f64, f64)>,
    /// The timings include the layers' tensor-parallel collectives: each tp group ran its
    /// shard through its own communicator, as the engine does. Otherwise (older profiles)
    /// the collectives are priced separately from the all-reduce curves.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub collectives: bool,
    /// A chunk as the executor runs it (embedding, blocks and head in one model, two
    /// microbatches stashed before their backwards, on a heap kept warm from repetition
    /// to repetition as a training rank's is) against the sum of its layers timed one at
    /// a time: (forward, backward) ratios, when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_scale: Option<(f64, f64)>,
    /// The same ratios measured at several chunk depths (blocks per chunk), when
    /// measured: a deeper chunk has a larger working set and runs each block slower.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunk_depths: Vec<ChunkScale>,
    /// The zero-bubble split backward of a chunk against its fused backward: (`I`, `W`)
    /// as fractions of the fused backward's seconds, when measured. They need not add up
    /// to 1 (two passes over the graph, and `I` keeps what `W` needs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_scale: Option<(f64, f64)>,
    /// A chunk with `blocks` = microbatches stashed before their backwards, against the
    /// same chunk with two stashed (the depth curve's), when measured: more activations
    /// in flight, a larger working set. `blocks` holds the stash depth here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stash_scale: Vec<ChunkScale>,
}

/// A chunk of `blocks` blocks (with the embedding and the head) as the executor runs it,
/// against the sum of its layers timed alone: forward and backward ratios.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChunkScale {
    pub blocks: usize,
    pub fwd: f64,
    pub bwd: f64,
}

/// The ratios at `blocks` on `curve` (sorted by `blocks`): linear between the measured
/// points around it, the nearest end's outside them.
pub fn interpolate_depth(curve: &[ChunkScale], blocks: usize) -> Option<(f64, f64)> {
    let first = curve.first()?;
    let n = blocks as f64;
    let mut below = first;
    for c in curve {
        if c.blocks >= blocks {
            if c.blocks == below.blocks || blocks <= below.blocks {
                return Some((c.fwd, c.bwd));
            }
            let t = (n - below.blocks as f64) / (c.blocks - below.blocks) as f64;
            let mix = |a: f64, b: f64| a + t * (b - a);
            return Some((mix(below.fwd, c.fwd), mix(below.bwd, c.bwd)));
        }
        below = c;
    }
    Some((below.fwd, below.bwd))
}

/// The all-reduce curve of one group shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupCurve {
    /// `tp` (consecutive ranks, activations) or `dp` (strided ranks, gradients).
    pub group: String,
    pub size: usize,
    /// An f32 all-reduce of a flat buffer through the engine's communicator.
    pub all_reduce: Curve,
    /// The same as the engine's tensor-parallel layers run it: tensor to buffer, reduce,
    /// buffer to tensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor_all_reduce: Option<Curve>,
    /// The data-parallel gradient average as the engine runs it (bucket packing,
    /// reduction, scaling, unpacking), against gradient bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_all_reduce: Option<Curve>,
}

/// Pipeline messages between two ranks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct P2pProfile {
    /// One-way time (half a ping-pong) of a raw message through the engine's transport.
    pub one_way: Curve,
    /// Sender-side cost of a pipeline send: serialising the tensor and posting it.
    pub send_overhead: Curve,
    /// Receiver-side cost once the message is there: deserialising it into a tensor.
    pub recv_overhead: Curve,
    /// Messages above this size do not move while the sender computes (they progress only
    /// inside the sender's communicator calls); `None` when every measured size did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stalls_above_bytes: Option<u64>,
    /// memcpy bandwidth of this machine, bytes/s, for comparison.
    #[serde(default)]
    pub memcpy_bytes_s: f64,
}

/// Dense fp32 matmul throughput per rank at the profile's thread count, every rank
/// multiplying at once.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatmulPeak {
    pub threads: usize,
    /// Best FLOP/s over the measured sizes.
    pub flops_per_s: f64,
    /// The square size that reached it.
    pub n: usize,
}

/// Per-step costs outside the schedule, per rank: `fixed_s + element_s · elements` per
/// flat buffer group, for each pass over the parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepCosts {
    /// AdamW update (and zeroing the gradients).
    pub adamw_fixed_s: f64,
    pub adamw_element_s: f64,
    /// Squared gradient norm of the owned parameters.
    pub norm_fixed_s: f64,
    pub norm_element_s: f64,
    /// Scaling the gradients when the norm is clipped.
    pub clip_fixed_s: f64,
    pub clip_element_s: f64,
    /// One scalar all-reduce over the world (the gradient norm's), seconds.
    pub scalar_all_reduce_s: f64,
}

/// Memory a worker holds before it builds its model: the process with libtorch and MPI
/// initialised and one small op run (thread pools, allocator arenas).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessMemory {
    /// Resident bytes of that process (`VmRSS`).
    pub baseline_bytes: u64,
    /// Installed memory of the machine (`MemTotal`), bytes.
    pub machine_bytes: u64,
}

/// Resident memory of one transformer block's stashed activations per microbatch, as
/// measured (growth of the process's resident set per stashed forward, so the
/// allocator's own overhead is included) and as [`crate::activation`] counts it.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActivationFootprint {
    pub micro_batch_size: usize,
    pub tp: usize,
    #[serde(default)]
    pub policy: ActivationPolicy,
    pub measured_bytes: u64,
    pub modeled_bytes: u64,
}

impl ActivationFootprint {
    /// Resident bytes per modeled byte (≥ 1 when the allocator keeps freed holes).
    pub fn residency(&self) -> f64 {
        if self.modeled_bytes == 0 {
            1.0
        } else {
            self.measured_bytes as f64 / self.modeled_bytes as f64
        }
    }
}

/// Everything measured under MPI; see the module docs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Ranks of the measuring job.
    pub world: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_sets: Vec<LayerSet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p: Option<P2pProfile>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub all_reduce: Vec<GroupCurve>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matmul: Option<MatmulPeak>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepCosts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ProcessMemory>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub activation_footprint: Vec<ActivationFootprint>,
}

impl Calibration {
    /// True for a profile written before calibration existed.
    pub fn is_empty(&self) -> bool {
        *self == Calibration::default()
    }

    /// The all-reduce curves of a group of `size` ranks of kind `group` (`tp` or `dp`),
    /// falling back to the other kind of the same size.
    pub fn group(&self, group: &str, size: usize) -> Option<&GroupCurve> {
        let same_size = || self.all_reduce.iter().filter(|g| g.size == size);
        same_size()
            .find(|g| g.group == group)
            .or_else(|| same_size().next())
    }

    /// Resident bytes per modeled activation byte for `policy` at `tp` and
    /// `micro_batch_size`: the measurement of the same policy and tp at the nearest
    /// micro-batch size, else of any policy; 1 when nothing was measured.
    pub fn residency(&self, policy: ActivationPolicy, tp: usize, micro_batch_size: usize) -> f64 {
        self.activation_footprint
            .iter()
            .min_by_key(|f| {
                (
                    f.policy != policy,
                    f.tp != tp,
                    f.micro_batch_size.abs_diff(micro_batch_size),
                )
            })
            .map_or(1.0, ActivationFootprint::residency)
    }

    /// The chunk ratios ([`LayerSet::chunk_scale`]) measured at the micro-batch size
    /// nearest `micro_batch_size`; (1, 1) when none was.
    pub fn chunk_scale(&self, micro_batch_size: usize) -> (f64, f64) {
        self.layer_sets
            .iter()
            .filter_map(|s| s.chunk_scale.map(|c| (s.micro_batch_size, c)))
            .min_by_key(|(b, _)| b.abs_diff(micro_batch_size))
            .map_or((1.0, 1.0), |(_, c)| c)
    }

    /// The chunk ratios of a chunk of `blocks` blocks at `micro_batch_size` and `tp`: on
    /// the depth curve ([`LayerSet::chunk_depths`]) measured at that micro-batch size and
    /// tp degree, else [`Calibration::chunk_scale`].
    pub fn chunk_scale_at(&self, micro_batch_size: usize, tp: usize, blocks: usize) -> (f64, f64) {
        self.layer_sets
            .iter()
            .find(|s| {
                s.micro_batch_size == micro_batch_size && s.tp == tp && !s.chunk_depths.is_empty()
            })
            .and_then(|s| interpolate_depth(&s.chunk_depths, blocks))
            .unwrap_or_else(|| self.chunk_scale(micro_batch_size))
    }

    /// The ratios of a chunk with `stash` microbatches in flight against two
    /// ([`LayerSet::stash_scale`]) at `micro_batch_size` (the nearest measured one); (1, 1)
    /// when none was measured.
    pub fn stash_scale_at(&self, micro_batch_size: usize, stash: usize) -> (f64, f64) {
        self.layer_sets
            .iter()
            .filter(|s| !s.stash_scale.is_empty())
            .min_by_key(|s| (s.tp != 1, s.micro_batch_size.abs_diff(micro_batch_size)))
            .and_then(|s| interpolate_depth(&s.stash_scale, stash))
            .unwrap_or((1.0, 1.0))
    }

    /// The zero-bubble split ratios ([`LayerSet::split_scale`]) measured at the
    /// micro-batch size nearest `micro_batch_size`, if any.
    pub fn split_scale(&self, micro_batch_size: usize) -> Option<(f64, f64)> {
        self.layer_sets
            .iter()
            .filter_map(|s| s.split_scale.map(|c| (s.micro_batch_size, c)))
            .min_by_key(|(b, _)| b.abs_diff(micro_batch_size))
            .map(|(_, c)| c)
    }

    /// The layer set measured at `micro_batch_size` and `tp`, preferring the one with the
    /// most concurrent ranks not above `ranks`.
    pub fn layer_set(&self, micro_batch_size: usize, tp: usize, ranks: usize) -> Option<&LayerSet> {
        self.layer_sets
            .iter()
            .filter(|s| s.micro_batch_size == micro_batch_size && s.tp == tp)
            .min_by_key(|s| (s.concurrent > ranks, ranks.abs_diff(s.concurrent)))
    }
}
