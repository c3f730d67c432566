//! The training loop of one rank: builds its model chunks from the plan, runs the
//! validated schedule every step, clips and applies AdamW, evaluates, and (on rank 0)
//! writes the run directory: `config.yaml`, `plan.json`, `metrics.jsonl` and `trace.json`.
//!
//! Invariants: every rank derives the same plan, schedule and batches from the config
//! alone (nothing but activations, gradients, metrics and trace spans crosses ranks);
//! rank 0 is the only writer of the run directory; chunk `c` of the plan lives on rank
//! `c % pp`.

use crate::comm::groups::ParallelComms;
use crate::comm::{wire, Tag};
use crate::config::{Config, LrSchedule};
use crate::data::{Dataset, Split};
use crate::dp::{all_reduce_mean_grads, sum_tied_embedding_grads};
use crate::error::{Error, Result};
use crate::executor::{run_actions, ChunkModel, PipelineLayout, StepData, StepStats};
use crate::model::{grad_sq_norm, tokens_tensor, Param, StageModel};
use crate::optim::{scale_grads, AdamW, AdamWConfig};
use crate::tp::TpStageModel;
use crate::trace::Trace;
use partitioner::mesh::MeshCoord;
use partitioner::{Plan, Rank, Schedule, ScheduleKind};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Knobs that are not part of the experiment config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Fail on purpose at (rank, step), to test failure handling.
    pub fail_at: Option<(Rank, usize)>,
    /// Print progress lines (rank 0).
    pub verbose: bool,
    /// Write the run directory (rank 0).
    pub write_outputs: bool,
    /// Record this rank's parameter gradients at this step (after the data-parallel and
    /// tied-embedding reductions, before clipping), for equivalence tests.
    pub capture_grads_at: Option<usize>,
}

/// A parameter's gradient as one rank holds it (a shard, with tensor parallelism).
#[derive(Clone, Debug)]
pub struct CapturedGrad {
    pub name: String,
    pub shape: Vec<i64>,
    pub values: Vec<f32>,
    pub tied_copy: bool,
}

/// What rank 0 saw over the run (other ranks return empty vectors).
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub losses: Vec<f64>,
    pub val_losses: Vec<(usize, f64)>,
    pub tokens_per_s: Vec<f64>,
    /// Per rank: the most microbatches stashed for backward at once, over all steps.
    pub peak_stash: Vec<usize>,
    /// This rank's mesh coordinates.
    pub coord: Option<MeshCoord>,
    /// This rank's gradients at `RunOptions::capture_grads_at`.
    pub grads: Vec<CapturedGrad>,
    /// Per rank: measured bubble (time waiting for other ranks / step time) averaged over
    /// steps 2..
    pub bubble: Vec<f64>,
}

/// Per-rank numbers reported to rank 0 every step.
#[derive(Clone, Copy, Debug, Serialize)]
struct RankMetrics {
    rank: usize,
    compute_s: f64,
    wait_s: f64,
    step_s: f64,
    bubble: f64,
    peak_stash: usize,
    peak_rss_mib: f64,
    /// Bytes of parameters this rank holds (shards, with tensor parallelism).
    param_bytes: u64,
}

/// One line of metrics.jsonl.
#[derive(Serialize)]
struct StepRecord {
    step: usize,
    loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
    lr: f64,
    tokens_per_s: f64,
    step_s: f64,
    /// Seconds of the whole step on rank 0, evaluation and metrics gathering included.
    wall_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    grad_norm: Option<f64>,
    ranks: Vec<RankMetrics>,
}

const REPORT_LEN: usize = 9;

