//! Activation memory: what autograd keeps per microbatch for the backward, per device, for
//! each layer kind, under activation recomputation and sequence parallelism.
//!
//! Counted by listing the tensors each layer's autograd graph saves (checked against
//! PyTorch's `saved_tensors_hooks` on the same layers), with `b` sequences of `s` tokens,
//! width `d`, MLP width `f`, `h` heads, key/value width `d_kv`, padded vocabulary `V`,
//! `e` bytes per element and tensor-parallel degree `t`:
//!
//! * Attention runs libtorch's CPU flash kernel (`_scaled_dot_product_flash_attention_cpu`,
//!   chosen for causal fp32 attention without a mask): it saves q, k, v, its output and
//!   one log-sum-exp per head and token. Nothing is `O(s²)`; q, k and v are views of the
//!   QKV projection's output, and the output is the row-parallel projection's input.
//! * GPT block, `none`: replicated `x, LN1(x), x₂, LN2(x₂)` (`4d`) and the two norms'
//!   mean and rstd (`4`), sharded QKV (`3d`), attention output (`d`), log-sum-exp (`h`),
//!   MLP pre-GELU and post-GELU (`2f`): `e·bs·[(4d + 4)·r + (4d + 2f + h)/t]`.
//! * LLaMA block, `none`: replicated `4d + 2` (RMSNorm inputs, outputs, rstd), sharded QKV
//!   (`d + 2d_kv`), rotated q and k (`d + d_kv`), attention output (`d`), log-sum-exp
//!   (`h`), SwiGLU gate, up, `silu(gate)` and their product (`4f`):
//!   `e·bs·[(4d + 2)·r + (3d + 3d_kv + 4f + h)/t]`.
//! * Both architectures, `none`, also: the chunk's tape holds each row-parallel output
//!   after its reduction (`2d`, replicated region), and at tp > 1 without sequence
//!   parallelism both partial products before the all-reduce (`2d` at full width on every
//!   rank: the cut tape keeps the all-reduce's input and its result).
//! * `selective` recomputes every non-matmul op in the backward (both norms, the attention
//!   core, the activation; recomputing only the core would save just the log-sum-exp
//!   with the flash kernel). A block keeps its input, `x₂` and both reduced row-parallel
//!   outputs (`4d`, replicated region) and its column-parallel outputs: GPT QKV and fc1
//!   (`3d + f`), LLaMA QKV, gate and up (`d + 2d_kv + 2f`). No partial product or
//!   gathered input is kept.
//! * `full` keeps only each block's input, `e·bs·d·r`, and recomputes the block in the
//!   backward.
//! * Sequence parallelism (`r = 1/t`, only with `t > 1`) splits the replicated norm and
//!   residual region along the sequence; without it `r = 1`.
//! * Embedding: the token ids (int64), `8·bs`. Head: the final norm's input, output and
//!   statistics `(2d + 2)·r`, and the log-probabilities (`V`; the vocabulary-parallel loss
//!   keeps logits, exponentials and its gradient, `3V/t`).
//!
//! Zero-bubble schedules split the backward: after `I` a block keeps, until its `W`, each
//! linear layer's input `X` and output gradient `dY` ([`layer_weight_grad_bytes`]). GPT:
//! replicated `LN1(x), LN2(x₂)` and the row-parallel outputs' gradients (`4d`), sharded
//! attention output and post-GELU inputs, QKV and fc1 output gradients (`4d + 2f`).
//! LLaMA: replicated `4d`, sharded `2d + 2d_kv + 3f`. Head: `d` and the logits' gradient.
//!
//! Invariant: every figure is per device and per microbatch; `full ≤ selective ≤ none`,
//! and sequence parallelism never increases a figure.

use crate::graph::{Arch, LayerKind, ModelShape};
use serde::{Deserialize, Serialize};

/// `parallel.recompute`: which activations are recomputed in the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Keep every activation autograd saves.
    #[default]
    None,
    /// Recompute the attention core (scores, softmax, weighted sum).
    Selective,
    /// Keep only each block's input; recompute the whole block.
    Full,
}

impl Recompute {
    /// Every mode, in the order of the docs.
    pub const ALL: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

    /// The config spelling.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How activations are kept: the recompute mode and sequence parallelism.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ActivationPolicy {
    #[serde(default)]
    pub recompute: Recompute,
    #[serde(default)]
    pub sequence_parallel: bool,
}

/// Activation shape parameters of one device.
#[derive(Clone, Debug)]
pub struct ActivationShape {
    pub shape: ModelShape,
    pub micro_batch_size: usize,
    pub dtype_bytes: usize,
    pub tp: usize,
    pub padded_vocab: usize,
}

/// The MLP width of `layer` (0 outside the blocks).
fn ff_width(sh: &ModelShape, layer: LayerKind) -> f64 {
    match layer {
        LayerKind::Block(i) => sh.d_ff_of(i) as f64,
        _ => 0.0,
    }
}

