//! What `strata generate SOURCE ...` runs, decided once by the launcher (so bad input
//! exits 2 before any rank starts) and handed to every rank as a [`GenerateJob`].
//!
//! SOURCE is one of:
//! * a Strata checkpoint (`step-N` directory, or a root whose `latest` names one), dense,
//!   pruned or quantised: its model, vocabulary and weights;
//! * a Hugging Face directory (`config.json` + safetensors) with a character
//!   `vocab.json`;
//! * a Strata config (YAML): its model with the seeded initial weights (for speed
//!   measurements of models nobody trained).
//!
//! Checked here: the sampling knobs, the layout (`pp` stages, `tp` shards the model can
//! take), every prompt character (named if outside the vocabulary), and that the longest
//! prompt plus `--max-new-tokens` fits the model's positions (there is no sliding window).

use super::batch::{self, Microbatch};
use super::load::{spec_from_hf, CheckpointWeights, ModelSetup, Source};
use super::pipeline::Job;
use super::sample::Sampling;
use super::stats::Report;
use crate::checkpoint::{self, Checkpoint};
use crate::comm::groups::ParallelComms;
use crate::config::Config;
use crate::data::{CharVocab, DataSource};
use crate::error::{Error, Result};
use crate::hf::from_checkpoint::{checkpoint_config, resolved_spec};
use crate::hf::{HfCheckpoint, HfVocab};
use crate::model::ModelSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelSource {
    Checkpoint(PathBuf),
    Hf(PathBuf),
    /// A config's seeded initial weights.
    Config(PathBuf),
}

/// The user's request, as flags give it.
#[derive(Clone, Debug)]
pub struct Request {
    pub source: PathBuf,
    pub prompts: Vec<String>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    pub pp: usize,
    pub tp: usize,
    /// Microbatches (default: as many as pipeline stages, at most one per prompt).
    pub microbatches: Option<usize>,
    pub kv_cache: bool,
    /// libtorch intra-op threads per rank (default: [`default_threads`]).
    pub threads: Option<usize>,
}

/// Everything every rank needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateJob {
    pub source: ModelSource,
    pub vocab: Vec<char>,
    pub prompts: Vec<Vec<i64>>,
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub seed: u64,
    pub pp: usize,
    pub tp: usize,
    pub microbatches: usize,
    pub kv_cache: bool,
    /// libtorch intra-op threads per rank.
    pub threads: usize,
}

impl GenerateJob {
    /// Checks the request and decides the job; every user error is found here.
    pub fn prepare(req: &Request) -> Result<GenerateJob> {
        req.sampling.validate()?;
        if req.prompts.is_empty() {
            return Err(Error::usage(
                "--prompt",
                "no prompt given",
                "pass --prompt TEXT or --prompts FILE (one prompt per line)",
            ));
        }
        if req.max_new_tokens == 0 {
            return Err(Error::usage(
                "--max-new-tokens",
                "0 generates nothing",
                "pass a positive number of new tokens, e.g. --max-new-tokens 64",
            ));
        }
        let source = std::path::absolute(&req.source).unwrap_or_else(|_| req.source.clone());
        let (source, spec, vocab) = open(&source)?;
        let vocab = CharVocab {
            chars: vocab,
            len_tokens: 0,
        };
        let prompts = req
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                if p.is_empty() {
                    return Err(Error::usage(
                        "--prompt",
                        format!("prompt {} is empty", i + 1),
                        "give every prompt at least one character",
                    ));
                }
                batch::encode(&vocab, p, i)
            })
            .collect::<Result<Vec<_>>>()?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let seq_len = spec.shape.seq_len;
        if longest + req.max_new_tokens > seq_len {
            return Err(Error::usage(
                "--max-new-tokens",
                format!(
                    "the longest prompt ({longest} tokens) plus {} new tokens exceeds the model's {seq_len} positions (model.seq_len), and the model has no sliding window to go past them",
                    req.max_new_tokens
                ),
                format!(
                    "ask for at most {} new tokens, or shorten the prompt",
                    seq_len.saturating_sub(longest)
                ),
            ));
        }
        ModelSetup::new(spec, req.pp, req.tp)?;
        let threads = match req.threads {
            Some(0) => {
                return Err(Error::usage(
                    "--threads",
                    "0 threads cannot run anything",
                    "pass a positive number of libtorch threads per rank, e.g. --threads 1",
                ))
            }
            Some(n) => n,
            None => default_threads(&source, req.pp * req.tp)?,
        };
        let microbatches = req.microbatches.unwrap_or(req.pp).clamp(1, prompts.len());
        let s = req.sampling;
        Ok(GenerateJob {
            source,
            vocab: vocab.chars,
            prompts,
            max_new_tokens: req.max_new_tokens,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            seed: s.seed,
            pp: req.pp,
            tp: req.tp,
            microbatches,
            kv_cache: req.kv_cache,
            threads,
        })
    }

    /// Number of ranks: pp · tp.
    pub fn world_size(&self) -> usize {
        self.pp * self.tp
    }

    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }

    /// The microbatches every rank runs.
    pub fn pipeline_job(&self) -> Job {
        Job {
            microbatches: batch::split(&self.prompts, self.microbatches),
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling(),
            kv_cache: self.kv_cache,
        }
    }

    /// The text of prompt `i` followed by its generated tokens.
    pub fn text(&self, i: usize, generated: &[i64]) -> String {
        let vocab = CharVocab {
            chars: self.vocab.clone(),
            len_tokens: 0,
        };
        let mut ids = self.prompts[i].clone();
        ids.extend_from_slice(generated);
        batch::decode(&vocab, &ids)
    }

    /// Runs this rank's part; world rank 0 returns the report.
    pub fn run(&self, comms: &mut ParallelComms) -> Result<Option<Report>> {
        tch::set_num_threads(self.threads.max(1) as i32);
        let (_, spec, _) = open_spec(&self.source)?;
        let setup = ModelSetup::new(spec, self.pp, self.tp)?;
        let job = self.pipeline_job();
        match &self.source {
            ModelSource::Checkpoint(dir) => {
                let mut w = CheckpointWeights::new(Checkpoint::open(dir)?)?;
                super::run(&setup, Source::Trained(&mut w), &job, comms)
            }
            ModelSource::Hf(dir) => {
                let ck = HfCheckpoint::open(dir)?;
                let mut import = ck.import(&ck.config.spec)?;
                super::run(&setup, Source::Trained(&mut import), &job, comms)
            }
            ModelSource::Config(path) => {
                let seed = Config::load(path)?.train.seed;
                super::run(&setup, Source::Seed(seed), &job, comms)
            }
        }
    }

    /// Runs a one-rank job (pp = tp = 1) in this process and returns its report.
    pub fn run_single(&self) -> Result<Report> {
        if self.world_size() != 1 {
            return Err(Error::Internal(format!(
                "an in-process generation needs one rank, the layout has {}",
                self.world_size()
            )));
        }
        let mesh =
            partitioner::mesh::Mesh::new(1, 1, 1).map_err(|e| Error::Internal(e.to_string()))?;
        let mut comms = ParallelComms::local(mesh)?
            .pop()
            .ok_or_else(|| Error::Internal("no local communicators".into()))?;
        self.run(&mut comms)?
            .ok_or_else(|| Error::Internal("rank 0 made no report".into()))
    }

    /// Microbatches of the job (for callers that print per-microbatch details).
    pub fn microbatch_list(&self) -> Vec<Microbatch> {
        batch::split(&self.prompts, self.microbatches)
    }
}