fn lr_at(cfg: &Config, step: usize) -> f64 {
    let t = &cfg.train;
    if t.warmup_steps > 0 && step <= t.warmup_steps {
        return t.lr * step as f64 / t.warmup_steps as f64;
    }
    match t.lr_schedule {
        LrSchedule::Constant => t.lr,
        LrSchedule::Cosine => {
            let min_lr = t.min_lr.unwrap_or(t.lr / 10.0);
            let span = (*t.steps).saturating_sub(t.warmup_steps).max(1) as f64;
            let progress = ((step - t.warmup_steps.min(step)) as f64 / span).min(1.0);
            min_lr + 0.5 * (t.lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

/// Peak resident memory of this process in MiB (Linux; 0 elsewhere).
fn peak_rss_mib() -> f64 {
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

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Steps whose spans go into trace.json: `trace_steps` steps after the first (which
/// includes one-off warm-up costs), or step 1 alone for one-step runs.
fn traced(cfg: &Config, step: usize) -> bool {
    let n = cfg.output.trace_steps;
    let steps = *cfg.train.steps;
    n > 0
        && if steps == 1 {
            step == 1
        } else {
            step >= 2 && step < 2 + n
        }
}

/// Runs the whole training job on this rank, with its pipeline, tensor- and
/// data-parallel communicators.
pub fn train(cfg: &Config, comms: &mut ParallelComms, opts: &RunOptions) -> Result<RunSummary> {
    let plan = cfg.plan()?;
    let world = comms.world.size();
    let source = cfg.source.display().to_string();
    if world != cfg.world_size() {
        return Err(Error::Config {
            path: source,
            field: "parallel".into(),
            problem: format!(
                "the job has {world} ranks but pp·tp·dp = {}",
                cfg.world_size()
            ),
            fix: format!(
                "launch with {} ranks (strata launch does this)",
                cfg.world_size()
            ),
        });
    }
    tch::set_num_threads(*cfg.train.threads as i32);
    let rank = comms.rank();
    let coord = comms.coord;
    let (pp, dp) = (*cfg.parallel.pp, *cfg.parallel.dp);
    let shape = plan.model;
    let (m, mbs, seq) = (
        *cfg.parallel.microbatches,
        *cfg.parallel.micro_batch_size,
        shape.seq_len,
    );
    let eval_m = cfg.train.eval_microbatches.map_or(m, |c| *c);
    let v = *cfg.parallel.virtual_stages;
    let layout = PipelineLayout {
        pp,
        n_chunks: pp * v,
    };
    if plan.stages.len() != layout.n_chunks {
        return Err(Error::Internal(format!(
            "the plan has {} chunks, expected pp · virtual_stages = {}",
            plan.stages.len(),
            layout.n_chunks
        )));
    }
    // Without tensor parallelism a chunk is one autograd graph; with it, a shard run as
    // segments joined by tp collectives.
    let tp_size = *cfg.parallel.tp;
    let tie = cfg.model.tie_embeddings;
    // With tied embeddings split over chunks, every pipeline rank joins the gradient sum.
    let tied_numel = (tie && layout.n_chunks > 1)
        .then(|| crate::tp::padded_vocab(shape.vocab, tp_size) / tp_size * shape.d_model);
    let chunks: Vec<ChunkModel> = (0..v)
        .map(|slot| {
            let layers = &plan.stages[slot * pp + coord.pp].layers;
            Ok(if tp_size == 1 {
                ChunkModel::Plain(StageModel::with_tied_embeddings(
                    &shape,
                    layers,
                    cfg.train.seed,
                    tie,
                )?)
            } else {
                ChunkModel::Tp(TpStageModel::new(
                    &shape,
                    layers,
                    cfg.train.seed,
                    coord.tp,
                    tp_size,
                    tie,
                )?)
            })
        })
        .collect::<Result<_>>()?;
    let params: Vec<Param> = chunks
        .iter()
        .flat_map(|c| c.params().iter().map(Param::alias))
        .collect();
    let param_bytes: usize = params.iter().map(|p| p.tensor.numel() * 4).sum();
    let norm_params: Vec<Param> = params
        .iter()
        .filter(|p| (p.tp_sharded || coord.tp == 0) && !p.tied_copy)
        .map(Param::alias)
        .collect();
    let dataset = Dataset::load(&cfg.data_source()?, cfg.train.seed)?;
    let plan_err = |e| Error::Plan {
        path: cfg.source.display().to_string(),
        source: e,
    };
    let schedule = cfg.schedule().and_then(|s| s.lower()).map_err(plan_err)?;
    let eval_schedule = Schedule::build_virtual(ScheduleKind::ForwardOnly, pp, v, eval_m)
        .and_then(|s| s.lower())
        .map_err(plan_err)?;
    let mut optim = AdamW::new(
        &params,
        AdamWConfig {
            beta1: cfg.train.beta1,
            beta2: cfg.train.beta2,
            eps: 1e-8,
            weight_decay: cfg.train.weight_decay,
        },
    )?;
    let is_root = rank.0 == 0;
    let has_first = layout.rank_of(0).0 == coord.pp;
    let last_stage = layout.rank_of(layout.n_chunks - 1).0;
    let has_last = coord.pp == last_stage;
    let mesh_rank = |pp: usize, dp: usize, tp: usize| -> Result<Rank> {
        comms
            .mesh
            .rank(MeshCoord { pp, dp, tp })
            .map_err(|e| Error::Internal(e.to_string()))
    };
    // The ranks whose last-stage losses make the step's loss (one per replica), and the
    // one whose validation loss is reported.
    let loss_ranks: Vec<Rank> = (0..dp)
        .map(|d| mesh_rank(last_stage, d, 0))
        .collect::<Result<_>>()?;
    let val_rank = loss_ranks[0];
    let mut metrics_file = if is_root && opts.write_outputs {
        Some(prepare_run_dir(cfg, &plan)?)
    } else {
        None
    };
    if is_root && opts.verbose {
        println!(
            "strata: {} params in {} chunks on {world} ranks (pp {pp}, tp {}, dp {dp}), {dp} x {m} x {mbs} sequences of {seq} tokens per step, schedule {}",
            plan.total_params, layout.n_chunks, *cfg.parallel.tp, cfg.parallel.schedule
        );
    }
    let hidden_shape = vec![mbs as i64, seq as i64, shape.d_model as i64];
    // Replica d trains on global microbatches d·m .. (d+1)·m of each step; every replica
    // evaluates the same validation batches.
    let make_data = |split: Split, step: u64, microbatches: usize| -> Result<StepData> {
        let mut tokens = Vec::new();
        let mut targets = Vec::new();
        let first_mb = if split == Split::Train {
            coord.dp * microbatches
        } else {
            0
        };
        if has_first || has_last {
            for mb in 0..microbatches {
                let (x, y) = dataset.batch(split, step, (first_mb + mb) * mbs, mbs, seq);
                if has_first {
                    tokens.push(tokens_tensor(&x, mbs, seq)?);
                }
                if has_last {
                    targets.push(tokens_tensor(&y, mbs, seq)?);
                }
            }
        }
        Ok(StepData {
            tokens,
            targets,
            hidden_shape: hidden_shape.clone(),
            microbatches,
        })
    };

    let mut summary = RunSummary {
        coord: Some(coord),
        peak_stash: vec![0; world],
        bubble: vec![0.0; world],
        ..RunSummary::default()
    };
    let mut trace = Trace::default();
    let steps = *cfg.train.steps;
    for step in 1..=steps {
        let t0 = Instant::now();
        if opts.fail_at == Some((rank, step)) {
            return Err(Error::Injected { step });
        }
        let lr = lr_at(cfg, step);
        let data = make_data(Split::Train, step as u64, m)?;
        let mut stats = run_actions(
            &schedule.ranks[coord.pp],
            &chunks,
            comms.pp.as_mut(),
            comms.tp.as_mut(),
            layout,
            &data,
            true,
        )?;
        if let Some(numel) = tied_numel {
            sum_tied_embedding_grads(&params, numel, comms.pp.as_mut())?;
        }
        all_reduce_mean_grads(&params, comms.dp.as_mut())?;
        if opts.capture_grads_at == Some(step) {
            summary.grads = capture_grads(&params)?;
        }
        let t_opt = t0.elapsed().as_secs_f64();
        let grad_norm = match cfg.train.grad_clip {
            Some(clip) => {
                // Replicas hold identical gradients: count each parameter once, and one
                // replicated over the tp group on its tp rank 0 only.
                let mut sq = [if coord.dp == 0 {
                    grad_sq_norm(&norm_params)?
                } else {
                    0.0
                }];
                // The all-reduce is where this rank waits for the slowest one: idle time.
                let t_reduce = Instant::now();
                comms.world.all_reduce_sum(&mut sq)?;
                stats.wait_s += t_reduce.elapsed().as_secs_f64();
                let norm = sq[0].sqrt();
                if norm > clip {
                    scale_grads(&params, clip / (norm + 1e-6))?;
                }
                Some(norm)
            }
            None => None,
        };
        optim.step(&params, lr)?;
        let train_s = t0.elapsed().as_secs_f64();
        let evaluate = step == 1
            || step == steps
            || (cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0);
        let val_sum = if evaluate {
            let data = make_data(Split::Val, 0, eval_m)?;
            run_actions(
                &eval_schedule.ranks[coord.pp],
                &chunks,
                comms.pp.as_mut(),
                comms.tp.as_mut(),
                layout,
                &data,
                false,
            )?
            .loss_sum
        } else {
            0.0
        };
        if traced(cfg, step) {
            trace.add_step(
                rank,
                step,
                &stats,
                t_opt,
                train_s,
                t0.elapsed().as_secs_f64(),
            );
            if !traced(cfg, step + 1) {
                trace.gather_and_write(
                    comms.world.as_mut(),
                    is_root && opts.write_outputs,
                    &cfg.output_dir().join("trace.json"),
                )?;
            }
        }
        let mine = report(rank, &stats, train_s, val_sum, param_bytes);
        if !is_root {
            comms
                .world
                .send(Rank(0), Tag::plain(Tag::METRICS), wire::encode_f64s(&mine))?;
            continue;
        }
        let mut reports = vec![mine];
        for r in 1..world {
            let bytes = comms.world.recv(Rank(r), Tag::plain(Tag::METRICS))?;
            reports.push(
                wire::decode_f64s(&bytes, Rank(r), REPORT_LEN)?
                    .try_into()
                    .unwrap(),
            );
        }
        // Ranks start a step at different times but are chained by the pipeline, so the
        // step takes as long as the slowest rank's training part (evaluation excluded).
        let step_s = reports.iter().map(|r| r[4]).fold(0.0, f64::max);
        let loss = loss_ranks.iter().map(|r| reports[r.0][1]).sum::<f64>() / (m * dp) as f64;
        let val_loss = evaluate.then(|| reports[val_rank.0][7] / eval_m as f64);
        let record = StepRecord {
            step,
            loss,
            val_loss,
            lr,
            tokens_per_s: cfg.tokens_per_step() as f64 / step_s,
            step_s,
            wall_s: t0.elapsed().as_secs_f64(),
            grad_norm,
            ranks: reports.iter().map(rank_metrics).collect(),
        };
        summary.losses.push(loss);
        summary.tokens_per_s.push(record.tokens_per_s);
        for r in &record.ranks {
            summary.peak_stash[r.rank] = summary.peak_stash[r.rank].max(r.peak_stash);
            if step > 1 {
                summary.bubble[r.rank] += r.bubble / (steps - 1) as f64;
            }
        }
        if let Some(v) = val_loss {
            summary.val_losses.push((step, v));
        }
        if let Some((file, path)) = metrics_file.as_mut() {
            let line =
                serde_json::to_string(&record).map_err(|e| Error::Internal(e.to_string()))?;
            writeln!(file, "{line}")
                .and_then(|_| file.flush())
                .map_err(io_err(path))?;
        }
        if opts.verbose
            && (step == 1
                || step == steps
                || step % *cfg.train.log_every == 0
                || val_loss.is_some())
        {
            let val = val_loss.map_or(String::new(), |v| format!(" | val {v:.4}"));
            let bubble = record.ranks.iter().map(|r| r.bubble).fold(0.0, f64::max);
            println!(
                "step {step:>5} | loss {loss:.4}{val} | lr {lr:.2e} | {:>8.0} tok/s | {step_s:.3} s | max bubble {:.1}%",
                record.tokens_per_s,
                bubble * 100.0
            );
        }
    }
    for comm in [
        &mut comms.world,
        &mut comms.pp,
        &mut comms.tp,
        &mut comms.dp,
    ] {
        comm.flush()?;
    }
    Ok(summary)
}

fn capture_grads(params: &[Param]) -> Result<Vec<CapturedGrad>> {
    params
        .iter()
        .map(|p| {
            let g = p.tensor.grad();
            let n = g.numel();
            let mut values = vec![0f32; n];
            g.f_contiguous()
                .and_then(|g| g.f_view([-1]).map(|v| v.f_copy_data(&mut values, n)))
                .map_err(Error::torch("capturing gradients"))?
                .map_err(Error::torch("capturing gradients"))?;
            Ok(CapturedGrad {
                name: p.name.clone(),
                shape: g.size(),
                values,
                tied_copy: p.tied_copy,
            })
        })
        .collect()
}

/// Packs this rank's step numbers for rank 0.
fn report(
    rank: Rank,
    s: &StepStats,
    step_s: f64,
    val_sum: f64,
    param_bytes: usize,
) -> [f64; REPORT_LEN] {
    [
        rank.0 as f64,
        s.loss_sum,
        s.compute_s,
        s.wait_s,
        step_s,
        s.peak_stash as f64,
        peak_rss_mib(),
        val_sum,
        param_bytes as f64,
    ]
}

fn rank_metrics(r: &[f64; REPORT_LEN]) -> RankMetrics {
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

/// Creates the run directory with `config.yaml` and `plan.json`; returns metrics.jsonl.
fn prepare_run_dir(cfg: &Config, plan: &Plan) -> Result<(std::fs::File, std::path::PathBuf)> {
    let dir = cfg.output_dir();
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let cfg_path = dir.join("config.yaml");
    std::fs::write(&cfg_path, cfg.resolved_yaml()?).map_err(io_err(&cfg_path))?;
    let plan_path = dir.join("plan.json");
    let json = serde_json::to_string_pretty(plan).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(&plan_path, json + "\n").map_err(io_err(&plan_path))?;
    let metrics = dir.join("metrics.jsonl");
    let file = std::fs::File::create(&metrics).map_err(io_err(&metrics))?;
    Ok((file, metrics))
}
