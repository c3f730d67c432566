//! The layer graph of a decoder-only transformer and the per-device cost of each layer.
//!
//! Two architectures ([`Arch`]):
//! * `gpt` (GPT-2 style): LayerNorm (weight and bias), GELU MLP, learned position
//!   embedding, biased linears, fused QKV with `n_kv_heads = n_heads`.
//! * `llama` (LLaMA style): RMSNorm (weight only), SwiGLU MLP (`gate`, `fc1` = up,
//!   `fc2` = down), rotary positions (no position parameters), no biases, and grouped-query
//!   attention: `n_kv_heads` key/value heads shared by `n_heads / n_kv_heads` query heads.
//!
//! The graph is a chain: `embed`, `block.0` … `block.{n-1}`, `head`. The embedding always
//! comes first and the head (final norm, LM head and loss) last, so any contiguous split
//! puts them on the first and last stage.
//!
//! Notation: micro-batch size `b`, sequence length `s`, model width `d`, MLP width `f`,
//! `h` query heads, `d_kv = n_kv_heads · d / h`, vocabulary `V` (padded up to a multiple
//! of `tp`, see [`crate::tp`]), `e` bytes per element (4 for fp32) and tensor-parallel
//! degree `t`. A matmul of `[m, k] × [k, n]` costs `2mkn` FLOPs; element-wise work is
//! ignored except where noted. Every cost is **per device**: the part that Megatron-style
//! tensor parallelism shards is divided by `t`, the rest (norms, row-parallel biases,
//! position embeddings, norm inputs) is replicated.
//!
//! | layer | forward FLOPs (÷ t) | parameters (sharded ÷ t + replicated) |
//! |-------|---------------------|---------------------------------------|
//! | gpt embed | `bsd` (adding positions; replicated) | `Vd/t + sd` |
//! | gpt block | `2bs(3d² + d² + 2df) + 4bs²d` = QKV + out-proj + MLP + (QKᵀ and AV) | `(4d² + 2df + 3d + f)/t + 6d` |
//! | gpt head  | `2bsdV` | `dV/t + 2d` |
//! | llama embed | 0 (a gather) | `Vd/t` |
//! | llama block | `2bs(d² + 2d·d_kv + d² + 3df) + 4bs²d` = Q + KV + out-proj + SwiGLU + attention | `(2d² + 2d·d_kv + 3df)/t + 2d` |
//! | llama head  | `2bsdV` | `dV/t + d` |
//!
//! Backward FLOPs are twice the forward FLOPs (gradients w.r.t. inputs and weights); of
//! them, the weight gradients of the linear layers (`weight_grad_flops`, what a
//! zero-bubble `W` computes) equal the linear layers' forward FLOPs.
//!
//! Memory per parameter: `e` bytes of weight, `e` bytes of gradient, and AdamW state of
//! two fp32 moments (8 bytes) plus an fp32 master copy (4 bytes) when `e < 4`.
//!
//! Activation bytes stashed per microbatch (what autograd keeps for backward) come from
//! [`crate::activation`], which lists the saved tensors of each layer (flash attention: no
//! `O(s²)` term) under `parallel.recompute` and sequence parallelism.
//!
//! Bytes sent to the next stage: `e·bsd` for embed and blocks, none for the head.
//! Tensor-parallel all-reduce payload per microbatch (only when `t > 1`): block `4·e·bsd`
//! (two in forward, two in backward), embed `e·bsd`, head `12bs + e·bsd` (vocab-parallel
//! cross-entropy's max, sum and target-logit reductions in fp32, and the input gradient).

use crate::activation::{layer_activation_bytes, ActivationPolicy, ActivationShape};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The transformer family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2 style: LayerNorm, GELU MLP, learned positions.
    #[default]
    Gpt,
    /// LLaMA style: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention.
    Llama,
}

impl Arch {
    /// The config spelling (`gpt`, `llama`).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt => "gpt",
            Arch::Llama => "llama",
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Arch> {
        match s {
            "gpt" => Ok(Arch::Gpt),
            "llama" => Ok(Arch::Llama),
            _ => Err(Error::BadValue {
                field: "model.arch",
                value: s.to_string(),
                reason: "unknown architecture".into(),
                fix: "use `gpt` or `llama`".into(),
            }),
        }
    }
}