/// The source kind, model and vocabulary of SOURCE.
fn open(path: &Path) -> Result<(ModelSource, ModelSpec, Vec<char>)> {
    let (source, spec, vocab) = open_spec(&classify(path))?;
    let vocab = vocab.ok_or_else(|| {
        Error::usage(
            "SOURCE",
            format!(
                "{} has no character vocabulary (it was trained on random tokens, or its vocab.json is not a character vocabulary), so text prompts cannot be read",
                path.display()
            ),
            "generate from a model trained on a text file",
        )
    })?;
    Ok((source, spec, vocab))
}

/// Threads per rank when `--threads` is not given: the `train.threads` of the source's
/// config (a checkpoint's or a config file's: decoding runs as the model was trained), else
/// the machine's cores shared out over the `world` ranks (at least 1).
pub fn default_threads(source: &ModelSource, world: usize) -> Result<usize> {
    let configured = match source {
        ModelSource::Checkpoint(p) => Some(checkpoint_config(&Checkpoint::open(p)?)?),
        ModelSource::Config(p) => Some(Config::load(p)?),
        ModelSource::Hf(_) => None,
    };
    Ok(match configured {
        Some(cfg) => *cfg.train.threads,
        None => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / world.max(1)).max(1)
        }
    })
}

/// Checkpoint, HF directory or config.
fn classify(path: &Path) -> ModelSource {
    if path.is_file() {
        ModelSource::Config(path.to_path_buf())
    } else if path.join("config.json").is_file() && !path.join(checkpoint::MANIFEST).is_file() {
        ModelSource::Hf(path.to_path_buf())
    } else {
        ModelSource::Checkpoint(path.to_path_buf())
    }
}

fn open_spec(source: &ModelSource) -> Result<(ModelSource, ModelSpec, Option<Vec<char>>)> {
    Ok(match source {
        ModelSource::Checkpoint(p) => {
            let ckpt = Checkpoint::open(p)?;
            let spec = resolved_spec(&checkpoint_config(&ckpt)?)?;
            let vocab = ckpt.manifest().vocab.clone();
            (
                ModelSource::Checkpoint(ckpt.dir().to_path_buf()),
                spec,
                vocab,
            )
        }
        ModelSource::Hf(p) => {
            let ck = HfCheckpoint::open(p)?;
            let spec = spec_from_hf(&ck.config.spec, tch::Kind::Float, tch::Device::Cpu);
            let vocab = match &ck.vocab {
                HfVocab::Chars(v) => Some(v.chars.clone()),
                _ => None,
            };
            (source.clone(), spec, vocab)
        }
        ModelSource::Config(p) => {
            let cfg = Config::load(p)?;
            let vocab = match cfg.data_source()? {
                DataSource::Chars { vocab, .. } => Some(vocab.chars),
                DataSource::Random { .. } => None,
            };
            (source.clone(), cfg.model_spec()?, vocab)
        }
    })
}
