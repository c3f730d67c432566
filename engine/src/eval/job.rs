//! What `strata eval SOURCE [--data FILE] [--layout pp=..,tp=..,dp=..]` evaluates, decided
//! once by the launcher (so bad input fails with exit code 2 before any rank starts) and
//! handed to every rank as an [`EvalJob`].
//!
//! SOURCE is one of:
//! * a Strata checkpoint (`step-N` directory, or a root whose `latest` names one): the
//!   model and vocabulary it was saved with, its weights; default data: the validation
//!   split (last 10%) of the file it was trained on;
//! * a Hugging Face directory (`config.json` + safetensors): loaded through
//!   `model.init_from` with `seq_len` = its positions; its `vocab.json` character
//!   vocabulary, else the data file's own characters; `--data` is required;
//! * a Strata config (YAML): its model with its initial weights (`model.init_from`, else
//!   the seeded initialisation); default data: its validation split.
//!
//! The job's config is the source's with the layout replaced (forward-only, so no
//! schedule or virtual stages) and `train.data: random`: the evaluated text is read here,
//! cut into [`Windows`] with the model's vocabulary, unknown characters refused.

use super::windows::{encode, Windows};
use super::{evaluate, EvalOptions, EvalResult};
use crate::checkpoint::{self, Checkpoint};
use crate::comm::groups::ParallelComms;
use crate::config::Config;
use crate::data::CharVocab;
use crate::error::{Error, Result};
use crate::generate::load::{install_quantized, CheckpointWeights, Weights as _};
use crate::hf::from_checkpoint::checkpoint_config;
use crate::hf::{HfConfig, HfVocab};
use crate::model::Model;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// `--layout pp=P,tp=T,dp=D` (each defaults to 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutArg {
    pub pp: usize,
    pub tp: usize,
    pub dp: usize,
}

impl Default for LayoutArg {
    fn default() -> Self {
        LayoutArg {
            pp: 1,
            tp: 1,
            dp: 1,
        }
    }
}

impl std::str::FromStr for LayoutArg {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<LayoutArg, String> {
        let mut l = LayoutArg::default();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not KEY=N"))?;
            let n: usize = v
                .trim()
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .ok_or_else(|| format!("{} must be a positive integer", k.trim()))?;
            match k.trim() {
                "pp" => l.pp = n,
                "tp" => l.tp = n,
                "dp" => l.dp = n,
                other => return Err(format!("unknown key `{other}` (use pp, tp and dp)")),
            }
        }
        Ok(l)
    }
}

/// Which part of the data file is evaluated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataPart {
    /// The whole file (`--data`).
    Whole,
    /// The last 10% (the training run's validation split).
    Validation,
}

/// Where the weights come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Weights {
    /// A Strata checkpoint directory.
    Checkpoint(PathBuf),
    /// The config's own (`model.init_from`, else the seeded initialisation).
    Config,
}

/// Everything every rank needs to run an evaluation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalJob {
    /// The config's YAML (layout applied, `train.data: random`).
    pub config: String,
    /// Where relative paths in it resolve from (and messages point).
    pub config_path: PathBuf,
    pub weights: Weights,
    pub data: PathBuf,
    pub part: DataPart,
    /// The model's character vocabulary (token id = index).
    pub vocab: Vec<char>,
}

fn user_err(path: &Path, field: &str, problem: String, fix: &str) -> Error {
    Error::Config {
        path: path.display().to_string(),
        field: field.into(),
        problem,
        fix: fix.into(),
    }
}

/// Sets `map[key] = value` on a YAML mapping.
fn set(map: &mut Mapping, key: &str, value: Value) {
    map.insert(Value::from(key), value);
}

fn section<'a>(root: &'a mut Value, key: &str) -> Result<&'a mut Mapping> {
    let map = root
        .as_mapping_mut()
        .ok_or_else(|| Error::Internal("config is not a mapping".into()))?;
    if !map.contains_key(key) {
        set(map, key, Value::Mapping(Mapping::new()));
    }
    map.get_mut(key)
        .and_then(Value::as_mapping_mut)
        .ok_or_else(|| Error::Internal(format!("config.{key} is not a mapping")))
}

