//! Tensor-parallel sharding plan in the Megatron-LM scheme, as serializable data.
//!
//! Per transformer block: the fused QKV projection is column-parallel **by heads** (each
//! of Q, K and V is split into `tp` contiguous groups of heads and rank `t` takes group
//! `t` of each), the attention output projection is row-parallel, the MLP's `fc1` (and,
//! for LLaMA, `gate`) is column-parallel and `fc2` row-parallel; norms and the biases of
//! row-parallel layers are replicated. The token embedding and the LM head are
//! vocab-parallel, and the loss is a vocab-parallel cross-entropy (all-reduces of the
//! per-token max, sum of exponentials and target logit; the full logits never exist on
//! one device).
//!
//! Weights are stored `[in, out]` (`Y = XA + b`), so column-parallel splits dimension 1
//! and row-parallel dimension 0; the embedding `[V, d]` splits dimension 0 and the LM head
//! `[d, V]` dimension 1.
//!
//! Invariants of a [`TpPlan`] returned by [`TpPlan::new`]: `n_heads`, `n_kv_heads` and
//! `d_ff` are divisible by `tp`; `padded_vocab` is the smallest multiple of `tp` that is
//! at least `vocab`; for every sharded parameter the `tp` rank ranges
//! ([`ParamShard::ranges`]) are disjoint and cover the split dimension exactly.

use crate::error::{Error, Result};
use crate::graph::{Arch, FfWidth, LayerKind, ModelShape};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The vocabulary padded up to a multiple of `tp` (Megatron's `make-vocab-size-divisible-by`).
pub fn padded_vocab(vocab: usize, tp: usize) -> usize {
    vocab.div_ceil(tp.max(1)) * tp.max(1)
}

fn divisors(n: usize) -> String {
    let d: Vec<String> = (1..=n)
        .filter(|k| n.is_multiple_of(*k))
        .map(|k| k.to_string())
        .collect();
    d.join(", ")
}

/// Checks that `shape` can be sharded over `tp` ranks; errors name the field and numbers.
pub fn check_divisibility(shape: &ModelShape, tp: usize) -> Result<()> {
    if tp == 0 {
        return Err(Error::NotPositive {
            field: "parallel.tp",
            value: 0,
        });
    }
    if tp > shape.n_heads {
        return Err(Error::BadValue {
            field: "parallel.tp",
            value: tp.to_string(),
            reason: format!(
                "exceeds model.n_heads = {}: every tensor-parallel rank needs at least one \
                 attention head",
                shape.n_heads
            ),
            fix: format!(
                "set parallel.tp to a divisor of {}: {}",
                shape.n_heads,
                divisors(shape.n_heads)
            ),
        });
    }
    let checks: [(&'static str, usize, &'static str); 2] = [
        ("n_heads", shape.n_heads, "query heads"),
        ("n_kv_heads", shape.n_kv_heads, "key/value heads"),
    ];
    for (field, value, what) in checks {
        if field == "n_kv_heads" && shape.arch == Arch::Gpt {
            continue; // equals n_heads
        }
        if !value.is_multiple_of(tp) {
            return Err(Error::NotDivisibleByTp {
                field,
                value,
                tp,
                what,
                fix: format!(
                    "set parallel.tp to a divisor of {value} ({}), or change model.{field}",
                    divisors(value)
                ),
            });
        }
    }
    // After the heads: a head count that tp cannot split is the more basic mistake.
    check_d_ff_divisibility(shape, tp)
}

/// Every block's `d_ff` divisible by `tp`: a per-layer list names the first bad entry.
fn check_d_ff_divisibility(shape: &ModelShape, tp: usize) -> Result<()> {
    let widths = match &shape.d_ff {
        FfWidth::Uniform(f) => {
            if f.is_multiple_of(tp) {
                return Ok(());
            }
            return Err(Error::NotDivisibleByTp {
                field: "d_ff",
                value: *f,
                tp,
                what: "the MLP's hidden units",
                fix: format!(
                    "set parallel.tp to a divisor of {f} ({}), or change model.d_ff",
                    divisors(*f)
                ),
            });
        }
        FfWidth::PerLayer(v) => v,
    };
    match widths.iter().position(|f| !f.is_multiple_of(tp)) {
        None => Ok(()),
        Some(i) => Err(Error::BadValue {
            field: "model.d_ff",
            value: format!("{widths:?}"),
            reason: format!(
                "entry {i} (block {i}) = {} is not divisible by parallel.tp = {tp}: tensor \
                 parallelism shards every block's MLP hidden units evenly over tp ranks",
                widths[i]
            ),
            fix: format!(
                "make every entry a multiple of {tp} (prune with `strata prune --method \
                 neurons --multiple-of {tp}`), or set parallel.tp to a divisor of {}",
                widths[i]
            ),
        }),
    }
}

/// How one parameter is distributed over the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharding {
    /// Every rank holds the whole tensor.
    Replicated,
    /// Split along the output features (dimension 1 of a `[in, out]` weight, 0 of a bias).
    Column,
    /// Split along the input features (dimension 0 of a `[in, out]` weight).
    Row,
    /// Split along the (padded) vocabulary.
    Vocab,
}

