//! Reading a Hugging Face model directory into Strata (`model.init_from`).
//!
//! [`HfCheckpoint::open`] reads `config.json`, maps the safetensors files and checks the
//! file against its own config: every tensor the config implies is present with its
//! shape, and nothing else is (a missing or unexpected tensor is refused by name).
//! [`HfCheckpoint::import`] then checks the Strata model against the HF one
//! ([`check_compat`]) and returns an [`Import`], from which each rank copies exactly the
//! blocks of each parameter it owns, straight from the mapped files.
//!
//! Tolerated, as transformers tolerates them: names without the base-model prefix
//! (`h.0...` for `transformer.h.0...`), causal-mask and rotary buffers saved by older
//! versions, and an `lm_head.weight` in a tied model (transformers ties it to the
//! embedding; so does Strata).

use super::config::HfConfig;
use super::mapping::{load_full, load_shard, mappings, Mapping};
use super::safetensors_io::MappedFiles;
use super::spec::check_compat;
use super::vocab::{self, HfVocab};
use super::{gpt2, llama};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::shard::ShardSpec;
use partitioner::Arch;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// An opened, self-consistent HF model directory.
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub config: HfConfig,
    pub vocab: HfVocab,
    files: MappedFiles,
}

impl HfCheckpoint {
    /// Opens `dir` and checks its tensors against its `config.json`.
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        if !dir.is_dir() {
            return Err(Error::Hf {
                path: dir.display().to_string(),
                field: "(directory)".into(),
                problem: "is not a directory".into(),
                fix:
                    "point at a directory written by save_pretrained or `strata export --format hf`"
                        .into(),
            });
        }
        let config = HfConfig::read(dir)?;
        let arch = config.spec.shape.arch;
        let files = MappedFiles::open(dir, |n| match arch {
            Arch::Gpt => gpt2::canonical(n),
            Arch::Llama => llama::canonical(n),
        })?;
        let ckpt = HfCheckpoint {
            dir: dir.to_path_buf(),
            vocab: vocab::read(dir)?,
            config,
            files,
        };
        ckpt.check_tensors()?;
        Ok(ckpt)
    }

    fn err(&self, field: &str, problem: String, fix: &str) -> Error {
        Error::Hf {
            path: self.dir.display().to_string(),
            field: field.into(),
            problem,
            fix: fix.into(),
        }
    }

    /// Every tensor `config.json` implies is in the files with its shape; nothing else is.
    fn check_tensors(&self) -> Result<()> {
        let spec = &self.config.spec;
        let maps = mappings(spec, spec)?;
        let mut expected = BTreeMap::new();
        for p in maps.iter().flat_map(|m| &m.pieces) {
            expected.insert(p.hf.as_str(), &p.hf_shape);
        }
        for (name, want) in &expected {
            let Some(e) = self.files.index.get(*name) else {
                return Err(self.err(
                    name,
                    "is missing from the weights".into(),
                    "the weights do not match config.json: re-save the model with save_pretrained",
                ));
            };
            if &&e.shape != want {
                return Err(self.err(
                    name,
                    format!("has shape {:?}, but config.json implies {want:?}", e.shape),
                    "the weights do not match config.json: re-save the model with save_pretrained",
                ));
            }
        }
        let buffer = |n: &str| match spec.shape.arch {
            Arch::Gpt => gpt2::is_buffer(n),
            Arch::Llama => llama::is_buffer(n),
        };
        let tied_head = |n: &str| spec.tie_embeddings && n == "lm_head.weight";
        if let Some((name, e)) = self
            .files
            .index
            .iter()
            .find(|(n, _)| !expected.contains_key(n.as_str()) && !buffer(n) && !tied_head(n))
        {
            let file = self
                .files
                .path_of(name)
                .map_or(String::new(), |p| p.display().to_string());
            return Err(self.err(
                &e.file_name,
                format!("is an unexpected tensor in {file} (not part of a {} model with this config.json)", spec.shape.arch.name()),
                "check that config.json belongs to these weights (model_type, n_layer / num_hidden_layers, tie_word_embeddings)",
            ));
        }
        Ok(())
    }

    /// Checks the Strata model `target` against this one and prepares to load it.
    pub fn import(&self, target: &ModelSpec) -> Result<Import<'_>> {
        check_compat(&self.config.spec, target, &self.config.path)?;
        let maps = mappings(target, &self.config.spec)?
            .into_iter()
            .map(|m| (m.strata.clone(), m))
            .collect();
        Ok(Import { ckpt: self, maps })
    }
}

/// A Strata model's parameters, read from an HF checkpoint.
pub struct Import<'a> {
    ckpt: &'a HfCheckpoint,
    maps: BTreeMap<String, Mapping>,
}

impl Import<'_> {
    /// Every Strata parameter name and its global shape.
    pub fn params(&self) -> impl Iterator<Item = (&str, &[usize])> {
        self.maps
            .values()
            .map(|m| (m.strata.as_str(), m.shape.as_slice()))
    }

    fn mapping(&self, name: &str) -> Result<&Mapping> {
        self.maps.get(name).ok_or_else(|| {
            Error::Internal(format!(
                "the model has a parameter {name} that an import from {} does not",
                self.ckpt.dir.display()
            ))
        })
    }

    /// Copies the blocks of `name` that `spec` says this rank holds into `dst`.
    pub fn load_shard(&self, name: &str, spec: &ShardSpec, dst: &Tensor) -> Result<()> {
        load_shard(self.mapping(name)?, spec, &self.ckpt.files, dst)
    }

    /// The whole tensor `name` as a new `kind` tensor.
    pub fn load_full(&self, name: &str, kind: Kind) -> Result<Tensor> {
        load_full(self.mapping(name)?, &self.ckpt.files, kind)
    }

    /// Every parameter, whole.
    pub fn load_all(&self, kind: Kind) -> Result<BTreeMap<String, Tensor>> {
        self.maps
            .values()
            .map(|m| Ok((m.strata.clone(), load_full(m, &self.ckpt.files, kind)?)))
            .collect()
    }
}