/// The evaluation config: `yaml` (a resolved config) with `layout`, forward-only and
/// random training data (the evaluated text is read separately).
fn eval_config_yaml(yaml: &str, layout: LayoutArg, keep_init_from: bool) -> Result<String> {
    let mut root: Value =
        serde_yaml::from_str(yaml).map_err(|e| Error::Internal(format!("config YAML: {e}")))?;
    let parallel = section(&mut root, "parallel")?;
    let mbs = parallel
        .get("micro_batch_size")
        .cloned()
        .unwrap_or(Value::from(4));
    let m = parallel
        .get("microbatches")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let mut p = Mapping::new();
    set(&mut p, "pp", Value::from(layout.pp));
    set(&mut p, "tp", Value::from(layout.tp));
    set(&mut p, "dp", Value::from(layout.dp));
    set(
        &mut p,
        "microbatches",
        Value::from(m.max(2 * layout.pp as u64)),
    );
    set(&mut p, "micro_batch_size", mbs);
    set(&mut p, "schedule", Value::from("gpipe"));
    *parallel = p;
    let train = section(&mut root, "train")?;
    set(train, "data", Value::from("random"));
    set(train, "steps", Value::from(1));
    train.remove("resume");
    train.remove("eval_microbatches");
    if !keep_init_from {
        section(&mut root, "model")?.remove("init_from");
    }
    if let Some(map) = root.as_mapping_mut() {
        map.remove("checkpoint");
    }
    serde_yaml::to_string(&root).map_err(|e| Error::Internal(format!("config YAML: {e}")))
}

impl EvalJob {
    /// Decides what to evaluate; every user error is found here.
    pub fn prepare(source: &Path, layout: LayoutArg, data: Option<&Path>) -> Result<EvalJob> {
        let job = if source.is_file() {
            Self::from_config(source, layout, data)?
        } else if source.join("config.json").is_file()
            && !source.join(checkpoint::MANIFEST).is_file()
        {
            Self::from_hf(source, layout, data)?
        } else {
            Self::from_checkpoint(source, layout, data)?
        };
        let cfg = job.config()?;
        job.windows(&cfg)?;
        Ok(job)
    }

    fn from_checkpoint(path: &Path, layout: LayoutArg, data: Option<&Path>) -> Result<EvalJob> {
        let ckpt = Checkpoint::open(path)?;
        let cfg = checkpoint_config(&ckpt)?;
        let vocab = ckpt.manifest().vocab.clone().ok_or_else(|| {
            user_err(
                ckpt.dir(),
                "vocab",
                "the checkpoint was trained on random tokens: it has no character vocabulary to read text with".into(),
                "evaluate a checkpoint trained on a text file",
            )
        })?;
        let (data, part) = default_data(&cfg, data)?;
        Ok(EvalJob {
            config: eval_config_yaml(&ckpt.manifest().config, layout, false)?,
            config_path: cfg.source.clone(),
            weights: Weights::Checkpoint(ckpt.dir().to_path_buf()),
            data,
            part,
            vocab,
        })
    }

    fn from_config(path: &Path, layout: LayoutArg, data: Option<&Path>) -> Result<EvalJob> {
        let cfg = Config::load(path)?;
        let vocab = match cfg.data_source()? {
            crate::data::DataSource::Chars { vocab, .. } => vocab.chars,
            crate::data::DataSource::Random { .. } => {
                return Err(user_err(
                    path,
                    "train.data",
                    "is `random`: the model has no character vocabulary to read text with".into(),
                    "evaluate a config whose train.data is a text file",
                ))
            }
        };
        let (data, part) = default_data(&cfg, data)?;
        Ok(EvalJob {
            config: eval_config_yaml(&cfg.resolved_yaml()?, layout, true)?,
            config_path: cfg.source.clone(),
            weights: Weights::Config,
            data,
            part,
            vocab,
        })
    }

