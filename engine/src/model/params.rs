//! Parameters: named, deterministically initialised, and sliced to this rank's shard.
//!
//! Invariant: a parameter's initial value is a pure function of (seed, layer name,
//! parameter name): the full tensor is drawn from its own SplitMix64 stream (never torch's
//! global generator) and then sliced by its [`Split`], so a layer is bit-identical on any
//! stage and every tensor-parallel shard is the exact slice of the single-process tensor.

use super::sharding::{spec_for, take_local, Split, TpRank};
use super::Ctx;
use crate::error::{Error, Result};
use crate::rng::{hash_str, Rng};
use crate::shard::ShardSpec;
use partitioner::LayerKind;
use tch::{Device, Kind, Tensor};

/// How a parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    Zeros,
    Ones,
    Normal(f64),
}

/// A named trainable tensor (`block.3.attn.qkv.weight`), as this rank holds it.
#[derive(Debug)]
pub struct Param {
    /// Global, layout-free name.
    pub name: String,
    pub tensor: Tensor,
    /// Whether weight decay applies (matrices and embeddings, not biases or norms).
    pub decay: bool,
    /// How the local tensor maps onto the global one.
    pub spec: ShardSpec,
    /// True on the one rank of the tensor-parallel group that writes this parameter to a
    /// checkpoint and counts it in the global gradient norm: every rank for split
    /// parameters, tp rank 0 for replicated ones, and never the last stage's copy of a tied
    /// embedding. (Data-parallel replicas other than 0 never write; the trainer decides.)
    pub owner: bool,
    /// True for the last stage's copy of a tied word embedding: its gradient is summed with
    /// the embedding's every step.
    pub tied_copy: bool,
    /// A replicated parameter used inside the sequence-split regions (norms, the bias
    /// added after a row-parallel reduction): under sequence parallelism each tp rank's
    /// gradient covers its tokens only, and the trainer sums it over the tp group before
    /// the optimizer (Megatron's all-reduce of sequence-parallel gradients).
    pub sequence_parallel: bool,
}

impl Param {
    /// Another handle to the same parameter (same storage and gradient).
    pub fn alias(&self) -> Param {
        Param {
            name: self.name.clone(),
            tensor: self.tensor.shallow_clone(),
            decay: self.decay,
            spec: self.spec.clone(),
            owner: self.owner,
            tied_copy: self.tied_copy,
            sequence_parallel: self.sequence_parallel,
        }
    }

    /// True when each tensor-parallel rank holds a different slice.
    pub fn tp_sharded(&self) -> bool {
        !self.spec.is_full()
    }
}

/// Creates the full initial value of `layer.name` with `shape` (f32 on the CPU).
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
        .map_err(Error::torch(format!(
            "initialising {}.{name}",
            layer.name()
        )))
}

/// Builds the parameters of one chunk on one tensor-parallel rank.
pub struct ParamBuilder {
    /// The initialisation seed; None builds an inference model whose weights will be
    /// loaded: no initial values are drawn (only vocabulary padding is zeroed) and no
    /// tensor requires a gradient.
    pub seed: Option<u64>,
    pub tp: TpRank,
    pub kind: Kind,
    pub device: Device,
    pub params: Vec<Param>,
}

impl ParamBuilder {
    /// Creates `layer.name` (global `shape`, split by `split`) and returns its local tensor.
    pub fn param(
        &mut self,
        layer: LayerKind,
        name: &str,
        shape: &[usize],
        init: Init,
        split: Split,
    ) -> Result<Tensor> {
        let (local_shape, spec) = spec_for(shape, &split, self.tp);
        let local = match self.seed {
            Some(seed) => {
                let full = init_param(seed, layer, name, shape, init)?;
                take_local(&full, &spec, &local_shape)?
                    .f_to_dtype(self.kind, false, false)
                    .and_then(|t| t.f_to(self.device))
                    .and_then(|t| t.f_contiguous())
                    .ctx("placing a parameter")?
                    .set_requires_grad(true)
            }
            None => {
                let dims: Vec<i64> = local_shape.iter().map(|&d| d as i64).collect();
                let opts = (self.kind, self.device);
                let covered = spec.numel() == local_shape.iter().product::<usize>();
                // Untouched pages cost no memory until the weights are loaded into them.
                if covered {
                    Tensor::f_empty(dims.as_slice(), opts)
                } else {
                    Tensor::f_zeros(dims.as_slice(), opts)
                }
                .ctx("allocating a parameter")?
            }
        };
        let replicated = split == Split::Replicated;
        self.params.push(Param {
            name: format!("{}.{name}", layer.name()),
            tensor: local.shallow_clone(),
            decay: shape.len() >= 2,
            spec,
            owner: !replicated || self.tp.rank == 0,
            tied_copy: false,
            sequence_parallel: false,
        });
        Ok(local)
    }

    /// Marks the parameter created last as used in the sequence-split regions (see
    /// [`Param::sequence_parallel`]).
    pub fn mark_sequence_parallel(&mut self) {
        if let Some(p) = self.params.last_mut() {
            p.sequence_parallel = true;
        }
    }
}

/// Gives every parameter a defined, all-zero `.grad`, so that weight-gradient (`W`)
/// actions can add into it; `0 + g` is exact, so B-based schedules are unaffected.
pub fn init_grads(params: &[Param]) -> Result<()> {
    if params.is_empty() {
        return Ok(());
    }
    let zeros = params
        .iter()
        .map(|p| p.tensor.f_zeros_like())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::torch("initialising the parameters' gradients"))?;
    // A leaf seeded with zeros accumulates them as its `.grad` (one backward, no graph).
    let seeds: Vec<(&Tensor, &Tensor)> = params.iter().map(|p| &p.tensor).zip(&zeros).collect();
    super::seeded::backward(&seeds, &[]).map(drop)
}
