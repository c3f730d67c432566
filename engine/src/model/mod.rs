//! The model: one definition of GPT- and LLaMA-style decoders, built one pipeline chunk at
//! a time on one tensor-parallel rank (Megatron-core style: layers take their tp rank, and a
//! group of size 1 is the plain model with no collectives and no extra copies).
//!
//! * [`sharding`]: how each parameter splits over tp (the [`crate::shard::ShardSpec`]s).
//! * [`params`]: named parameters with deterministic initial values.
//! * [`layers`]: column/row-parallel linears, norms, the vocabulary-parallel embedding.
//! * [`attention`]: causal attention, grouped-query heads and rotary embeddings.
//! * [`block`]: the pre-norm transformer block for both architectures.
//! * [`head`]: final norm, LM head and (vocabulary-parallel) cross-entropy.
//! * [`kv`]: the key/value cache of incremental decoding ([`Model::infer`]).
//! * [`tape`]: the forward as autograd segments joined by tp collectives, and the
//!   backward (whole, or split into input-gradient `I` and weight-gradient `W`).
//! * [`sequence`]: the sequence-parallel collectives (all-gather, reduce-scatter, split).
//!
//! Sequence parallelism ([`Model::with_sequence_parallel`], `parallel.sequence_parallel`,
//! Megatron's `--sequence-parallel`, tp > 1): the embedding's output is split into tp
//! blocks of contiguous token rows ([`sequence`]: rank `r` holds rows
//! `[r·b·s/p, (r+1)·b·s/p)` of the `[b·s, d]` view, shaped `[b, s/p, d]`; any `b`, with
//! `s % p == 0`), so the hidden state between layers, and between pipeline chunks, is this
//! tp rank's block (what a pipeline stage sends and its receiver preallocates); norms,
//! residuals and biases added after a reduction run on it (row-wise, so which rows does
//! not matter); each column-parallel layer's input is all-gathered and each row-parallel
//! output reduce-scattered; the head gathers before the vocabulary-parallel loss. The replicated
//! parameters of the split regions get per-rank partial gradients
//! ([`Param::sequence_parallel`]) that the trainer sums over tp before the optimizer.
//!
//! Full activation recomputation ([`Model::with_recompute`], `parallel.recompute: full`,
//! Megatron's `--recompute-granularity full` with the uniform method over every block):
//! a training forward runs each block without autograd and keeps only its input; the
//! backward reruns the block's forward on a tape of its own from that input and
//! differentiates it at once. The layers around the blocks (embedding, head) keep their
//! tapes. The tapes are joined by their input and output gradients, so every operation,
//! and every parameter's one gradient addition per microbatch, is the same as without
//! recomputation: losses and gradients are bit-identical. The one parameter two tapes
//! share, a tied word embedding on a chunk with both the embedding and the head, has its
//! two contributions held and added with one addition, as the single autograd graph of a
//! fused (tp = 1, whole-backward) chunk adds them.
//!
//! Selective recomputation (`parallel.recompute: selective`): every block runs on the
//! tape's linear nodes with its non-matmul pieces (norms, attention core, activation)
//! recomputed in the backward (see [`block`] and [`tape`]); a training forward then uses
//! a cut tape even at tp = 1. A block keeps its input, the mid-block residual and its
//! linear layers' outputs. Gradients agree with `none` within rounding (a weight
//! gradient is formed outside autograd, and the cut graph adds a value's gradient
//! contributions in another order).
//!
//! Layers (see [`partitioner::LayerKind`]): `embed` (token embedding, + learned positions
//! for GPT), `block.i`, and `head`. Linear weights are stored `[in, out]` (`Y = XA`).
//!
//! Invariants: every parameter's initial value is a pure function of (seed, layer name,
//! parameter name), and every tp shard is the exact slice of it, so every layout starts
//! from the same model; dtype and device come from the [`ModelSpec`], never from here.