/// The MLP hidden width `d_ff`: one for every block (`512`), or one per block (`[512, 256,
/// 384, 512]`, what structured pruning writes). Serialised as a number or a list.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FfWidth {
    /// Every block has this width.
    Uniform(usize),
    /// Block `i` has width `[i]` (length `n_layers`, checked by [`ModelShape::validate`]).
    PerLayer(Vec<usize>),
}

impl FfWidth {
    /// The width of block `layer` (the last entry past the end of a too-short list, which
    /// [`ModelShape::validate`] refuses).
    pub fn of(&self, layer: usize) -> usize {
        match self {
            FfWidth::Uniform(f) => *f,
            FfWidth::PerLayer(v) => v.get(layer).or(v.last()).copied().unwrap_or(0),
        }
    }

    /// The one width of every block, if all are equal.
    pub fn uniform(&self) -> Option<usize> {
        match self {
            FfWidth::Uniform(f) => Some(*f),
            FfWidth::PerLayer(v) => v.first().copied().filter(|f| v.iter().all(|x| x == f)),
        }
    }

    /// The widest block's width.
    pub fn max(&self) -> usize {
        match self {
            FfWidth::Uniform(f) => *f,
            FfWidth::PerLayer(v) => v.iter().copied().max().unwrap_or(0),
        }
    }

    /// Every block's width, `n_layers` of them.
    pub fn widths(&self, n_layers: usize) -> Vec<usize> {
        (0..n_layers).map(|i| self.of(i)).collect()
    }

    /// True when the widths are a list (even of equal entries).
    pub fn is_per_layer(&self) -> bool {
        matches!(self, FfWidth::PerLayer(_))
    }
}

impl From<usize> for FfWidth {
    fn from(f: usize) -> FfWidth {
        FfWidth::Uniform(f)
    }
}

impl fmt::Display for FfWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FfWidth::Uniform(w) => write!(f, "{w}"),
            FfWidth::PerLayer(v) => write!(f, "{v:?}"),
        }
    }
}

/// The concrete shape of a model (vocab already resolved).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    #[serde(default)]
    pub arch: Arch,
    pub vocab: usize,
    pub seq_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention); equals `n_heads` for `gpt`.
    pub n_kv_heads: usize,
    pub n_layers: usize,
    /// The MLP width, one or per block ([`FfWidth`]); [`ModelShape::d_ff_of`] reads it.
    pub d_ff: FfWidth,
}

impl ModelShape {
    /// A GPT-2 style shape (`n_kv_heads = n_heads`).
    pub fn gpt(
        vocab: usize,
        seq_len: usize,
        d_model: usize,
        n_heads: usize,
        n_layers: usize,
        d_ff: usize,
    ) -> ModelShape {
        ModelShape {
            arch: Arch::Gpt,
            vocab,
            seq_len,
            d_model,
            n_heads,
            n_kv_heads: n_heads,
            n_layers,
            d_ff: FfWidth::Uniform(d_ff),
        }
    }

    /// A LLaMA style shape.
    #[allow(clippy::too_many_arguments)]
    pub fn llama(
        vocab: usize,
        seq_len: usize,
        d_model: usize,
        n_heads: usize,
        n_kv_heads: usize,
        n_layers: usize,
        d_ff: usize,
    ) -> ModelShape {
        ModelShape {
            arch: Arch::Llama,
            vocab,
            seq_len,
            d_model,
            n_heads,
            n_kv_heads,
            n_layers,
            d_ff: FfWidth::Uniform(d_ff),
        }
    }

