//! YAML experiment configs: parsing with unknown keys rejected by name, validation with
//! one-line errors that name the field and the fix, and resolution of the data path and
//! the vocabulary.
//!
//! Path rule: `train.data` is resolved against the directory that holds the config file;
//! `output.dir` is resolved against the current working directory (where you launch).
//! The resolved config written to the run directory holds absolute paths.
//!
//! Invariant: a [`Config`] returned by [`Config::load`] is fully validated: its layout
//! is plannable, its data file exists and its vocabulary covers the data.

use crate::data::{CharVocab, DataSource};
use crate::error::{Error, Result};
use crate::model::{Activation, ModelSpec};
use partitioner::mesh::Mesh;
use partitioner::{
    ActivationPolicy, Arch, FfWidth, Hardware, ModelShape, PartitionMethod, PipeSchedule, Plan,
    PlanSpec, Profile, Recompute, Schedule, ScheduleKind,
};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

mod checks;
mod init_from;
mod source;
pub use source::Override;

/// A positive integer in a config; zero or negative values are rejected with the field
/// name and the fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Count(pub usize);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Count, D::Error> {
        let v = i64::deserialize(d)?;
        if v < 1 {
            return Err(de::Error::custom(format!(
                "must be a positive integer, got {v}"
            )));
        }
        Ok(Count(v as usize))
    }
}

impl std::ops::Deref for Count {
    type Target = usize;
    fn deref(&self) -> &usize {
        &self.0
    }
}

/// `model.d_ff`: one positive width for every block (`512`), or a list of one positive
/// width per block (`[512, 256, 384, 512]`, as `strata prune --method neurons` writes).
/// Its length against `model.n_layers` and its divisibility by `parallel.tp` are checked
/// with the plan ([`ModelShape::validate`], [`partitioner::tp::check_divisibility`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct FfConfig(pub FfWidth);

impl<'de> Deserialize<'de> for FfConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<FfConfig, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            L(Vec<i64>),
        }
        let bad = |v: i64| {
            de::Error::custom(format!(
                "must be a positive integer or a list of positive integers (one per block), \
                 got {v}; fix: write e.g. `d_ff: 512` or `d_ff: [512, 384, 256, 512]`"
            ))
        };
        match Raw::deserialize(d).map_err(|_| {
            de::Error::custom(
                "must be a positive integer or a list of positive integers (one per block); \
                 fix: write e.g. `d_ff: 512` or `d_ff: [512, 384, 256, 512]`",
            )
        })? {
            Raw::N(n) if n >= 1 => Ok(FfConfig(FfWidth::Uniform(n as usize))),
            Raw::N(n) => Err(bad(n)),
            Raw::L(v) => match v.iter().find(|&&x| x < 1) {
                Some(&x) => Err(bad(x)),
                None => Ok(FfConfig(FfWidth::PerLayer(
                    v.into_iter().map(|x| x as usize).collect(),
                ))),
            },
        }
    }
}

impl std::ops::Deref for FfConfig {
    type Target = FfWidth;
    fn deref(&self) -> &FfWidth {
        &self.0
    }
}

/// `model.vocab`: a number, or `auto` to use the data's character set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Vocab {
    #[default]
    Auto,
    Fixed(usize),
}

impl Serialize for Vocab {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Vocab::Auto => s.serialize_str("auto"),
            Vocab::Fixed(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Vocab {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Vocab, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) if n >= 2 => Ok(Vocab::Fixed(n as usize)),
            Raw::S(s) if s == "auto" => Ok(Vocab::Auto),
            _ => Err(de::Error::custom(
                "must be `auto` or an integer of at least 2; fix: write `vocab: auto` to take it from the data",
            )),
        }
    }
}

/// `model`: the transformer's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(default)]
    pub vocab: Vocab,
    pub seq_len: Count,
    pub d_model: Count,
    pub n_heads: Count,
    pub n_layers: Count,
    /// MLP width: one integer, or one per block ([`FfConfig`]).
    pub d_ff: FfConfig,
    /// `gpt` (GPT-2 style) or `llama` (RMSNorm, SwiGLU, rotary, grouped-query attention).
    #[serde(default)]
    pub arch: Arch,
    /// Key/value heads (grouped-query attention; default `n_heads`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_heads: Option<Count>,
    /// Use the word embedding as the LM head (logits = h Eᵀ); the first and last stages
    /// then hold the same matrix and sum its gradient every step.
    #[serde(default)]
    pub tie_embeddings: bool,
    /// GPT's MLP activation: `gelu` (erf form, the default) or `gelu_tanh` (GPT-2's
    /// `gelu_new`). LLaMA's SwiGLU always uses SiLU and takes no activation key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// LayerNorm (gpt) or RMSNorm (llama) epsilon.
    #[serde(default = "norm_eps")]
    pub norm_eps: f64,
    /// Base of the rotary position embeddings (llama).
    #[serde(default = "rope_theta")]
    pub rope_theta: f64,
    /// Start from the weights of a Hugging Face directory (`GPT2LMHeadModel` or
    /// `LlamaForCausalLM`, e.g. written by `strata export --format hf`); relative to the
    /// config's directory. See [`init_from`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

