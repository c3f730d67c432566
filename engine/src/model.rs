//! The GPT-style decoder on libtorch, built one pipeline stage at a time.
//!
//! Layers: `embed` (token + learned position embedding), `block.i` (pre-LayerNorm causal
//! multi-head self-attention and GELU MLP, each with a residual), and `head` (final
//! LayerNorm, untied LM head, mean cross-entropy). Linear weights are stored `[in, out]`
//! and applied as `Y = XA + b`, the Megatron convention that lets tensor parallelism slice
//! `A = [A1 .. Ap]` by columns (or rows) without transposes.
//!
//! Invariant: every parameter's initial value is a pure function of
//! (seed, layer name, parameter name) — see [`init_param`] — so a layer is bit-identical
//! whether it lives on stage 0 or stage 3, and every layout starts from the same model.

use crate::error::{Error, Result};
use crate::rng::{hash_str, Rng};
use partitioner::{LayerKind, ModelShape};
use tch::{Kind, Reduction, Tensor};

/// Standard deviation of the normal initialisation (GPT-2).
const INIT_STD: f64 = 0.02;
const LN_EPS: f64 = 1e-5;

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
}

/// A named trainable tensor (`block.3.attn.qkv.weight`).
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// Whether weight decay applies (matrices and embeddings, not biases or norms).
    pub decay: bool,
    /// True when each tensor-parallel rank holds a different slice; false when the
    /// parameter is replicated across the tp group (counted once in the global norm).
    pub tp_sharded: bool,
    /// True for the last stage's copy of a tied word embedding: its gradient is summed
    /// with the embedding's every step, and it is not counted again in the global norm.
    pub tied_copy: bool,
}

impl Param {
    /// Another handle to the same parameter (same storage and gradient).
    pub fn alias(&self) -> Param {
        Param {
            name: self.name.clone(),
            tensor: self.tensor.shallow_clone(),
            decay: self.decay,
            tp_sharded: self.tp_sharded,
            tied_copy: self.tied_copy,
        }
    }
}

/// Creates the initial value of `layer.name` with `shape`, deterministically from `seed`.
pub fn init_param(
    seed: u64,
    layer: LayerKind,
    name: &str,
    shape: &[usize],
    init: Init,
) -> Result<Tensor> {
    let numel: usize = shape.iter().product();
    let values: Vec<f32> = match init {
        Init::Zeros => vec![0.0; numel],
        Init::Ones => vec![1.0; numel],
        Init::Normal(std) => {
            let mut rng = Rng::from_key(&[seed, hash_str(&layer.name()), hash_str(name)]);
            (0..numel).map(|_| (rng.normal() * std) as f32).collect()
        }
    };
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_slice(&values)
        .and_then(|t| t.f_reshape(dims.as_slice()))
        .map(|t| t.set_requires_grad(true))
        .map_err(Error::torch(format!(
            "initialising {}.{name}",
            layer.name()
        )))
}

/// Collects a layer's parameters while building it.
struct Builder<'a> {
    seed: u64,
    layer: LayerKind,
    params: &'a mut Vec<Param>,
}

impl Builder<'_> {
    fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let t = init_param(self.seed, self.layer, name, shape, init)?;
        self.params.push(Param {
            name: format!("{}.{name}", self.layer.name()),
            tensor: t.shallow_clone(),
            decay: shape.len() >= 2,
            tp_sharded: false,
            tied_copy: false,
        });
        Ok(t)
    }

    fn linear(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        std: f64,
        bias: bool,
    ) -> Result<Linear> {
        Ok(Linear {
            weight: self.param(&format!("{name}.weight"), &[d_in, d_out], Init::Normal(std))?,
            bias: if bias {
                Some(self.param(&format!("{name}.bias"), &[d_out], Init::Zeros)?)
            } else {
                None
            },
        })
    }

    fn norm(&mut self, name: &str, d: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.param(&format!("{name}.weight"), &[d], Init::Ones)?,
            bias: self.param(&format!("{name}.bias"), &[d], Init::Zeros)?,
        })
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