/// One parameter's shard spec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamShard {
    /// Name relative to its layer (`attn.qkv.weight`); the full name is `block.3.attn.qkv.weight`.
    pub name: String,
    pub sharding: Sharding,
    /// Shape of the whole parameter (real vocabulary).
    pub full_shape: Vec<usize>,
    /// Shape of one rank's shard (padded vocabulary ÷ tp for vocab-parallel tensors).
    pub shard_shape: Vec<usize>,
    /// The dimension that is split (None when replicated).
    pub split_dim: Option<usize>,
    /// The split dimension as consecutive segments, each split evenly over the ranks
    /// (`[d, d_kv, d_kv]` for a fused QKV, so every rank gets whole heads of Q, K and V).
    pub segments: Vec<usize>,
}

impl ParamShard {
    /// The index ranges along `split_dim` that tensor-parallel rank `tp_rank` of `tp`
    /// holds, in order (empty when replicated). For vocab-parallel tensors the ranges
    /// are over the padded vocabulary; rows at or past the real vocabulary are padding.
    pub fn ranges(&self, tp_rank: usize, tp: usize) -> Vec<Range<usize>> {
        if self.split_dim.is_none() || tp == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.segments.len());
        let mut offset = 0;
        for &len in &self.segments {
            let part = len / tp;
            out.push(offset + tp_rank * part..offset + (tp_rank + 1) * part);
            offset += len;
        }
        out
    }
}

/// The shard spec of one layer kind, with the collectives it needs per microbatch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShard {
    pub params: Vec<ParamShard>,
    /// All-reduces over the tp group in the forward pass (where, what).
    pub forward_allreduces: Vec<String>,
    /// All-reduces over the tp group in the backward pass.
    pub backward_allreduces: Vec<String>,
}

/// The tensor-parallel plan of a whole model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TpPlan {
    pub tp: usize,
    pub arch: Arch,
    pub vocab: usize,
    /// `vocab` rounded up to a multiple of `tp`.
    pub padded_vocab: usize,
    /// `padded_vocab - vocab` padding rows (zero-initialised, never a target).
    pub vocab_padding: usize,
    /// The loss: always `vocab_parallel_cross_entropy` (also correct at tp = 1).
    pub loss: String,
    pub embed: LayerShard,
    /// Applies to every `block.i`; with a per-layer `d_ff` its MLP shapes are those of the
    /// widest block, and block `i` has `block_d_ff[i]` hidden units (split the same way).
    pub block: LayerShard,
    /// Each block's MLP width (`model.d_ff`, one entry per block).
    #[serde(default)]
    pub block_d_ff: Vec<usize>,
    pub head: LayerShard,
}

