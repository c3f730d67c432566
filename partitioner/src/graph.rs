//! The layer graph of a GPT-style decoder and the cost of each layer.
//!
//! The graph is a chain: `embed`, `block.0` … `block.{n-1}`, `head`. The embedding always
//! comes first and the head (final LayerNorm, LM head and loss) last, so any contiguous
//! split puts them on the first and last stage.
//!
//! Costs, for micro-batch size `b`, sequence length `s`, model width `d`, MLP width `f`,
//! `h` heads, vocabulary `V` and `e` bytes per element (4 for fp32). A matmul of
//! `[m, k] x [k, n]` costs `2mkn` FLOPs; element-wise work is ignored except where noted.
//!
//! | layer | forward FLOPs | parameters |
//! |-------|---------------|------------|
//! | embed | `bsd` (adding positions) | `Vd + sd` |
//! | block | `2bs(3d² + d² + 2df) + 4bs²d` = QKV + out-proj + MLP + (QKᵀ and AV) | `4d² + 2df + 9d + f` |
//! | head  | `2bsdV` | `dV + 2d` |
//!
//! Backward FLOPs are twice the forward FLOPs (gradients w.r.t. inputs and weights).
//!
//! Activation bytes stashed per microbatch (what autograd keeps for backward):
//! block `e·bs(9d + 2f) + e·bhs²` (inputs of each matmul and norm, the MLP's pre- and
//! post-GELU, and the attention probabilities); embed `e·bsd`; head `e·bs(2d + V)`.
//! Bytes sent to the next stage: `e·bsd` for embed and blocks, none for the head.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fmt;

/// The concrete shape of a GPT-style model (vocab already resolved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    pub vocab: usize,
    pub seq_len: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_layers: usize,
    pub d_ff: usize,
}

impl ModelShape {
    /// Checks that every dimension is usable; errors name the field and the fix.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab", self.vocab),
            ("seq_len", self.seq_len),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_layers", self.n_layers),
            ("d_ff", self.d_ff),
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
        Ok(())
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }
}

/// What a node of the graph is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Token + learned position embedding.
    Embedding,
    /// Transformer block with the given index.
    Block(usize),
    /// Final LayerNorm, LM head and the loss.
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
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// Costs of one layer for one microbatch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerCost {
    pub fwd_flops: f64,
    pub bwd_flops: f64,
    pub params: u64,
    pub param_bytes: u64,
    /// Bytes autograd stashes per microbatch in flight.
    pub activation_bytes: u64,
    /// Bytes sent to the next layer (and stage) per microbatch.
    pub output_bytes: u64,
}

impl LayerCost {
    /// Forward plus backward FLOPs.
    pub fn train_flops(&self) -> f64 {
        self.fwd_flops + self.bwd_flops
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
            activation_bytes: self.activation_bytes + o.activation_bytes,
            output_bytes: o.output_bytes,
        }
    }
}

/// One node of the layer chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerNode {
    pub kind: LayerKind,
    pub cost: LayerCost,
}

/// The model as a chain of layers with costs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerGraph {
    pub shape: ModelShape,
    pub micro_batch_size: usize,
    pub dtype_bytes: usize,
    pub nodes: Vec<LayerNode>,
}

impl LayerGraph {
    /// Builds the chain `embed, block.0..n, head` with costs for one microbatch of
    /// `micro_batch_size` sequences, at `dtype_bytes` per element.
    pub fn gpt(shape: &ModelShape, micro_batch_size: usize, dtype_bytes: usize) -> Result<Self> {
        shape.validate()?;
        let (b, s, d, f, v) = (
            micro_batch_size as f64,
            shape.seq_len as f64,
            shape.d_model as f64,
            shape.d_ff as f64,
            shape.vocab as f64,
        );
        let e = dtype_bytes as u64;
        let (bu, su, du, fu, hu, vu) = (
            micro_batch_size as u64,
            shape.seq_len as u64,
            shape.d_model as u64,
            shape.d_ff as u64,
            shape.n_heads as u64,
            shape.vocab as u64,
        );
        let hidden_bytes = e * bu * su * du;
        let cost = |fwd: f64, params: u64, act: u64, out: u64| LayerCost {
            fwd_flops: fwd,
            bwd_flops: 2.0 * fwd,
            params,
            param_bytes: params * e,
            activation_bytes: act,
            output_bytes: out,
        };
        let mut nodes = Vec::with_capacity(shape.n_layers + 2);
        nodes.push(LayerNode {
            kind: LayerKind::Embedding,
            cost: cost(b * s * d, vu * du + su * du, hidden_bytes, hidden_bytes),
        });
        let block_fwd = 2.0 * b * s * (3.0 * d * d + d * d + 2.0 * d * f) + 4.0 * b * s * s * d;
        let block_params = 4 * du * du + 2 * du * fu + 9 * du + fu;
        let block_act = e * bu * su * (9 * du + 2 * fu) + e * bu * hu * su * su;
        for i in 0..shape.n_layers {
            nodes.push(LayerNode {
                kind: LayerKind::Block(i),
                cost: cost(block_fwd, block_params, block_act, hidden_bytes),
            });
        }
        nodes.push(LayerNode {
            kind: LayerKind::Head,
            cost: cost(
                2.0 * b * s * d * v,
                du * vu + 2 * du,
                e * bu * su * (2 * du + vu),
                0,
            ),
        });
        Ok(LayerGraph {
            shape: *shape,
            micro_batch_size,
            dtype_bytes,
            nodes,
        })
    }

    /// Total parameter count of the model.
    pub fn total_params(&self) -> u64 {
        self.nodes.iter().map(|n| n.cost.params).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ModelShape {
        ModelShape {
            vocab: 10,
            seq_len: 4,
            d_model: 8,
            n_heads: 2,
            n_layers: 2,
            d_ff: 16,
        }
    }

    #[test]
    fn hand_computed_costs() {
        let g = LayerGraph::gpt(&small(), 3, 4).unwrap();
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
        // block stash: 4*3*4*(72 + 32) + 4*3*2*16
        assert_eq!(g.nodes[1].cost.activation_bytes, 4992 + 384);
        assert_eq!(g.total_params(), 112 + 1200 + 96);
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let mut s = small();
        s.d_model = 9;
        let msg = LayerGraph::gpt(&s, 1, 4).unwrap_err().to_string();
        assert!(msg.contains("model.d_model = 9"), "{msg}");
        assert!(msg.contains("fix:"), "{msg}");
        s.d_model = 8;
        s.n_layers = 0;
        let msg = s.validate().unwrap_err().to_string();
        assert!(msg.starts_with("model.n_layers = 0"), "{msg}");
    }
}