    fn from_hf(dir: &Path, layout: LayoutArg, data: Option<&Path>) -> Result<EvalJob> {
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let hf = HfConfig::read(&dir)?;
        let data = data.ok_or_else(|| {
            user_err(
                &dir,
                "--data",
                "is required to evaluate a Hugging Face directory".into(),
                "pass --data FILE (a text file)",
            )
        })?;
        let vocab = match crate::hf::vocab::read(&dir)? {
            HfVocab::Chars(v) => v.chars,
            HfVocab::Absent => read_text(data)?.0.chars,
            HfVocab::Other => {
                return Err(user_err(
                    &dir.join("vocab.json"),
                    "vocab.json",
                    "is not a character vocabulary (a subword tokenizer's?); strata eval reads character-level text".into(),
                    "evaluate a model trained on characters, or remove vocab.json to number the data's own characters",
                ))
            }
        };
        let s = &hf.spec.shape;
        let yaml = format!(
            "model: {{seq_len: {}, d_model: {}, n_heads: {}, n_layers: {}, d_ff: {}, init_from: {:?}}}
parallel: {{pp: 1, microbatches: 1, micro_batch_size: 4}}
train: {{steps: 1, lr: 1.0e-3, data: random}}
output: {{dir: {:?}}}
",
            s.seq_len,
            s.d_model,
            s.n_heads,
            s.n_layers,
            s.d_ff,
            dir.display().to_string(),
            std::env::temp_dir().join("strata-eval").display().to_string(),
        );
        Ok(EvalJob {
            config: eval_config_yaml(&yaml, layout, true)?,
            config_path: dir.join("config.json"),
            weights: Weights::Config,
            data: std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf()),
            part: DataPart::Whole,
            vocab,
        })
    }

    /// The evaluation config (validated).
    pub fn config(&self) -> Result<Config> {
        Config::parse(&self.config, &self.config_path)
    }

    /// The windows of the data under the model's vocabulary.
    pub fn windows(&self, cfg: &Config) -> Result<Windows> {
        let vocab = CharVocab {
            chars: self.vocab.clone(),
            len_tokens: 0,
        };
        let (_, text) = read_text(&self.data)?;
        let mut tokens = encode(&text, &vocab, &self.data)?;
        if self.part == DataPart::Validation {
            tokens.drain(..tokens.len() * 9 / 10);
        }
        let seq = *cfg.model.seq_len;
        let w = Windows::from_tokens(&tokens, seq);
        if w.count() == 0 {
            return Err(user_err(
                &self.data,
                "--data",
                format!(
                    "{} tokens{} are fewer than one window of seq_len + 1 = {}",
                    tokens.len(),
                    if self.part == DataPart::Validation {
                        " in the validation split"
                    } else {
                        ""
                    },
                    seq + 1
                ),
                "evaluate a longer text",
            ));
        }
        Ok(w)
    }

    /// Fills one freshly built chunk of this rank with the job's weights; a quantised
    /// checkpoint's linear layers become int8 ones (as `strata generate` loads them).
    pub fn load_weights(&self, cfg: &Config, chunk: &mut Model) -> Result<()> {
        match &self.weights {
            Weights::Config => crate::hf::load_init_from(cfg, chunk.params()),
            Weights::Checkpoint(dir) => {
                let mut w = CheckpointWeights::new(Checkpoint::open(dir)?)?;
                install_quantized(chunk, &mut w)?;
                for p in chunk.params() {
                    w.load(&p.name, &p.spec, &p.tensor)?;
                }
                Ok(())
            }
        }
    }

    /// Runs this rank's part of the evaluation on `comms` (a mesh of the job's layout).
    pub fn run(&self, comms: &mut ParallelComms) -> Result<EvalResult> {
        let cfg = self.config()?;
        cfg.check_world(comms.world.size())?;
        let windows = self.windows(&cfg)?;
        let load = |chunk: &mut Model| self.load_weights(&cfg, chunk);
        evaluate(&cfg, comms, &load, &windows, EvalOptions::default())
    }

    /// Runs the job in this process when its layout is one rank.
    pub fn run_single(&self) -> Result<EvalResult> {
        let mesh = self.config()?.mesh()?;
        let mut comms = ParallelComms::local(mesh)?;
        match comms.as_mut_slice() {
            [one] => self.run(one),
            all => Err(Error::Internal(format!(
                "an in-process evaluation needs one rank, the layout has {}",
                all.len()
            ))),
        }
    }
}

/// The text of `path` and its characters.
fn read_text(path: &Path) -> Result<(CharVocab, String)> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        user_err(
            path,
            "--data",
            format!("cannot read it: {e}"),
            "pass the path of a UTF-8 text file",
        )
    })?;
    Ok((CharVocab::from_text(&text), text))
}

/// `--data`, else the validation split of the file the config trains on.
fn default_data(cfg: &Config, data: Option<&Path>) -> Result<(PathBuf, DataPart)> {
    if let Some(d) = data {
        return Ok((
            std::path::absolute(d).unwrap_or_else(|_| d.to_path_buf()),
            DataPart::Whole,
        ));
    }
    let trained_on = cfg.data_path().filter(|p| p.is_file()).ok_or_else(|| {
        user_err(
            &cfg.source,
            "--data",
            format!(
                "no data given, and the training data `{}` is not a file here",
                cfg.train.data
            ),
            "pass --data FILE (a text file in the model's characters)",
        )
    })?;
    Ok((trained_on, DataPart::Validation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_parse_with_defaults() {
        assert_eq!(
            "pp=2,tp=2".parse(),
            Ok(LayoutArg {
                pp: 2,
                tp: 2,
                dp: 1
            })
        );
        assert_eq!("".parse(), Ok(LayoutArg::default()));
        assert!("pp=0"
            .parse::<LayoutArg>()
            .unwrap_err()
            .contains("positive"));
        assert!("xp=2"
            .parse::<LayoutArg>()
            .unwrap_err()
            .contains("unknown key `xp`"));
        assert!("pp2".parse::<LayoutArg>().unwrap_err().contains("KEY=N"));
    }
}
