//! The `checkpoint.*` and `train.resume` config keys: where checkpoints go, and which one
//! a run continues from, checked before any rank starts.
//!
//! Invariants: a config that validates with `train.resume` set names an existing,
//! well-formed checkpoint whose model (every `model.*` key, vocabulary resolved) and
//! character vocabulary equal the config's, and whose step is below `train.steps`; or
//! `latest` with no checkpoint yet (the run starts fresh). Layout and schedule may differ.

use super::{checkpoint_error, read_latest, resolve, Manifest};
use crate::config::Config;
use crate::data::DataSource;
use crate::error::{Error, Result};
use partitioner::ModelShape;
use std::path::{Path, PathBuf};

/// The value of `train.resume` that means "the newest checkpoint, if any".
pub const RESUME_LATEST: &str = "latest";

impl Config {
    /// The checkpoint root: `checkpoint.dir`, or `<output.dir>/checkpoints`, absolute
    /// (relative paths resolve against the working directory, like `output.dir`).
    pub fn checkpoint_dir(&self) -> PathBuf {
        match &self.checkpoint.dir {
            Some(d) => {
                let p = PathBuf::from(d);
                std::path::absolute(&p).unwrap_or(p)
            }
            None => self.output_dir().join("checkpoints"),
        }
    }

    /// The checkpoint directory this run continues from: None without `train.resume`, or
    /// with `latest` and no checkpoint yet.
    pub fn resume_from(&self) -> Result<Option<PathBuf>> {
        let Some(value) = self.train.resume.as_deref() else {
            return Ok(None);
        };
        let as_config_error = |e: Error| match e {
            Error::Checkpoint {
                path,
                tensor,
                problem,
                fix,
            } => {
                let tensor = if tensor.is_empty() {
                    String::new()
                } else {
                    format!(" (tensor {tensor})")
                };
                self.field_error(
                    "train.resume",
                    format!("{}{tensor}: {problem}", path.display()),
                    fix,
                )
            }
            other => other,
        };
        if value == RESUME_LATEST {
            return read_latest(&self.checkpoint_dir()).map_err(as_config_error);
        }
        let p = PathBuf::from(value);
        let path = std::path::absolute(&p).unwrap_or(p);
        if !path.exists() {
            return Err(self.field_error(
                "train.resume",
                format!(
                    "no checkpoint at {} (relative paths resolve against the working directory)",
                    path.display()
                ),
                "point train.resume at a step-NNNNNN directory or a checkpoint root, or write `latest`".into(),
            ));
        }
        resolve(&path).map(Some).map_err(as_config_error)
    }

    /// Checks the `checkpoint` section.
    pub(crate) fn check_checkpoint_keys(&self) -> Result<()> {
        if let Some(d) = &self.checkpoint.dir {
            if d.trim().is_empty() {
                return Err(self.field_error(
                    "checkpoint.dir",
                    "is empty".into(),
                    "remove the key (default <output.dir>/checkpoints) or set a directory".into(),
                ));
            }
        }
        let root = self.checkpoint_dir();
        if root.exists() && !root.is_dir() {
            return Err(self.field_error(
                "checkpoint.dir",
                format!("{} exists and is not a directory", root.display()),
                "point checkpoint.dir at a directory (it is created if missing)".into(),
            ));
        }
        // A run must not train for hours and then fail at its first save.
        if self.checkpoint.enabled {
            self.check_writable_dir("checkpoint.dir", &root)?;
        }
        Ok(())
    }

    /// Checks that the checkpoint `train.resume` names fits this config.
    pub(crate) fn check_resume(&self, source: &DataSource, shape: &ModelShape) -> Result<()> {
        let Some(dir) = self.resume_from()? else {
            return Ok(());
        };
        let manifest = Manifest::load(&dir).map_err(|e| {
            self.field_error(
                "train.resume",
                e.to_string(),
                "resume from another checkpoint".into(),
            )
        })?;
        let mismatch = |problem: String, fix: String| -> Error {
            self.field_error("train.resume", format!("{} {problem}", dir.display()), fix)
        };
        if manifest.step >= *self.train.steps {
            return Err(mismatch(
                format!(
                    "is at step {}, and train.steps = {}: nothing is left to train",
                    manifest.step, *self.train.steps
                ),
                format!("raise train.steps above {}", manifest.step),
            ));
        }
        if let Some((key, saved, ours)) = self.model_difference(&manifest, &dir, shape)? {
            return Err(mismatch(
                format!("was saved with model.{key} = {saved}, but the config has {ours}"),
                format!("set model.{key}: {saved} (the model must match to resume; the layout and schedule may differ)"),
            ));
        }
        if let (DataSource::Chars { vocab, .. }, Some(saved)) = (source, &manifest.vocab) {
            if &vocab.chars != saved {
                return Err(mismatch(
                    format!(
                        "has a {}-character vocabulary that differs from train.data's {} characters",
                        saved.len(),
                        vocab.chars.len()
                    ),
                    "train on the data the checkpoint was trained on (token ids are characters of its vocabulary)".into(),
                ));
            }
        }
        Ok(())
    }

    /// The first `model.*` key whose value differs between the checkpoint's config and
    /// this one (vocabulary and key/value heads resolved): (key, saved, ours).
    fn model_difference(
        &self,
        manifest: &Manifest,
        dir: &Path,
        shape: &ModelShape,
    ) -> Result<Option<(String, String, String)>> {
        let saved_cfg = Config::parse_unchecked(&manifest.config, &dir.join(super::MANIFEST))
            .map_err(|e| {
                checkpoint_error(
                    &dir.join(super::MANIFEST),
                    "",
                    format!("its config does not parse: {e}"),
                    "resume from a checkpoint written by this version of Strata",
                )
            })?;
        let saved_shape = saved_cfg.shape_for_resume()?;
        let as_map = |shape: &ModelShape,
                      cfg: &Config|
         -> Result<serde_json::Map<String, serde_json::Value>> {
            let mut m = match serde_json::to_value(&cfg.model) {
                Ok(serde_json::Value::Object(m)) => m,
                _ => return Err(Error::Internal("model config is not a map".into())),
            };
            if let Ok(serde_json::Value::Object(s)) = serde_json::to_value(shape) {
                m.extend(s);
            }
            Ok(m)
        };
        let (saved, ours) = (as_map(&saved_shape, &saved_cfg)?, as_map(shape, self)?);
        let mut keys: Vec<&String> = saved.keys().chain(ours.keys()).collect();
        keys.sort();
        keys.dedup();
        let null = serde_json::Value::Null;
        Ok(keys.into_iter().find_map(|k| {
            let (a, b) = (saved.get(k).unwrap_or(&null), ours.get(k).unwrap_or(&null));
            (a != b).then(|| (k.clone(), a.to_string(), b.to_string()))
        }))
    }

    /// The model shape recorded in a saved (resolved) config: its vocabulary is a number,
    /// so the data file need not exist.
    fn shape_for_resume(&self) -> Result<ModelShape> {
        let vocab = match self.model.vocab {
            crate::config::Vocab::Fixed(v) => v,
            crate::config::Vocab::Auto => {
                return Err(Error::Internal("a saved config has `vocab: auto`".into()))
            }
        };
        Ok(self.model.shape(vocab))
    }
}
