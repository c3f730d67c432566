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
//!
//! Layers (see [`partitioner::LayerKind`]): `embed` (token embedding, + learned positions
//! for GPT), `block.i`, and `head`. Linear weights are stored `[in, out]` (`Y = XA`).
//!
//! Invariants: every parameter's initial value is a pure function of (seed, layer name,
//! parameter name), and every tp shard is the exact slice of it, so every layout starts
//! from the same model; dtype and device come from the [`ModelSpec`], never from here.

pub mod attention;
pub mod block;
pub mod head;
pub mod kv;
pub mod layers;
pub mod params;
pub mod sharding;
pub mod tape;

use crate::comm::Communicator;
use crate::error::{Error, Result};
use attention::Rotary;
use block::Block;
use head::{Head, Seed};
use kv::{CacheShape, Cached, KvCache};
use layers::VocabParallelEmbedding;
use params::{init_grads, ParamBuilder};
use partitioner::{Arch, LayerKind, ModelShape};
use sharding::TpRank;
use tape::{Mode, Tape, WeightWork};
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
#[derive(Clone, Copy, Debug, PartialEq)]
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
    tape: Tape,
    /// The hidden output `[b, s, d]`, or the mean loss (a scalar) on the last chunk;
    /// detached.
    pub output: Tensor,
    seed: Seed,
    /// With [`Pass::EvalLogits`] on the chunk with the head: this rank's logits
    /// `[b, s, n_local]` (its vocabulary columns; padded columns −∞).
    pub logits: Option<Tensor>,
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
}

impl Model {
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
            spec: *spec,
            tp,
            layers: built,
            params: b.params,
            rotary,
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
            Pass::Train { .. } if self.tp.size == 1 => Mode::Fused,
            Pass::Train { .. } => Mode::Cut,
        };
        let split = matches!(pass, Pass::Train { split: true });
        let mut tape = Tape::new(mode, split, input);
        let mut x: tape::V = 0;
        for layer in &self.layers {
            match layer {
                Layer::Embedding(e) => x = e.forward(&mut tape, input, tp, None)?,
                Layer::Block(b) => x = b.forward(&mut tape, x, tp, self.rotary.as_ref(), None)?,
                Layer::Head(h) => {
                    let targets =
                        targets.ok_or_else(|| Error::Internal("the head needs targets".into()))?;
                    let logits = match pass {
                        Pass::EvalLogits => Some(h.logits(tape.value(x))?),
                        _ => None,
                    };
                    let (loss, seed) = h.forward(&mut tape, x, targets, tp)?;
                    let output = tape.value(loss).detach();
                    return Ok(Forward {
                        tape,
                        output,
                        seed,
                        logits,
                    });
                }
            }
        }
        let output = tape.value(x).detach();
        Ok(Forward {
            tape,
            output,
            seed: Seed::Hidden(x),
            logits: None,
        })
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
        let seed = match (fwd.seed, grad) {
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
        };
        fwd.tape.backward(vec![seed], tp, &self.params)
    }
}

/// Converts row-major token ids into a `[rows, seq_len]` tensor.
pub fn tokens_tensor(ids: &[i64], rows: usize, seq_len: usize) -> Result<Tensor> {
    Tensor::f_from_slice(ids)
        .and_then(|t| t.f_view([rows as i64, seq_len as i64]))
        .map_err(Error::torch("token tensor"))
}
