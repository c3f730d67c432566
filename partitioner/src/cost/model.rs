//! [`CostModel`]: the seconds of every piece of a training step, from a profile when one
//! is given and from the [`Hardware`] figures otherwise. The formulas are in the docs of
//! [`crate::cost`].
//!
//! Invariant: every price is finite and non-negative; a missing measurement falls back
//! to the next best source (another micro-batch size or tp degree scaled by FLOPs, then
//! the hardware figures), never to zero for work that exists.

use super::Hardware;
use crate::graph::{LayerKind, LayerNode, ModelShape};
use crate::profile::{Calibration, Profile};

/// Where a layer time came from (for reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeSource {
    /// Measured with every rank busy at this micro-batch size and tp degree.
    Measured,
    /// Measured as [`TimeSource::Measured`], on every rank of a tp group running its
    /// shard with the layer's collectives inside: they are not priced again.
    WithCollectives,
    /// Measured at another micro-batch size or tp degree, scaled by FLOPs.
    Scaled,
    /// FLOPs divided by a throughput (the sgemm peak, or `device_tflops`).
    Flops,
}

/// One pipeline message's costs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MessageCost {
    /// The sender's own time: serialising the tensor and posting the send.
    pub send_s: f64,
    /// From the send to the receiver having it.
    pub transit_s: f64,
    /// The receiver's own time once it is there: deserialising it.
    pub recv_s: f64,
    /// The message moves only inside the sender's later communicator calls.
    pub needs_sender_progress: bool,
}

/// The cost model of one layout; see the module docs.
#[derive(Clone, Debug, PartialEq)]
pub struct CostModel {
    pub hardware: Hardware,
    pub profile: Option<Profile>,
    /// Ranks computing at once (`pp · tp · dp`): picks the layer timings measured with
    /// as many ranks busy.
    pub ranks: usize,
}

impl CostModel {
    pub fn new(hardware: Hardware, profile: Option<Profile>, ranks: usize) -> CostModel {
        CostModel {
            hardware,
            profile,
            ranks: ranks.max(1),
        }
    }

    fn calibration(&self) -> Option<&Calibration> {
        self.profile
            .as_ref()
            .map(|p| &p.calibration)
            .filter(|c| !c.is_empty())
    }

    /// Forward and backward compute seconds of `node` (a layer at micro-batch size `mbs`
    /// and tensor-parallel degree `tp`) timed alone; `unsharded` is the same layer at
    /// `tp = 1`, whose FLOPs scale a timing measured at another degree. Inside a chunk a
    /// measured time is multiplied by [`CostModel::chunk_scale`].
    pub fn layer_s(
        &self,
        node: &LayerNode,
        unsharded: &LayerNode,
        mbs: usize,
        tp: usize,
    ) -> (f64, f64, TimeSource) {
        let family = node.kind.family();
        if let Some(p) = &self.profile {
            let time_of = |layers: &[crate::profile::LayerTiming]| {
                layers
                    .iter()
                    .find(|l| l.kind == family)
                    .map(|l| (l.fwd_s, l.bwd_s))
            };
            // A single process: the profile's own (solo) timings when they fit.
            if self.ranks == 1 && tp == 1 && p.micro_batch_size == mbs {
                if let Some((f, b)) = time_of(&p.layers) {
                    return (f, b, TimeSource::Measured);
                }
            }
            let cal = &p.calibration;
            if let Some(set) = cal.layer_set(mbs, tp, self.ranks) {
                if let Some((f, b)) = time_of(&set.layers) {
                    let source = if set.collectives && tp > 1 {
                        TimeSource::WithCollectives
                    } else {
                        TimeSource::Measured
                    };
                    return (f, b, source);
                }
            }
            // Nearest measured micro-batch size at tp = 1, scaled by FLOPs.
            let nearest = cal
                .layer_sets
                .iter()
                .filter(|s| s.tp == 1)
                .min_by_key(|s| {
                    (
                        s.micro_batch_size.abs_diff(mbs),
                        s.concurrent.abs_diff(self.ranks),
                    )
                })
                .map(|s| (s.micro_batch_size, time_of(&s.layers)));
            let measured = match nearest {
                Some((b, Some(t))) => Some((b, t)),
                _ => time_of(&p.layers).map(|t| (p.micro_batch_size, t)),
            };
            if let Some((b, (f, bw))) = measured {
                // FLOPs are linear in the micro-batch size; tp divides the sharded part.
                let batch = mbs as f64 / b.max(1) as f64;
                let shard = |sharded: f64, whole: f64| {
                    if whole > 0.0 {
                        sharded / whole
                    } else {
                        1.0 / tp as f64
                    }
                };
                let fs = batch * shard(node.cost.fwd_flops, unsharded.cost.fwd_flops);
                let bs = batch * shard(node.cost.bwd_flops, unsharded.cost.bwd_flops);
                return (f * fs, bw * bs, TimeSource::Scaled);
            }
        }
        let rate = self.flops_per_s();
        (
            node.cost.fwd_flops / rate,
            node.cost.bwd_flops / rate,
            TimeSource::Flops,
        )
    }