/// `Y = XA + b` with `A` stored `[in, out]`.
#[derive(Debug)]
pub(crate) struct Linear {
    pub(crate) weight: Tensor,
    pub(crate) bias: Option<Tensor>,
}

/// One linear layer's input and output in one forward, kept so that its weight gradient
/// can be formed later from the output gradient alone (zero-bubble `W`):
/// `dA = Xᵀ dY`, `db = Σ dY`.
pub struct LinearRecord {
    pub x: Tensor,
    pub y: Tensor,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `forward`, also recording the call in `rec`.
    fn forward_rec(&self, x: &Tensor, rec: &mut Vec<LinearRecord>) -> Result<Tensor> {
        let y = self.forward(x)?;
        rec.push(LinearRecord {
            x: x.shallow_clone(),
            y: y.shallow_clone(),
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
        });
        Ok(y)
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.f_matmul(&self.weight).ctx("linear")?;
        match &self.bias {
            Some(b) => y.f_add(b).ctx("linear bias"),
            None => Ok(y),
        }
    }
}

#[derive(Debug)]
pub(crate) struct LayerNorm {
    pub(crate) weight: Tensor,
    pub(crate) bias: Tensor,
}

impl LayerNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.weight.size()[0];
        x.f_layer_norm([d], Some(&self.weight), Some(&self.bias), LN_EPS, false)
            .ctx("layer_norm")
    }
}

/// Token + position embedding: `h = E[tokens] + P[0..s]`.
#[derive(Debug)]
struct Embedding {
    wte: Tensor,
    wpe: Tensor,
}

/// Pre-LN block: `x = x + Attn(LN1(x)); x = x + MLP(LN2(x))`.
#[derive(Debug)]
struct Block {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    n_heads: i64,
}

/// Final LayerNorm, LM head `[d, V]` (no bias) and the loss.
#[derive(Debug)]
struct Head {
    ln_f: LayerNorm,
    /// `[d, V]`, or with tied embeddings the word embedding `[V, d]` used transposed.
    lm_head: Tensor,
    tied: bool,
}

#[derive(Debug)]
enum Layer {
    Embedding(Embedding),
    Block(Block),
    Head(Head),
}

