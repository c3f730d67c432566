//! Megatron-style tensor parallelism for one pipeline chunk, on libtorch without custom
//! autograd functions.
//!
//! Layers (each rank `i` of a tp group of size `p` holds slice `i`):
//! * `ColumnParallelLinear`: `Y = XA`, `A = [A1 .. Ap]` split by columns; rank `i` computes
//!   `Yi = X Ai` from the replicated `X`. QKV is split this way by heads
//!   (`[Q1 K1 V1 | Q2 K2 V2 | …]` gathered from the `[Q | K | V]` layout), and so is MLP fc1.
//! * `RowParallelLinear`: `Y = XA`, `A = [A1; ..; Ap]` split by rows and `X = [X1 .. Xp]`
//!   by columns; rank `i` computes the partial `Xi Ai` and `Y = Σi Xi Ai + b` is formed by
//!   `reduce_from_tp_region`. The attention output projection and MLP fc2 are row-parallel.
//! * Parallel attention: each rank runs the heads of its QKV columns.
//! * `VocabParallelEmbedding`: rank `i` holds vocabulary rows `[i·V/p, (i+1)·V/p)`; ids
//!   outside its range look up zeros, and the partial embeddings are summed.
//! * Vocab-parallel cross-entropy: the LM head is column-parallel over the vocabulary and
//!   the loss `log Σ exp(z) − z_target` is formed from all-reduced row maxima, sums of
//!   exponentials and target logits, so the full logits are never gathered. Its backward
//!   is the analytic `softmax − onehot` on the local slice.
//! * The vocabulary is padded to a multiple of `p`; padded logits are masked to −∞.
//!
//! Region collectives and their backward:
//! * `copy_to_tp_region`: forward identity, backward all-reduce of the input gradient;
//! * `reduce_from_tp_region`: forward all-reduce, backward identity.
//!
//! How the backward collectives are placed without autograd hooks: the chunk runs as a
//! [`Tape`] of *segments*, each an ordinary autograd graph from explicit leaf inputs to
//! outputs, joined by collectives — the way pipeline stages are joined by sends. Backward
//! walks the tape in reverse: each segment is differentiated with the surrogate
//! `Σ sum(out ⊙ grad)`, and its leaf gradients flow to the values they came from, through
//! an all-reduce where the leaf entered a `copy_to_tp_region`.
//!
//! Invariant: every shard is the exact slice of the single-process parameter (initialised
//! in full from (seed, layer, name) and then sliced), and replicated parameters receive the
//! full gradient on every rank, so results do not depend on the layout.

use crate::comm::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::model::{causal_attention, init_grads, init_param, Ctx, Init, LayerNorm, Linear, Param};
use partitioner::{LayerKind, ModelShape};
use tch::{Kind, Tensor};

const INIT_STD: f64 = 0.02;

/// All-reduces `t` (as f32) over the tensor-parallel group.
fn all_reduce(t: &Tensor, tp: &mut dyn Communicator, op: ReduceOp) -> Result<Tensor> {
    let t = t
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .ctx("all-reduce input")?;
    let n = t.numel();
    let mut buf = vec![0f32; n];
    t.f_view([-1])
        .and_then(|v| v.f_copy_data(&mut buf, n))
        .ctx("all-reduce copy")?;
    tp.all_reduce_f32(&mut buf, op)?;
    Tensor::f_from_slice(&buf)
        .and_then(|r| r.f_view(t.size().as_slice()))
        .ctx("all-reduce result")
}

/// Index of a value on a [`Tape`].
type V = usize;

enum Node {
    /// An autograd segment: (value, leaf, how it entered) inputs and outputs.
    Seg {
        inputs: Vec<(V, Tensor, Entry)>,
        outputs: Vec<(V, Tensor)>,
    },
    /// `reduce_from_tp_region`: `to = Σ_ranks from`; backward passes the gradient through.
    Reduce { from: V, to: V },
}

/// A chunk's forward as segments joined by collectives; see the module docs.
pub struct Tape {
    values: Vec<Tensor>,
    nodes: Vec<Node>,
    training: bool,
}

impl Tape {
    fn new(training: bool) -> Tape {
        Tape {
            values: Vec::new(),
            nodes: Vec::new(),
            training,
        }
    }

    fn push(&mut self, t: Tensor) -> V {
        self.values.push(t);
        self.values.len() - 1
    }

