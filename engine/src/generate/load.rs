//! A rank's chunk of a trained model for inference: which layers it holds (the
//! partitioner's FLOP-balanced plan for `pp` stages and `tp` shards), built without
//! initial values and filled from a weight source, shard by shard.
//!
//! Invariant: a rank reads exactly the blocks of each parameter its [`ShardSpec`]s name;
//! nothing is gathered and no rank holds a parameter it does not use.

use crate::error::{Error, Result};
use crate::hf::Import;
use crate::model::sharding::TpRank;
use crate::model::{Model, ModelSpec};
use crate::shard::ShardSpec;
use partitioner::mesh::MeshCoord;
use partitioner::{LayerKind, Plan, PlanSpec};
use tch::Tensor;

/// Where the weights come from.
pub enum Source<'a> {
    /// Trained weights (a Strata checkpoint, an HF directory).
    Trained(&'a mut dyn Weights),
    /// The initial weights of `train.seed` (for speed measurements and tests).
    Seed(u64),
}

/// Where trained weights come from (a Strata checkpoint, an HF directory).
pub trait Weights {
    /// Fills `dst`, this rank's shard of parameter `name` as `spec` places it.
    fn load(&mut self, name: &str, spec: &ShardSpec, dst: &Tensor) -> Result<()>;
}

impl Weights for Import<'_> {
    fn load(&mut self, name: &str, spec: &ShardSpec, dst: &Tensor) -> Result<()> {
        tch::no_grad(|| self.load_shard(name, spec, dst))
    }
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
        let mut plan_spec = PlanSpec::new(spec.shape, pp, 1, 1);
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
        let model = Model::for_inference(&self.spec, layers, tp)?;
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
        ..*hf
    }
}