    /// Forward and backward ratios of a chunk of `blocks` blocks with `stash`
    /// microbatches in flight at its peak, at micro-batch size `mbs` and degree `tp`,
    /// against its layers timed alone, as the profile measured them: the depth's ratio
    /// ([`Calibration::chunk_scale_at`], two stashed) times the stash depth's
    /// ([`Calibration::stash_scale_at`]); (1, 1) without a calibration.
    pub fn chunk_scale(&self, mbs: usize, tp: usize, blocks: usize, stash: usize) -> (f64, f64) {
        self.calibration().map_or((1.0, 1.0), |c| {
            let (df, db) = c.chunk_scale_at(mbs, tp, blocks);
            let (sf, sb) = c.stash_scale_at(mbs, stash);
            (df * sf, db * sb)
        })
    }

    /// The measured zero-bubble split of a chunk's backward, (`I`, `W`) as fractions of
    /// the fused backward, if the profile has it.
    pub fn split_scale(&self, mbs: usize) -> Option<(f64, f64)> {
        self.calibration().and_then(|c| c.split_scale(mbs))
    }

    /// Dense FLOP/s of one device: the measured sgemm peak, else `device_tflops`.
    pub fn flops_per_s(&self) -> f64 {
        self.calibration()
            .and_then(|c| c.matmul)
            .map_or(self.hardware.device_tflops * 1e12, |m| m.flops_per_s)
    }

    /// Seconds of one tensor-parallel all-reduce of `bytes` over `tp` ranks.
    pub fn tp_all_reduce_s(&self, bytes: u64, tp: usize) -> f64 {
        if tp <= 1 || bytes == 0 {
            return 0.0;
        }
        match self.calibration().and_then(|c| c.group("tp", tp)) {
            Some(g) => g
                .tensor_all_reduce
                .as_ref()
                .unwrap_or(&g.all_reduce)
                .at(bytes),
            None => self.hardware.tp_allreduce_s(bytes, 1, tp),
        }
    }

    /// Forward and backward seconds of `layer`'s tensor-parallel collectives for one
    /// microbatch (see [`tp_collectives`]).
    pub fn tp_collectives_s(
        &self,
        shape: &ModelShape,
        layer: LayerKind,
        mbs: usize,
        e: usize,
        tp: usize,
    ) -> (f64, f64) {
        let (fwd, bwd) = tp_collectives(shape, layer, mbs, e, tp);
        let sum = |v: Vec<u64>| v.into_iter().map(|b| self.tp_all_reduce_s(b, tp)).sum();
        (sum(fwd), sum(bwd))
    }

