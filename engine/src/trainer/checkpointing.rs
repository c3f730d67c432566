//! Training state in and out of [`crate::checkpoint`]: what a rank saves at a step
//! boundary (its owned parameters and their AdamW moments, plus the state that makes the
//! next step identical), and how a run on any layout resumes from it.
//!
//! Tensor names: a parameter's global name (`block.3.attn.qkv.weight`), and its moments
//! `optim.exp_avg.<name>` and `optim.exp_avg_sq.<name>`, each with the parameter's
//! [`ShardSpec`](crate::shard::ShardSpec). Nothing else is needed to continue bit for bit:
//! the learning rate is a function of the step, every batch a function of (seed, split,
//! step, row), and initial weights a function of (seed, layer, name) — there is no
//! stateful RNG; [`TrainState`] records these positions.
//!
//! Invariants: only owners write (data-parallel replica 0, the parameter's tp owner; tied
//! copies never), so every element is written exactly once; every rank, owner or not,
//! reads every one of its parameters and moments, so replicas resume identical.

use super::setup::RankState;
use crate::checkpoint::{
    self, checkpoint_error, Checkpoint, Layout, SaveFault, SaveMeta, SaveOptions, SavedTensor,
    RESUME_LATEST,
};
use crate::comm::groups::ParallelComms;
use crate::comm::ReduceOp;
use crate::config::Config;
use crate::data::DataSource;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;

/// Prefix of a parameter's first AdamW moment.
pub const EXP_AVG: &str = "optim.exp_avg.";
/// Prefix of a parameter's second AdamW moment.
pub const EXP_AVG_SQ: &str = "optim.exp_avg_sq.";

/// The trainer's part of a manifest (`train_state`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps completed; the next step is `step + 1`.
    pub step: usize,
    /// AdamW's update count (the exponent of its bias corrections).
    pub optimizer_steps: i32,
    /// The learning rate of the next step (the schedule is a function of the step).
    pub next_lr: f64,
    /// Batches are a pure function of (seed, split, step, row): the data position is the
    /// next step.
    pub next_data_step: usize,
    /// Seed of the keyed RNG streams (initial weights, random data, batch sampling); no
    /// stream carries state between steps.
    pub seed: u64,
    /// Tokens trained on so far.
    pub tokens: u64,
}

/// Saves this run's checkpoints: what is the same at every save, computed once.
pub struct Checkpointer {
    root: PathBuf,
    every: usize,
    enabled: bool,
    /// False when the run writes no files at all (`RunOptions::write_outputs`).
    writes: bool,
    keep: usize,
    meta: SaveMeta,
    /// Step at which this rank dies mid-save (fault injection).
    fault: Option<(usize, SaveFault)>,
}

impl Checkpointer {
    pub fn new(
        cfg: &Config,
        rank: &RankState,
        writes: bool,
        fault: Option<(usize, SaveFault)>,
    ) -> Result<Self> {
        let p = &cfg.parallel;
        let vocab = match cfg.data_source()? {
            DataSource::Chars { vocab, .. } => Some(vocab.chars),
            DataSource::Random { .. } => None,
        };
        let meta = SaveMeta {
            step: 0,
            config: cfg.resolved_yaml()?,
            vocab,
            plan: serde_json::to_value(&rank.plan).map_err(|e| Error::Internal(e.to_string()))?,
            layout: Layout {
                pp: *p.pp,
                tp: *p.tp,
                dp: *p.dp,
                virtual_stages: *p.virtual_stages,
                schedule: p.schedule.clone(),
            },
            train_state: serde_json::Value::Null,
            extra: BTreeMap::new(),
        };
        Ok(Checkpointer {
            root: cfg.checkpoint_dir(),
            every: cfg.checkpoint.every,
            enabled: cfg.checkpoint.enabled,
            writes,
            keep: cfg.checkpoint.keep,
            meta,
            fault,
        })
    }

    /// Whether to save at the end of `step` (of `steps`): a scheduled save, or the run
    /// stops there (preemption), unless the run writes no files.
    pub fn due(&self, step: usize, steps: usize, stopping: bool) -> bool {
        let scheduled =
            self.enabled && (step == steps || (self.every > 0 && step.is_multiple_of(self.every)));
        self.writes && (scheduled || stopping)
    }