/// What flows into a stage.
pub enum StageInput<'a> {
    /// Token ids `[b, s]` (first stage).
    Tokens(&'a Tensor),
    /// Hidden states `[b, s, d]` from the previous stage.
    Hidden(&'a Tensor),
}

/// What flows out of a stage.
pub enum StageOutput {
    /// Hidden states `[b, s, d]` for the next stage.
    Hidden(Tensor),
    /// Mean cross-entropy over the microbatch's tokens (last stage).
    Loss(Tensor),
}

/// The layers of one pipeline stage and their parameters.
#[derive(Debug)]
pub struct StageModel {
    layers: Vec<Layer>,
    params: Vec<Param>,
    shape: ModelShape,
}

impl StageModel {
    /// Builds the given layers of a model of `shape`, initialised from `seed`.
    pub fn new(shape: &ModelShape, layers: &[LayerKind], seed: u64) -> Result<StageModel> {
        Self::with_tied_embeddings(shape, layers, seed, false)
    }

    /// Like [`StageModel::new`]; with `tie` the LM head is the word embedding `E`
    /// (logits = h Eᵀ). A stage holding both uses one tensor; a last stage without the
    /// embedding holds a copy (`embed.wte`, `tied_copy`) initialised identically.
    pub fn with_tied_embeddings(
        shape: &ModelShape,
        layers: &[LayerKind],
        seed: u64,
        tie: bool,
    ) -> Result<StageModel> {
        let (d, f, v, s) = (shape.d_model, shape.d_ff, shape.vocab, shape.seq_len);
        let mut word_embedding: Option<Tensor> = None;
        let resid_std = INIT_STD / (2.0 * shape.n_layers as f64).sqrt();
        let mut params = Vec::new();
        let mut built = Vec::with_capacity(layers.len());
        for &layer in layers {
            let mut b = Builder {
                seed,
                layer,
                params: &mut params,
            };
            built.push(match layer {
                LayerKind::Embedding => {
                    let wte = b.param("wte", &[v, d], Init::Normal(INIT_STD))?;
                    word_embedding = Some(wte.shallow_clone());
                    Layer::Embedding(Embedding {
                        wte,
                        wpe: b.param("wpe", &[s, d], Init::Normal(INIT_STD))?,
                    })
                }
                LayerKind::Block(_) => Layer::Block(Block {
                    ln1: b.norm("ln1", d)?,
                    qkv: b.linear("attn.qkv", d, 3 * d, INIT_STD, true)?,
                    proj: b.linear("attn.proj", d, d, resid_std, true)?,
                    ln2: b.norm("ln2", d)?,
                    fc1: b.linear("mlp.fc1", d, f, INIT_STD, true)?,
                    fc2: b.linear("mlp.fc2", f, d, resid_std, true)?,
                    n_heads: shape.n_heads as i64,
                }),
                LayerKind::Head if tie => {
                    let ln_f = b.norm("ln_f", d)?;
                    let lm_head = match &word_embedding {
                        Some(wte) => wte.shallow_clone(),
                        None => {
                            let mut e = Builder {
                                seed,
                                layer: LayerKind::Embedding,
                                params: b.params,
                            };
                            let t = e.param("wte", &[v, d], Init::Normal(INIT_STD))?;
                            if let Some(p) = e.params.last_mut() {
                                p.tied_copy = true;
                            }
                            t
                        }
                    };
                    Layer::Head(Head {
                        ln_f,
                        lm_head,
                        tied: true,
                    })
                }
                LayerKind::Head => Layer::Head(Head {
                    ln_f: b.norm("ln_f", d)?,
                    lm_head: b.param("lm_head.weight", &[d, v], Init::Normal(INIT_STD))?,
                    tied: false,
                }),
            });
        }
        let model = StageModel {
            layers: built,
            params,
            shape: *shape,
        };
        model.init_grads()?;
        Ok(model)
    }

    /// Gives every parameter a defined, all-zero `.grad`, so that weight-gradient (`W`)
    /// actions can add into it; `0 + g` is exact, so B-based schedules are unaffected.
    fn init_grads(&self) -> Result<()> {
        init_grads(&self.params)
    }

    /// The stage's parameters, in layer order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Number of scalar parameters on this stage.
    pub fn num_params(&self) -> usize {
        self.params.iter().map(|p| p.tensor.numel()).sum()
    }

    /// Runs the stage. `targets` (`[b, s]` token ids) are needed iff the stage has the head.
    pub fn forward(&self, input: StageInput<'_>, targets: Option<&Tensor>) -> Result<StageOutput> {
        self.forward_recorded(input, targets, &mut Vec::new())
    }

    /// [`StageModel::forward`], recording every linear layer's input and output in `rec`
    /// (in call order) so that a later weight-gradient pass needs no autograd.
    pub fn forward_recorded(
        &self,
        input: StageInput<'_>,
        targets: Option<&Tensor>,
        rec: &mut Vec<LinearRecord>,
    ) -> Result<StageOutput> {
        let mut x = match input {
            StageInput::Tokens(t) => t.shallow_clone(),
            StageInput::Hidden(h) => h.shallow_clone(),
        };
        for layer in &self.layers {
            match layer {
                Layer::Embedding(e) => {
                    let seq = x.size().get(1).copied().unwrap_or(0);
                    let pos = e.wpe.f_narrow(0, 0, seq).ctx("position embedding")?;
                    x = Tensor::f_embedding(&e.wte, &x, -1, false, false)
                        .ctx("token embedding")?
                        .f_add(&pos)
                        .ctx("embedding add")?;
                }
                Layer::Block(b) => x = b.forward(&x, rec)?,
                Layer::Head(h) => {
                    let targets =
                        targets.ok_or_else(|| Error::Internal("the head needs targets".into()))?;
                    let logits = h.lm_head_logits(&x, rec)?;
                    let v = self.shape.vocab as i64;
                    let loss = logits
                        .f_view([-1, v])
                        .ctx("logits view")?
                        .f_cross_entropy_loss::<Tensor>(
                            &targets.f_view([-1]).ctx("targets view")?,
                            None,
                            Reduction::Mean,
                            -100,
                            0.0,
                        )
                        .ctx("cross entropy")?;
                    return Ok(StageOutput::Loss(loss));
                }
            }
        }
        Ok(StageOutput::Hidden(x))
    }
}

impl Block {
    fn forward(&self, x: &Tensor, rec: &mut Vec<LinearRecord>) -> Result<Tensor> {
        let size = x.size();
        let (b, s, d) = match size.as_slice() {
            [b, s, d] => (*b, *s, *d),
            _ => {
                return Err(Error::Internal(format!(
                    "block input must be [b, s, d], got {size:?}"
                )))
            }
        };
        let h = self.ln1.forward(x)?;
        let y = causal_attention(&self.qkv.forward_rec(&h, rec)?, b, s, d, self.n_heads)?;
        let x = x
            .f_add(&self.proj.forward_rec(&y, rec)?)
            .ctx("attention residual")?;
        let h = self.ln2.forward(&x)?;
        let h = self.fc1.forward_rec(&h, rec)?.f_gelu("none").ctx("gelu")?;
        x.f_add(&self.fc2.forward_rec(&h, rec)?).ctx("mlp residual")
    }
}

/// Causal multi-head attention of `qkv` (`[b, s, 3w]`, laid out `[q | k | v]`, `heads`
/// heads of width `w / heads`); returns the merged heads `[b, s, w]`. Shared by the full
/// model and its tensor-parallel shards (which pass their local width and heads).
pub(crate) fn causal_attention(qkv: &Tensor, b: i64, s: i64, w: i64, heads: i64) -> Result<Tensor> {
    let hd = w / heads;
    let parts = qkv.f_split(w, -1).ctx("qkv split")?;
    let split = |t: &Tensor| -> Result<Tensor> {
        t.f_view([b, s, heads, hd])
            .and_then(|t| t.f_transpose(1, 2))
            .ctx("split heads")
    };
    let (q, k, v) = (split(&parts[0])?, split(&parts[1])?, split(&parts[2])?);
    Tensor::f_scaled_dot_product_attention::<Tensor>(&q, &k, &v, None, 0.0, true, None, false)
        .ctx("attention")?
        .f_transpose(1, 2)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_view([b, s, w]))
        .ctx("merge heads")
}