pub mod attention;
pub mod block;
pub mod causal_kernel;
pub mod head;
pub mod kv;
pub mod layers;
pub mod params;
pub mod seeded;
pub mod sequence;
pub mod sharding;
pub mod shim;
pub mod tape;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use attention::Rotary;
use block::Block;
use head::{Head, Seed};
use kv::{CacheShape, Cached, KvCache};
use layers::VocabParallelEmbedding;
use params::{init_grads, ParamBuilder};
use partitioner::{Arch, LayerKind, ModelShape, Recompute};
use sharding::TpRank;
use tape::{Backward, Mode, Tape, WeightWork};
use tch::{Device, Kind, Tensor};

pub use params::{init_param, Init, Param};

/// Standard deviation of the normal initialisation (GPT-2).
pub const INIT_STD: f64 = 0.02;

/// The MLP activation of GPT blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x Φ(x)` with the exact (erf) normal CDF.
    #[default]
    Gelu,
    /// The tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
}

/// Everything that fixes the model's numbers: shape, architecture constants, dtype, device.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub shape: ModelShape,
    /// The LM head is the word embedding (logits = h Eᵀ).
    pub tie_embeddings: bool,
    pub activation: Activation,
    /// LayerNorm / RMSNorm epsilon.
    pub norm_eps: f64,
    /// Rotary base (LLaMA).
    pub rope_theta: f64,
    pub kind: Kind,
    pub device: Device,
}

impl ModelSpec {
    /// GPT defaults (untied, erf GELU, eps 1e-5) in f32 on the CPU for `shape`.
    pub fn new(shape: ModelShape) -> ModelSpec {
        ModelSpec {
            shape,
            tie_embeddings: false,
            activation: Activation::Gelu,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            kind: Kind::Float,
            device: Device::Cpu,
        }
    }
}

/// Maps a libtorch error to [`Error::Torch`] naming the operation.
pub(crate) trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> Ctx<T> for std::result::Result<T, tch::TchError> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(Error::torch(what))
    }
}

#[derive(Debug)]
enum Layer {
    Embedding(VocabParallelEmbedding),
    Block(Box<Block>),
    Head(Head),
}

/// How a forward runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// No gradients.
    Eval,
    /// No gradients; the chunk with the head also keeps its logits ([`Forward::logits`]).
    EvalLogits,
    /// For training; `split` prepares a zero-bubble backward (`I` then `W`).
    Train { split: bool },
}

/// A chunk's forward, kept until its backward.
pub struct Forward {
    /// In forward order; each part's input is the previous part's output.
    parts: Vec<Part>,
    /// The hidden output `[b, s, d]`, or the mean loss (a scalar) on the last chunk;
    /// detached.
    pub output: Tensor,
    /// Where the last part is seeded; None when it is a recomputed block (its output
    /// gradient seeds it).
    seed: Option<Seed>,
    /// With [`Pass::EvalLogits`] on the chunk with the head: this rank's logits
    /// `[b, s, n_local]` (its vocabulary columns; padded columns −∞).
    pub logits: Option<Tensor>,
    mode: Mode,
    split: bool,
}

impl Forward {
    /// Blocks of this forward kept as their input alone, to be rerun in the backward.
    pub fn recomputed_blocks(&self) -> usize {
        self.parts
            .iter()
            .filter(|p| matches!(p, Part::Recompute { .. }))
            .count()
    }
}

impl Forward {
    /// Values of this forward that selective recomputation dropped, to be rebuilt in the
    /// backward (four per block: both norm outputs, the attention output and the
    /// activation's output).
    pub fn dropped_values(&self) -> usize {
        self.parts
            .iter()
            .map(|p| match p {
                Part::Kept { tape, .. } => tape.dropped(),
                Part::Recompute { .. } => 0,
            })
            .sum()
    }
}

/// A piece of a chunk's forward.
enum Part {
    /// Layers whose autograd state is kept; `out` is the part's hidden output.
    Kept { tape: Tape, out: tape::V },
    /// Block `layers[layer]`, kept as its input alone and rerun in the backward.
    Recompute { layer: usize, input: Tensor },
}

/// What seeds a chunk's backward.
pub enum Grad {
    /// The last chunk: the loss is scaled by this (1 / microbatches).
    LossScale(f64),
    /// The gradient of the hidden output.
    Output(Tensor),
}