    /// Runs `f` on fresh leaves made from `inputs` (`true` = the input enters through
    /// `copy_to_tp_region`) and records it; returns the ids of its outputs.
    fn seg(
        &mut self,
        inputs: &[(V, Entry)],
        f: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    ) -> Result<Vec<V>> {
        let leaves: Vec<Tensor> = inputs
            .iter()
            .map(|&(v, _)| {
                let t = self.values[v].detach();
                if self.training {
                    t.set_requires_grad(true)
                } else {
                    t
                }
            })
            .collect();
        let outs = if self.training {
            f(&leaves)?
        } else {
            tch::no_grad(|| f(&leaves))?
        };
        let ids: Vec<V> = outs.iter().map(|o| self.push(o.detach())).collect();
        if self.training {
            self.nodes.push(Node::Seg {
                inputs: inputs
                    .iter()
                    .zip(leaves)
                    .map(|(&(v, c), l)| (v, l, c))
                    .collect(),
                outputs: ids.iter().copied().zip(outs).collect(),
            });
        }
        Ok(ids)
    }

    fn seg1(
        &mut self,
        inputs: &[(V, Entry)],
        f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    ) -> Result<V> {
        Ok(self.seg(inputs, |x| Ok(vec![f(x)?]))?[0])
    }

    /// `reduce_from_tp_region`: all-reduce forward, identity backward.
    fn reduce_from_tp_region(&mut self, v: V, tp: &mut dyn Communicator) -> Result<V> {
        let sum = all_reduce(&self.values[v], tp, ReduceOp::Sum)?;
        let to = self.push(sum);
        self.nodes.push(Node::Reduce { from: v, to });
        Ok(to)
    }

    /// Backpropagates `seeds` (value, gradient) through the tape, accumulating parameter
    /// gradients; returns the gradient of value 0 (the chunk's input), if any.
    fn backward(
        self,
        seeds: Vec<(V, Tensor)>,
        tp: &mut dyn Communicator,
    ) -> Result<Option<Tensor>> {
        let mut grads: Vec<Option<Tensor>> = (0..self.values.len()).map(|_| None).collect();
        let add = |slot: &mut Option<Tensor>, g: Tensor| -> Result<()> {
            *slot = Some(match slot.take() {
                Some(old) => old.f_add(&g).ctx("gradient accumulation")?,
                None => g,
            });
            Ok(())
        };
        for (v, g) in seeds {
            add(&mut grads[v], g)?;
        }
        for node in self.nodes.into_iter().rev() {
            match node {
                Node::Reduce { from, to } => {
                    if let Some(g) = grads[to].take() {
                        add(&mut grads[from], g)?;
                    }
                }
                Node::Seg { inputs, outputs } => {
                    let mut surrogate: Option<Tensor> = None;
                    for (v, out) in &outputs {
                        if let Some(g) = grads[*v].take() {
                            let term = out
                                .f_mul(&g)
                                .and_then(|t| t.f_sum(Kind::Float))
                                .ctx("segment seed")?;
                            surrogate = Some(match surrogate {
                                Some(s) => s.f_add(&term).ctx("segment seed")?,
                                None => term,
                            });
                        }
                    }
                    let Some(surrogate) = surrogate else { continue };
                    surrogate.f_backward().ctx("segment backward")?;
                    for (v, leaf, entry) in inputs {
                        let g = leaf.grad();
                        if !g.defined() {
                            continue;
                        }
                        // copy_to_tp_region's backward: sum the partial gradients.
                        let g = if entry == Entry::CopyToTp {
                            all_reduce(&g, tp, ReduceOp::Sum)?
                        } else {
                            g
                        };
                        add(&mut grads[v], g)?;
                    }
                }
            }
        }
        Ok(grads.swap_remove(0))
    }
}

/// How a parameter is laid out across the tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardDim {
    Replicated,
    /// Split along dim 0 (row-parallel weights, vocabulary rows of the embedding).
    Rows,
    /// Split along the last dim (column-parallel weights and biases, LM head vocabulary).
    Cols,
    /// Columns of the `[Q | K | V]` layout, split by heads within each of the three parts.
    QkvCols,
}