impl TpPlan {
    /// The Megatron shard plan of `shape` over `tp` ranks.
    pub fn new(shape: &ModelShape, tp: usize) -> Result<TpPlan> {
        shape.validate()?;
        check_divisibility(shape, tp)?;
        let (d, f, s, v) = (shape.d_model, shape.d_ff.max(), shape.seq_len, shape.vocab);
        let vp = padded_vocab(v, tp);
        let dkv = shape.d_kv();
        let rep = |name: &str, shape: &[usize]| ParamShard {
            name: name.into(),
            sharding: Sharding::Replicated,
            full_shape: shape.to_vec(),
            shard_shape: shape.to_vec(),
            split_dim: None,
            segments: Vec::new(),
        };
        let split =
            |name: &str, sharding: Sharding, full: &[usize], dim: usize, segments: &[usize]| {
                let mut shard = full.to_vec();
                shard[dim] = segments.iter().sum::<usize>() / tp;
                ParamShard {
                    name: name.into(),
                    sharding,
                    full_shape: full.to_vec(),
                    shard_shape: shard,
                    split_dim: Some(dim),
                    segments: segments.to_vec(),
                }
            };
        let gpt = shape.arch == Arch::Gpt;
        let norm = |name: &str| -> Vec<ParamShard> {
            let mut v = vec![rep(&format!("{name}.weight"), &[d])];
            if gpt {
                v.push(rep(&format!("{name}.bias"), &[d]));
            }
            v
        };
        let qkv = [d, dkv, dkv];
        let qkv_out = d + 2 * dkv;
        let mut embed_params = vec![split("wte", Sharding::Vocab, &[v, d], 0, &[vp])];
        if gpt {
            embed_params.push(rep("wpe", &[s, d]));
        }
        let mut block = norm(if gpt { "ln1" } else { "norm1" });
        block.push(split(
            "attn.qkv.weight",
            Sharding::Column,
            &[d, qkv_out],
            1,
            &qkv,
        ));
        if gpt {
            block.push(split(
                "attn.qkv.bias",
                Sharding::Column,
                &[qkv_out],
                0,
                &qkv,
            ));
        }
        block.push(split("attn.proj.weight", Sharding::Row, &[d, d], 0, &[d]));
        if gpt {
            block.push(rep("attn.proj.bias", &[d]));
        }
        block.extend(norm(if gpt { "ln2" } else { "norm2" }));
        if !gpt {
            block.push(split("mlp.gate.weight", Sharding::Column, &[d, f], 1, &[f]));
        }
        block.push(split("mlp.fc1.weight", Sharding::Column, &[d, f], 1, &[f]));
        if gpt {
            block.push(split("mlp.fc1.bias", Sharding::Column, &[f], 0, &[f]));
        }
        block.push(split("mlp.fc2.weight", Sharding::Row, &[f, d], 0, &[f]));
        if gpt {
            block.push(rep("mlp.fc2.bias", &[d]));
        }
        let mut head = norm(if gpt { "ln_f" } else { "norm_f" });
        head.push(split("lm_head.weight", Sharding::Vocab, &[d, v], 1, &[vp]));
        let strs = |v: &[&str]| -> Vec<String> { v.iter().map(|s| s.to_string()).collect() };
        Ok(TpPlan {
            tp,
            arch: shape.arch,
            vocab: v,
            padded_vocab: vp,
            vocab_padding: vp - v,
            loss: "vocab_parallel_cross_entropy".into(),
            embed: LayerShard {
                params: embed_params,
                forward_allreduces: strs(&["embedding output [b, s, d] (partial lookups)"]),
                backward_allreduces: Vec::new(),
            },
            block_d_ff: shape.d_ff.widths(shape.n_layers),
            block: LayerShard {
                params: block,
                forward_allreduces: strs(&[
                    "attn.proj output [b, s, d] (row-parallel)",
                    "mlp.fc2 output [b, s, d] (row-parallel)",
                ]),
                backward_allreduces: strs(&[
                    "grad of attn.qkv input [b, s, d] (column-parallel)",
                    "grad of mlp.fc1 input [b, s, d] (column-parallel)",
                ]),
            },
            head: LayerShard {
                params: head,
                forward_allreduces: strs(&[
                    "cross-entropy max logit [b, s] (fp32)",
                    "cross-entropy sum of exp [b, s] (fp32)",
                    "cross-entropy target logit [b, s] (fp32)",
                ]),
                backward_allreduces: strs(&["grad of lm_head input [b, s, d] (column-parallel)"]),
            },
        })
    }

    /// The shard spec of `layer`.
    pub fn layer(&self, layer: LayerKind) -> &LayerShard {
        match layer {
            LayerKind::Embedding => &self.embed,
            LayerKind::Block(_) => &self.block,
            LayerKind::Head => &self.head,
        }
    }

