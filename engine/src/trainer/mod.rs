//! The training loop of one rank: builds its model chunks from the plan ([`setup`]), runs
//! the validated schedule every step, reduces and clips gradients ([`grads`]), applies
//! AdamW, evaluates, and (on rank 0) writes the run directory: `config.yaml`, `plan.json`,
//! `metrics.jsonl` ([`metrics`]) and `trace.json`.
//!
//! Invariants: every rank derives the same plan, schedule and batches from the config
//! alone (nothing but activations, gradients, metrics and trace spans crosses ranks);
//! rank 0 is the only writer of the run directory; chunk `c` of the plan lives on rank
//! `c % pp`.

mod checkpointing;
mod flops;
mod grads;
mod lr;
mod metrics;
mod setup;

pub use checkpointing::{Checkpointer, TrainState, EXP_AVG, EXP_AVG_SQ};
pub use flops::{model_flops_per_step, FlopsModel, PeakSource};
pub use grads::CapturedGrad;
pub use lr::lr_at;
pub use metrics::peak_rss_mib;

use crate::comm::groups::ParallelComms;
use crate::config::Config;
use crate::data::Split;
use crate::error::{Error, Result};
use crate::executor::{run_actions, run_observed, ActionObserver, StepStats};
use crate::progress::{Progress, ProgressMode};
use crate::trace::Trace;
use metrics::{Measured, MetricsFile, StepInfo, StepRecord};
use partitioner::mesh::MeshCoord;
use partitioner::Rank;
use setup::RankState;
use std::time::Instant;

/// Knobs that are not part of the experiment config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Fail on purpose at (rank, step), to test failure handling.
    pub fail_at: Option<(Rank, usize)>,
    /// Die on purpose in the middle of the checkpoint save of (rank, step), after part of
    /// that rank's file is written (`STRATA_FAIL_AT=RANK:save:STEP`).
    pub fail_in_save: Option<(Rank, usize, crate::checkpoint::SaveFault)>,
    /// Save a checkpoint after this step and stop, as a preempted job does.
    pub stop_after: Option<usize>,
    /// Print progress lines (rank 0).
    pub verbose: bool,
    /// Write the run directory (rank 0) and checkpoints (every rank; the same on all).
    pub write_outputs: bool,
    /// Record this rank's parameter gradients at this step (after the data-parallel and
    /// tied-embedding reductions, before clipping), for equivalence tests.
    pub capture_grads_at: Option<usize>,
    /// Set by SIGTERM/SIGINT: the ranks stop together at the next step boundary.
    pub stop: Option<crate::preempt::StopFlag>,
}

/// What rank 0 saw over the run (other ranks return empty vectors).
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    pub losses: Vec<f64>,
    pub val_losses: Vec<(usize, f64)>,
    pub tokens_per_s: Vec<f64>,
    /// Model FLOPs utilisation of each step (see [`flops`]).
    pub mfu: Vec<f64>,
    /// Model FLOP/s per rank of each step.
    pub flops_per_s_per_rank: Vec<f64>,
    /// What the MFU is measured against.
    pub flops: Option<FlopsModel>,
    /// Global gradient norm of each step (with `train.grad_clip`).
    pub grad_norms: Vec<f64>,
    /// Per rank: the most microbatches stashed for backward at once, over all steps.
    pub peak_stash: Vec<usize>,
    /// This rank's mesh coordinates.
    pub coord: Option<MeshCoord>,
    /// This rank's gradients at `RunOptions::capture_grads_at`.
    pub grads: Vec<CapturedGrad>,
    /// Per rank: measured bubble (time waiting for other ranks / step time) averaged over
    /// steps 2..
    pub bubble: Vec<f64>,
    /// Steps completed when a stop was requested (SIGTERM/SIGINT), if one was.
    pub preempted_at: Option<usize>,
    /// The checkpoint saved at that stop (none when the run writes no files).
    pub preempt_checkpoint: Option<std::path::PathBuf>,
}

