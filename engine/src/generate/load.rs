//! A rank's chunk of a trained model for inference: which layers it holds (the
//! partitioner's FLOP-balanced plan for `pp` stages and `tp` shards), built without
//! initial values and filled from a weight source, shard by shard.
//!
//! Invariant: a rank reads exactly the blocks of each parameter its [`ShardSpec`]s name;
//! nothing is gathered and no rank holds a parameter it does not use.

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::hf::Import;
use crate::model::sharding::TpRank;
use crate::model::{Model, ModelSpec};
use crate::quant::{self, Int8Weight, QuantInfo};
use crate::shard::ShardSpec;
use partitioner::mesh::MeshCoord;
use partitioner::{LayerKind, Plan, PlanSpec};
use tch::{Device, Kind, Tensor};

/// Where the weights come from.
pub enum Source<'a> {
    /// Trained weights (a Strata checkpoint, an HF directory).
    Trained(&'a mut dyn Weights),
    /// The initial weights of `train.seed` (for speed measurements and tests).
    Seed(u64),
}

/// Where trained weights come from (a Strata checkpoint, an HF directory).
pub trait Weights {
    /// Fills `dst`, this rank's shard of tensor `name` as `spec` places it.
    fn load(&mut self, name: &str, spec: &ShardSpec, dst: &Tensor) -> Result<()>;

    /// Which linear weights are stored quantised, if any.
    fn quantization(&self) -> Option<&QuantInfo> {
        None
    }
}

impl Weights for Import<'_> {
    fn load(&mut self, name: &str, spec: &ShardSpec, dst: &Tensor) -> Result<()> {
        tch::no_grad(|| self.load_shard(name, spec, dst))
    }
}

/// A Strata checkpoint and its quantisation record.
pub struct CheckpointWeights {
    pub ckpt: Checkpoint,
    pub quant: Option<QuantInfo>,
}

impl CheckpointWeights {
    pub fn new(ckpt: Checkpoint) -> Result<CheckpointWeights> {
        let quant = QuantInfo::from_extra(&ckpt.manifest().extra)?;
        Ok(CheckpointWeights { ckpt, quant })
    }
}

impl Weights for CheckpointWeights {
    fn load(&mut self, name: &str, spec: &ShardSpec, dst: &Tensor) -> Result<()> {
        tch::no_grad(|| self.ckpt.read_into(name, dst, spec))
    }

    fn quantization(&self) -> Option<&QuantInfo> {
        self.quant.as_ref()
    }
}

/// Replaces every linear layer of `model` that `weights` stores quantised by its int8
/// codes and scales (this rank's slices), read straight into int8 and f32 tensors.
pub fn install_quantized(model: &mut Model, weights: &mut dyn Weights) -> Result<()> {
    let Some(info) = weights.quantization().cloned() else {
        return Ok(());
    };
    let spec = model.spec().clone();
    let names: Vec<String> = model
        .linears_mut()
        .iter()
        .map(|l| l.name.clone())
        .filter(|n| info.covers(n))
        .collect();
    for name in names {
        let (wspec, local) = model
            .params()
            .iter()
            .find(|p| p.name == name)
            .map(|p| (p.spec.clone(), p.tensor.size()))
            .ok_or_else(|| Error::Internal(format!("{name} has no parameter")))?;
        let (cspec, sspec) = (quant::codes_spec(&wspec), quant::scale_spec(&wspec));
        let alloc = |shape: &[i64], kind: Kind| {
            Tensor::f_zeros(shape, (kind, Device::Cpu))
                .map_err(Error::torch("allocating int8 weights"))
        };
        // The local weight's own shape (`[in_l, out_l]`), so vocabulary padding columns
        // of a tp-sharded head stay in place: their codes and scales remain zero.
        let codes = alloc(&[local[1], local[0]], Kind::Int8)?;
        let scales = alloc(&[local[1]], Kind::Float)?;
        weights.load(&quant::codes_name(&name), &cspec, &codes)?;
        weights.load(&quant::scale_name(&name), &sspec, &scales)?;
        let int8 = Int8Weight::new(codes, &scales, spec.kind, spec.device)?;
        model.install_int8(&name, int8)?;
    }
    Ok(())
}

/// The model and how it is split.
#[derive(Clone, Debug)]
pub struct ModelSetup {
    pub spec: ModelSpec,
    pub tp: usize,
    /// Layers of each pipeline stage.
    pub stages: Vec<Vec<LayerKind>>,
}

impl ModelSetup {
    /// Splits `spec`'s model over `pp` stages (balanced by FLOPs) and `tp` shards; a layout
    /// the model cannot take is refused naming `--layout`.
    pub fn new(spec: ModelSpec, pp: usize, tp: usize) -> Result<ModelSetup> {
        let mut plan_spec = PlanSpec::new(spec.shape.clone(), pp, 1, 1);
        plan_spec.tp = tp;
        let plan = Plan::build(&plan_spec).map_err(layout_error)?;
        Ok(ModelSetup {
            spec,
            tp,
            stages: plan.stages.into_iter().map(|s| s.layers).collect(),
        })
    }

    pub fn pp(&self) -> usize {
        self.stages.len()
    }

    /// The chunk of the rank at `coord`, with every parameter loaded from `source`.
    pub fn build_chunk(&self, coord: MeshCoord, source: &mut Source<'_>) -> Result<Model> {
        let tp = TpRank {
            rank: coord.tp,
            size: self.tp,
        };
        let layers = &self.stages[coord.pp];
        let weights = match source {
            Source::Seed(seed) => return Model::new(&self.spec, layers, *seed, tp),
            Source::Trained(w) => w,
        };
        let mut model = Model::for_inference(&self.spec, layers, tp)?;
        install_quantized(&mut model, *weights)?;
        for p in model.params() {
            weights.load(&p.name, &p.spec, &p.tensor)?;
        }
        Ok(model)
    }
}

/// A partitioner error about the layout, reworded for `--layout pp=..,tp=..`.
fn layout_error(e: partitioner::Error) -> Error {
    let text = e.to_string().replace("parallel.", "");
    let (problem, fix) = text.split_once("; fix: ").map_or(
        (text.as_str(), "choose a layout the model can split"),
        |(p, f)| (p, f),
    );
    Error::usage(
        "--layout",
        format!("the checkpoint's model cannot be split this way: {problem}"),
        format!("{fix} (in --layout pp=..,tp=..)"),
    )
}

/// The model of an HF directory's `config.json` (already a [`ModelSpec`], see
/// [`crate::hf::HfConfig`]), in `kind` on `device`.
pub fn spec_from_hf(hf: &ModelSpec, kind: tch::Kind, device: tch::Device) -> ModelSpec {
    ModelSpec {
        kind,
        device,
        ..hf.clone()
    }
}