    /// Checks that every dimension is usable; errors name the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab", self.vocab),
            ("seq_len", self.seq_len),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("n_layers", self.n_layers),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::BadModel {
                    field,
                    value,
                    reason: "must be at least 1".into(),
                    fix: format!("set model.{field} to a positive integer"),
                });
            }
        }
        self.validate_d_ff()?;
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(Error::BadModel {
                field: "d_model",
                value: self.d_model,
                reason: format!("not divisible by model.n_heads = {}", self.n_heads),
                fix: format!(
                    "make model.d_model a multiple of {} (e.g. {}) or change model.n_heads",
                    self.n_heads,
                    self.n_heads * (self.d_model / self.n_heads).max(1)
                ),
            });
        }
        match self.arch {
            Arch::Gpt if self.n_kv_heads != self.n_heads => Err(Error::BadModel {
                field: "n_kv_heads",
                value: self.n_kv_heads,
                reason: format!(
                    "GPT-style attention has one key/value head per query head (model.n_heads = {})",
                    self.n_heads
                ),
                fix: "remove model.n_kv_heads, or set model.arch: llama for grouped-query attention"
                    .into(),
            }),
            _ if !self.n_heads.is_multiple_of(self.n_kv_heads) => Err(Error::BadModel {
                field: "n_kv_heads",
                value: self.n_kv_heads,
                reason: format!(
                    "model.n_heads = {} is not a multiple of it (each key/value head serves a \
                     whole group of query heads)",
                    self.n_heads
                ),
                fix: "choose model.n_kv_heads dividing model.n_heads".into(),
            }),
            _ => Ok(()),
        }
    }

    /// `d_ff`: positive, and a list has one entry per block.
    fn validate_d_ff(&self) -> Result<()> {
        let widths = match &self.d_ff {
            FfWidth::Uniform(0) => {
                return Err(Error::BadModel {
                    field: "d_ff",
                    value: 0,
                    reason: "must be at least 1".into(),
                    fix: "set model.d_ff to a positive integer".into(),
                })
            }
            FfWidth::Uniform(_) => return Ok(()),
            FfWidth::PerLayer(v) => v,
        };
        if widths.len() != self.n_layers {
            return Err(Error::BadValue {
                field: "model.d_ff",
                value: format!("{widths:?}"),
                reason: format!(
                    "a per-layer list needs one entry per block (model.n_layers = {}), it has {}",
                    self.n_layers,
                    widths.len()
                ),
                fix: format!(
                    "write {} widths, or one integer for every block",
                    self.n_layers
                ),
            });
        }
        if let Some(i) = widths.iter().position(|&f| f == 0) {
            return Err(Error::BadValue {
                field: "model.d_ff",
                value: format!("{widths:?}"),
                reason: format!("entry {i} (block {i}) is 0; every block needs a hidden unit"),
                fix: "make every entry a positive integer".into(),
            });
        }
        Ok(())
    }

    /// The MLP width of block `layer`.
    pub fn d_ff_of(&self, layer: usize) -> usize {
        self.d_ff.of(layer)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// Width of the key (and value) projection: `n_kv_heads · head_dim`.
    pub fn d_kv(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }
}

/// What a node of the graph is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Token embedding (+ learned positions for `gpt`).
    Embedding,
    /// Transformer block with the given index.
    Block(usize),
    /// Final norm, LM head and the loss.
    Head,
}

impl LayerKind {
    /// Canonical name, used as the prefix of its parameters (`block.3.attn.qkv.weight`).
    pub fn name(&self) -> String {
        match self {
            LayerKind::Embedding => "embed".into(),
            LayerKind::Block(i) => format!("block.{i}"),
            LayerKind::Head => "head".into(),
        }
    }