impl ModelConfig {
    /// The shape with vocabulary `vocab` (resolved by the caller).
    pub fn shape(&self, vocab: usize) -> ModelShape {
        ModelShape {
            arch: self.arch,
            vocab,
            seq_len: *self.seq_len,
            d_model: *self.d_model,
            n_heads: *self.n_heads,
            n_kv_heads: self.n_kv_heads.map_or(*self.n_heads, |c| *c),
            n_layers: *self.n_layers,
            d_ff: self.d_ff.0.clone(),
        }
    }
}

fn norm_eps() -> f64 {
    1e-5
}
fn rope_theta() -> f64 {
    10_000.0
}

/// `parallel`: the layout and the schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelConfig {
    pub pp: Count,
    #[serde(default = "one")]
    pub tp: Count,
    #[serde(default = "one")]
    pub dp: Count,
    pub microbatches: Count,
    pub micro_batch_size: Count,
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// Model chunks per rank for interleaved schedules (pp · v chunks, round-robin).
    #[serde(default = "one")]
    pub virtual_stages: Count,
    /// How layers are split over stages: uniform, parameters, flops, profile, optimal.
    #[serde(default = "default_partition")]
    pub partition: PartitionMethod,
    /// Per-device memory cap in GiB (used by `partition: optimal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_gib: Option<f64>,
    /// Layer-time profile from `strata profile` (relative to the config's directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// Device and link figures of the cost model.
    #[serde(default)]
    pub hardware: Hardware,
    /// Deadline in seconds of every blocking wait (receive, send completion, all-reduce,
    /// barrier); a wait that passes it fails the job naming the rank it waited on.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// A rank whose heartbeat has been missing this many seconds is declared stuck (a
    /// stopped or dead process) by its peers, even while they compute.
    #[serde(default = "default_heartbeat_s")]
    pub heartbeat_s: f64,
    /// Activations recomputed in the backward: `none`, `selective` (every non-matmul op
    /// of a block: norms, attention core, activation; linear outputs and residuals kept)
    /// or `full` (whole blocks from their inputs).
    #[serde(default, skip_serializing_if = "is_default")]
    pub recompute: Recompute,
    /// Megatron sequence parallelism (tp > 1): the norm and residual regions hold each tp
    /// rank's contiguous block of a microbatch's token rows (needs `seq_len % tp == 0`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub sequence_parallel: bool,
    /// Largest data-parallel gradient bucket in MiB (PyTorch DDP's `bucket_cap_mb`): each
    /// bucket's all-reduce starts as soon as its gradients are final, overlapping the rest
    /// of the backward; smaller buckets start sooner and cost more collectives.
    #[serde(default = "default_dp_bucket_mb")]
    pub dp_bucket_mb: f64,
}

fn default_dp_bucket_mb() -> f64 {
    25.0
}

fn default_timeout_s() -> f64 {
    300.0
}

fn default_heartbeat_s() -> f64 {
    10.0
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn default_partition() -> PartitionMethod {
    PartitionMethod::Flops
}

fn one() -> Count {
    Count(1)
}
fn default_schedule() -> String {
    "gpipe".into()
}

/// Learning-rate schedule after warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    Cosine,
}

/// `train.allocator`: how a rank's process keeps the memory libtorch frees (see
/// [`crate::alloc`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocatorPolicy {
    /// Freed memory stays in the heap for the next step: no page faults per step;
    /// resident memory stays at the step's high-water mark. The default where glibc is
    /// (it measured faster than `system` on most gpt-tiny layouts: README, "Memory").
    Retain,
    /// Blocks of 256 KiB or more go back to the system when freed: resident memory
    /// follows the live tensors; every step faults its activations' pages in again.
    Release,
    /// glibc's defaults and any `MALLOC_*` environment variables; the default of a
    /// build without glibc, where the other two do not exist.
    System,
}

impl Default for AllocatorPolicy {
    fn default() -> AllocatorPolicy {
        if crate::alloc::unsupported(AllocatorPolicy::Retain).is_none() {
            AllocatorPolicy::Retain
        } else {
            AllocatorPolicy::System
        }
    }
}