    /// Costs of one pipeline message of `bytes` of payload.
    pub fn message(&self, bytes: u64) -> MessageCost {
        // The engine's wire header: magic, dtype, rank, chunk, microbatch and 3 dims.
        let wire = bytes + 12 + 3 * 8;
        match self.calibration().and_then(|c| c.p2p.as_ref()) {
            Some(p) => MessageCost {
                send_s: p.send_overhead.at(bytes),
                transit_s: p.one_way.at(wire),
                recv_s: p.recv_overhead.at(bytes),
                needs_sender_progress: p.stalls_above_bytes.is_some_and(|n| wire >= n),
            },
            None => MessageCost {
                transit_s: self.hardware.p2p_s(wire),
                ..MessageCost::default()
            },
        }
    }

    /// Seconds of the data-parallel gradient average of `grad_bytes` over `dp` ranks.
    pub fn dp_all_reduce_s(&self, grad_bytes: u64, dp: usize) -> f64 {
        if dp <= 1 || grad_bytes == 0 {
            return 0.0;
        }
        match self.calibration().and_then(|c| c.group("dp", dp)) {
            Some(g) => g
                .grad_all_reduce
                .as_ref()
                .unwrap_or(&g.all_reduce)
                .at(grad_bytes),
            None => self.hardware.dp_allreduce_s(grad_bytes, dp),
        }
    }

    /// Seconds of an f32 all-reduce of `bytes` over a group of `size` (tied embeddings'
    /// gradient sum over the pipeline group).
    pub fn group_all_reduce_s(&self, bytes: u64, size: usize) -> f64 {
        if size <= 1 || bytes == 0 {
            return 0.0;
        }
        match self.calibration().and_then(|c| c.group("dp", size)) {
            Some(g) => g.all_reduce.at(bytes),
            None => self.hardware.dp_allreduce_s(bytes, size),
        }
    }

    /// Per-step seconds outside the schedule on one rank holding `elements` parameter
    /// values in `groups` flat buffer groups: (before the gradient-norm all-reduce, the
    /// all-reduce itself, after it). Without a profile only the all-reduce is priced.
    pub fn optimizer_s(&self, groups: u64, elements: u64, clip: bool) -> (f64, f64, f64) {
        let Some(c) = self.calibration().and_then(|c| c.step) else {
            let sync = if clip {
                2.0 * self.hardware.p2p_latency_us * 1e-6
            } else {
                0.0
            };
            return (0.0, sync, 0.0);
        };
        let (t, e) = (groups as f64, elements as f64);
        let adam = c.adamw_fixed_s * t + c.adamw_element_s * e;
        if !clip {
            return (0.0, 0.0, adam);
        }
        let norm = c.norm_fixed_s * t + c.norm_element_s * e;
        let scale = c.clip_fixed_s * t + c.clip_element_s * e;
        (norm, c.scalar_all_reduce_s, scale + adam)
    }
}

/// Byte sizes of the tensor-parallel all-reduces of `layer` for one microbatch, forward
/// and backward (none at `tp = 1`): a block reduces its attention and MLP outputs in the
/// forward and their inputs' gradients in the backward (`e·bsd` each); the embedding sums
/// its vocabulary-parallel lookups; the head reduces the cross-entropy's row maxima, sums
/// and target logits (fp32 per token) forward and its input's gradient backward.
pub fn tp_collectives(
    shape: &ModelShape,
    layer: LayerKind,
    mbs: usize,
    e: usize,
    tp: usize,
) -> (Vec<u64>, Vec<u64>) {
    if tp <= 1 {
        return (Vec::new(), Vec::new());
    }
    let tokens = (mbs * shape.seq_len) as u64;
    let hidden = tokens * shape.d_model as u64 * e as u64;
    match layer {
        LayerKind::Embedding => (vec![hidden], Vec::new()),
        LayerKind::Block(_) => (vec![hidden; 2], vec![hidden; 2]),
        LayerKind::Head => (vec![4 * tokens; 3], vec![hidden]),
    }
}