    /// `embed`, `block` or `head`: the kind without the block index (profiles key on it).
    pub fn family(&self) -> &'static str {
        match self {
            LayerKind::Embedding => "embed",
            LayerKind::Block(_) => "block",
            LayerKind::Head => "head",
        }
    }

    /// True for transformer blocks.
    pub fn is_block(&self) -> bool {
        matches!(self, LayerKind::Block(_))
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Costs of one layer for one microbatch, on one device (after tensor-parallel sharding).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerCost {
    pub fwd_flops: f64,
    pub bwd_flops: f64,
    /// Parameters held by one device.
    pub params: u64,
    pub param_bytes: u64,
    pub grad_bytes: u64,
    /// AdamW state: two fp32 moments, plus an fp32 master copy below fp32.
    pub optim_bytes: u64,
    /// Bytes autograd stashes per microbatch in flight.
    pub activation_bytes: u64,
    /// Bytes sent to the next layer (and stage) per microbatch.
    pub output_bytes: u64,
    /// Tensor-parallel all-reduce payload per microbatch (forward + backward).
    pub tp_comm_bytes: u64,
    /// Number of tensor-parallel all-reduces per microbatch (forward + backward).
    pub tp_collectives: u32,
    /// Backward FLOPs that form weight gradients of linear layers (a zero-bubble `W`).
    #[serde(default)]
    pub weight_grad_flops: f64,
}

impl LayerCost {
    /// Forward plus backward FLOPs.
    pub fn train_flops(&self) -> f64 {
        self.fwd_flops + self.bwd_flops
    }

    /// Weights + gradients + optimizer state.
    pub fn static_bytes(&self) -> u64 {
        self.param_bytes + self.grad_bytes + self.optim_bytes
    }
}

impl std::ops::Add for LayerCost {
    type Output = LayerCost;
    fn add(self, o: LayerCost) -> LayerCost {
        LayerCost {
            fwd_flops: self.fwd_flops + o.fwd_flops,
            bwd_flops: self.bwd_flops + o.bwd_flops,
            params: self.params + o.params,
            param_bytes: self.param_bytes + o.param_bytes,
            grad_bytes: self.grad_bytes + o.grad_bytes,
            optim_bytes: self.optim_bytes + o.optim_bytes,
            activation_bytes: self.activation_bytes + o.activation_bytes,
            output_bytes: o.output_bytes,
            tp_comm_bytes: self.tp_comm_bytes + o.tp_comm_bytes,
            tp_collectives: self.tp_collectives + o.tp_collectives,
            weight_grad_flops: self.weight_grad_flops + o.weight_grad_flops,
        }
    }
}

/// One node of the layer chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerNode {
    pub kind: LayerKind,
    /// Per-device cost at the graph's `tp`.
    pub cost: LayerCost,
    /// Parameters of the whole (unsharded, unpadded) layer.
    pub full_params: u64,
}

/// The model as a chain of layers with per-device costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerGraph {
    pub shape: ModelShape,
    pub micro_batch_size: usize,
    pub dtype_bytes: usize,
    /// Tensor-parallel degree the costs are computed for.
    pub tp: usize,
    /// Vocabulary padded up to a multiple of `tp`.
    pub padded_vocab: usize,
    /// Recomputation and sequence parallelism the activation bytes assume.
    #[serde(default)]
    pub policy: ActivationPolicy,
    pub nodes: Vec<LayerNode>,
}

/// A cost split into its tensor-parallel sharded part and its replicated part.
#[derive(Clone, Copy)]
struct Part {
    sharded: u64,
    replicated: u64,
}

impl Part {
    fn at(self, tp: u64) -> u64 {
        self.sharded / tp + self.replicated
    }
}

const fn part(sharded: u64, replicated: u64) -> Part {
    Part {
        sharded,
        replicated,
    }
}

impl LayerGraph {
    /// Builds the chain `embed, block.0..n, head` (for `shape.arch`) with costs for one
    /// microbatch of `micro_batch_size` sequences at `dtype_bytes` per element, unsharded.
    pub fn new(shape: &ModelShape, micro_batch_size: usize, dtype_bytes: usize) -> Result<Self> {
        Self::with_tp(shape, micro_batch_size, dtype_bytes, 1)
    }

    /// Alias of [`LayerGraph::new`] kept for older callers.
    pub fn gpt(shape: &ModelShape, micro_batch_size: usize, dtype_bytes: usize) -> Result<Self> {
        Self::new(shape, micro_batch_size, dtype_bytes)
    }