/// The layout of the parameter called `name` (a full name like `block.3.mlp.fc1.weight`).
pub fn shard_dim(name: &str) -> ShardDim {
    let suffix = name.split('.').skip(1).collect::<Vec<_>>().join(".");
    let suffix = if name.starts_with("block.") {
        name.splitn(3, '.').nth(2).unwrap_or("").to_string()
    } else {
        suffix
    };
    match suffix.as_str() {
        "wte" => ShardDim::Rows,
        "attn.qkv.weight" | "attn.qkv.bias" => ShardDim::QkvCols,
        "attn.proj.weight" | "mlp.fc2.weight" => ShardDim::Rows,
        "mlp.fc1.weight" | "mlp.fc1.bias" | "lm_head.weight" => ShardDim::Cols,
        _ => ShardDim::Replicated,
    }
}

/// Vocabulary size padded up to a multiple of `tp`.
pub fn padded_vocab(vocab: usize, tp: usize) -> usize {
    vocab.div_ceil(tp) * tp
}

/// The vocabulary dimension of a vocab-split parameter, if any.
fn vocab_dim(name: &str) -> Option<i64> {
    match name {
        "embed.wte" => Some(0),
        "head.lm_head.weight" => Some(1),
        _ => None,
    }
}

/// Rank `rank`'s slice (of `size`) of the full parameter `name`.
pub fn shard(name: &str, full: &Tensor, rank: usize, size: usize) -> Result<Tensor> {
    let ctx = format!("sharding {name}");
    let mut full = full.shallow_clone();
    if let Some(dim) = vocab_dim(name) {
        let v = full.size()[dim as usize];
        let pad = padded_vocab(v as usize, size) as i64 - v;
        if pad > 0 {
            let mut shape = full.size();
            shape[dim as usize] = pad;
            let zeros =
                Tensor::f_zeros(shape.as_slice(), (Kind::Float, full.device())).ctx(&ctx)?;
            full = Tensor::f_cat(&[&full, &zeros], dim).ctx(&ctx)?;
        }
    }
    let (rank, size) = (rank as i64, size as i64);
    let split = |t: &Tensor, dim: i64| -> Result<Tensor> {
        let n = t.size()[if dim < 0 { t.dim() - 1 } else { dim as usize }];
        t.f_narrow(dim, rank * n / size, n / size).ctx(&ctx)
    };
    let out = match shard_dim(name) {
        ShardDim::Replicated => full,
        ShardDim::Rows => split(&full, 0)?,
        ShardDim::Cols => split(&full, -1)?,
        ShardDim::QkvCols => {
            let parts = full.f_chunk(3, -1).ctx(&ctx)?;
            let mine: Vec<Tensor> = parts.iter().map(|p| split(p, -1)).collect::<Result<_>>()?;
            Tensor::f_cat(&mine, -1).ctx(&ctx)?
        }
    };
    out.f_contiguous().ctx(&ctx)
}

/// Reassembles the full parameter `name` (true vocabulary size `vocab`) from the shards of
/// every rank, in rank order; the inverse of [`shard`].
pub fn unshard(name: &str, shards: &[Tensor], vocab: usize) -> Result<Tensor> {
    let ctx = format!("unsharding {name}");
    let full = match shard_dim(name) {
        ShardDim::Replicated => shards[0].shallow_clone(),
        ShardDim::Rows => Tensor::f_cat(shards, 0).ctx(&ctx)?,
        ShardDim::Cols => Tensor::f_cat(shards, -1).ctx(&ctx)?,
        ShardDim::QkvCols => {
            let per_rank: Vec<Vec<Tensor>> = shards
                .iter()
                .map(|s| s.f_chunk(3, -1).ctx(&ctx))
                .collect::<Result<_>>()?;
            let parts: Vec<Tensor> = (0..3)
                .map(|k| {
                    Tensor::f_cat(
                        &per_rank
                            .iter()
                            .map(|p| p[k].shallow_clone())
                            .collect::<Vec<_>>(),
                        -1,
                    )
                    .ctx(&ctx)
                })
                .collect::<Result<_>>()?;
            Tensor::f_cat(&parts, -1).ctx(&ctx)?
        }
    };
    match vocab_dim(name) {
        Some(dim) => full.f_narrow(dim, 0, vocab as i64).ctx(&ctx),
        None => Ok(full),
    }
}

/// `ColumnParallelLinear`: `Y = XA + b` with `A = [A1 .. Ap]` (and `b`) split by columns.
/// Rank `i` computes `Yi = X Ai + bi` from the replicated `X`, which enters through
/// `copy_to_tp_region`; the output stays split (no gather).
struct ColumnParallelLinear(Linear);

impl ColumnParallelLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.0.forward(x)
    }
}