/// Bytes `layer` stashes per microbatch on one device under `policy`; see the module docs.
pub fn layer_activation_bytes(
    a: &ActivationShape,
    layer: LayerKind,
    policy: ActivationPolicy,
) -> u64 {
    let (e, t) = (a.dtype_bytes as f64, a.tp.max(1) as f64);
    let sh = &a.shape;
    let tokens = (a.micro_batch_size * sh.seq_len) as f64;
    let (d, f, h, dkv) = (
        sh.d_model as f64,
        ff_width(sh, layer),
        sh.n_heads as f64,
        sh.d_kv() as f64,
    );
    let r = if policy.sequence_parallel && a.tp > 1 {
        1.0 / t
    } else {
        1.0
    };
    let per_token = match layer {
        LayerKind::Embedding => return (8.0 * tokens) as u64,
        LayerKind::Head => {
            let logits = if a.tp > 1 { 3.0 } else { 1.0 } * a.padded_vocab as f64 / t;
            e * ((2.0 * d + 2.0) * r + logits)
        }
        LayerKind::Block(_) => {
            // The tape's values hold both row-parallel outputs after their reduction
            // (`2d`, replicated region); at tp > 1 without sequence parallelism also both
            // partial products before it (`2d`, full width on every rank).
            let sums = 2.0 * d;
            let partials = if a.tp > 1 && !policy.sequence_parallel {
                2.0 * d
            } else {
                0.0
            };
            let (replicated, sharded, lse) = match sh.arch {
                Arch::Gpt => (4.0 * d + 4.0, 4.0 * d + 2.0 * f, h),
                Arch::Llama => (4.0 * d + 2.0, 3.0 * d + 3.0 * dkv + 4.0 * f, h),
            };
            // Selective keeps the block input, `x2`, both reduced row-parallel outputs
            // and the column-parallel outputs (QKV; fc1, or gate and up).
            let column_outputs = match sh.arch {
                Arch::Gpt => 3.0 * d + f,
                Arch::Llama => d + 2.0 * dkv + 2.0 * f,
            };
            e * match policy.recompute {
                Recompute::None => (replicated + sums) * r + partials + (sharded + lse) / t,
                Recompute::Selective => 4.0 * d * r + column_outputs / t,
                Recompute::Full => d * r,
            }
        }
    };
    (per_token * tokens).round() as u64
}

/// Bytes `layer` keeps per microbatch between a zero-bubble `I` and its `W`; see the
/// module docs.
pub fn layer_weight_grad_bytes(
    a: &ActivationShape,
    layer: LayerKind,
    policy: ActivationPolicy,
) -> u64 {
    let (e, t) = (a.dtype_bytes as f64, a.tp.max(1) as f64);
    let sh = &a.shape;
    let tokens = (a.micro_batch_size * sh.seq_len) as f64;
    let (d, f, dkv) = (sh.d_model as f64, ff_width(sh, layer), sh.d_kv() as f64);
    let r = if policy.sequence_parallel && a.tp > 1 {
        1.0 / t
    } else {
        1.0
    };
    let per_token = match layer {
        LayerKind::Embedding => 0.0,
        LayerKind::Head => d * r + a.padded_vocab as f64 / t,
        LayerKind::Block(_) => match sh.arch {
            Arch::Gpt => 4.0 * d * r + (4.0 * d + 2.0 * f) / t,
            Arch::Llama => 4.0 * d * r + (2.0 * d + 2.0 * dkv + 3.0 * f) / t,
        },
    };
    (e * per_token * tokens).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tiny(tp: usize, b: usize) -> ActivationShape {
        ActivationShape {
            shape: ModelShape::gpt(65, 128, 256, 8, 8, 1024),
            micro_batch_size: b,
            dtype_bytes: 4,
            tp,
            padded_vocab: 65usize.div_ceil(tp) * tp,
        }
    }

    #[test]
    fn gpt_tiny_block_matches_the_saved_tensors() {
        // PyTorch's saved_tensors_hooks on this block at b = 8 list 16.046875 MiB:
        // x, LN1, QKV (3), attention output, x2, LN2 (1 MiB each), pre- and post-GELU
        // (4 MiB each), two norms' mean and rstd (4 KiB each) and the log-sum-exp (32 KiB);
        // plus the two row-parallel outputs the tape's values hold (1 MiB each).
        let bytes = layer_activation_bytes(
            &tiny(1, 8),
            LayerKind::Block(0),
            ActivationPolicy::default(),
        );
        assert_eq!(bytes, (18.046875 * 1048576.0) as u64);
        let full = ActivationPolicy {
            recompute: Recompute::Full,
            sequence_parallel: false,
        };
        assert_eq!(
            layer_activation_bytes(&tiny(1, 8), LayerKind::Block(0), full),
            1 << 20
        );
    }

    proptest! {
        /// full ≤ selective ≤ none, sequence parallelism never adds, and everything is
        /// linear in the micro-batch size.
        #[test]
        fn recompute_and_sp_order(tp in prop::sample::select(vec![1usize, 2, 4, 8]), b in 1usize..16, llama in any::<bool>()) {
            let mut a = tiny(tp, b);
            if llama {
                a.shape = ModelShape::llama(65, 128, 256, 8, 4, 8, 1024);
            }
            for layer in [LayerKind::Embedding, LayerKind::Block(3), LayerKind::Head] {
                for sp in [false, true] {
                    let at = |recompute| layer_activation_bytes(&a, layer, ActivationPolicy { recompute, sequence_parallel: sp });
                    prop_assert!(at(Recompute::Full) <= at(Recompute::Selective));
                    prop_assert!(at(Recompute::Selective) <= at(Recompute::None));
                    let no_sp = layer_activation_bytes(&a, layer, ActivationPolicy { recompute: Recompute::None, sequence_parallel: false });
                    prop_assert!(at(Recompute::None) <= no_sp);
                }
                let one = layer_activation_bytes(&ActivationShape { micro_batch_size: 1, ..a.clone() }, layer, ActivationPolicy::default()) as f64;
                let many = layer_activation_bytes(&a, layer, ActivationPolicy::default()) as f64;
                prop_assert!((many - one * b as f64).abs() <= b as f64);
            }
        }
    }
}