    /// One line for `strata plan`.
    pub fn summary(&self) -> String {
        let pad = if self.vocab_padding > 0 {
            format!(
                "vocab {} padded to {} (+{} rows) for tp = {}",
                self.vocab, self.padded_vocab, self.vocab_padding, self.tp
            )
        } else {
            format!("vocab {} divisible by tp = {}", self.vocab, self.tp)
        };
        let widths = match self.block_d_ff.first() {
            Some(f) if self.block_d_ff.iter().any(|x| x != f) => format!(
                "; per-layer d_ff {:?} (each split over tp = {})",
                self.block_d_ff, self.tp
            ),
            _ => String::new(),
        };
        format!(
            "tensor parallel (Megatron): qkv column-parallel by heads, attn.proj row-parallel, \
             mlp.fc1{} column-parallel, mlp.fc2 row-parallel, embedding and lm_head \
             vocab-parallel with vocab-parallel cross-entropy; {pad}{widths}",
            if self.arch == Arch::Llama {
                "/gate"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_parameter_exactly() {
        for shape in [
            ModelShape::gpt(65, 16, 32, 4, 2, 64),
            ModelShape::llama(67, 16, 32, 8, 4, 2, 96),
        ] {
            for tp in [1, 2, 4] {
                let plan = TpPlan::new(&shape, tp).unwrap();
                assert_eq!(plan.padded_vocab % tp, 0);
                assert!(plan.padded_vocab >= shape.vocab && plan.vocab_padding < tp);
                for layer in [&plan.embed, &plan.block, &plan.head] {
                    for p in &layer.params {
                        let Some(dim) = p.split_dim else {
                            assert_eq!(p.full_shape, p.shard_shape);
                            continue;
                        };
                        let total: usize = p.segments.iter().sum();
                        let mut covered = vec![0u8; total];
                        for t in 0..tp {
                            let rs = p.ranges(t, tp);
                            let len: usize = rs.iter().map(|r| r.len()).sum();
                            assert_eq!(len, p.shard_shape[dim], "{}", p.name);
                            for r in rs {
                                for i in r {
                                    covered[i] += 1;
                                }
                            }
                        }
                        assert!(covered.iter().all(|&c| c == 1), "{}", p.name);
                    }
                }
            }
        }
    }

    #[test]
    fn qkv_is_split_by_heads() {
        // d 8, 4 heads of 2, kv 2 heads -> d_kv 4; fused out = 16.
        let plan = TpPlan::new(&ModelShape::llama(10, 4, 8, 4, 2, 1, 8), 2).unwrap();
        let qkv = &plan.block.params[1];
        assert_eq!(qkv.name, "attn.qkv.weight");
        assert_eq!(qkv.full_shape, vec![8, 16]);
        assert_eq!(qkv.shard_shape, vec![8, 8]);
        assert_eq!(qkv.ranges(1, 2), vec![4..8, 10..12, 14..16]);
        let fc2 = plan
            .block
            .params
            .iter()
            .find(|p| p.name == "mlp.fc2.weight")
            .unwrap();
        assert_eq!((fc2.sharding, fc2.split_dim), (Sharding::Row, Some(0)));
    }

    #[test]
    fn divisibility_errors_name_the_field_and_numbers() {
        let shape = ModelShape::gpt(64, 8, 24, 6, 2, 48);
        let e = TpPlan::new(&shape, 4).unwrap_err().to_string();
        assert!(
            e.contains("model.n_heads = 6") && e.contains("parallel.tp = 4"),
            "{e}"
        );
        let e = TpPlan::new(&shape, 8).unwrap_err().to_string();
        assert!(
            e.contains("parallel.tp = 8") && e.contains("model.n_heads = 6"),
            "{e}"
        );
        let e = TpPlan::new(&ModelShape::llama(64, 8, 32, 8, 2, 2, 64), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.n_kv_heads = 2"), "{e}");
        let e = TpPlan::new(&ModelShape::gpt(64, 8, 32, 4, 2, 66), 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model.d_ff = 66") && e.contains("fix:"), "{e}");
        let p = TpPlan::new(&ModelShape::gpt(65, 8, 32, 4, 2, 64), 4).unwrap();
        assert_eq!((p.padded_vocab, p.vocab_padding), (68, 3));
        assert!(p.summary().contains("padded to 68"));
    }
}
