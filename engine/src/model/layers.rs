//! The layers of the model, each taking its tensor-parallel rank (Megatron-core style: a
//! group of size 1 is the plain layer, with no collectives and no extra copies).
//!
//! * [`ColumnParallelLinear`]: `Y = XA + b`, `A = [A1 .. Ap]` (and `b`) split by columns.
//!   Rank `i` computes `Yi = X Ai + bi` from the replicated `X`, which enters through
//!   `copy_to_tp_region`; the output stays split (no gather).
//! * [`RowParallelLinear`]: `Y = XA + b`, `A = [A1; ..; Ap]` split by rows and the input
//!   `X = [X1 .. Xp]` by columns. Rank `i` computes the partial `Xi Ai`;
//!   `reduce_from_tp_region` sums the partials and the replicated `b` is added after. At
//!   tp = 1 the bias is fused into the product.
//! * [`Norm`]: LayerNorm (GPT) or RMSNorm (LLaMA), replicated.
//! * [`VocabParallelEmbedding`]: rank `i` holds vocabulary rows `[i·V'/p, (i+1)·V'/p)` of the
//!   vocabulary padded to `V'`; ids outside its range look up zeros and the partial
//!   embeddings are summed by `reduce_from_tp_region`; with sequence parallelism the sum
//!   (plus positions, added while every token still knows its position) is then split
//!   into this rank's block of token rows (Megatron's embedding).
//!
//! With sequence parallelism ([`super::tape`], [`super::sequence`]: rank `r` holds rows
//! `[r·b·s/p, (r+1)·b·s/p)` of the `[b·s, d]` activation, shaped `[b, s/p, d]`) the
//! column-parallel input enters through an all-gather of the blocks and the row-parallel
//! partials leave through a reduce-scatter; the replicated parameters used on blocks
//! (norms, the bias added after the reduction: all row-wise) are marked
//! [`super::params::Param::sequence_parallel`].
//!
//! Weights are stored `[in, out]` (`Y = XA`), so both splits slice without transposes.
//! Under a split backward (zero bubble) a linear multiplies by its *detached* weight and
//! records `(X, Y)`; see [`super::tape`].

use super::params::{Init, ParamBuilder};
use super::sharding::{padded, Split};
use super::tape::{LinearRecord, Recorder, Tape, V};
use super::Ctx;
use crate::comm::Communicator;
use crate::error::Result;
use crate::quant::Int8Weight;
use partitioner::LayerKind;
use tch::Tensor;

/// `Y = XA + b` on this rank's slice of `A`.
#[derive(Debug)]
pub struct Linear {
    /// The weight's global parameter name (`block.3.attn.qkv.weight`).
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// `A` is stored `[out, in]` (a tied LM head reuses the embedding `[V, d]`).
    pub transposed: bool,
    /// Inference on int8 weights: when set, `weight` is empty and the product runs on
    /// these codes and scales ([`crate::quant`]).
    pub int8: Option<Box<Int8Weight>>,
}

impl Linear {
    /// A dense layer (f32 or the model's dtype).
    pub fn dense(name: String, weight: Tensor, bias: Option<Tensor>, transposed: bool) -> Linear {
        Linear {
            name,
            weight,
            bias,
            transposed,
            int8: None,
        }
    }

    /// The layer's tensors for the tape's sequence-parallel linear nodes.
    pub fn tensors(&self) -> super::tape::Dense {
        super::tape::Dense {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            transposed: self.transposed,
        }
    }

    /// `Y = XA (+ b)`; under a split backward the weights are detached and the call recorded.
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        self.forward_bias(x, self.bias.as_ref(), rec)
    }

    fn forward_bias(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        rec: &mut Recorder,
    ) -> Result<Tensor> {
        if let Some(q) = &self.int8 {
            if rec.split() {
                return Err(crate::error::Error::Internal(format!(
                    "{} holds int8 weights, which are for inference only",
                    self.name
                )));
            }
            let y = q.matmul(x)?;
            return match bias {
                Some(b) => y.f_add(b).ctx("linear bias"),
                None => Ok(y),
            };
        }
        let split = rec.split();
        let detach = |t: &Tensor| if split { t.detach() } else { t.shallow_clone() };
        let w = detach(&self.weight);
        let w_out_in = if self.transposed {
            w
        } else {
            w.f_transpose(0, 1).ctx("linear")?
        };
        let b = bias.map(detach);
        let y = x.f_linear(&w_out_in, b.as_ref()).ctx("linear")?;
        if split {
            rec.push(LinearRecord {
                x: x.detach(),
                y: y.shallow_clone(),
                weight: self.weight.shallow_clone(),
                bias: bias.map(Tensor::shallow_clone),
                transposed: self.transposed,
            });
        }
        Ok(y)
    }
}

