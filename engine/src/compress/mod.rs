//! Offline transforms of a trained checkpoint into a smaller one (`strata quantize`,
//! `strata prune`): read the source's model tensors whole, one at a time (memory-mapped),
//! transform them, and write a new checkpoint in the same format on one rank (layout
//! tp = 1, pp = 1; any layout can load it).
//!
//! * [`Trained`]: an opened checkpoint with its config, model and parameter names;
//! * [`quantize`]: weight-only int8 of every linear layer;
//! * [`prune`]: magnitude, 2:4 and sensitivity pruning with stored masks, and structured
//!   neuron pruning (a smaller model with a per-layer `d_ff`);
//! * [`mask`]: the masks a training run keeps pruned weights at zero with;
//! * [`eval`]: validation loss of a whole checkpoint model on one rank;
//! * [`report`]: `strata compress-report`, the dense model and its variants side by side;
//!
//! Invariants: the output keeps the source's config (neuron pruning: with the new
//! per-layer `d_ff`), vocabulary and step; a quantised checkpoint holds only model tensors,
//! a pruned one keeps the optimizer state (masked or cut like its weights) so
//! `train.resume` fine-tunes from it; the manifest's `extra` says what was done, so every
//! reader can tell.

pub mod eval;
pub mod mask;
pub mod prune;
pub mod quantize;
pub mod report;

use crate::checkpoint::{self, Checkpoint, Layout, SaveMeta, SaveOptions, SavedTensor};
use crate::comm::local::LocalComm;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hf::from_checkpoint::{checkpoint_config, resolved_spec};
use crate::model::sharding::TpRank;
use crate::model::{Model, ModelSpec};
use partitioner::LayerKind;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// An opened trained checkpoint.
pub struct Trained {
    pub ckpt: Checkpoint,
    pub config: Config,
    pub spec: ModelSpec,
}

impl Trained {
    pub fn open(path: &Path) -> Result<Trained> {
        let ckpt = Checkpoint::open(path)?;
        let config = checkpoint_config(&ckpt)?;
        let spec = resolved_spec(&config)?;
        Ok(Trained { ckpt, config, spec })
    }

    /// Every layer of the model, in order.
    pub fn layers(&self) -> Vec<LayerKind> {
        model_layers(self.spec.shape.n_layers)
    }

    /// The whole model (one rank), allocated but not loaded: for its parameter names,
    /// specs and linear layers. Untouched pages cost no memory.
    pub fn skeleton(&self) -> Result<Model> {
        Model::for_inference(&self.spec, &self.layers(), TpRank::SINGLE)
    }

    /// Bytes of the checkpoint's files.
    pub fn bytes(&self) -> u64 {
        self.ckpt.manifest().files.values().map(|f| f.bytes).sum()
    }

    /// Writes `tensors` as a new checkpoint under `out` (its `step-N/` and `latest`),
    /// with the source's config, vocabulary and step and `extra` added to its extras.
    pub fn write(
        &self,
        out: &Path,
        tensors: &[SavedTensor],
        extra: BTreeMap<String, serde_json::Value>,
    ) -> Result<PathBuf> {
        self.write_with_state(out, tensors, extra, serde_json::Value::Null)
    }

    /// [`Trained::write`] with a trainer state (a pruned checkpoint keeps the source's, so
    /// `train.resume` continues from it).
    pub fn write_with_state(
        &self,
        out: &Path,
        tensors: &[SavedTensor],
        extra: BTreeMap<String, serde_json::Value>,
        train_state: serde_json::Value,
    ) -> Result<PathBuf> {
        let m = self.ckpt.manifest();
        let (config, plan) = (m.config.clone(), m.plan.clone());
        self.write_as(out, tensors, extra, train_state, config, plan)
    }

    /// [`Trained::write_with_state`] with a new config (YAML) and plan (JSON): for a
    /// transform that changes the model's shape (neuron pruning).
    pub fn write_as(
        &self,
        out: &Path,
        tensors: &[SavedTensor],
        extra: BTreeMap<String, serde_json::Value>,
        train_state: serde_json::Value,
        config: String,
        plan: serde_json::Value,
    ) -> Result<PathBuf> {
        let m = self.ckpt.manifest();
        let mut all_extra = m.extra.clone();
        all_extra.extend(extra);
        let meta = SaveMeta {
            step: m.step,
            config,
            vocab: m.vocab.clone(),
            plan,
            layout: Layout {
                pp: 1,
                tp: 1,
                dp: 1,
                virtual_stages: 1,
                schedule: m.layout.schedule.clone(),
            },
            train_state,
            extra: all_extra,
        };
        let mut comm = LocalComm::group(1)
            .pop()
            .ok_or_else(|| Error::Internal("no local communicator".into()))?;
        checkpoint::save(out, &meta, tensors, &mut comm, &SaveOptions::default())
    }
}

/// `embed, block.0 .. block.{n-1}, head`.
pub fn model_layers(n_layers: usize) -> Vec<LayerKind> {
    let mut v = vec![LayerKind::Embedding];
    v.extend((0..n_layers).map(LayerKind::Block));
    v.push(LayerKind::Head);
    v
}
