//! The performance model: device throughput and links ([`Hardware`]), what each pipeline
//! schedule family costs in memory and bubble in closed form ([`PipeSchedule`]), and the
//! calibrated [`CostModel`] that prices every piece of a training step.
//!
//! # How a step is predicted
//!
//! A step is the configured schedule, simulated action by action on every pipeline rank
//! ([`crate::schedule::simulate_messages`]), followed by what every rank does after it.
//! With micro-batch size `b`, sequence length `s`, width `d`, `e` bytes per element and
//! tensor-parallel degree `t`, for chunk `c` (a run of layers):
//!
//! * **Compute.** `F(c) = k_F · Σ_l f_l + Σ AR_t(fwd collectives of c)`,
//!   `B(c) = k_B · Σ_l b_l + Σ AR_t(bwd collectives of c)`, where `f_l`, `b_l` are layer
//!   `l`'s forward and backward seconds measured by `strata profile` with every rank busy
//!   at this `b` and `t`. At `t > 1` the profile times each tp group running its shards
//!   through its own communicator, so `f_l`, `b_l` include the layer's collectives and
//!   the `AR_t` terms drop out (profiles without such a set keep them). A timing
//!   measured at another micro-batch size or at `t = 1` is scaled by the layer's
//!   per-device FLOPs; without a profile, `FLOPs / device_tflops`. `k_F`, `k_B` are the
//!   measured chunk ratios: a chunk as the executor runs it (embedding, `n` blocks and
//!   the head in one model, two microbatches stashed before their backwards) over the
//!   sum of its layers timed one at a time, with every rank doing the same at once. The
//!   chunks run on a warm heap, as a training rank's do from step to step: the first
//!   repetition keeps one more forward of the largest chunk alive at its peak, so glibc
//!   cannot trim the heap top between repetitions and fault the stash in again (without
//!   it the profile read a 4- and 8-block chunk's forward at 1.16x and 1.23x its layers
//!   and 8 stashed microbatches at 1.24x 2, where the runs showed about 1.04x, 1.08x and
//!   1.0x). They
//!   depend on the chunk's depth `n` (its blocks): a deeper chunk holds more weights,
//!   autograd graph and stashed activations, and runs each block slower. The profile
//!   measures `k(n)` at `n = 1, 2, 4, …` and the model's blocks, at the config's
//!   micro-batch size, for tp = 1 and each tp degree (the shards with their
//!   collectives), timing the depths in turn so a drifting machine moves them alike
//!   ([`crate::profile::LayerSet::chunk_depths`]); between measured depths `k` is linear
//!   in `n`, outside them the nearest end's. Since `k(n)` is the chunk's time over these
//!   same layer timings, a chunk of a measured depth is predicted at its measured time.
//!   Without a curve: the ratio of a 4-block chunk at the nearest micro-batch size
//!   (1 without a measurement). The ratio is then multiplied by the stash ratio
//!   `k_S(m)` of the chunk's peak microbatches in flight `m` (the schedule's, as the
//!   memory model counts them): a 4-block chunk holding `m = 1, 2` and the config's
//!   microbatches timed in turn, against holding 2
//!   ([`crate::profile::LayerSet::stash_scale`]; linear in `m` between them; measured at
//!   tp = 1 and applied at every degree). GPipe's chunks hold every microbatch and run
//!   slower than 1F1B's.
//! * **Zero-bubble split.** When the profile timed a chunk's split backward against its
//!   fused one, alternately ([`crate::profile::LayerSet::split_scale`]):
//!   `I(c) = i · k_B·Σ b_l + Σ AR_t(bwd)`, `W(c) = w · k_B·Σ b_l`, where `i + w > 1` is
//!   usual (two passes over the graph; `I` keeps what `W` needs). Otherwise
//!   `W(c) = B(c) · Wflops(c) / Bflops(c)`, where `Wflops` are the linear layers'
//!   weight-gradient FLOPs (equal to their forward FLOPs), and `I(c) = B(c) − W(c)`.
//! * **Tensor-parallel collectives** ([`tp_collectives`]): per block two all-reduces of
//!   `e·bsd` in the forward (attention and MLP outputs) and two in the backward (their
//!   inputs' gradients); the embedding one forward; the head three fp32 per-token
//!   reductions forward and one `e·bsd` backward. `AR_t(n)` is the measured all-reduce
//!   curve of a `t`-rank group for a tensor of `n` bytes, copies included.
//! * **Pipeline messages** ([`MessageCost`]): a send costs its sender `send(n)` (tensor
//!   serialisation), arrives `one_way(n)` later (measured ping-pong), and costs its
//!   receiver `recv(n)` (deserialisation); `n = e·bsd`. When the profile found that
//!   messages of that size only move inside the sender's communicator calls, the transit
//!   starts at the sender's next send or receive instead.
//! * **After the schedule**, on each rank with `N` parameter values in `G` flat buffer
//!   groups (decay / no decay, owned / not): the tied-embedding sum over the pipeline
//!   group, the data-parallel gradient average `DP_dp(4N)` (measured as the engine runs
//!   it, on bucket views of the gradient buffers), the owned squared norm
//!   `n_G·G + n_N·N`, the world's scalar all-reduce (a barrier: every rank waits for the
//!   slowest), the clip scaling and AdamW `a_G·G + a_N·N` (all measured). So
//!
//!   `step = max_r (end_r + tied_r + DP_r + norm_r) + A_scalar + max_r (clip_r + adam_r)`
//!
//!   where `end_r` is rank `r`'s finish time in the simulation; without `grad_clip` the
//!   norm and its all-reduce drop out.
//!
//! Without a profile the same formulas run on the [`Hardware`] figures: a point-to-point
//! message takes `latency + n / bandwidth`, a ring all-reduce over `g` ranks
//! `2(g − 1)/g · n / bandwidth + 2(g − 1) · latency`, and serialisation and the optimizer
//! are not priced.
//!
//! Invariants: every time is finite and non-negative for valid inputs; in-flight counts are
//! between 1 and the number of microbatches.