/// `train`: optimisation and data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub steps: Count,
    pub lr: f64,
    #[serde(default)]
    pub seed: u64,
    /// Path to a text file (character-level), or `random` for seeded random tokens.
    pub data: String,
    /// Evaluate every this many steps (and at the first and last step); 0 disables.
    #[serde(default)]
    pub eval_every: usize,
    /// Validation microbatches per evaluation (default: `parallel.microbatches`).
    #[serde(default)]
    pub eval_microbatches: Option<Count>,
    #[serde(default)]
    pub warmup_steps: usize,
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Floor of the cosine schedule (default lr / 10).
    #[serde(default)]
    pub min_lr: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "beta1")]
    pub beta1: f64,
    #[serde(default = "beta2")]
    pub beta2: f64,
    /// Clip the global gradient norm to this value (none by default).
    #[serde(default)]
    pub grad_clip: Option<f64>,
    /// libtorch intra-op threads per rank.
    #[serde(default = "one")]
    pub threads: Count,
    /// How each rank's process keeps the memory libtorch frees: `retain` (default:
    /// reused by the next step without page faults; resident memory stays at the step's
    /// high-water mark), `release` (returned to the system, so resident memory follows
    /// the live tensors as `strata plan` counts them, at the cost of faulting pages in
    /// every step) or `system` (glibc's defaults and `MALLOC_*` variables). Applied by
    /// the worker and `strata profile` at start.
    #[serde(default)]
    pub allocator: AllocatorPolicy,
    /// Print a progress line every this many steps.
    #[serde(default = "ten")]
    pub log_every: Count,
    /// Continue from a checkpoint: `latest` (the newest under `checkpoint.dir`; none
    /// there starts fresh) or the path of a checkpoint directory or root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.95
}
fn ten() -> Count {
    Count(10)
}

/// `output`: where the run directory goes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub dir: String,
    /// Steps recorded in trace.json (from step 2 on; 0 disables the trace).
    #[serde(default = "three")]
    pub trace_steps: usize,
}

fn three() -> usize {
    3
}

/// `checkpoint`: where and how often the run saves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Checkpoint root (default `<output.dir>/checkpoints`; relative to the working
    /// directory, like `output.dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Save every this many steps, and always after the last step; 0 saves only after the
    /// last step.
    #[serde(default)]
    pub every: usize,
    /// Keep the newest this many checkpoints (0 keeps all).
    #[serde(default)]
    pub keep: usize,
    /// Save at all (`false`: never, e.g. for benchmarks).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            dir: None,
            every: 0,
            keep: 0,
            enabled: true,
        }
    }
}

/// A whole experiment file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    pub parallel: ParallelConfig,
    pub train: TrainConfig,
    pub output: OutputConfig,
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Where the config was read from (not a YAML key).
    #[serde(skip)]
    pub source: PathBuf,
    /// The character vocabulary of `model.init_from` (its `vocab.json`), which then
    /// numbers the data's tokens (not a YAML key).
    #[serde(skip)]
    pub init_vocab: Option<CharVocab>,
}

/// Schedules the engine can run today.
pub const SUPPORTED_SCHEDULES: &[&str] = &["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"];
/// Message tags encode the microbatch in 10 bits and the virtual stage in 2.
pub const MAX_MICROBATCHES: usize = 1024;
pub const MAX_VIRTUAL_STAGES: usize = 4;

impl Config {
    /// Reads, parses, validates and resolves a config file.
    pub fn load(path: &Path) -> Result<Config> {
        Self::load_with(path, &[])
    }

    /// Like [`Config::load`], with `--set KEY=VALUE` overrides applied to the YAML tree
    /// before parsing (so they meet the same checks as the file).
    pub fn load_with(path: &Path, overrides: &[Override]) -> Result<Config> {
        Self::parse_with(&source::read(path)?, path, overrides)
    }