impl Head {
    fn lm_head_logits(&self, x: &Tensor, rec: &mut Vec<LinearRecord>) -> Result<Tensor> {
        let h = self.ln_f.forward(x)?;
        if self.tied {
            // The tied head shares E with the embedding: its gradient stays with autograd.
            h.f_matmul(&self.lm_head.f_transpose(0, 1).ctx("tied lm head")?)
                .ctx("tied lm head")
        } else {
            let head = Linear {
                weight: self.lm_head.shallow_clone(),
                bias: None,
            };
            head.forward_rec(&h, rec)
        }
    }
}

/// Gives every parameter a defined, all-zero `.grad` (see [`StageModel`]).
pub(crate) fn init_grads(params: &[Param]) -> Result<()> {
    for p in params {
        p.tensor
            .f_sum(Kind::Float)
            .and_then(|s| s.f_mul_scalar(0.0))
            .and_then(|s| s.f_backward())
            .map_err(Error::torch(format!(
                "initialising the gradient of {}",
                p.name
            )))?;
    }
    Ok(())
}

/// Converts row-major token ids into a `[rows, seq_len]` tensor.
pub fn tokens_tensor(ids: &[i64], rows: usize, seq_len: usize) -> Result<Tensor> {
    Tensor::f_from_slice(ids)
        .and_then(|t| t.f_view([rows as i64, seq_len as i64]))
        .map_err(Error::torch("token tensor"))
}

/// Sum of squares of every parameter gradient on this stage (0 for missing grads).
pub fn grad_sq_norm(params: &[Param]) -> Result<f64> {
    let mut total = 0.0;
    for p in params {
        let g = p.tensor.grad();
        if g.defined() {
            total += g
                .f_square()
                .and_then(|t| t.f_sum(Kind::Double))
                .and_then(|t| t.f_double_value(&[]))
                .map_err(Error::torch("gradient norm"))?;
        }
    }
    Ok(total)
}
