//! Per-step numbers: each rank packs what it measured, rank 0 gathers them into one
//! `metrics.jsonl` line and the progress line, and keeps the run's [`RunSummary`].
//!
//! Invariant: rank 0 is the only writer of the run directory.

use super::flops::FlopsModel;
use super::setup::RankState;
use crate::comm::{wire, Communicator, Tag};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::executor::StepStats;
use crate::progress::StepProgress;
use partitioner::{Plan, Rank};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Per-rank numbers reported to rank 0 every step.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct RankMetrics {
    pub rank: usize,
    pub compute_s: f64,
    pub wait_s: f64,
    pub step_s: f64,
    pub bubble: f64,
    pub peak_stash: usize,
    pub peak_rss_mib: f64,
    /// Bytes of parameters this rank holds (shards, with tensor parallelism).
    pub param_bytes: u64,
}

/// One line of metrics.jsonl.
#[derive(Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub tokens_per_s: f64,
    /// Model FLOP/s of one rank (see [`super::flops`]).
    pub flops_per_s_per_rank: f64,
    /// Model FLOPs utilisation: `flops_per_s_per_rank` over the peak of one rank.
    pub mfu: f64,
    pub step_s: f64,
    /// Seconds of the whole step on rank 0, evaluation and metrics gathering included.
    pub wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    pub ranks: Vec<RankMetrics>,
}

const REPORT_LEN: usize = 9;
type Report = [f64; REPORT_LEN];

/// What one rank measured in one step.
pub struct Measured<'a> {
    pub stats: &'a StepStats,
    /// Seconds of the training part of the step (schedule, reductions, optimizer).
    pub train_s: f64,
    /// Sum of validation microbatch losses (last stage, when evaluated).
    pub val_sum: f64,
}

/// Peak resident memory of this process in MiB (Linux; 0 elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn pack(rank: Rank, m: &Measured<'_>, param_bytes: usize) -> Report {
    [
        rank.0 as f64,
        m.stats.loss_sum,
        m.stats.compute_s,
        m.stats.wait_s,
        m.train_s,
        m.stats.peak_stash as f64,
        peak_rss_mib(),
        m.val_sum,
        param_bytes as f64,
    ]
}

fn unpack(r: &Report) -> RankMetrics {
    RankMetrics {
        rank: r[0] as usize,
        compute_s: r[2],
        wait_s: r[3],
        step_s: r[4],
        bubble: if r[4] > 0.0 { r[3] / r[4] } else { 0.0 },
        peak_stash: r[5] as usize,
        peak_rss_mib: r[6],
        param_bytes: r[8] as u64,
    }
}

/// Sends this rank's numbers to rank 0; on rank 0 returns everyone's, in rank order.
pub fn gather(
    world: &mut dyn Communicator,
    rank: &RankState,
    m: &Measured<'_>,
) -> Result<Option<Vec<Report>>> {
    let me = world.rank();
    let mine = pack(me, m, rank.param_bytes);
    if me.0 != 0 {
        world.send(Rank(0), Tag::plain(Tag::METRICS), wire::encode_f64s(&mine))?;
        return Ok(None);
    }
    let mut reports = vec![mine];
    for r in 1..world.size() {
        let bytes = world.recv(Rank(r), Tag::plain(Tag::METRICS))?;
        let values = wire::decode_f64s(&bytes, Rank(r), REPORT_LEN)?;
        reports.push(
            values
                .try_into()
                .map_err(|_| Error::Internal("metrics report length".into()))?,
        );
    }
    Ok(Some(reports))
}

/// What rank 0 knows of a step besides the reports.
pub struct StepInfo {
    pub step: usize,
    pub lr: f64,
    pub evaluated: bool,
    pub grad_norm: Option<f64>,
    pub wall_s: f64,
}

/// Combines every rank's report into the step's metrics line.
pub fn record(
    cfg: &Config,
    rank: &RankState,
    flops: &FlopsModel,
    reports: &[Report],
    info: StepInfo,
) -> StepRecord {
    // Ranks start a step at different times but are chained by the pipeline, so the step
    // takes as long as the slowest rank's training part (evaluation excluded).
    let step_s = reports.iter().map(|r| r[4]).fold(0.0, f64::max);
    let m = rank.microbatches * rank.loss_ranks.len();
    let loss = rank.loss_ranks.iter().map(|r| reports[r.0][1]).sum::<f64>() / m as f64;
    let val_loss = info
        .evaluated
        .then(|| reports[rank.loss_ranks[0].0][7] / rank.eval_microbatches as f64);
    let (flops_per_s_per_rank, mfu) = flops.rate(step_s);
    StepRecord {
        step: info.step,
        loss,
        val_loss,
        lr: info.lr,
        tokens_per_s: cfg.tokens_per_step() as f64 / step_s,
        flops_per_s_per_rank,
        mfu,
        step_s,
        wall_s: info.wall_s,
        grad_norm: info.grad_norm,
        ranks: reports.iter().map(unpack).collect(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The run directory's `metrics.jsonl`, open for writing.
pub struct MetricsFile {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsFile {
    /// Creates the run directory with `config.yaml` and `plan.json`, and metrics.jsonl;
    /// a run resumed after step `start` > 0 keeps the lines of steps up to `start` and
    /// appends to them.
    pub fn create(cfg: &Config, plan: &Plan, start: usize) -> Result<MetricsFile> {
        let dir = cfg.output_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let cfg_path = dir.join("config.yaml");
        std::fs::write(&cfg_path, cfg.resolved_yaml()?).map_err(io_err(&cfg_path))?;
        let plan_path = dir.join("plan.json");
        let json =
            serde_json::to_string_pretty(plan).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(&plan_path, json + "\n").map_err(io_err(&plan_path))?;
        let path = dir.join("metrics.jsonl");
        let kept = match start {
            0 => String::new(),
            _ => lines_up_to(&path, start),
        };
        std::fs::write(&path, kept).map_err(io_err(&path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(MetricsFile { file, path })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|e| Error::Internal(e.to_string()))?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.flush())
            .map_err(io_err(&self.path))
    }
}

/// The lines of an existing metrics.jsonl whose step is at most `step` (a resumed run
/// continues the file; lines of steps after its checkpoint are dropped).
fn lines_up_to(path: &Path, step: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The progress display's view of a step's record; MFU only when `show_mfu` (a known
/// peak: [`super::flops::FlopsModel::peak_is_known`]).
pub fn progress(r: &StepRecord, show_mfu: bool) -> StepProgress {
    StepProgress {
        step: r.step,
        loss: r.loss,
        val_loss: r.val_loss,
        lr: r.lr,
        tokens_per_s: r.tokens_per_s,
        step_s: r.step_s,
        max_bubble: r.ranks.iter().map(|m| m.bubble).fold(0.0, f64::max),
        flops_per_s_per_rank: r.flops_per_s_per_rank,
        mfu: show_mfu.then_some(r.mfu),
    }
}