mod model;

pub use model::{tp_collectives, CostModel, MessageCost, TimeSource};

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Device and link figures (config section `parallel.hardware`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hardware {
    /// Sustained dense throughput per device, TFLOP/s.
    pub device_tflops: f64,
    /// Pipeline (stage-to-stage) bandwidth, GB/s, and latency, µs.
    pub p2p_gb_s: f64,
    pub p2p_latency_us: f64,
    /// Tensor-parallel all-reduce bandwidth (intra-node), GB/s, and latency, µs.
    pub tp_gb_s: f64,
    pub tp_latency_us: f64,
    /// Data-parallel gradient all-reduce bandwidth, GB/s, and latency, µs.
    pub dp_gb_s: f64,
    pub dp_latency_us: f64,
}

impl Default for Hardware {
    fn default() -> Self {
        Hardware {
            device_tflops: 100.0,
            p2p_gb_s: 25.0,
            p2p_latency_us: 10.0,
            tp_gb_s: 150.0,
            tp_latency_us: 5.0,
            dp_gb_s: 25.0,
            dp_latency_us: 20.0,
        }
    }
}

impl Hardware {
    /// Checks that every figure is a positive (latencies: non-negative) finite number.
    pub fn validate(&self) -> Result<()> {
        let figures: [(&'static str, f64, bool); 7] = [
            ("parallel.hardware.device_tflops", self.device_tflops, true),
            ("parallel.hardware.p2p_gb_s", self.p2p_gb_s, true),
            (
                "parallel.hardware.p2p_latency_us",
                self.p2p_latency_us,
                false,
            ),
            ("parallel.hardware.tp_gb_s", self.tp_gb_s, true),
            ("parallel.hardware.tp_latency_us", self.tp_latency_us, false),
            ("parallel.hardware.dp_gb_s", self.dp_gb_s, true),
            ("parallel.hardware.dp_latency_us", self.dp_latency_us, false),
        ];
        for (field, v, positive) in figures {
            let ok = v.is_finite() && if positive { v > 0.0 } else { v >= 0.0 };
            if !ok {
                return Err(Error::BadValue {
                    field,
                    value: v.to_string(),
                    reason: if positive {
                        "must be a positive number".into()
                    } else {
                        "must be a non-negative number".into()
                    },
                    fix: format!("set {field} to a measured figure, or remove it for the default"),
                });
            }
        }
        Ok(())
    }

    /// Seconds to compute `flops`.
    pub fn compute_s(&self, flops: f64) -> f64 {
        flops / (self.device_tflops * 1e12)
    }

    /// Seconds for one pipeline message of `bytes`.
    pub fn p2p_s(&self, bytes: u64) -> f64 {
        if bytes == 0 {
            return 0.0;
        }
        self.p2p_latency_us * 1e-6 + bytes as f64 / (self.p2p_gb_s * 1e9)
    }

    /// Seconds for `count` ring all-reduces totalling `bytes` over `group` ranks.
    pub fn tp_allreduce_s(&self, bytes: u64, count: u32, group: usize) -> f64 {
        ring(bytes, count, group, self.tp_gb_s, self.tp_latency_us)
    }

    /// Seconds for the data-parallel gradient all-reduce of `bytes` over `group` ranks.
    pub fn dp_allreduce_s(&self, bytes: u64, group: usize) -> f64 {
        ring(bytes, 1, group, self.dp_gb_s, self.dp_latency_us)
    }
}

fn ring(bytes: u64, count: u32, group: usize, gb_s: f64, latency_us: f64) -> f64 {
    if group <= 1 || count == 0 {
        return 0.0;
    }
    let g = group as f64;
    2.0 * (g - 1.0) / g * bytes as f64 / (gb_s * 1e9)
        + count as f64 * 2.0 * (g - 1.0) * latency_us * 1e-6
}

/// Pipeline schedule families, as far as memory and bubble are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PipeSchedule {
    /// All forwards, then all backwards: every stage holds all `m` microbatches.
    Gpipe,
    /// One-forward-one-backward: stage `i` of `p` holds `p − i`.
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Interleaved 1F1B over `v` model chunks per rank (Narayanan et al. 2021).
    #[serde(rename = "interleaved-1f1b")]
    Interleaved1F1B,
    /// Zero-bubble H1 (Qi et al. 2024): 1F1B memory, about a third of its bubble.
    #[serde(rename = "zb-h1")]
    ZbH1,
}

impl PipeSchedule {
    /// All families, in the order the auto-planner tries them.
    pub const ALL: [PipeSchedule; 4] = [
        PipeSchedule::OneFOneB,
        PipeSchedule::Interleaved1F1B,
        PipeSchedule::ZbH1,
        PipeSchedule::Gpipe,
    ];

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            PipeSchedule::Gpipe => "gpipe",
            PipeSchedule::OneFOneB => "1f1b",
            PipeSchedule::Interleaved1F1B => "interleaved-1f1b",
            PipeSchedule::ZbH1 => "zb-h1",
        }
    }

    /// Parses `parallel.schedule`.
    pub fn parse(s: &str) -> Result<PipeSchedule> {
        PipeSchedule::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| Error::BadValue {
                field: "parallel.schedule",
                value: s.to_string(),
                reason: "unknown schedule".into(),
                fix: "use one of gpipe, 1f1b, interleaved-1f1b, zb-h1".into(),
            })
    }

    /// Whether the family runs more than one model chunk per rank.
    pub fn is_interleaved(self) -> bool {
        self == PipeSchedule::Interleaved1F1B
    }

    /// Microbatches whose activations model chunk `chunk` (of `pp · v`, placed on rank
    /// `chunk % pp`) keeps stashed at the schedule's peak, with `m` microbatches per step.
    ///
    /// GPipe: `m`. 1F1B and ZB-H1: `min(p − r, m)` on rank `r`. Interleaved 1F1B: rank
    /// `r` runs Megatron's `w = (p − r − 1)·2 + (v − 1)·p` warm-up chunk-forwards and holds
    /// `w + 1` chunk activations at its peak, spread over its `v` chunks:
    /// `⌈(w + 1)/v⌉` each, at most `m`.
    pub fn in_flight(self, chunk: usize, pp: usize, v: usize, m: usize) -> usize {
        let r = chunk % pp.max(1);
        let n = match self {
            PipeSchedule::Gpipe => m,
            PipeSchedule::OneFOneB | PipeSchedule::ZbH1 => pp - r,
            PipeSchedule::Interleaved1F1B => {
                let w = (pp - r - 1) * 2 + (v.max(1) - 1) * pp;
                (w + 1).div_ceil(v.max(1))
            }
        };
        n.clamp(1, m.max(1))
    }

    /// Closed-form bubble fraction (idle / total) with `p` ranks, `m` microbatches and
    /// `v` chunks per rank, for balanced stages: GPipe and 1F1B `(p−1)/(m+p−1)`;
    /// interleaved `(p−1)/(v·m+p−1)`; ZB-H1 `(p−1)/3 / (m+(p−1)/3)`.
    pub fn bubble_fraction(self, p: usize, m: usize, v: usize) -> f64 {
        let (p, m, v) = (p as f64, m.max(1) as f64, v.max(1) as f64);
        match self {
            PipeSchedule::Gpipe | PipeSchedule::OneFOneB => (p - 1.0) / (m + p - 1.0),
            PipeSchedule::Interleaved1F1B => (p - 1.0) / (v * m + p - 1.0),
            PipeSchedule::ZbH1 => {
                let b = (p - 1.0) / 3.0;
                b / (m + b)
            }
        }
    }
}

