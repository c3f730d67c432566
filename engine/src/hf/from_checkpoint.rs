//! `strata export CHECKPOINT --format hf --out DIR`: a Strata checkpoint (saved on any
//! layout) written as a Hugging Face directory.
//!
//! The model comes from the config stored in the manifest (its resolved YAML, so the
//! vocabulary size is a number and no data file is needed), the weights from the
//! checkpoint's layout-free tensors, read one at a time, whole and memory-mapped, while
//! `model.safetensors` is written; optimizer state is not exported.
//!
//! Invariant: every exported tensor agrees with the manifest on its global shape, or the
//! export is refused naming the tensor.

use super::export::{export, StrataSource};
use super::mapping::mappings;
use crate::checkpoint::Checkpoint;
use crate::config::{Config, Vocab};
use crate::data::CharVocab;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The config a checkpoint was saved with (parsed, not validated: its data file may be
/// gone).
pub fn checkpoint_config(ckpt: &Checkpoint) -> Result<Config> {
    let path = ckpt.dir().join(crate::checkpoint::MANIFEST);
    let mut cfg: Config = serde_yaml::from_str(&ckpt.manifest().config).map_err(|e| {
        crate::checkpoint::checkpoint_error(
            &path,
            "",
            format!("its config does not parse: {e}"),
            "the manifest is damaged or from another version of Strata",
        )
    })?;
    cfg.source = path;
    Ok(cfg)
}

/// The model of a resolved config (numeric `model.vocab`), without reading its data.
pub fn resolved_spec(cfg: &Config) -> Result<ModelSpec> {
    let m = &cfg.model;
    let Vocab::Fixed(vocab) = m.vocab else {
        return Err(Error::Internal(format!(
            "{}: model.vocab is not resolved to a number",
            cfg.source.display()
        )));
    };
    let shape = m.shape(vocab);
    Ok(ModelSpec {
        tie_embeddings: m.tie_embeddings,
        activation: m.activation.unwrap_or_default(),
        norm_eps: m.norm_eps,
        rope_theta: m.rope_theta,
        ..ModelSpec::new(shape)
    })
}

/// Reads whole tensors from a checkpoint (one at a time).
struct CheckpointSource(RefCell<Checkpoint>);

impl StrataSource for CheckpointSource {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.0.borrow_mut().read_full(name)
    }
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct Exported {
    pub checkpoint: PathBuf,
    pub step: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// Writes the checkpoint at `path` (a `step-N` directory or a root) as an HF directory.
pub fn export_checkpoint(path: &Path, out: &Path) -> Result<Exported> {
    let ckpt = Checkpoint::open(path)?;
    let cfg = checkpoint_config(&ckpt)?;
    let mut spec = resolved_spec(&cfg)?;
    super::config::check_exportable(&spec)?;
    let maps = mappings(&spec, &spec)?;
    for m in &maps {
        let entry = ckpt.entry(&m.strata)?;
        if entry.shape != m.shape {
            return Err(crate::checkpoint::checkpoint_error(
                ckpt.dir(),
                &m.strata,
                format!(
                    "has shape {:?}, but its config implies {:?}",
                    entry.shape, m.shape
                ),
                "the manifest's config and tensors disagree: the checkpoint is damaged",
            ));
        }
        spec.kind = entry.dtype.kind();
    }
    let vocab = ckpt.manifest().vocab.clone().map(|chars| CharVocab {
        chars,
        len_tokens: 0,
    });
    let done = Exported {
        checkpoint: ckpt.dir().to_path_buf(),
        step: ckpt.manifest().step,
        tensors: maps.iter().map(|m| m.pieces.len()).sum(),
        bytes: maps
            .iter()
            .map(|m| m.shape.iter().product::<usize>() as u64)
            .sum::<u64>()
            * spec.kind.elt_size_in_bytes() as u64,
    };
    let kind = spec.kind;
    let source = CheckpointSource(RefCell::new(ckpt));
    export(out, &spec, vocab.as_ref(), &source, kind_or_float(kind))?;
    Ok(done)
}

/// Exported weights keep the checkpoint's floating dtype.
fn kind_or_float(kind: Kind) -> Kind {
    match kind {
        Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double => kind,
        _ => Kind::Float,
    }
}