/// One pipeline chunk of the model on one tensor-parallel rank.
#[derive(Debug)]
pub struct Model {
    spec: ModelSpec,
    tp: TpRank,
    layers: Vec<Layer>,
    params: Vec<Param>,
    rotary: Option<Rotary>,
    /// What the backward recomputes (see the module docs).
    recompute: Recompute,
    /// Sequence parallelism in training and evaluation forwards (see the module docs).
    sequence_parallel: bool,
}

impl Model {
    /// The model with activation recomputation `recompute` (none when built).
    pub fn with_recompute(mut self, recompute: Recompute) -> Model {
        self.recompute = recompute;
        self
    }

    /// The model with sequence parallelism on or off (off when built; a no-op at tp = 1).
    /// Incremental decoding ([`Model::infer`]) never splits the sequence.
    pub fn with_sequence_parallel(mut self, on: bool) -> Model {
        self.sequence_parallel = on && self.tp.size > 1;
        self
    }

    /// True when this chunk's hidden inputs and outputs are sequence-parallel blocks (this
    /// rank's contiguous token rows, shaped `[b, s/p, d]`; see [`sequence`]).
    pub fn sequence_parallel(&self) -> bool {
        self.sequence_parallel
    }

    /// A tape for a forward of this chunk (sequence-parallel when the model is).
    fn tape(&self, mode: Mode, split: bool, input: &Tensor) -> Tape {
        Tape::new(mode, split, input)
            .with_sequence_parallel(self.sequence_parallel)
            .with_selective(self.recompute == Recompute::Selective)
    }

    /// Builds `layers` of the model as tp rank `tp` holds them, initialised from `seed`.
    /// With tied embeddings, a head chunk without the embedding holds a copy of it.
    pub fn new(spec: &ModelSpec, layers: &[LayerKind], seed: u64, tp: TpRank) -> Result<Model> {
        Self::build(spec, layers, Some(seed), tp)
    }

    /// [`Model::new`] for inference: the parameters are allocated but not initialised (the
    /// caller loads them), and nothing requires or holds a gradient.
    pub fn for_inference(spec: &ModelSpec, layers: &[LayerKind], tp: TpRank) -> Result<Model> {
        Self::build(spec, layers, None, tp)
    }

    fn build(
        spec: &ModelSpec,
        layers: &[LayerKind],
        seed: Option<u64>,
        tp: TpRank,
    ) -> Result<Model> {
        let s = &spec.shape;
        let mut b = ParamBuilder {
            seed,
            tp,
            kind: spec.kind,
            device: spec.device,
            params: Vec::new(),
        };
        let mut word_embedding: Option<Tensor> = None;
        let mut built = Vec::with_capacity(layers.len());
        for &layer in layers {
            built.push(match layer {
                LayerKind::Embedding => {
                    let positions = (s.arch == Arch::Gpt).then_some(s.seq_len);
                    let e = VocabParallelEmbedding::new(
                        &mut b, s.vocab, s.d_model, positions, INIT_STD,
                    )?;
                    word_embedding = Some(e.wte.shallow_clone());
                    Layer::Embedding(e)
                }
                LayerKind::Block(_) => Layer::Block(Box::new(Block::new(&mut b, layer, spec)?)),
                LayerKind::Head => Layer::Head(Head::new(&mut b, spec, word_embedding.as_ref())?),
            });
        }
        let has_blocks = layers.iter().any(LayerKind::is_block);
        let rotary = match s.arch {
            Arch::Llama if has_blocks => Some(Rotary::new(
                s.seq_len,
                s.head_dim(),
                spec.rope_theta,
                spec.kind,
                spec.device,
            )?),
            _ => None,
        };
        if seed.is_some() {
            init_grads(&b.params)?;
        }
        Ok(Model {
            spec: spec.clone(),
            tp,
            layers: built,
            params: b.params,
            rotary,
            recompute: Recompute::None,
            sequence_parallel: false,
        })
    }

