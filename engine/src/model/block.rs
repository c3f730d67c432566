//! One transformer block, GPT or LLaMA, on one tensor-parallel rank:
//! `x = x + Attn(Norm1(x)); x = x + MLP(Norm2(x))` (pre-norm).
//!
//! * Attention: column-parallel fused `qkv` (heads split over tp), causal attention of the
//!   rank's heads (rotary and grouped-query for LLaMA), row-parallel output projection.
//! * MLP: GPT `fc2(act(fc1 x))` with GELU (erf or tanh form); LLaMA SwiGLU
//!   `down(silu(gate x) ⊙ up x)`, gate and up column-parallel, down row-parallel.
//!
//! On the tape a block is 2 × (norm → copy_to_tp_region → column-parallel work and the
//! row-parallel partial → reduce_from_tp_region → residual): four tp collectives forward
//! and four backward (two all-reduces each way), none at tp = 1. With sequence
//! parallelism the norms and residuals (row-wise) run on this rank's block of contiguous
//! token rows, `[r·b·s/p, (r+1)·b·s/p)` of the `[b·s, d]` activation, shaped
//! `[b, s/p, d]` ([`super::sequence`]), and the regions are entered by an all-gather and
//! left by a reduce-scatter instead, neither with a permuting copy: the same bytes on the
//! wire, the norm and element-wise activations divided by p. Attention (rotary
//! included) runs after the gather, on whole sequences.
//!
//! Selective recomputation (`parallel.recompute: selective`, [`Tape::selective`]): every
//! non-matmul piece — the two norms, the attention core (SDPA: its output and
//! log-sum-exp) and the activation (GELU, or SwiGLU's `silu(gate) ⊙ up`) — runs without
//! autograd and its output is dropped once its linear layer has read it; the backward
//! reruns it from what is kept just before that linear's weight gradient. A block keeps
//! its input, the mid-block residual `x2` and its linear layers' outputs.

use super::attention::{causal_attention, Heads, Rotary};
use super::kv::Cached;
use super::layers::{ColumnParallelLinear, Linear, Norm, RowParallelLinear};
use super::params::ParamBuilder;
use super::tape::{Recorder, Tape, V};
use super::{Activation, Ctx, ModelSpec, INIT_STD};
use crate::comm::Communicator;
use crate::error::Result;
use partitioner::{Arch, LayerKind};
use tch::Tensor;

/// The feed-forward part of a block.
#[derive(Debug)]
enum Mlp {
    Gelu {
        fc1: ColumnParallelLinear,
        fc2: RowParallelLinear,
        approximate: &'static str,
    },
    SwiGlu {
        gate: ColumnParallelLinear,
        up: ColumnParallelLinear,
        down: RowParallelLinear,
    },
}

impl Mlp {
    fn new(
        b: &mut ParamBuilder,
        layer: LayerKind,
        spec: &ModelSpec,
        resid_std: f64,
    ) -> Result<Mlp> {
        let LayerKind::Block(i) = layer else {
            return Err(crate::error::Error::Internal(format!("an MLP in {layer}")));
        };
        // Each block has its own width (`model.d_ff` may be per layer), split over tp.
        let (d, f) = (spec.shape.d_model, spec.shape.d_ff_of(i));
        Ok(match spec.shape.arch {
            Arch::Gpt => Mlp::Gelu {
                fc1: ColumnParallelLinear::new(b, layer, "mlp.fc1", d, f, INIT_STD, true, None)?,
                fc2: RowParallelLinear::new(b, layer, "mlp.fc2", f, d, resid_std, true)?,
                approximate: match spec.activation {
                    Activation::Gelu => "none",
                    Activation::GeluTanh => "tanh",
                },
            },
            Arch::Llama => Mlp::SwiGlu {
                gate: ColumnParallelLinear::new(b, layer, "mlp.gate", d, f, INIT_STD, false, None)?,
                up: ColumnParallelLinear::new(b, layer, "mlp.up", d, f, INIT_STD, false, None)?,
                down: RowParallelLinear::new(b, layer, "mlp.down", f, d, resid_std, false)?,
            },
        })
    }