impl RunSummary {
    fn add(&mut self, r: &StepRecord, steps: usize) {
        self.losses.push(r.loss);
        self.tokens_per_s.push(r.tokens_per_s);
        self.mfu.push(r.mfu);
        self.flops_per_s_per_rank.push(r.flops_per_s_per_rank);
        self.grad_norms.extend(r.grad_norm);
        for m in &r.ranks {
            self.peak_stash[m.rank] = self.peak_stash[m.rank].max(m.peak_stash);
            if r.step > 1 {
                self.bubble[m.rank] += m.bubble / (steps - 1) as f64;
            }
        }
        if let Some(v) = r.val_loss {
            self.val_losses.push((r.step, v));
        }
    }
}

/// Steps whose spans go into trace.json: `trace_steps` steps from `first` (after the
/// run's first step, which includes one-off warm-up costs, or that step alone for one-step
/// runs; None: no trace, see [`checkpointing::trace_window_start`]). The trace is written
/// after the window's last step, or after the run's last step if that is sooner.
fn traced(cfg: &Config, step: usize, first: Option<usize>) -> bool {
    let n = cfg.output.trace_steps;
    first.is_some_and(|first| n > 0 && step >= first && step < first + n)
}

/// Runs the whole training job on this rank, with its pipeline, tensor- and
/// data-parallel communicators.
pub fn train(cfg: &Config, comms: &mut ParallelComms, opts: &RunOptions) -> Result<RunSummary> {
    let mut rank = RankState::new(cfg, comms)?;
    tch::set_num_threads(*cfg.train.threads as i32);
    let me = comms.rank();
    let world = comms.world.size();
    let is_root = me.0 == 0;
    let (start, resumed) = checkpointing::resume(cfg, &mut rank, comms)?;
    rank.masks = crate::compress::mask::Masks::for_resume(cfg, &rank.params)?;
    let fault = opts.fail_in_save.filter(|f| f.0 == me).map(|f| (f.1, f.2));
    let saver = Checkpointer::new(cfg, &rank, opts.write_outputs, fault)?;
    let trace_from = checkpointing::trace_window_start(cfg, start);
    let mut metrics_file = match is_root && opts.write_outputs {
        true => Some(MetricsFile::create(cfg, &rank.plan, start)?),
        false => None,
    };
    let flops = FlopsModel::new(cfg, &rank.plan)?;
    if is_root && opts.verbose {
        println!("{}", banner(cfg, &rank, world));
        println!("{}", flops.describe());
        resumed.iter().for_each(|line| println!("{line}"));
    }
    let steps = *cfg.train.steps;
    let mode = match is_root && opts.verbose {
        true => ProgressMode::from_env(),
        false => ProgressMode::Quiet,
    };
    let mut progress = Progress::new(mode, start + 1, steps, *cfg.train.log_every);
    let mut summary = RunSummary {
        coord: Some(comms.coord),
        flops: is_root.then(|| flops.clone()),
        peak_stash: vec![0; world],
        bubble: vec![0.0; world],
        ..RunSummary::default()
    };
    let mut trace = Trace::default();
    for step in start + 1..=steps {
        if let Some(f) = comms.flight() {
            f.set_step(step);
        }
        let t0 = Instant::now();
        if opts.fail_at == Some((me, step)) {
            return Err(Error::Injected { step });
        }
        let lr = lr_at(cfg, step);
        let mut stats = train_step(&rank, comms, step)?;
        grads::reduce(&rank, comms)?;
        if opts.capture_grads_at == Some(step) {
            summary.grads = grads::capture(&rank.params)?;
        }
        let t_opt = t0.elapsed().as_secs_f64();
        let grad_norm = grads::clip(&rank, comms, cfg.train.grad_clip, &mut stats.wait_s)?;
        rank.optim.step(&rank.flat, lr)?;
        rank.masks.apply(&rank.params)?;
        let train_s = t0.elapsed().as_secs_f64();
        let evaluated = step == 1
            || step == steps
            || (cfg.train.eval_every > 0 && step % cfg.train.eval_every == 0);
        let val_sum = if evaluated {
            evaluate(&rank, comms)?
        } else {
            0.0
        };
        // The one place a stop is decided: a test's `stop_after`, or a preemption signal
        // on any rank (a collective: every rank agrees on the step).
        let preempted = crate::preempt::stop_agreed(opts.stop.as_ref(), comms.world.as_mut())?;
        let stop = opts.stop_after == Some(step) || preempted;
        if traced(cfg, step, trace_from) {
            trace.add_step(me, step, &stats, t_opt, train_s, t0.elapsed().as_secs_f64());
            if !traced(cfg, step + 1, trace_from) || step == steps || stop {
                let path = cfg.output_dir().join("trace.json");
                trace.gather_and_write(
                    comms.world.as_mut(),
                    is_root && opts.write_outputs,
                    &path,
                )?;
            }
        }
        let measured = Measured {
            stats: &stats,
            train_s,
            val_sum,
        };
        let saved = match saver.due(step, steps, stop) {
            true => Some(saver.save(cfg, &rank, comms, step)?),
            false => None,
        };
        if preempted {
            summary.preempted_at = Some(step);
            summary.preempt_checkpoint = saved.as_ref().map(|s| s.0.clone());
        }
        let saved = saved.map(|s| s.1);
        let Some(reports) = metrics::gather(comms.world.as_mut(), &rank, &measured)? else {
            if stop {
                break;
            }
            continue;
        };
        let info = StepInfo {
            step,
            lr,
            evaluated,
            grad_norm,
            wall_s: t0.elapsed().as_secs_f64(),
        };
        let record = metrics::record(cfg, &rank, &flops, &reports, info);
        summary.add(&record, steps);
        if let Some(file) = metrics_file.as_mut() {
            file.write(&record)?;
        }
        progress.step(&metrics::progress(&record, flops.peak_is_known()));
        if let Some(line) = saved.filter(|_| opts.verbose) {
            progress.println(&line);
        }
        if stop {
            break;
        }
    }
    progress.finish();
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

/// The first line a run prints.
fn banner(cfg: &Config, rank: &RankState, world: usize) -> String {
    let p = &cfg.parallel;
    format!(
        "strata: {} params in {} chunks on {world} ranks (pp {}, tp {}, dp {}), {} x {} x {} sequences of {} tokens per step, schedule {}",
        rank.plan.total_params,
        rank.layout.n_chunks,
        *p.pp,
        *p.tp,
        *p.dp,
        *p.dp,
        *p.microbatches,
        *p.micro_batch_size,
        rank.plan.model.seq_len,
        p.schedule
    )
}

/// Runs this rank's row of the training schedule for `step`; with data parallelism,
/// gradient buckets start their all-reduce during it (see [`crate::dp::overlap`]).
fn train_step(rank: &RankState, comms: &mut ParallelComms, step: usize) -> Result<StepStats> {
    let data = rank.step_data(Split::Train, step as u64)?;
    let armed = rank.grad_sync.as_ref().map(|s| s.arm(&mut comms.dp));
    run_observed(
        &rank.schedule.ranks[rank.coord.pp],
        &rank.chunks,
        comms.pp.as_mut(),
        comms.tp.as_mut(),
        rank.layout,
        &data,
        true,
        armed.as_ref().map(|a| a as &dyn ActionObserver),
    )
}

/// The sum of validation microbatch losses (on the last stage; 0 elsewhere).
fn evaluate(rank: &RankState, comms: &mut ParallelComms) -> Result<f64> {
    let data = rank.step_data(Split::Val, 0)?;
    let stats = run_actions(
        &rank.eval_schedule.ranks[rank.coord.pp],
        &rank.chunks,
        comms.pp.as_mut(),
        comms.tp.as_mut(),
        rank.layout,
        &data,
        false,
    )?;
    Ok(stats.loss_sum)
}