/// A column-parallel linear layer (see the module docs).
#[derive(Debug)]
pub struct ColumnParallelLinear(pub Linear);

impl ColumnParallelLinear {
    /// Builds `layer.name` of global shape `[d_in, d_out]`; `parts` splits a fused output
    /// (q | k | v) part by part.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut ParamBuilder,
        layer: LayerKind,
        name: &str,
        d_in: usize,
        d_out: usize,
        std: f64,
        bias: bool,
        parts: Option<Vec<usize>>,
    ) -> Result<Self> {
        let split = match parts {
            Some(p) => Split::FusedCols(p),
            None => Split::Cols { padded: false },
        };
        let weight = b.param(
            layer,
            &format!("{name}.weight"),
            &[d_in, d_out],
            Init::Normal(std),
            split.clone(),
        )?;
        let bias = match bias {
            true => Some(b.param(layer, &format!("{name}.bias"), &[d_out], Init::Zeros, split)?),
            false => None,
        };
        let full_name = format!("{}.{name}.weight", layer.name());
        Ok(ColumnParallelLinear(Linear::dense(
            full_name, weight, bias, false,
        )))
    }

    /// This rank's `Yi = X Ai + bi` (the input must have entered `copy_to_tp_region`).
    pub fn forward(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        self.0.forward(x, rec)
    }
}

/// A row-parallel linear layer (see the module docs).
#[derive(Debug)]
pub struct RowParallelLinear {
    linear: Linear,
    /// The replicated bias, added after the reduction (None without bias).
    bias: Option<Tensor>,
    tp_size: usize,
}

impl RowParallelLinear {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut ParamBuilder,
        layer: LayerKind,
        name: &str,
        d_in: usize,
        d_out: usize,
        std: f64,
        bias: bool,
    ) -> Result<Self> {
        let split = Split::Rows { padded: false };
        let weight = b.param(
            layer,
            &format!("{name}.weight"),
            &[d_in, d_out],
            Init::Normal(std),
            split,
        )?;
        let bias = match bias {
            true => {
                let bias = b.param(
                    layer,
                    &format!("{name}.bias"),
                    &[d_out],
                    Init::Zeros,
                    Split::Replicated,
                )?;
                b.mark_sequence_parallel();
                Some(bias)
            }
            false => None,
        };
        Ok(RowParallelLinear {
            linear: Linear::dense(
                format!("{}.{name}.weight", layer.name()),
                weight,
                None,
                false,
            ),
            bias,
            tp_size: b.tp.size,
        })
    }

    /// `Xi Ai`, to be summed over the group; at tp = 1 the whole `XA + b`.
    pub fn partial(&self, x: &Tensor, rec: &mut Recorder) -> Result<Tensor> {
        let fused_bias = if self.tp_size == 1 {
            self.bias.as_ref()
        } else {
            None
        };
        self.linear.forward_bias(x, fused_bias, rec)
    }

    /// The layer's tensors for the tape's row-linear node: the local weight, with the
    /// bias only where it is fused into the product (tp = 1).
    pub fn dense(&self) -> super::tape::Dense {
        super::tape::Dense {
            weight: self.linear.weight.shallow_clone(),
            bias: self
                .bias
                .as_ref()
                .filter(|_| self.tp_size == 1)
                .map(Tensor::shallow_clone),
            transposed: false,
        }
    }

    /// The layer's local product.
    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    /// The layer's local product (for int8 installation and masks).
    pub fn linear_mut(&mut self) -> &mut Linear {
        &mut self.linear
    }

    /// The bias to add after `reduce_from_tp_region` (None at tp = 1, where it is fused).
    pub fn bias_after_reduce(&self) -> Option<&Tensor> {
        self.bias.as_ref().filter(|_| self.tp_size > 1)
    }
}

/// LayerNorm (GPT) or RMSNorm (LLaMA) over the last dim; replicated over tp.
#[derive(Debug)]
pub enum Norm {
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
    Rms {
        weight: Tensor,
        eps: f64,
    },
}

impl Norm {
    /// `layer.name` of width `d`: LayerNorm with a bias, or RMSNorm without.
    pub fn new(
        b: &mut ParamBuilder,
        layer: LayerKind,
        name: &str,
        d: usize,
        rms: bool,
        eps: f64,
    ) -> Result<Norm> {
        let weight = b.param(
            layer,
            &format!("{name}.weight"),
            &[d],
            Init::Ones,
            Split::Replicated,
        )?;
        b.mark_sequence_parallel();
        Ok(if rms {
            Norm::Rms { weight, eps }
        } else {
            let bias = b.param(
                layer,
                &format!("{name}.bias"),
                &[d],
                Init::Zeros,
                Split::Replicated,
            )?;
            b.mark_sequence_parallel();
            Norm::Layer { weight, bias, eps }
        })
    }