impl std::fmt::Display for PipeSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts() {
        let s = PipeSchedule::OneFOneB;
        assert_eq!(
            (0..4).map(|r| s.in_flight(r, 4, 1, 8)).collect::<Vec<_>>(),
            vec![4, 3, 2, 1]
        );
        assert_eq!(s.in_flight(0, 4, 1, 2), 2);
        assert_eq!(PipeSchedule::Gpipe.in_flight(3, 4, 1, 8), 8);
        // interleaved p = 2, v = 2: rank 0 warm-up 2 + 2 = 4 -> 5 chunk activations, 3 per chunk
        assert_eq!(PipeSchedule::Interleaved1F1B.in_flight(0, 2, 2, 8), 3);
        assert_eq!(PipeSchedule::Interleaved1F1B.in_flight(3, 2, 2, 8), 2);
    }

    #[test]
    fn bubbles_and_comm() {
        assert!((PipeSchedule::OneFOneB.bubble_fraction(4, 8, 1) - 3.0 / 11.0).abs() < 1e-12);
        assert!(
            PipeSchedule::Interleaved1F1B.bubble_fraction(4, 8, 2)
                < PipeSchedule::OneFOneB.bubble_fraction(4, 8, 1)
        );
        assert!(
            PipeSchedule::ZbH1.bubble_fraction(4, 8, 1)
                < PipeSchedule::OneFOneB.bubble_fraction(4, 8, 1)
        );
        let h = Hardware::default();
        assert_eq!(h.tp_allreduce_s(1000, 1, 1), 0.0);
        assert!(h.tp_allreduce_s(1000, 1, 2) > 0.0);
        assert!(PipeSchedule::parse("zb-h1").is_ok());
        let e = PipeSchedule::parse("zb").unwrap_err().to_string();
        assert!(e.contains("parallel.schedule = zb"), "{e}");
        let bad = Hardware {
            tp_gb_s: 0.0,
            ..Hardware::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("parallel.hardware.tp_gb_s"));
    }
}