    /// Parses and validates YAML `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config> {
        Self::parse_with(text, path, &[])
    }

    /// Parses YAML `text` (unknown keys and bad types rejected) without validation.
    pub(crate) fn parse_unchecked(text: &str, path: &Path) -> Result<Config> {
        Self::deserialize(text, path, &[])
    }

    /// Deserialises `text` with `overrides` applied, then adopts what `model.init_from`
    /// supplies for the keys that neither the file nor an override wrote.
    fn deserialize(text: &str, path: &Path, overrides: &[Override]) -> Result<Config> {
        let mut cfg = source::deserialize(text, path, overrides)?;
        init_from::adopt(&mut cfg, text, overrides)?;
        Ok(cfg)
    }

    /// Like [`Config::parse`], with overrides.
    pub fn parse_with(text: &str, path: &Path, overrides: &[Override]) -> Result<Config> {
        let cfg = Self::deserialize(text, path, overrides)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub(crate) fn field_error(&self, field: &str, problem: String, fix: String) -> Error {
        Error::Config {
            path: self.source.display().to_string(),
            field: field.into(),
            problem,
            fix,
        }
    }

    fn validate(&self) -> Result<()> {
        self.check_model_constants()?;
        init_from::check_vocab(self)?;
        self.check_engine_support()?;
        let p = &self.parallel;
        if ScheduleKind::from_name(&p.schedule).is_none_or(|k| k == ScheduleKind::ForwardOnly) {
            return Err(self.field_error(
                "parallel.schedule",
                format!("unknown schedule `{}`", p.schedule),
                format!("use one of: {}", SUPPORTED_SCHEDULES.join(", ")),
            ));
        }
        if *p.microbatches > MAX_MICROBATCHES {
            return Err(self.field_error(
                "parallel.microbatches",
                format!(
                    "{} is more than the supported {MAX_MICROBATCHES}",
                    *p.microbatches
                ),
                format!("use at most {MAX_MICROBATCHES} microbatches per step"),
            ));
        }
        if *p.virtual_stages > MAX_VIRTUAL_STAGES {
            return Err(self.field_error(
                "parallel.virtual_stages",
                format!(
                    "{} is more than the supported {MAX_VIRTUAL_STAGES}",
                    *p.virtual_stages
                ),
                format!("use at most {MAX_VIRTUAL_STAGES} virtual stages per rank"),
            ));
        }
        self.check_watchdog()?;
        // The schedule must build (and so be deadlock-free) for this layout.
        self.schedule().map_err(|e| Error::Plan {
            path: self.source.display().to_string(),
            source: e,
        })?;
        let t = &self.train;
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(self.field_error(
                "train.lr",
                format!("must be a positive number, got {}", t.lr),
                "set e.g. train.lr: 1.0e-3".into(),
            ));
        }
        for (field, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(self.field_error(
                    field,
                    format!("must be in [0, 1), got {v}"),
                    format!("set e.g. {field}: 0.9"),
                ));
            }
        }
        if let Some(problem) = crate::alloc::unsupported(t.allocator) {
            return Err(self.field_error(
                "train.allocator",
                problem,
                "set train.allocator: system".into(),
            ));
        }
        if !(t.weight_decay.is_finite() && t.weight_decay >= 0.0) {
            return Err(self.field_error(
                "train.weight_decay",
                format!("must be ≥ 0, got {}", t.weight_decay),
                "set e.g. train.weight_decay: 0.1".into(),
            ));
        }
        if let Some(c) = t.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(self.field_error(
                    "train.grad_clip",
                    format!("must be positive, got {c}"),
                    "set e.g. train.grad_clip: 1.0, or remove the key".into(),
                ));
            }
        }
        if let Some(m) = t.min_lr {
            if !(m.is_finite() && m >= 0.0 && m <= t.lr) {
                return Err(self.field_error(
                    "train.min_lr",
                    format!("must be in [0, train.lr = {}], got {m}", t.lr),
                    "lower train.min_lr or remove it".into(),
                ));
            }
        }
        if self.output.dir.trim().is_empty() {
            return Err(self.field_error(
                "output.dir",
                "is empty".into(),
                "set output.dir: runs/<name>".into(),
            ));
        }
        self.check_output_dir()?;
        // Data, vocabulary and the plan.
        let source = self.data_source()?;
        self.check_split_windows(&source)?;
        let shape = self.shape_with(&source)?;
        self.plan_for(&shape)?;
        self.check_checkpoint_keys()?;
        self.check_resume(&source, &shape)?;
        init_from::check(self)
    }

    /// The directory of `model.init_from`, resolved against the config's directory.
    pub fn init_from_dir(&self) -> Option<PathBuf> {
        Some(self.beside_config(self.model.init_from.as_ref()?))
    }

    /// Checks the architecture constants (`activation`, `norm_eps`, `rope_theta`).
    fn check_model_constants(&self) -> Result<()> {
        let m = &self.model;
        if !(m.norm_eps.is_finite() && m.norm_eps > 0.0) {
            return Err(self.field_error(
                "model.norm_eps",
                format!("must be a positive number, got {}", m.norm_eps),
                "set e.g. model.norm_eps: 1.0e-5".into(),
            ));
        }
        if !(m.rope_theta.is_finite() && m.rope_theta > 1.0) {
            return Err(self.field_error(
                "model.rope_theta",
                format!("must be a number above 1, got {}", m.rope_theta),
                "set e.g. model.rope_theta: 10000".into(),
            ));
        }
        if m.arch == Arch::Llama && m.activation.is_some() {
            return Err(self.field_error(
                "model.activation",
                "llama blocks use SwiGLU (SiLU-gated); the activation key applies to gpt only"
                    .into(),
                "remove model.activation, or set model.arch: gpt".into(),
            ));
        }
        Ok(())
    }

    /// Everything that fixes the model's numbers (shape, constants, dtype, device).
    pub fn model_spec(&self) -> Result<ModelSpec> {
        let m = &self.model;
        Ok(ModelSpec {
            tie_embeddings: m.tie_embeddings,
            activation: m.activation.unwrap_or_default(),
            norm_eps: m.norm_eps,
            rope_theta: m.rope_theta,
            ..ModelSpec::new(self.shape()?)
        })
    }

    /// Checks `parallel.timeout_s`, `parallel.heartbeat_s` and `parallel.dp_bucket_mb`.
    fn check_watchdog(&self) -> Result<()> {
        let p = &self.parallel;
        let mb = p.dp_bucket_mb;
        if !(mb.is_finite() && (1e-3..=2048.0).contains(&mb)) {
            return Err(self.field_error(
                "parallel.dp_bucket_mb",
                format!("must be a size in MiB in [0.001, 2048], got {mb}"),
                "set e.g. parallel.dp_bucket_mb: 25 (the default)".into(),
            ));
        }
        for (field, v, example) in [
            ("parallel.timeout_s", p.timeout_s, "300"),
            ("parallel.heartbeat_s", p.heartbeat_s, "10"),
        ] {
            // At least a millisecond, and no more than a year (Duration-safe).
            if !(v.is_finite() && (1e-3..=3.2e7).contains(&v)) {
                return Err(self.field_error(
                    field,
                    format!("must be a number of seconds in [0.001, 3.2e7], got {v}"),
                    format!("set e.g. {field}: {example}"),
                ));
            }
        }
        Ok(())
    }

    /// The data-parallel gradient bucket cap in bytes (validated by [`Config::load`]).
    pub fn dp_bucket_bytes(&self) -> usize {
        ((self.parallel.dp_bucket_mb * (1 << 20) as f64) as usize).max(4)
    }

    /// The watchdog's deadlines (validated by [`Config::load`]).
    pub fn watchdog(&self) -> crate::watchdog::Deadlines {
        crate::watchdog::Deadlines {
            timeout: std::time::Duration::from_secs_f64(self.parallel.timeout_s),
            heartbeat: std::time::Duration::from_secs_f64(self.parallel.heartbeat_s),
        }
    }

    /// The schedule family named by `parallel.schedule`.
    pub fn schedule_kind(&self) -> ScheduleKind {
        ScheduleKind::from_name(&self.parallel.schedule).unwrap_or(ScheduleKind::Gpipe)
    }

    /// The validated (unlowered) training schedule of this config.
    pub fn schedule(&self) -> std::result::Result<Schedule, partitioner::Error> {
        let p = &self.parallel;
        Schedule::build_virtual(
            self.schedule_kind(),
            *p.pp,
            *p.virtual_stages,
            *p.microbatches,
        )
    }

    /// The device mesh of this layout (validated: every degree is positive).
    pub fn mesh(&self) -> Result<Mesh> {
        let p = &self.parallel;
        Mesh::new(*p.pp, *p.tp, *p.dp).map_err(self.plan_err())
    }

    /// Checks that a job of `world` ranks fits this layout (pp · tp · dp = world).
    pub fn check_world(&self, world: usize) -> Result<()> {
        self.mesh()?.validate_world(world).map_err(self.plan_err())
    }

    /// World size: pp · tp · dp.
    pub fn world_size(&self) -> usize {
        *self.parallel.pp * *self.parallel.tp * *self.parallel.dp
    }

    /// Absolute path of the data file (None for `random`).
    pub fn data_path(&self) -> Option<PathBuf> {
        if self.train.data == "random" {
            return None;
        }
        Some(self.beside_config(&self.train.data))
    }

    /// `path` made absolute, resolving a relative one against the config's directory.
    fn beside_config(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            return p.to_path_buf();
        }
        let base = self
            .source
            .parent()
            .filter(|b| !b.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let joined = base.join(p);
        std::path::absolute(&joined).unwrap_or(joined)
    }

    /// Where the data comes from; checks that the file exists and is usable.
    pub fn data_source(&self) -> Result<DataSource> {
        match self.data_path() {
            None => match self.model.vocab {
                Vocab::Fixed(v) => Ok(DataSource::Random { vocab: v }),
                Vocab::Auto => Err(self.field_error(
                    "model.vocab",
                    "`auto` needs a text file, but train.data is `random`".into(),
                    "set model.vocab to a number (e.g. 64) for random tokens".into(),
                )),
            },
            Some(path) => {
                if path.is_dir() {
                    return Err(self.field_error(
                        "train.data",
                        format!("{} is a directory, not a text file", path.display()),
                        "point train.data at a text file inside it, or use `random`".into(),
                    ));
                }
                if !path.is_file() {
                    return Err(self.field_error(
                        "train.data",
                        format!("file not found: {} (relative paths resolve against the config's directory)", path.display()),
                        "point train.data at an existing text file, or use `random`".into(),
                    ));
                }
                let vocab = match &self.init_vocab {
                    Some(v) => init_from::covering_vocab(self, v, &path)?,
                    None => CharVocab::from_file(&path)?,
                };
                Ok(DataSource::Chars { path, vocab })
            }
        }
    }

    fn shape_with(&self, source: &DataSource) -> Result<ModelShape> {
        let vocab = match (self.model.vocab, source) {
            (Vocab::Fixed(v), DataSource::Chars { vocab, .. }) if v < vocab.chars.len() => {
                return Err(self.field_error(
                    "model.vocab",
                    format!(
                        "{v} is smaller than the {} distinct characters in the data",
                        vocab.chars.len()
                    ),
                    format!("set model.vocab: auto, or at least {}", vocab.chars.len()),
                ))
            }
            (Vocab::Fixed(v), _) => v,
            (Vocab::Auto, DataSource::Chars { vocab, .. }) => vocab.chars.len(),
            (Vocab::Auto, DataSource::Random { vocab }) => *vocab,
        };
        Ok(self.model.shape(vocab))
    }

    /// The model shape, with `vocab: auto` resolved from the data.
    pub fn shape(&self) -> Result<ModelShape> {
        self.shape_with(&self.data_source()?)
    }

    /// The pipeline plan for this config: `pp · virtual_stages` stages (chunks) in model
    /// order, chunk `c` on pipeline rank `c % pp`.
    pub fn plan(&self) -> Result<Plan> {
        self.plan_for(&self.shape()?)
    }

    fn plan_err(&self) -> impl Fn(partitioner::Error) -> Error + '_ {
        move |source| Error::Plan {
            path: self.source.display().to_string(),
            source,
        }
    }

    /// Absolute path of `parallel.profile` (relative paths resolve against the config's
    /// directory, like `train.data`).
    pub fn profile_path(&self) -> Option<PathBuf> {
        Some(self.beside_config(self.parallel.profile.as_ref()?))
    }

    /// `parallel.recompute` and `parallel.sequence_parallel`, checked: sequence
    /// parallelism splits tensor-parallel regions, so it needs `tp > 1`.
    pub fn activation_policy(&self) -> Result<ActivationPolicy> {
        let p = &self.parallel;
        if p.sequence_parallel && *p.tp == 1 {
            return Err(self.field_error(
                "parallel.sequence_parallel",
                "needs tensor parallelism (it splits the tp group's norm and dropout regions \
                 along the sequence), but parallel.tp = 1"
                    .into(),
                "set parallel.tp to 2 or more, or remove parallel.sequence_parallel".into(),
            ));
        }
        let seq_len = *self.model.seq_len;
        if p.sequence_parallel && !seq_len.is_multiple_of(*p.tp) {
            return Err(self.field_error(
                "model.seq_len",
                format!(
                    "{seq_len} is not divisible by parallel.tp = {} with \
                     parallel.sequence_parallel: each microbatch's token rows are split into \
                     tp equal blocks of shape [micro_batch_size, seq_len/tp, d_model]",
                    *p.tp
                ),
                "set model.seq_len to a multiple of parallel.tp, or remove \
                 parallel.sequence_parallel"
                    .into(),
            ));
        }
        Ok(ActivationPolicy {
            recompute: p.recompute,
            sequence_parallel: p.sequence_parallel,
        })
    }

    /// The partitioner's inputs for this config and a resolved `shape`.
    pub fn plan_spec(&self, shape: &ModelShape) -> Result<PlanSpec> {
        let p = &self.parallel;
        let policy = self.activation_policy()?;
        let schedule = PipeSchedule::parse(&p.schedule).map_err(self.plan_err())?;
        let memory_cap_bytes = match p.memory_gib {
            None => None,
            Some(g) if g.is_finite() && g > 0.0 => Some((g * (1u64 << 30) as f64) as u64),
            Some(g) => {
                return Err(self.field_error(
                    "parallel.memory_gib",
                    format!("must be a positive number of GiB, got {g}"),
                    "set e.g. parallel.memory_gib: 80, or remove the key".into(),
                ))
            }
        };
        let profile = match self.profile_path() {
            None => None,
            Some(path) => {
                let prof = Profile::load(&path).map_err(self.plan_err())?;
                prof.check(&path.display().to_string(), shape, *p.micro_batch_size)
                    .map_err(self.plan_err())?;
                Some(prof)
            }
        };
        Ok(PlanSpec {
            shape: shape.clone(),
            pp: *p.pp,
            tp: *p.tp,
            dp: *p.dp,
            virtual_stages: *p.virtual_stages,
            microbatches: *p.microbatches,
            micro_batch_size: *p.micro_batch_size,
            dtype_bytes: 4,
            schedule,
            method: p.partition,
            memory_cap_bytes,
            hardware: p.hardware,
            profile,
            policy,
            data_bytes: self.data_source()?.resident_bytes(),
            dp_bucket_bytes: self.dp_bucket_bytes() as u64,
        })
    }

    fn plan_for(&self, shape: &ModelShape) -> Result<Plan> {
        Plan::build(&self.plan_spec(shape)?).map_err(self.plan_err())
    }

    /// Refuses what the partitioner can plan but the engine cannot run yet.
    fn check_engine_support(&self) -> Result<()> {
        self.activation_policy().map(drop)
    }

    /// Reads and checks a config for planning only (`strata plan`, `strata profile`):
    /// the model, parallel layout and data are validated, but not what only the engine
    /// needs (architecture support, tp/dp support, optimizer settings, output directory).
    pub fn load_for_plan(path: &Path, overrides: &[Override]) -> Result<Config> {
        Self::parse_for_plan(&source::read(path)?, path, overrides)
    }

    /// Reads a config for `strata profile`: keys and types are checked and the model
    /// shape (data, vocabulary) resolved, but no plan is built, since the profile that
    /// `parallel.profile` names may not exist yet.
    pub fn load_for_profile(path: &Path, overrides: &[Override]) -> Result<Config> {
        let cfg = Self::deserialize(&source::read(path)?, path, overrides)?;
        cfg.shape()?.validate().map_err(cfg.plan_err())?;
        Ok(cfg)
    }

    /// Like [`Config::parse`], checking only what planning needs.
    pub fn parse_for_plan(text: &str, path: &Path, overrides: &[Override]) -> Result<Config> {
        let cfg = Self::deserialize(text, path, overrides)?;
        cfg.plan()?;
        Ok(cfg)
    }

    /// The output directory, resolved against the current working directory.
    pub fn output_dir(&self) -> PathBuf {
        let p = PathBuf::from(&self.output.dir);
        std::path::absolute(&p).unwrap_or(p)
    }

    /// The config with absolute paths and the resolved vocabulary, as YAML.
    pub fn resolved_yaml(&self) -> Result<String> {
        let mut c = self.clone();
        if let Some(p) = self.data_path() {
            c.train.data = p.display().to_string();
        }
        c.output.dir = self.output_dir().display().to_string();
        if let Some(dir) = self.init_from_dir() {
            c.model.init_from = Some(dir.display().to_string());
        }
        c.model.vocab = Vocab::Fixed(self.shape()?.vocab);
        serde_yaml::to_string(&c).map_err(|e| Error::Internal(format!("serialising config: {e}")))
    }

    /// Tokens processed per optimizer step (over all data-parallel replicas).
    pub fn tokens_per_step(&self) -> usize {
        let p = &self.parallel;
        *p.dp * *p.microbatches * *p.micro_batch_size * *self.model.seq_len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "
model: {vocab: 32, seq_len: 8, d_model: 16, n_heads: 2, n_layers: 4, d_ff: 32}
parallel: {pp: 2, microbatches: 4, micro_batch_size: 2}
train: {steps: 3, lr: 1.0e-3, seed: 1, data: random}
output: {dir: /tmp/strata-test}
";

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("x.yaml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn overrides_apply_before_validation_and_are_recorded() {
        let sets: Vec<Override> = ["train.steps=100", "parallel.pp=4", "train.data=random"]
            .iter()
            .map(|s| Override::parse(s).unwrap())
            .collect();
        let c = Config::parse_with(GOOD, Path::new("x.yaml"), &sets).unwrap();
        assert_eq!((*c.train.steps, *c.parallel.pp), (100, 4));
        let yaml = c.resolved_yaml().unwrap();
        assert!(
            yaml.contains("steps: 100") && yaml.contains("pp: 4"),
            "{yaml}"
        );
        // The same checks and messages as the file, naming the --set.
        let bad = [Override::parse("parallel.pp=5").unwrap()];
        let e = Config::parse_with(GOOD, Path::new("x.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("parallel.pp = 5"), "{e}");
        let bad = [Override::parse("train.lr=fast").unwrap()];
        let e = Config::parse_with(GOOD, Path::new("x.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.lr: invalid type") && e.contains("(from --set train.lr=fast)"),
            "{e}"
        );
    }

    #[test]
    fn good_config_parses() {
        let c = Config::parse(GOOD, Path::new("x.yaml")).unwrap();
        assert_eq!(c.world_size(), 2);
        assert_eq!(c.shape().unwrap().vocab, 32);
        assert_eq!(c.plan().unwrap().stages.len(), 2);
    }

    #[test]
    fn errors_name_field_and_fix() {
        let e = err(&GOOD.replace("d_ff: 32", "d_ff: 32, dff: 3"));
        assert!(
            e.contains("model.dff") || e.contains("model: unknown field `dff`"),
            "{e}"
        );
        assert!(e.contains("fix:"), "{e}");
        let e = err(&GOOD.replace("microbatches: 4", "microbatches: 0"));
        assert!(
            e.contains("parallel.microbatches") && e.contains("positive"),
            "{e}"
        );
        let e = err(&GOOD.replace("pp: 2", "pp: 5"));
        assert!(
            e.contains("parallel.pp = 5") && e.contains("model.n_layers = 4"),
            "{e}"
        );
        let e = err(&GOOD.replace("data: random", "data: nope.txt"));
        assert!(e.contains("train.data") && e.contains("not found"), "{e}");
        let e = err(&GOOD.replace("pp: 2,", "pp: 2, tp: 3,"));
        assert!(
            e.contains("parallel.tp = 3: exceeds model.n_heads = 2") && e.contains("fix:"),
            "{e}"
        );
        let e = err("model: {seq_len: 1\n");
        assert!(e.contains("YAML syntax error at line"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn partitioner_keys_plan_and_llama_constants_are_checked() {
        let llama = GOOD.replace("d_ff: 32}", "d_ff: 32, arch: llama, n_kv_heads: 1}");
        let c = Config::parse(&llama, Path::new("x.yaml")).unwrap();
        assert_eq!(c.plan().unwrap().model.n_kv_heads, 1);
        let e = err(&llama.replace("n_kv_heads: 1}", "n_kv_heads: 1, activation: gelu_tanh}"));
        assert!(e.contains("model.activation") && e.contains("fix:"), "{e}");
        let e = err(&llama.replace("n_kv_heads: 1}", "n_kv_heads: 1, rope_theta: 0}"));
        assert!(e.contains("model.rope_theta") && e.contains("fix:"), "{e}");
        let e = err(&GOOD.replace("d_ff: 32}", "d_ff: 32, norm_eps: -1}"));
        assert!(e.contains("model.norm_eps") && e.contains("fix:"), "{e}");
        let e = err(&GOOD.replace("d_ff: 32}", "d_ff: 32, activation: relu}"));
        assert!(
            e.contains("model.activation") && e.contains("unknown variant"),
            "{e}"
        );
        let e = err(&llama.replace("pp: 2,", "pp: 2, tp: 2,"));
        assert!(
            e.contains("model.n_kv_heads = 1") && e.contains("parallel.tp = 2"),
            "{e}"
        );
        let e = err(&GOOD.replace("d_ff: 32}", "d_ff: 32, n_kv_heads: 1}"));
        assert!(e.contains("model.n_kv_heads = 1"), "{e}");
        let opt = GOOD.replace(
            "micro_batch_size: 2}",
            "micro_batch_size: 2, partition: optimal, memory_gib: 0.000001}",
        );
        let e = err(&opt);
        assert!(
            e.contains("parallel.memory_gib") && e.contains("needs at least") && e.contains("fix:"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "micro_batch_size: 2}",
            "micro_batch_size: 2, partition: greedy}",
        ));
        assert!(
            e.contains("parallel.partition") && e.contains("unknown variant"),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "micro_batch_size: 2}",
            "micro_batch_size: 2, hardware: {tflops: 3}}",
        ));
        assert!(
            e.contains("parallel.hardware") && e.contains("tflops"),
            "{e}"
        );
        let ok = GOOD.replace(
            "micro_batch_size: 2}",
            "micro_batch_size: 2, schedule: 1f1b, partition: uniform, hardware: {device_tflops: 50}}",
        );
        let plan = Config::parse(&ok, Path::new("x.yaml"))
            .unwrap()
            .plan()
            .unwrap();
        assert_eq!(
            (plan.method.as_str(), plan.schedule.as_str()),
            ("uniform", "1f1b")
        );
    }
}