    /// Like [`LayerGraph::new`], with per-device costs under tensor parallelism of degree
    /// `tp` (checked by [`crate::tp::check_divisibility`]).
    pub fn with_tp(
        shape: &ModelShape,
        micro_batch_size: usize,
        dtype_bytes: usize,
        tp: usize,
    ) -> Result<Self> {
        Self::with_policy(
            shape,
            micro_batch_size,
            dtype_bytes,
            tp,
            ActivationPolicy::default(),
        )
    }

    /// Like [`LayerGraph::with_tp`], with activations kept under `policy`
    /// (recomputation, sequence parallelism).
    pub fn with_policy(
        shape: &ModelShape,
        micro_batch_size: usize,
        dtype_bytes: usize,
        tp: usize,
        policy: ActivationPolicy,
    ) -> Result<Self> {
        shape.validate()?;
        if micro_batch_size == 0 {
            return Err(Error::NotPositive {
                field: "parallel.micro_batch_size",
                value: 0,
            });
        }
        if dtype_bytes == 0 {
            return Err(Error::NotPositive {
                field: "dtype bytes",
                value: 0,
            });
        }
        crate::tp::check_divisibility(shape, tp)?;
        let padded_vocab = crate::tp::padded_vocab(shape.vocab, tp);
        let t = tp as u64;
        let e = dtype_bytes as u64;
        let (b, s, d, v) = (
            micro_batch_size as u64,
            shape.seq_len as u64,
            shape.d_model as u64,
            padded_vocab as u64,
        );
        let f_of = |i: usize| shape.d_ff_of(i) as u64;
        let v_full = shape.vocab as u64;
        let dkv = shape.d_kv() as u64;
        let hidden = e * b * s * d;
        let optim_per_param = 8 + if dtype_bytes < 4 { 4 } else { 0 };
        let tp_on = tp > 1;
        let act_shape = ActivationShape {
            shape: shape.clone(),
            micro_batch_size,
            dtype_bytes,
            tp,
            padded_vocab,
        };
        // fwd FLOPs (and of them the linear layers'), params (padded vocab), full params
        // (real vocab), output bytes, tp bytes, tp collectives.
        let node = |kind: LayerKind,
                    (fwd, linear): (Part, Part),
                    params: Part,
                    full_params: u64,
                    out: u64,
                    tp_bytes: u64,
                    tp_count: u32| {
            let p = params.at(t);
            LayerNode {
                kind,
                cost: LayerCost {
                    fwd_flops: fwd.at(t) as f64,
                    bwd_flops: 2.0 * fwd.at(t) as f64,
                    params: p,
                    param_bytes: p * e,
                    grad_bytes: p * e,
                    optim_bytes: p * optim_per_param,
                    activation_bytes: layer_activation_bytes(&act_shape, kind, policy),
                    output_bytes: out,
                    tp_comm_bytes: if tp_on { tp_bytes } else { 0 },
                    tp_collectives: if tp_on { tp_count } else { 0 },
                    weight_grad_flops: linear.at(t) as f64,
                },
                full_params,
            }
        };
        let attn_scores = 4 * b * s * s * d;
        let none = part(0, 0);
        let mut nodes = Vec::with_capacity(shape.n_layers + 2);
        match shape.arch {
            Arch::Gpt => {
                let pos = s * d;
                nodes.push(node(
                    LayerKind::Embedding,
                    (part(0, b * s * d), none),
                    part(v * d, pos),
                    v_full * d + pos,
                    hidden,
                    hidden,
                    1,
                ));
                for i in 0..shape.n_layers {
                    let f = f_of(i);
                    let sharded = 4 * d * d + 2 * d * f + 3 * d + f;
                    let linear = 2 * b * s * (4 * d * d + 2 * d * f);
                    nodes.push(node(
                        LayerKind::Block(i),
                        (part(linear + attn_scores, 0), part(linear, 0)),
                        part(sharded, 6 * d),
                        sharded + 6 * d,
                        hidden,
                        4 * hidden,
                        4,
                    ));
                }
                nodes.push(node(
                    LayerKind::Head,
                    (part(2 * b * s * d * v, 0), part(2 * b * s * d * v, 0)),
                    part(d * v, 2 * d),
                    d * v_full + 2 * d,
                    0,
                    12 * b * s + hidden,
                    4,
                ));
            }
            Arch::Llama => {
                nodes.push(node(
                    LayerKind::Embedding,
                    (none, none),
                    part(v * d, 0),
                    v_full * d,
                    hidden,
                    hidden,
                    1,
                ));
                for i in 0..shape.n_layers {
                    let sharded = 2 * d * d + 2 * d * dkv + 3 * d * f_of(i);
                    nodes.push(node(
                        LayerKind::Block(i),
                        (
                            part(2 * b * s * sharded + attn_scores, 0),
                            part(2 * b * s * sharded, 0),
                        ),
                        part(sharded, 2 * d),
                        sharded + 2 * d,
                        hidden,
                        4 * hidden,
                        4,
                    ));
                }
                nodes.push(node(
                    LayerKind::Head,
                    (part(2 * b * s * d * v, 0), part(2 * b * s * d * v, 0)),
                    part(d * v, d),
                    d * v_full + d,
                    0,
                    12 * b * s + hidden,
                    4,
                ));
            }
        }
        Ok(LayerGraph {
            shape: shape.clone(),
            micro_batch_size,
            dtype_bytes,
            tp,
            padded_vocab,
            policy,
            nodes,
        })
    }