    /// The chunk's parameters (this rank's shards), in layer order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Number of scalar parameters held by this rank.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.tensor.numel()).sum()
    }

    /// Runs the chunk on `input`: token ids `[b, s]` on the first chunk, else the hidden
    /// state `[b, s, d]`; `targets` (`[b, s]`) are needed iff the chunk has the head.
    pub fn forward(
        &self,
        input: &Tensor,
        targets: Option<&Tensor>,
        tp: &mut dyn Communicator,
        pass: Pass,
    ) -> Result<Forward> {
        let mode = match pass {
            Pass::Eval | Pass::EvalLogits => Mode::Eval,
            // Selective recomputation cuts the graph around its rerun pieces.
            Pass::Train { .. } if self.tp.size == 1 && self.recompute != Recompute::Selective => {
                Mode::Fused
            }
            Pass::Train { .. } => Mode::Cut,
        };
        let split = matches!(pass, Pass::Train { split: true });
        let recompute = self.recompute == Recompute::Full && mode != Mode::Eval;
        let mut fwd = Forward {
            parts: Vec::new(),
            output: input.shallow_clone(),
            seed: None,
            logits: None,
            mode,
            split,
        };
        // The open tape and its current value, or None while `fwd.output` is the hidden
        // state (at the start, and after a recomputed block).
        let mut open: Option<(Tape, tape::V)> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if let (Layer::Block(b), true) = (layer, recompute) {
                if let Some((tape, out)) = open.take() {
                    fwd.output = tape.value(out).detach();
                    fwd.parts.push(Part::Kept { tape, out });
                }
                let y = self.block_without_grad(b, &fwd.output, tp)?;
                let input = std::mem::replace(&mut fwd.output, y);
                fwd.parts.push(Part::Recompute { layer: i, input });
                continue;
            }
            let (tape, x) = open.get_or_insert_with(|| (self.tape(mode, split, &fwd.output), 0));
            match layer {
                Layer::Embedding(e) => *x = e.forward(tape, input, tp, None)?,
                Layer::Block(b) => *x = b.forward(tape, *x, tp, self.rotary.as_ref(), None)?,
                Layer::Head(h) => {
                    let targets =
                        targets.ok_or_else(|| Error::Internal("the head needs targets".into()))?;
                    if pass == Pass::EvalLogits {
                        let hidden = match self.sequence_parallel {
                            true => sequence::all_gather(tape.value(*x), tp)?,
                            false => tape.value(*x).shallow_clone(),
                        };
                        fwd.logits = Some(h.logits(&hidden)?);
                    }
                    let (loss, seed) = h.forward(tape, *x, targets, tp)?;
                    *x = loss;
                    fwd.seed = Some(seed);
                }
            }
        }
        if let Some((tape, out)) = open {
            fwd.output = tape.value(out).detach();
            fwd.seed.get_or_insert(Seed::Hidden(out));
            fwd.parts.push(Part::Kept { tape, out });
        }
        Ok(fwd)
    }

    /// Block `b`'s forward on `x` without autograd (the first pass of a recomputed block).
    fn block_without_grad(
        &self,
        b: &Block,
        x: &Tensor,
        tp: &mut dyn Communicator,
    ) -> Result<Tensor> {
        let mut tape = self.tape(Mode::Eval, false, x);
        let out = b.forward(&mut tape, 0, tp, self.rotary.as_ref(), None)?;
        Ok(tape.value(out).shallow_clone())
    }

    /// Every linear layer of the chunk with a weight of its own (a tied LM head is the
    /// embedding and is not listed), in layer order.
    pub fn linears_mut(&mut self) -> Vec<&mut layers::Linear> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            match layer {
                Layer::Embedding(_) => {}
                Layer::Block(b) => out.extend(b.linears_mut()),
                Layer::Head(h) => out.extend(h.lm_head_mut()),
            }
        }
        out
    }

    /// Makes the linear layer whose weight is `name` run on `int8` and drops its dense
    /// weight from the chunk (its parameter is no longer listed).
    pub fn install_int8(&mut self, name: &str, int8: crate::quant::Int8Weight) -> Result<()> {
        let mut linears = self.linears_mut();
        let linear = linears
            .iter_mut()
            .find(|l| l.name == name)
            .ok_or_else(|| Error::Internal(format!("no linear layer {name} in this chunk")))?;
        linear.int8 = Some(Box::new(int8));
        linear.weight = Tensor::new();
        self.params.retain(|p| p.name != name);
        Ok(())
    }

    /// The shape of this chunk's key/value cache for `batch` sequences of up to `max_len`
    /// slots.
    pub fn cache_shape(&self, batch: usize, max_len: usize) -> CacheShape {
        let s = &self.spec.shape;
        CacheShape {
            layers: self
                .layers
                .iter()
                .filter(|l| matches!(l, Layer::Block(_)))
                .count(),
            batch: batch as i64,
            heads: (s.n_kv_heads / self.tp.size) as i64,
            head_dim: s.head_dim() as i64,
            max_len: max_len as i64,
            kind: self.spec.kind,
            device: self.spec.device,
        }
    }

    /// Incremental decoding: runs the chunk on the step's new tokens (ids `[b, s]` on the
    /// first chunk, else the hidden state `[b, s, d]`), reading and extending `cache`.
    /// Returns the hidden output, or on the last chunk the logits of each row's last
    /// position over the whole vocabulary, `[b, V]` (f32, the same on every tp rank).
    pub fn infer(
        &self,
        input: &Tensor,
        cache: &mut KvCache,
        tp: &mut dyn Communicator,
    ) -> Result<Tensor> {
        let (b, s) = (input.size()[0], input.size()[1]);
        let (step, layers) = cache.step(s)?;
        let positions = step.positions(b, self.spec.device)?;
        let mut layers = layers.iter_mut();
        let mut tape = Tape::new(Mode::Eval, false, input);
        let mut x: tape::V = 0;
        for layer in &self.layers {
            match layer {
                Layer::Embedding(e) => x = e.forward(&mut tape, input, tp, Some(&positions))?,
                Layer::Block(blk) => {
                    let layer = layers
                        .next()
                        .ok_or_else(|| Error::Internal("kv cache has too few layers".into()))?;
                    let cached = Cached { layer, step: &step };
                    x = blk.forward(&mut tape, x, tp, self.rotary.as_ref(), Some(cached))?;
                }
                Layer::Head(h) => {
                    let logits = h.next_token_logits(&mut tape, x, tp)?;
                    cache.advance(s);
                    return Ok(logits);
                }
            }
        }
        let out = tape.value(x).shallow_clone();
        cache.advance(s);
        Ok(out)
    }

    /// The backward of `fwd`: parameter gradients accumulate into `.grad` (all of them, or
    /// with a split forward all but the linear weights, which the returned [`WeightWork`]
    /// adds when run). Returns the gradient of the chunk's input (None on the first chunk).
    pub fn backward(
        &self,
        fwd: Forward,
        grad: Grad,
        tp: &mut dyn Communicator,
    ) -> Result<(Option<Tensor>, WeightWork)> {
        let (mode, split) = (fwd.mode, fwd.split);
        let hold = self.shared_across_tapes(mode, split);
        let mut parts = fwd.parts;
        let last = parts
            .pop()
            .ok_or_else(|| Error::Internal("a chunk's forward has no parts".into()))?;
        let first = match (last, fwd.seed, grad) {
            (Part::Recompute { layer, input }, None, Grad::Output(g)) => {
                self.rerun_backward(layer, &input, g, mode, split, tp)?
            }
            (Part::Kept { tape, .. }, Some(seed), grad) => {
                let seed = self.seed(seed, grad)?;
                tape.backward(vec![seed], tp, &self.params, &hold)?
            }
            _ => {
                return Err(Error::Internal(
                    "a chunk's backward was seeded with the wrong kind of gradient".into(),
                ))
            }
        };
        let Backward {
            mut input_grad,
            mut work,
            mut held,
        } = first;
        for part in parts.into_iter().rev() {
            let g = input_grad.take().ok_or_else(|| {
                Error::Internal("no gradient reached an inner part of a chunk".into())
            })?;
            let b = match part {
                Part::Kept { tape, out } => {
                    tape.backward(vec![(out, g)], tp, &self.params, &hold)?
                }
                Part::Recompute { layer, input } => {
                    self.rerun_backward(layer, &input, g, mode, split, tp)?
                }
            };
            input_grad = b.input_grad;
            work.extend(b.work);
            held.extend(b.held);
        }
        self.add_held(held)?;
        Ok((input_grad, work))
    }

    /// Reruns block `layers[layer]` on `input` with autograd and differentiates it from
    /// its output gradient `grad`.
    fn rerun_backward(
        &self,
        layer: usize,
        input: &Tensor,
        grad: Tensor,
        mode: Mode,
        split: bool,
        tp: &mut dyn Communicator,
    ) -> Result<Backward> {
        let Some(Layer::Block(b)) = self.layers.get(layer) else {
            return Err(Error::Internal(format!("layer {layer} is not a block")));
        };
        let mut tape = self.tape(mode, split, input);
        let out = b.forward(&mut tape, 0, tp, self.rotary.as_ref(), None)?;
        tape.backward(vec![(out, grad)], tp, &self.params, &[])
    }

    /// The parameters whose gradient two kept tapes of a recomputing chunk both produce
    /// and a fused whole backward adds at once: a tied word embedding used by the
    /// embedding and the head of this chunk (see the module docs).
    fn shared_across_tapes(&self, mode: Mode, split: bool) -> Vec<usize> {
        let both = self.layers.iter().any(|l| matches!(l, Layer::Embedding(_)))
            && self.layers.iter().any(|l| matches!(l, Layer::Head(_)));
        let full = self.recompute == Recompute::Full;
        if !(full && mode == Mode::Fused && !split && self.spec.tie_embeddings && both) {
            return Vec::new();
        }
        self.params
            .iter()
            .position(|p| p.name == "embed.wte")
            .into_iter()
            .collect()
    }

    /// Adds each held parameter's contributions together, then to its `.grad` (one
    /// addition, as autograd's accumulation of a parameter used twice in one graph).
    fn add_held(&self, held: Vec<(usize, Tensor)>) -> Result<()> {
        let mut sums: Vec<(usize, Tensor)> = Vec::new();
        for (i, g) in held {
            match sums.iter_mut().find(|(j, _)| *j == i) {
                Some((_, s)) => *s = s.f_add(&g).ctx("held gradient")?,
                None => sums.push((i, g)),
            }
        }
        tch::no_grad(|| {
            for (i, g) in sums {
                let _ = self.params[i]
                    .tensor
                    .grad()
                    .f_add_(&g)
                    .ctx("held gradient")?;
            }
            Ok(())
        })
    }

    /// The seed of the part that ends the chunk.
    fn seed(&self, seed: Seed, grad: Grad) -> Result<(tape::V, Tensor)> {
        Ok(match (seed, grad) {
            (Seed::Loss(v), Grad::LossScale(s)) => {
                let scale = Tensor::f_from_slice(&[s as f32])
                    .and_then(|t| t.f_view([]))
                    .and_then(|t| t.f_to_kind(self.spec.kind))
                    .ctx("loss scale")?;
                (v, scale)
            }
            (Seed::Logits(v, dlogits), Grad::LossScale(s)) => {
                (v, dlogits.f_mul_scalar(s).ctx("loss scale")?)
            }
            (Seed::Hidden(v), Grad::Output(g)) => (v, g),
            _ => {
                return Err(Error::Internal(
                    "a chunk's backward was seeded with the wrong kind of gradient".into(),
                ))
            }
        })
    }
}