    /// This rank's partial output (before the reduction over tp).
    fn partial(&self, h: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        match self {
            Mlp::Gelu {
                fc1,
                fc2,
                approximate,
            } => {
                let a = fc1.forward(h, rec)?.f_gelu(approximate).ctx("gelu")?;
                fc2.partial(&a, rec)
            }
            Mlp::SwiGlu { gate, up, down } => {
                let g = gate.forward(h, rec)?.f_silu().ctx("silu")?;
                let a = g.f_mul(&up.forward(h, rec)?).ctx("swiglu")?;
                down.partial(&a, rec)
            }
        }
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        match self {
            Mlp::Gelu { fc1, fc2, .. } => vec![&mut fc1.0, fc2.linear_mut()],
            Mlp::SwiGlu { gate, up, down } => vec![&mut gate.0, &mut up.0, down.linear_mut()],
        }
    }

    fn out(&self) -> &RowParallelLinear {
        match self {
            Mlp::Gelu { fc2, .. } => fc2,
            Mlp::SwiGlu { down, .. } => down,
        }
    }
}

/// A pre-norm transformer block (see the module docs).
#[derive(Debug)]
pub struct Block {
    norm1: Norm,
    qkv: ColumnParallelLinear,
    proj: RowParallelLinear,
    norm2: Norm,
    mlp: Mlp,
    heads: Heads,
}

impl Block {
    pub fn new(b: &mut ParamBuilder, layer: LayerKind, spec: &ModelSpec) -> Result<Block> {
        let s = &spec.shape;
        let (d, p) = (s.d_model, b.tp.size);
        let rms = s.arch == Arch::Llama;
        let bias = !rms;
        let resid_std = INIT_STD / (2.0 * s.n_layers as f64).sqrt();
        let (q_w, kv_w) = (s.n_heads * s.head_dim(), s.n_kv_heads * s.head_dim());
        Ok(Block {
            norm1: Norm::new(b, layer, "ln1", d, rms, spec.norm_eps)?,
            qkv: ColumnParallelLinear::new(
                b,
                layer,
                "attn.qkv",
                d,
                q_w + 2 * kv_w,
                INIT_STD,
                bias,
                Some(vec![q_w, kv_w, kv_w]),
            )?,
            proj: RowParallelLinear::new(b, layer, "attn.proj", q_w, d, resid_std, bias)?,
            norm2: Norm::new(b, layer, "ln2", d, rms, spec.norm_eps)?,
            mlp: Mlp::new(b, layer, spec, resid_std)?,
            heads: Heads {
                q: (s.n_heads / p) as i64,
                kv: (s.n_kv_heads / p) as i64,
                dim: s.head_dim() as i64,
            },
        })
    }