    /// Total parameter count of the model (unsharded, vocabulary unpadded): what the
    /// engine allocates over all stages.
    pub fn total_params(&self) -> u64 {
        self.nodes.iter().map(|n| n.full_params).sum()
    }

    /// Number of transformer blocks.
    pub fn n_blocks(&self) -> usize {
        self.nodes.iter().filter(|n| n.kind.is_block()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ModelShape {
        ModelShape::gpt(10, 4, 8, 2, 2, 16)
    }

    #[test]
    fn hand_computed_costs() {
        let g = LayerGraph::new(&small(), 3, 4).unwrap();
        assert_eq!(g.nodes.len(), 4);
        // embed: V*d + s*d = 80 + 32
        assert_eq!(g.nodes[0].cost.params, 112);
        // block: 4*64 + 2*8*16 + 9*8 + 16 = 256 + 256 + 72 + 16
        assert_eq!(g.nodes[1].cost.params, 600);
        // block fwd: 2*3*4*(3*64 + 64 + 2*128) + 4*3*16*8 = 24*512 + 1536
        assert_eq!(g.nodes[1].cost.fwd_flops, 13824.0);
        assert_eq!(g.nodes[1].cost.bwd_flops, 27648.0);
        // head: d*V + 2d = 96; fwd 2*3*4*8*10 = 1920
        assert_eq!(g.nodes[3].cost.params, 96);
        assert_eq!(g.nodes[3].cost.fwd_flops, 1920.0);
        // activations sent between stages: 4 bytes * 3 * 4 * 8
        assert_eq!(g.nodes[0].cost.output_bytes, 384);
        // block stash (flash attention, see crate::activation): 4 B * 12 tokens *
        // ((4d + 4) + 2d (row-parallel outputs on the tape) + (4d + 2f + h)) = 48 * (52 + 66)
        assert_eq!(g.nodes[1].cost.activation_bytes, 5664);
        // the W of a zero-bubble backward: the linear layers' weight gradients
        assert_eq!(g.nodes[1].cost.weight_grad_flops, 24.0 * 512.0);
        assert_eq!(g.nodes[3].cost.weight_grad_flops, 1920.0);
        assert_eq!(g.total_params(), 112 + 1200 + 96);
        // fp32: grads 4 B/param, AdamW moments 8 B/param, no master copy.
        assert_eq!(g.nodes[1].cost.grad_bytes, 2400);
        assert_eq!(g.nodes[1].cost.optim_bytes, 4800);
        assert_eq!(g.nodes[1].cost.tp_comm_bytes, 0);
        // bf16: 2 B weights and grads, 12 B optimizer state (moments + master).
        let g16 = LayerGraph::new(&small(), 3, 2).unwrap();
        assert_eq!(g16.nodes[1].cost.param_bytes, 1200);
        assert_eq!(g16.nodes[1].cost.optim_bytes, 7200);
    }

    #[test]
    fn hand_computed_llama_costs() {
        // V 10, s 4, d 8, h 2, kv 1 (head_dim 4, d_kv 4), 2 layers, f 12; b 3, fp32.
        let shape = ModelShape::llama(10, 4, 8, 2, 1, 2, 12);
        let g = LayerGraph::new(&shape, 3, 4).unwrap();
        assert_eq!(g.nodes.len(), 4);
        // embed: V*d, no position table, no FLOPs.
        assert_eq!(g.nodes[0].cost.params, 80);
        assert_eq!(g.nodes[0].cost.fwd_flops, 0.0);
        // block: 2*64 (q, o) + 2*8*4 (k, v) + 3*8*12 (gate, up, down) + 2*8 (RMSNorms)
        assert_eq!(g.nodes[1].cost.params, 128 + 64 + 288 + 16);
        // fwd: 2*3*4*(128 + 64 + 288) + 4*3*16*8 = 11520 + 1536
        assert_eq!(g.nodes[1].cost.fwd_flops, 13056.0);
        assert_eq!(g.nodes[1].cost.bwd_flops, 26112.0);
        // stash: 4 B * 12 tokens * ((4d + 2) + 2d + (3d + 3d_kv + 4f + h)) = 48 * (50 + 86)
        assert_eq!(g.nodes[1].cost.activation_bytes, 6528);
        // head: RMSNorm d + d*V; fwd 2*3*4*8*10
        assert_eq!(g.nodes[3].cost.params, 88);
        assert_eq!(g.nodes[3].cost.fwd_flops, 1920.0);
        assert_eq!(g.nodes[3].cost.activation_bytes, 4 * 12 * (18 + 10));
        assert_eq!(g.total_params(), 80 + 2 * 496 + 88);
    }

    #[test]
    fn tensor_parallel_costs_shard_the_right_parts() {
        // d 8, h 4, f 16, V 10 -> padded to 12 at tp = 4.
        let shape = ModelShape::gpt(10, 4, 8, 4, 2, 16);
        let g1 = LayerGraph::new(&shape, 1, 4).unwrap();
        let g4 = LayerGraph::with_tp(&shape, 1, 4, 4).unwrap();
        assert_eq!(g4.padded_vocab, 12);
        // block: sharded (4*64 + 2*128 + 24 + 16) / 4 + 6*8 replicated
        assert_eq!(g4.nodes[1].cost.params, 552 / 4 + 48);
        assert_eq!(g4.nodes[1].cost.fwd_flops * 4.0, g1.nodes[1].cost.fwd_flops);
        // embed: 12*8/4 + positions 4*8
        assert_eq!(g4.nodes[0].cost.params, 24 + 32);
        // head: 8*12/4 + 2*8
        assert_eq!(g4.nodes[3].cost.params, 24 + 16);
        // four all-reduces of b*s*d fp32 per block
        assert_eq!(g4.nodes[1].cost.tp_comm_bytes, 4 * 4 * 32);
        // total_params stays the real model's count
        assert_eq!(g4.total_params(), g1.total_params());
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let mut s = small();
        s.d_model = 9;
        let msg = LayerGraph::new(&s, 1, 4).unwrap_err().to_string();
        assert!(msg.contains("model.d_model = 9"), "{msg}");
        assert!(msg.contains("fix:"), "{msg}");
        s.d_model = 8;
        s.n_layers = 0;
        let msg = s.validate().unwrap_err().to_string();
        assert!(msg.starts_with("model.n_layers = 0"), "{msg}");
        let mut l = ModelShape::llama(10, 4, 8, 4, 3, 2, 16);
        let msg = l.validate().unwrap_err().to_string();
        assert!(msg.contains("model.n_kv_heads = 3"), "{msg}");
        l.arch = Arch::Gpt;
        l.n_kv_heads = 2;
        let msg = l.validate().unwrap_err().to_string();
        assert!(msg.contains("model.n_kv_heads = 2"), "{msg}");
    }
}
