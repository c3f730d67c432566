//! `model.init_from: <Hugging Face directory>`: start training or evaluation from the
//! weights of a `GPT2LMHeadModel` or `LlamaForCausalLM` directory.
//!
//! The HF `config.json` decides every constant that changes the numbers: a key the Strata
//! config does not write (`vocab`, `tie_embeddings`, `activation`, `norm_eps`,
//! `rope_theta`, `n_kv_heads`) is taken from it ([`adopt`]); a key it writes must agree,
//! as must every shape (`d_model`, `n_heads`, `n_layers`, `d_ff`; `seq_len` at most the
//! HF positions), or the config is refused naming the HF field and the fix ([`check`]).
//! A `vocab.json` character vocabulary (as `strata export` writes) numbers the data's
//! tokens, so the ids mean what they meant to the exported model ([`covering_vocab`]).
//!
//! Invariant: a validated config with `init_from` describes exactly the HF model (up to
//! fewer positions), and the HF directory's tensors match its own `config.json`.

use super::{Config, Count, Override, Vocab};
use crate::data::CharVocab;
use crate::error::{Error, Result};
use crate::hf::{HfCheckpoint, HfConfig, HfVocab};
use partitioner::Arch;
use std::collections::BTreeSet;
use std::path::Path;

/// The `model` keys written in the YAML text (to tell a default from a choice).
fn written_model_keys(text: &str) -> BTreeSet<String> {
    serde_yaml::from_str::<serde_yaml::Value>(text)
        .ok()
        .and_then(|v| {
            v.get("model")?.as_mapping().map(|m| {
                m.keys()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// Takes the constants the config leaves unwritten from the HF `config.json`, and the
/// character vocabulary from its `vocab.json`.
pub(super) fn adopt(cfg: &mut Config, text: &str, overrides: &[Override]) -> Result<()> {
    let Some(dir) = cfg.init_from_dir() else {
        return Ok(());
    };
    if !dir.is_dir() {
        return Err(Error::Config {
            path: cfg.source.display().to_string(),
            field: "model.init_from".into(),
            problem: format!(
                "directory not found: {} (relative paths resolve against the config's directory)",
                dir.display()
            ),
            fix: "point model.init_from at a directory written by save_pretrained or `strata export --format hf`".into(),
        });
    }
    let hf = HfConfig::read(&dir)?;
    let mut written = written_model_keys(text);
    // `--set model.KEY=…` writes KEY as surely as the file does.
    written.extend(
        overrides
            .iter()
            .filter(|o| o.key.len() >= 2 && o.key[0] == "model")
            .map(|o| o.key[1].clone()),
    );
    let unset = |k: &str| !written.contains(k);
    let (s, m) = (&hf.spec, &mut cfg.model);
    if unset("vocab") || m.vocab == Vocab::Auto {
        m.vocab = Vocab::Fixed(s.shape.vocab);
    }
    if unset("tie_embeddings") {
        m.tie_embeddings = s.tie_embeddings;
    }
    if unset("norm_eps") {
        m.norm_eps = s.norm_eps;
    }
    if unset("arch") {
        m.arch = s.shape.arch;
    }
    match s.shape.arch {
        Arch::Gpt if unset("activation") && m.arch == Arch::Gpt => {
            m.activation = Some(s.activation)
        }
        Arch::Llama if m.arch == Arch::Llama => {
            if unset("rope_theta") {
                m.rope_theta = s.rope_theta;
            }
            if unset("n_kv_heads") {
                m.n_kv_heads = Some(Count(s.shape.n_kv_heads));
            }
        }
        _ => {}
    }
    if let HfVocab::Chars(v) = crate::hf::vocab::read(&dir)? {
        cfg.init_vocab = Some(v);
    }
    Ok(())
}

/// The HF vocabulary `v`, if it covers every character of the data file `path`.
pub(super) fn covering_vocab(cfg: &Config, v: &CharVocab, path: &Path) -> Result<CharVocab> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if let Some((i, c)) = text
        .chars()
        .enumerate()
        .find(|(_, c)| v.chars.binary_search(c).is_err())
    {
        let dir = cfg.init_from_dir().unwrap_or_default();
        return Err(Error::Hf {
            path: dir.join("vocab.json").display().to_string(),
            field: "vocab.json".into(),
            problem: format!(
                "the character {c:?} (position {i} of {}) is not in the model's vocabulary of {} characters",
                path.display(),
                v.chars.len()
            ),
            fix: "use data written in the model's characters, or remove vocab.json to number the data's own characters".into(),
        });
    }
    Ok(CharVocab {
        chars: v.chars.clone(),
        len_tokens: text.chars().count(),
    })
}

/// Without a `vocab.json`, the data's characters must fit the HF vocabulary.
pub(super) fn check_vocab(cfg: &Config) -> Result<()> {
    let (Some(dir), None, Some(path)) = (cfg.init_from_dir(), &cfg.init_vocab, cfg.data_path())
    else {
        return Ok(());
    };
    let (Vocab::Fixed(v), Ok(chars)) = (cfg.model.vocab, CharVocab::from_file(&path)) else {
        return Ok(());
    };
    if chars.chars.len() > v {
        return Err(Error::Hf {
            path: dir.join("config.json").display().to_string(),
            field: "vocab_size".into(),
            problem: format!(
                "the HF model has {v} token ids but {} has {} distinct characters",
                path.display(),
                chars.chars.len()
            ),
            fix: format!(
                "use a model with vocab_size of at least {}, or data with fewer characters",
                chars.chars.len()
            ),
        });
    }
    Ok(())
}

/// Opens the HF directory (its tensors checked against its `config.json`) and checks the
/// config's model against it: every shape and constant, by name.
pub(super) fn check(cfg: &Config) -> Result<()> {
    let Some(dir) = cfg.init_from_dir() else {
        return Ok(());
    };
    let ckpt = HfCheckpoint::open(&dir)?;
    ckpt.import(&cfg.model_spec()?)?;
    Ok(())
}