/// `RowParallelLinear`: `Y = XA + b` with `A = [A1; ..; Ap]` split by rows and the input
/// `X = [X1 .. Xp]` split by columns. Rank `i` computes the partial `Xi Ai`;
/// `reduce_from_tp_region` sums the partials and the replicated `b` is added after.
struct RowParallelLinear {
    weight: Tensor,
    bias: Tensor,
}

impl RowParallelLinear {
    /// This rank's partial product `Xi Ai` (to be summed over the tp group).
    fn partial(&self, x: &Tensor) -> Result<Tensor> {
        x.f_matmul(&self.weight).ctx("row-parallel linear")
    }
}

/// How a segment input enters the segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Entry {
    /// Directly: the gradient flows back unchanged.
    Local,
    /// Through `copy_to_tp_region`: identity forward, all-reduce of the gradient backward.
    CopyToTp,
}

enum TpLayer {
    Embedding {
        wte: Tensor,
        wpe: Tensor,
    },
    Block {
        ln1: LayerNorm,
        qkv: ColumnParallelLinear,
        proj: RowParallelLinear,
        ln2: LayerNorm,
        fc1: ColumnParallelLinear,
        fc2: RowParallelLinear,
    },
    Head {
        ln_f: LayerNorm,
        /// `[d, V/p]`, or tied: this rank's rows of the word embedding `[V/p, d]`.
        lm_head: Tensor,
        tied: bool,
    },
}

/// One pipeline chunk's shard on one tensor-parallel rank.
pub struct TpStageModel {
    layers: Vec<TpLayer>,
    params: Vec<Param>,
    shape: ModelShape,
    rank: usize,
    size: usize,
}

/// The result of a chunk's forward, kept until its backward.
pub struct TpForward {
    tape: Tape,
    /// Hidden output `[b, s, d]`, or the mean loss (a scalar) on the last chunk.
    pub output: Tensor,
    output_value: V,
    /// On the last chunk: the logits value and `(softmax − onehot) / tokens` on the slice.
    ce: Option<(V, Tensor)>,
}