    /// The block's linear layers (attention, then MLP).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = vec![&mut self.qkv.0, self.proj.linear_mut()];
        out.extend(self.mlp.linears_mut());
        out
    }

    /// The block on the tape's linear nodes ([`Tape::column_linears`],
    /// [`Tape::row_linear`]: products without autograd whose inputs the tape need not
    /// keep) and [`Tape::rerun`] pieces between them (the norms, the attention core, the
    /// activation). Used for sequence parallelism (Megatron: each column-parallel input
    /// gathered without keeping it, each row-parallel product reduce-scattered without
    /// keeping it; norms and residuals on this rank's block of token rows) and for
    /// selective recomputation (the rerun pieces are dropped after the forward and rerun
    /// in the backward: a block keeps its input, `x2`, and its linear outputs).
    fn forward_linear_nodes(
        &self,
        tape: &mut Tape,
        x: V,
        tp: &mut dyn Communicator,
        rotary: Option<&Rotary>,
    ) -> Result<V> {
        let norm1 = self.norm1.shallow_clone();
        let h1 = tape.rerun(&[x], move |t| norm1.forward(&t[0]))?;
        let qkv = tape.column_linears(h1, vec![self.qkv.0.tensors()], tp)?[0];
        let (heads, rotary) = (self.heads, rotary.map(Rotary::shallow_clone));
        let y = tape.rerun(&[qkv], move |t| {
            causal_attention(&t[0], heads, rotary.as_ref(), None)
        })?;
        let attn = tape.row_linear(y, self.proj.dense(), tp)?;
        let x2 = tape.seg1(&[x, attn], |t, _| {
            residual(&t[0], &t[1], self.proj.bias_after_reduce())
        })?;
        let norm2 = self.norm2.shallow_clone();
        let h2 = tape.rerun(&[x2], move |t| norm2.forward(&t[0]))?;
        let mlp = match &self.mlp {
            Mlp::Gelu {
                fc1,
                fc2,
                approximate,
            } => {
                let a = tape.column_linears(h2, vec![fc1.0.tensors()], tp)?[0];
                let approximate = *approximate;
                let g = tape.rerun(&[a], move |t| t[0].f_gelu(approximate).ctx("gelu"))?;
                tape.row_linear(g, fc2.dense(), tp)?
            }
            Mlp::SwiGlu { gate, up, down } => {
                let gu = tape.column_linears(h2, vec![gate.0.tensors(), up.0.tensors()], tp)?;
                let a = tape.rerun(&[gu[0], gu[1]], |t| {
                    t[0].f_silu().and_then(|g| g.f_mul(&t[1])).ctx("swiglu")
                })?;
                tape.row_linear(a, down.dense(), tp)?
            }
        };
        tape.seg1(&[x2, mlp], |t, _| {
            residual(&t[0], &t[1], self.mlp.out().bias_after_reduce())
        })
    }

    /// Runs the block on the hidden state `x` (the step's new tokens, with a cache).
    pub fn forward(
        &self,
        tape: &mut Tape,
        x: V,
        tp: &mut dyn Communicator,
        rotary: Option<&Rotary>,
        cached: Option<Cached<'_>>,
    ) -> Result<V> {
        let sequence_parallel = tape.sequence_parallel() && tp.size() > 1;
        if (sequence_parallel || tape.selective()) && cached.is_none() {
            return self.forward_linear_nodes(tape, x, tp, rotary);
        }
        let h1 = tape.seg1(&[x], |t, _| self.norm1.forward(&t[0]))?;
        let h1 = tape.enter_tp_region(h1, tp)?;
        let heads = self.heads;
        let attn = tape.seg1(&[h1], |t, rec| {
            let y = causal_attention(&self.qkv.forward(&t[0], rec)?, heads, rotary, cached)?;
            self.proj.partial(&y, rec)
        })?;
        let attn = tape.leave_tp_region(attn, tp)?;
        let out = tape.seg(&[x, attn], |t, _| {
            let x2 = residual(&t[0], &t[1], self.proj.bias_after_reduce())?;
            let h2 = self.norm2.forward(&x2)?;
            Ok(vec![x2, h2])
        })?;
        let (x2, h2) = (out[0], out[1]);
        let h2 = tape.enter_tp_region(h2, tp)?;
        let mlp = tape.seg1(&[h2], |t, rec| self.mlp.partial(&t[0], rec))?;
        let mlp = tape.leave_tp_region(mlp, tp)?;
        tape.seg1(&[x2, mlp], |t, _| {
            residual(&t[0], &t[1], self.mlp.out().bias_after_reduce())
        })
    }
}

/// `x + y (+ b)`.
fn residual(x: &Tensor, y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let sum = x.f_add(y).ctx("residual")?;
    match bias {
        Some(b) => sum.f_add(b).ctx("residual bias"),
        None => Ok(sum),
    }
}