/// Converts row-major token ids into a `[rows, seq_len]` tensor.
pub fn tokens_tensor(ids: &[i64], rows: usize, seq_len: usize) -> Result<Tensor> {
    Tensor::f_from_slice(ids)
        .and_then(|t| t.f_view([rows as i64, seq_len as i64]))
        .map_err(Error::torch("token tensor"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;
    use partitioner::ModelShape;

    /// A whole model of three blocks, and a batch of 2 × 8 tokens with its targets
    /// (vocabulary 16).
    fn three_blocks() -> ([LayerKind; 5], Tensor, Tensor) {
        let layers = [
            LayerKind::Embedding,
            LayerKind::Block(0),
            LayerKind::Block(1),
            LayerKind::Block(2),
            LayerKind::Head,
        ];
        let ids: Vec<i64> = (0..16).map(|i| (i * 5 + 3) % 16).collect();
        let input = tokens_tensor(&ids, 2, 8).unwrap();
        let next: Vec<i64> = ids.iter().map(|i| (i + 1) % 16).collect();
        (layers, input, tokens_tensor(&next, 2, 8).unwrap())
    }

    /// Every parameter's name and a copy of its gradient.
    fn param_grads(model: &Model) -> Vec<(String, Tensor)> {
        model
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.tensor.grad().copy()))
            .collect()
    }

    /// A training forward with recomputation keeps every block as its input alone (the
    /// embedding and head keep their tapes); its backward gives the gradients of the
    /// plain model, bit for bit (tied embeddings: the shared parameter's two
    /// contributions are added at once).
    #[test]
    fn recompute_keeps_block_inputs_and_the_same_gradients() {
        let mut spec = ModelSpec::new(ModelShape::gpt(16, 8, 8, 2, 3, 16));
        spec.tie_embeddings = true;
        let (layers, input, targets) = three_blocks();
        let mut tp = LocalComm::group(1).pop().unwrap();
        let mut grads = |recompute: bool| {
            let how = if recompute {
                Recompute::Full
            } else {
                Recompute::None
            };
            let model = Model::new(&spec, &layers, 3, TpRank::SINGLE)
                .unwrap()
                .with_recompute(how);
            // Two microbatches, so each gradient is accumulated onto a non-zero one.
            for _ in 0..2 {
                let pass = Pass::Train { split: false };
                let fwd = model
                    .forward(&input, Some(&targets), &mut tp, pass)
                    .unwrap();
                assert_eq!(fwd.recomputed_blocks(), if recompute { 3 } else { 0 });
                let (g, work) = model.backward(fwd, Grad::LossScale(0.5), &mut tp).unwrap();
                assert!(g.is_none());
                work.run().unwrap();
            }
            param_grads(&model)
        };
        let plain = grads(false);
        let recomputed = grads(true);
        assert_eq!(plain.len(), recomputed.len());
        for ((name, a), (_, b)) in plain.iter().zip(&recomputed) {
            assert!(a.abs().sum(Kind::Double).double_value(&[]) > 0.0, "{name}");
            assert!(a.equal(b), "{name} differs with recomputation");
        }
    }

    /// Selective recomputation drops four values per block (norm outputs, attention
    /// output, activation output) after the forward and rebuilds them in the backward:
    /// the gradients of both architectures equal the plain model's within 1e-6.
    #[test]
    fn selective_drops_the_non_matmul_outputs_and_keeps_the_gradients() {
        for arch in [Arch::Gpt, Arch::Llama] {
            let mut shape = ModelShape::gpt(16, 8, 8, 2, 3, 16);
            shape.arch = arch;
            let spec = ModelSpec::new(shape);
            let (layers, input, targets) = three_blocks();
            let mut tp = LocalComm::group(1).pop().unwrap();
            let mut grads = |how: Recompute| {
                let model = Model::new(&spec, &layers, 3, TpRank::SINGLE)
                    .unwrap()
                    .with_recompute(how);
                let pass = Pass::Train { split: false };
                let fwd = model
                    .forward(&input, Some(&targets), &mut tp, pass)
                    .unwrap();
                let dropped = if how == Recompute::Selective { 12 } else { 0 };
                assert_eq!(fwd.dropped_values(), dropped, "{arch:?} {how}");
                let (_, work) = model.backward(fwd, Grad::LossScale(1.0), &mut tp).unwrap();
                work.run().unwrap();
                param_grads(&model)
            };
            let (plain, selective) = (grads(Recompute::None), grads(Recompute::Selective));
            for ((name, a), (_, b)) in plain.iter().zip(&selective) {
                let diff = (a - b).norm().double_value(&[]);
                let scale = a.norm().double_value(&[]);
                assert!(scale > 0.0, "{name}");
                assert!(diff <= 1e-6 * scale, "{arch:?} {name}: {diff} vs {scale}");
            }
        }
    }
}