    /// Saves the state after `step` now (every rank calls it at the same step boundary;
    /// also what a preemption handler calls). Returns the checkpoint directory and a line
    /// for rank 0 to print.
    pub fn save(
        &self,
        cfg: &Config,
        rank: &RankState,
        comms: &mut ParallelComms,
        step: usize,
    ) -> Result<(PathBuf, String)> {
        let t0 = Instant::now();
        let sampler = RssSampler::start();
        let tensors = if comms.coord.dp == 0 {
            let mut t = owned_tensors(rank)?;
            t.extend(rank.masks.saved(&rank.params));
            t
        } else {
            Vec::new()
        };
        let state = TrainState {
            step,
            optimizer_steps: rank.optim.steps_taken(),
            next_lr: super::lr_at(cfg, step + 1),
            next_data_step: step + 1,
            seed: cfg.train.seed,
            tokens: (step * cfg.tokens_per_step()) as u64,
        };
        let mut meta = self.meta.clone();
        meta.step = step;
        meta.extra.extend(rank.masks.extra());
        meta.train_state =
            serde_json::to_value(&state).map_err(|e| Error::Internal(e.to_string()))?;
        let opts = SaveOptions {
            keep: self.keep,
            fault: self.fault.filter(|f| f.0 == step).map(|f| f.1),
        };
        let dir = checkpoint::save(&self.root, &meta, &tensors, comms.world.as_mut(), &opts)?;
        drop(tensors);
        // The slowest rank's time and the largest extra memory of any rank.
        let mut worst = [t0.elapsed().as_secs_f32(), sampler.stop_mib()];
        comms.world.all_reduce_f32(&mut worst, ReduceOp::Max)?;
        let bytes = dir_bytes(&dir);
        let line = format!(
            "strata: saved checkpoint {} ({}, {:.2} s, {:.0} MB/s; peak extra memory {:.1} MiB per rank)",
            dir.display(),
            checkpoint::human_bytes(bytes),
            worst[0],
            bytes as f64 / 1e6 / worst[0].max(1e-9) as f64,
            worst[1]
        );
        Ok((dir, line))
    }
}

/// The AdamW moments of every parameter, parallel to `rank.params`, shaped like the
/// parameter (views into the optimizer's flat state: filled in place when resuming).
fn param_moments(rank: &RankState) -> Result<Vec<(Tensor, Tensor)>> {
    let mut out: Vec<Option<(Tensor, Tensor)>> = rank.params.iter().map(|_| None).collect();
    for (g, group) in rank.flat.groups.iter().enumerate() {
        for (i, member) in group.members.iter().enumerate() {
            let (m, v) = rank.optim.moments_of(&rank.flat, g, i)?;
            let p = &rank.params[member.param];
            let shape = p.tensor.size();
            let view = |t: Tensor| {
                t.f_view(shape.as_slice())
                    .map_err(Error::torch(format!("optimizer state of {}", p.name)))
            };
            out[member.param] = Some((view(m)?, view(v)?));
        }
    }
    out.into_iter()
        .zip(&rank.params)
        .map(|(m, p)| m.ok_or_else(|| Error::Internal(format!("{} is in no flat buffer", p.name))))
        .collect()
}

/// Bytes of the files directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Resident memory of this process in KiB (Linux; 0 elsewhere).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// Samples this process's resident memory every 2 ms while a save runs, to report the
/// save's peak extra memory (the store promises one bounded temporary, never a second
/// copy of the model).
struct RssSampler {
    base: u64,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let base = rss_kib();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = base;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib());
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak.max(rss_kib())
        });
        RssSampler { base, stop, thread }
    }

    /// Peak minus the resident memory at the start, in MiB.
    fn stop_mib(self) -> f32 {
        self.stop.store(true, Ordering::Relaxed);
        let peak = self.thread.join().unwrap_or(self.base);
        peak.saturating_sub(self.base) as f32 / 1024.0
    }
}

