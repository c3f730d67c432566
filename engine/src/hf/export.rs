//! Writing a Strata model as a Hugging Face directory (`strata export --format hf`):
//! `model.safetensors` (with `__metadata__ {"format": "pt"}`), `config.json` and, for a
//! character-level model, `vocab.json`. transformers' `from_pretrained` loads it as
//! `GPT2LMHeadModel` or `LlamaForCausalLM` with no missing or unexpected keys.
//!
//! Invariant: the Strata tensors are read one at a time from a [`StrataSource`] while the
//! file is written, so an export holds at most one parameter (and its HF form) beyond
//! what the source holds.

use super::config::to_json;
use super::mapping::{mappings, split};
use super::safetensors_io::{write, LazyTensor};
use super::vocab;
use crate::data::CharVocab;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// Where an export reads whole Strata tensors from, by global name.
pub trait StrataSource {
    fn tensor(&self, name: &str) -> Result<Tensor>;
}

impl StrataSource for BTreeMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Result<Tensor> {
        self.get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| Error::Internal(format!("export: no tensor {name}")))
    }
}

/// Writes the model `spec` whose parameters `source` holds to `dir` (created if needed;
/// these three files are replaced), in dtype `kind`.
pub fn export(
    dir: &Path,
    spec: &ModelSpec,
    vocab: Option<&CharVocab>,
    source: &dyn StrataSource,
    kind: Kind,
) -> Result<()> {
    super::config::check_exportable(spec)?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let maps = mappings(spec, spec)?;
    let mut tensors = Vec::new();
    for m in &maps {
        for (i, p) in m.pieces.iter().enumerate() {
            let load = move || -> Result<Tensor> {
                let whole = source.tensor(&m.strata)?;
                let mut parts = split(m, &whole)?;
                Ok(parts.swap_remove(i).1)
            };
            tensors.push((
                p.hf.clone(),
                LazyTensor {
                    shape: p.hf_shape.clone(),
                    kind,
                    load: Box::new(load),
                },
            ));
        }
    }
    write(&dir.join("model.safetensors"), &tensors)?;
    let config = serde_json::to_string_pretty(&to_json(spec))
        .map_err(|e| Error::Internal(format!("config.json: {e}")))?;
    write_text(&dir.join("config.json"), &(config + "\n"))?;
    if let Some(v) = vocab {
        write_text(&dir.join("vocab.json"), &vocab::to_json(v))?;
    }
    Ok(())
}

/// Writes a small file through a temporary name and a rename.
fn write_text(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}