impl TpStageModel {
    /// Builds rank `rank`'s shard (of `size`) of `layers`, sliced from the full
    /// deterministic initial weights.
    pub fn new(
        shape: &ModelShape,
        layers: &[LayerKind],
        seed: u64,
        rank: usize,
        size: usize,
        tie: bool,
    ) -> Result<TpStageModel> {
        let (d, f, v, s) = (shape.d_model, shape.d_ff, shape.vocab, shape.seq_len);
        let resid_std = INIT_STD / (2.0 * shape.n_layers as f64).sqrt();
        let mut params: Vec<Param> = Vec::new();
        let mut built = Vec::new();
        let mut word_embedding: Option<Tensor> = None;
        // Rank `rank`'s shard of parameter `name` of `layer`.
        let mut make = |layer: LayerKind,
                        name: &str,
                        dims: &[usize],
                        init: Init,
                        tied_copy: bool|
         -> Result<Tensor> {
            let full = init_param(seed, layer, name, dims, init)?.detach();
            let full_name = format!("{}.{name}", layer.name());
            let t = shard(&full_name, &full, rank, size)?.set_requires_grad(true);
            params.push(Param {
                name: full_name.clone(),
                tensor: t.shallow_clone(),
                decay: dims.len() >= 2,
                tp_sharded: shard_dim(&full_name) != ShardDim::Replicated,
                tied_copy,
            });
            Ok(t)
        };
        for &layer in layers {
            let mut p =
                |name: &str, dims: &[usize], init: Init| make(layer, name, dims, init, false);
            built.push(match layer {
                LayerKind::Embedding => {
                    let wte = p("wte", &[v, d], Init::Normal(INIT_STD))?;
                    word_embedding = Some(wte.shallow_clone());
                    TpLayer::Embedding {
                        wte,
                        wpe: p("wpe", &[s, d], Init::Normal(INIT_STD))?,
                    }
                }
                LayerKind::Block(_) => TpLayer::Block {
                    ln1: LayerNorm {
                        weight: p("ln1.weight", &[d], Init::Ones)?,
                        bias: p("ln1.bias", &[d], Init::Zeros)?,
                    },
                    qkv: ColumnParallelLinear(Linear {
                        weight: p("attn.qkv.weight", &[d, 3 * d], Init::Normal(INIT_STD))?,
                        bias: Some(p("attn.qkv.bias", &[3 * d], Init::Zeros)?),
                    }),
                    proj: RowParallelLinear {
                        weight: p("attn.proj.weight", &[d, d], Init::Normal(resid_std))?,
                        bias: p("attn.proj.bias", &[d], Init::Zeros)?,
                    },
                    ln2: LayerNorm {
                        weight: p("ln2.weight", &[d], Init::Ones)?,
                        bias: p("ln2.bias", &[d], Init::Zeros)?,
                    },
                    fc1: ColumnParallelLinear(Linear {
                        weight: p("mlp.fc1.weight", &[d, f], Init::Normal(INIT_STD))?,
                        bias: Some(p("mlp.fc1.bias", &[f], Init::Zeros)?),
                    }),
                    fc2: RowParallelLinear {
                        weight: p("mlp.fc2.weight", &[f, d], Init::Normal(resid_std))?,
                        bias: p("mlp.fc2.bias", &[d], Init::Zeros)?,
                    },
                },
                LayerKind::Head => {
                    let ln_f = LayerNorm {
                        weight: p("ln_f.weight", &[d], Init::Ones)?,
                        bias: p("ln_f.bias", &[d], Init::Zeros)?,
                    };
                    let lm_head = match (&word_embedding, tie) {
                        (Some(wte), true) => wte.shallow_clone(),
                        (None, true) => {
                            let init = Init::Normal(INIT_STD);
                            make(LayerKind::Embedding, "wte", &[v, d], init, true)?
                        }
                        (_, false) => p("lm_head.weight", &[d, v], Init::Normal(INIT_STD))?,
                    };
                    TpLayer::Head {
                        ln_f,
                        lm_head,
                        tied: tie,
                    }
                }
            });
        }
        init_grads(&params)?;
        Ok(TpStageModel {
            layers: built,
            params,
            shape: *shape,
            rank,
            size,
        })
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Local slice of the padded vocabulary: (first id, count).
    fn vocab_slice(&self) -> (i64, i64) {
        let local = (padded_vocab(self.shape.vocab, self.size) / self.size) as i64;
        (self.rank as i64 * local, local)
    }

    /// Runs the chunk. `input` is token ids `[b, s]` on the first chunk, else the hidden
    /// state; `targets` are needed iff the chunk has the head.
    pub fn forward(
        &self,
        input: &Tensor,
        targets: Option<&Tensor>,
        tp: &mut dyn Communicator,
        training: bool,
    ) -> Result<TpForward> {
        let mut tape = Tape::new(training);
        let mut x = tape.push(input.shallow_clone());
        let heads_local = (self.shape.n_heads / self.size) as i64;
        let (lo, n_local) = self.vocab_slice();
        for layer in &self.layers {
            match layer {
                TpLayer::Embedding { wte, wpe } => {
                    // VocabParallelEmbedding: look up the local rows, zero elsewhere, sum.
                    let tokens = input.shallow_clone();
                    let partial = tape.seg1(&[], |_| {
                        let local = tokens.f_sub_scalar(lo).ctx("vocab shift")?;
                        let inside = local
                            .f_ge(0)
                            .and_then(|a| local.f_lt(n_local).and_then(|b| a.f_logical_and(&b)))
                            .ctx("vocab mask")?;
                        let ids = local
                            .f_mul(&inside.f_to_kind(Kind::Int64).ctx("mask")?)
                            .ctx("ids")?;
                        Tensor::f_embedding(wte, &ids, -1, false, false)
                            .and_then(|e| e.f_mul(&inside.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?))
                            .ctx("vocab-parallel embedding")
                    })?;
                    let summed = tape.reduce_from_tp_region(partial, tp)?;
                    x = tape.seg1(&[(summed, Entry::Local)], |h| {
                        let seq = h[0].size()[1];
                        h[0].f_add(&wpe.f_narrow(0, 0, seq).ctx("positions")?)
                            .ctx("embedding add")
                    })?;
                }
                TpLayer::Block {
                    ln1,
                    qkv,
                    proj,
                    ln2,
                    fc1,
                    fc2,
                } => {
                    let size = tape.values[x].size();
                    let (b, s) = (size[0], size[1]);
                    let width = (self.shape.d_model / self.size) as i64;
                    let h1 = tape.seg1(&[(x, Entry::Local)], |t| ln1.forward(&t[0]))?;
                    let partial = tape.seg1(&[(h1, Entry::CopyToTp)], |t| {
                        let y = causal_attention(&qkv.forward(&t[0])?, b, s, width, heads_local)?;
                        proj.partial(&y)
                    })?;
                    let attn = tape.reduce_from_tp_region(partial, tp)?;
                    let out = tape.seg(&[(x, Entry::Local), (attn, Entry::Local)], |t| {
                        let x2 = t[0]
                            .f_add(&t[1])
                            .and_then(|y| y.f_add(&proj.bias))
                            .ctx("attention residual")?;
                        let h2 = ln2.forward(&x2)?;
                        Ok(vec![x2, h2])
                    })?;
                    let (x2, h2) = (out[0], out[1]);
                    let partial = tape.seg1(&[(h2, Entry::CopyToTp)], |t| {
                        let h = fc1.forward(&t[0])?.f_gelu("none").ctx("gelu")?;
                        fc2.partial(&h)
                    })?;
                    let mlp = tape.reduce_from_tp_region(partial, tp)?;
                    x = tape.seg1(&[(x2, Entry::Local), (mlp, Entry::Local)], |t| {
                        t[0].f_add(&t[1])
                            .and_then(|y| y.f_add(&fc2.bias))
                            .ctx("mlp residual")
                    })?;
                }
                TpLayer::Head {
                    ln_f,
                    lm_head,
                    tied,
                } => {
                    let targets =
                        targets.ok_or_else(|| Error::Internal("the head needs targets".into()))?;
                    let hf = tape.seg1(&[(x, Entry::Local)], |t| ln_f.forward(&t[0]))?;
                    let padded_from = self.shape.vocab as i64 - lo;
                    let logits = tape.seg1(&[(hf, Entry::CopyToTp)], |t| {
                        let z = if *tied {
                            lm_head.f_transpose(0, 1).and_then(|w| t[0].f_matmul(&w))
                        } else {
                            t[0].f_matmul(lm_head)
                        }
                        .ctx("column-parallel lm head")?;
                        if padded_from < n_local {
                            // Padding columns beyond the true vocabulary never win.
                            let keep = n_local.min(padded_from.max(0));
                            let opts = (Kind::Float, z.device());
                            let mask = Tensor::f_zeros([keep], opts)
                                .and_then(|zeros| {
                                    let pad =
                                        Tensor::f_full([n_local - keep], f64::NEG_INFINITY, opts)?;
                                    Tensor::f_cat(&[zeros, pad], 0)
                                })
                                .ctx("vocab padding mask")?;
                            z.f_add(&mask).ctx("vocab padding mask")
                        } else {
                            Ok(z)
                        }
                    })?;
                    let (loss, dlogits) = vocab_parallel_cross_entropy(
                        &tape.values[logits],
                        targets,
                        lo,
                        n_local,
                        tp,
                    )?;
                    let output_value = tape.push(loss.shallow_clone());
                    return Ok(TpForward {
                        tape,
                        output: loss,
                        output_value,
                        ce: Some((logits, dlogits)),
                    });
                }
            }
        }
        let output = tape.values[x].shallow_clone();
        Ok(TpForward {
            tape,
            output,
            output_value: x,
            ce: None,
        })
    }

    /// Backward of a chunk. On the last chunk `grad` is the scale of the loss (1 /
    /// microbatches); elsewhere it is the gradient of the hidden output. Returns the
    /// gradient of the chunk's input (None on the first chunk).
    pub fn backward(
        fwd: TpForward,
        grad: Grad,
        tp: &mut dyn Communicator,
    ) -> Result<Option<Tensor>> {
        let seed = match (fwd.ce, grad) {
            (Some((logits, dlogits)), Grad::LossScale(scale)) => {
                (logits, dlogits.f_mul_scalar(scale).ctx("loss scale")?)
            }
            (None, Grad::Output(g)) => (fwd.output_value, g),
            _ => {
                return Err(Error::Internal(
                    "tensor-parallel backward seeded with the wrong kind of gradient".into(),
                ))
            }
        };
        fwd.tape.backward(vec![seed], tp)
    }
}

/// What seeds a chunk's backward.
pub enum Grad {
    /// The loss is scaled by this (the last chunk).
    LossScale(f64),
    /// The gradient of the hidden output.
    Output(Tensor),
}

/// Mean cross-entropy over all tokens from vocabulary-sharded logits `[b, s, n_local]`
/// (this rank's columns start at id `lo`); returns the loss and the gradient of the mean
/// loss w.r.t. the local logits, `(softmax − onehot) / tokens`.
fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    lo: i64,
    n_local: i64,
    tp: &mut dyn Communicator,
) -> Result<(Tensor, Tensor)> {
    let c = "vocab-parallel cross-entropy";
    let z = logits.f_view([-1, n_local]).ctx(c)?;
    let tokens = z.size()[0];
    let local_max = z.f_amax([-1], false).ctx(c)?;
    let max = all_reduce(&local_max, tp, ReduceOp::Max)?;
    let exp = z
        .f_sub(&max.f_unsqueeze(-1).ctx(c)?)
        .and_then(|t| t.f_exp())
        .ctx(c)?;
    let sum_exp = all_reduce(
        &exp.f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
            .ctx(c)?,
        tp,
        ReduceOp::Sum,
    )?;
    let local = targets
        .f_view([-1])
        .and_then(|t| t.f_sub_scalar(lo))
        .ctx(c)?;
    let inside = local
        .f_ge(0)
        .and_then(|a| local.f_lt(n_local).and_then(|b| a.f_logical_and(&b)))
        .ctx(c)?;
    let ids = local.f_mul(&inside.f_to_kind(Kind::Int64).ctx(c)?).ctx(c)?;
    let inside_f = inside.f_to_kind(Kind::Float).ctx(c)?;
    let picked = z
        .f_gather(1, &ids.f_unsqueeze(1).ctx(c)?, false)
        .and_then(|t| t.f_squeeze_dim(1))
        .and_then(|t| t.f_mul(&inside_f))
        .ctx(c)?;
    let target_logit = all_reduce(&picked, tp, ReduceOp::Sum)?;
    let per_token = sum_exp
        .f_log()
        .and_then(|l| l.f_add(&max))
        .and_then(|l| l.f_sub(&target_logit))
        .ctx(c)?;
    let loss = per_token.f_mean(Kind::Float).ctx(c)?;
    let softmax = exp.f_div(&sum_exp.f_unsqueeze(-1).ctx(c)?).ctx(c)?;
    let onehot = ids
        .f_one_hot(n_local)
        .and_then(|o| o.f_to_kind(Kind::Float))
        .and_then(|o| o.f_mul(&inside_f.f_unsqueeze(-1)?))
        .ctx(c)?;
    let dlogits = softmax
        .f_sub(&onehot)
        .and_then(|g| g.f_div_scalar(tokens as f64))
        .and_then(|g| g.f_view(logits.size().as_slice()))
        .ctx(c)?;
    Ok((loss, dlogits))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_and_unshard_round_trip() {
        let full = Tensor::arange(4 * 12, (Kind::Float, tch::Device::Cpu)).view([4, 12]);
        for name in [
            "block.0.attn.qkv.weight",
            "block.0.mlp.fc1.weight",
            "block.1.mlp.fc2.weight",
            "block.0.ln1.weight",
        ] {
            let shards: Vec<Tensor> = (0..2).map(|r| shard(name, &full, r, 2).unwrap()).collect();
            assert!(unshard(name, &shards, 0).map(|_| ()).is_ok());
            let back = unshard(name, &shards, 4).unwrap();
            if vocab_dim(name).is_none() {
                assert!(back.equal(&full), "{name}");
            }
        }
        // QKV by heads: rank 1 of 2 gets the second half of each of Q, K and V.
        let s1 = shard("block.0.attn.qkv.weight", &full, 1, 2).unwrap();
        assert!(s1.narrow(1, 0, 2).equal(&full.narrow(1, 2, 2)));
        assert!(s1.narrow(1, 2, 2).equal(&full.narrow(1, 6, 2)));
        // Vocabulary padding: 5 rows over 2 ranks pad to 6 and come back as 5.
        let wte = Tensor::arange(5 * 3, (Kind::Float, tch::Device::Cpu)).view([5, 3]);
        let shards: Vec<Tensor> = (0..2)
            .map(|r| shard("embed.wte", &wte, r, 2).unwrap())
            .collect();
        assert_eq!(shards[1].size(), vec![3, 3]);
        assert!(unshard("embed.wte", &shards, 5).unwrap().equal(&wte));
        assert_eq!(shard_dim("block.12.attn.proj.bias"), ShardDim::Replicated);
        assert_eq!(shard_dim("head.lm_head.weight"), ShardDim::Cols);
    }
}