/// This rank's owned parameters and their moments, named for the checkpoint.
fn owned_tensors(rank: &RankState) -> Result<Vec<SavedTensor>> {
    let mut out = Vec::new();
    for (p, (m, v)) in rank.params.iter().zip(param_moments(rank)?) {
        if !p.owner {
            continue;
        }
        for (name, t) in [
            (p.name.clone(), &p.tensor),
            (format!("{EXP_AVG}{}", p.name), &m),
            (format!("{EXP_AVG_SQ}{}", p.name), &v),
        ] {
            out.push(SavedTensor {
                name,
                tensor: t.detach(),
                spec: p.spec.clone(),
            });
        }
    }
    Ok(out)
}

/// Loads `train.resume` into this rank's parameters and optimizer, if set; returns the
/// step the checkpoint was taken after (0: start fresh) and a line for rank 0 to print.
pub fn resume(
    cfg: &Config,
    rank: &mut RankState,
    comms: &mut ParallelComms,
) -> Result<(usize, Option<String>)> {
    let Some(dir) = cfg.resume_from()? else {
        let line = (cfg.train.resume.as_deref() == Some(RESUME_LATEST)).then(|| {
            format!(
                "strata: train.resume: latest: no checkpoint in {} yet; starting fresh",
                cfg.checkpoint_dir().display()
            )
        });
        return Ok((0, line));
    };
    let t0 = Instant::now();
    let mut ck = Checkpoint::open(&dir)?;
    let state = train_state(&ck)?;
    for (p, (m, v)) in rank.params.iter().zip(param_moments(rank)?) {
        ck.read_into(&p.name, &p.tensor, &p.spec)?;
        ck.read_into(&format!("{EXP_AVG}{}", p.name), &m, &p.spec)?;
        ck.read_into(&format!("{EXP_AVG_SQ}{}", p.name), &v, &p.spec)?;
    }
    rank.optim.set_steps_taken(state.optimizer_steps);
    let mut slowest = [t0.elapsed().as_secs_f32()];
    comms.world.all_reduce_f32(&mut slowest, ReduceOp::Max)?;
    let bytes = ck.manifest().total_bytes();
    let l = &ck.manifest().layout;
    let line = format!(
        "strata: resumed from {} at step {} (saved at pp {}, tp {}, dp {}, v {}, {}; {} loaded in {:.2} s, {:.0} MB/s)",
        ck.dir().display(),
        state.step,
        l.pp,
        l.tp,
        l.dp,
        l.virtual_stages,
        l.schedule,
        checkpoint::human_bytes(bytes),
        slowest[0],
        bytes as f64 / 1e6 / slowest[0].max(1e-9) as f64
    );
    Ok((state.step, Some(line)))
}

/// The trainer state of an open checkpoint.
fn train_state(ck: &Checkpoint) -> Result<TrainState> {
    let state: TrainState =
        serde_json::from_value(ck.manifest().train_state.clone()).map_err(|e| {
            checkpoint_error(
                &ck.dir().join(checkpoint::MANIFEST),
                "",
                format!("train_state does not parse: {e}"),
                "resume from a checkpoint that a Strata training run wrote",
            )
        })?;
    if state.step != ck.manifest().step {
        return Err(checkpoint_error(
            ck.dir(),
            "",
            format!(
                "train_state.step = {} but the manifest's step = {}",
                state.step,
                ck.manifest().step
            ),
            "the checkpoint is damaged: resume from another step-* directory",
        ));
    }
    Ok(state)
}

/// The first step of the trace window for a run that starts after `start`: the window
/// skips the run's first step (one-off warm-up) unless the run has one step; a resumed
/// run whose run directory already holds `trace.json` records none (the first run's
/// trace is kept, not overwritten).
pub fn trace_window_start(cfg: &Config, start: usize) -> Option<usize> {
    let remaining = (*cfg.train.steps).saturating_sub(start);
    if start > 0 && trace_exists(&cfg.output_dir()) {
        return None;
    }
    Some(start + if remaining == 1 { 1 } else { 2 })
}

fn trace_exists(run_dir: &Path) -> bool {
    run_dir.join("trace.json").is_file()
}