    /// The same norm on the same parameter tensors (no copies).
    pub fn shallow_clone(&self) -> Norm {
        match self {
            Norm::Layer { weight, bias, eps } => Norm::Layer {
                weight: weight.shallow_clone(),
                bias: bias.shallow_clone(),
                eps: *eps,
            },
            Norm::Rms { weight, eps } => Norm::Rms {
                weight: weight.shallow_clone(),
                eps: *eps,
            },
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer { weight, bias, eps } => {
                let d = weight.size()[0];
                x.f_layer_norm([d], Some(weight), Some(bias), *eps, false)
                    .ctx("layer_norm")
            }
            Norm::Rms { weight, eps } => {
                let d = weight.size()[0];
                x.f_rms_norm([d], Some(weight), *eps).ctx("rms_norm")
            }
        }
    }
}

/// This rank's slice of the padded vocabulary: (first id, count).
pub fn vocab_slice(vocab: usize, rank: usize, size: usize) -> (i64, i64) {
    let local = (padded(vocab, size) / size) as i64;
    (rank as i64 * local, local)
}

/// The token embedding (vocabulary-parallel), plus learned positions for GPT.
#[derive(Debug)]
pub struct VocabParallelEmbedding {
    /// This rank's rows of the (padded) word embedding, `[V'/p, d]`.
    pub wte: Tensor,
    /// Learned positions `[seq_len, d]` (GPT), replicated.
    pub wpe: Option<Tensor>,
    lo: i64,
    n_local: i64,
    tp_size: usize,
}

impl VocabParallelEmbedding {
    pub fn new(
        b: &mut ParamBuilder,
        vocab: usize,
        d: usize,
        positions: Option<usize>,
        std: f64,
    ) -> Result<Self> {
        let layer = LayerKind::Embedding;
        let wte = b.param(
            layer,
            "wte",
            &[vocab, d],
            Init::Normal(std),
            Split::Rows { padded: true },
        )?;
        let wpe = match positions {
            Some(s) => {
                Some(b.param(layer, "wpe", &[s, d], Init::Normal(std), Split::Replicated)?)
            }
            None => None,
        };
        let (lo, n_local) = vocab_slice(vocab, b.tp.rank, b.tp.size);
        Ok(VocabParallelEmbedding {
            wte,
            wpe,
            lo,
            n_local,
            tp_size: b.tp.size,
        })
    }

    /// `h = E[tokens] (+ P[0..s])` for token ids `[b, s]`; with `positions` (`[b, s]`,
    /// int64: incremental decoding), `P[positions]`.
    pub fn forward(
        &self,
        tape: &mut Tape,
        tokens: &Tensor,
        tp: &mut dyn Communicator,
        positions: Option<&Tensor>,
    ) -> Result<V> {
        let (lo, n_local, wte) = (self.lo, self.n_local, &self.wte);
        let looked_up = if self.tp_size == 1 {
            tape.seg1(&[], |_, _| {
                Tensor::f_embedding(wte, tokens, -1, false, false).ctx("token embedding")
            })?
        } else {
            let partial = tape.seg1(&[], |_, _| {
                let local = tokens.f_sub_scalar(lo).ctx("vocab shift")?;
                let inside = local
                    .f_ge(0)
                    .and_then(|a| local.f_lt(n_local).and_then(|b| a.f_logical_and(&b)))
                    .ctx("vocab mask")?;
                let ids = local.f_mul(&inside).ctx("local ids")?;
                Tensor::f_embedding(wte, &ids, -1, false, false)
                    .and_then(|e| e.f_mul(&inside.f_unsqueeze(-1)?.f_to_kind(e.kind())?))
                    .ctx("vocab-parallel embedding")
            })?;
            tape.reduce_from_tp_region(partial, tp)?
        };
        let h = match &self.wpe {
            None => looked_up,
            Some(wpe) => tape.seg1(&[looked_up], |h, _| {
                let seq = h[0].size()[1];
                let p = match positions {
                    Some(at) => Tensor::f_embedding(wpe, at, -1, false, false),
                    None => wpe.f_narrow(0, 0, seq),
                };
                h[0].f_add(&p.ctx("positions")?).ctx("position embedding")
            })?,
        };
        tape.scatter_to_sequence_parallel_region(h, tp)
    }
}
