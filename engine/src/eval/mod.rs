//! `strata eval`: the mean cross-entropy and perplexity of a model over a token stream's
//! [`Windows`], on any layout (pp × tp × dp, one rank per thread or MPI process).
//!
//! Each data-parallel replica takes a contiguous share of the windows and runs them
//! through the pipeline with the forward-only schedule, `micro_batch_size` windows per
//! microbatch and `microbatches` per pass (the remainder in a smaller last pass). The
//! last stage's tp rank 0 of every replica adds each microbatch's mean loss weighted by
//! its tokens; one all-reduce over the world gives the mean over every token.
//!
//! Invariant: the result is the mean over tokens of the per-token cross-entropy, whatever
//! the layout and batching (up to float summation order).

mod job;
mod windows;

pub use job::{DataPart, EvalJob, LayoutArg, Weights};
pub use windows::{encode, Windows};

use crate::comm::groups::ParallelComms;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::executor::{run_actions, PipelineLayout, StepData};
use crate::model::sharding::TpRank;
use crate::model::{tokens_tensor, Model};
use partitioner::mesh::MeshCoord;
use partitioner::{Schedule, ScheduleKind};
use std::collections::HashMap;
use tch::Tensor;

/// What `evaluate` should keep besides the loss.
#[derive(Clone, Copy, Debug, Default)]
pub struct EvalOptions {
    /// Keep the logits of every window (on the ranks holding the last chunk).
    pub keep_logits: bool,
}

/// One rank's view of an evaluation.
#[derive(Debug)]
pub struct EvalResult {
    /// Mean cross-entropy over every predicted token (the same on every rank).
    pub loss: f64,
    pub perplexity: f64,
    /// Predicted tokens (windows · seq_len).
    pub tokens: usize,
    pub windows: usize,
    pub coord: MeshCoord,
    /// With `keep_logits`, on a rank holding the last chunk: (window, this rank's logits
    /// `[seq_len, n_local]`, its vocabulary columns), for this replica's windows.
    pub logits: Vec<(usize, Tensor)>,
}

/// Where the weights come from: `load` fills one freshly built chunk of this rank (e.g.
/// [`crate::hf::load_init_from`] on its parameters, or a checkpoint read, which may first
/// replace linear layers by the checkpoint's int8 ones).
pub type LoadWeights<'a> = &'a dyn Fn(&mut Model) -> Result<()>;

/// One forward-only pass: `microbatches` microbatches of `rows` windows from `first`.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Pass {
    first: usize,
    rows: usize,
    microbatches: usize,
}

/// Cuts `n` windows starting at `first` into passes of `m` microbatches of `mbs` rows,
/// then one pass of whole microbatches, then one microbatch of the rest.
fn passes(first: usize, n: usize, m: usize, mbs: usize) -> Vec<Pass> {
    let mut out = Vec::new();
    let mut at = first;
    let end = first + n;
    while end - at >= m * mbs {
        out.push(Pass {
            first: at,
            rows: mbs,
            microbatches: m,
        });
        at += m * mbs;
    }
    if (end - at) / mbs > 0 {
        let k = (end - at) / mbs;
        out.push(Pass {
            first: at,
            rows: mbs,
            microbatches: k,
        });
        at += k * mbs;
    }
    if end > at {
        out.push(Pass {
            first: at,
            rows: end - at,
            microbatches: 1,
        });
    }
    out
}

/// This rank's model chunks for `cfg`, with their weights from `load`.
fn build_chunks(cfg: &Config, coord: MeshCoord, load: LoadWeights<'_>) -> Result<Vec<Model>> {
    let plan = cfg.plan()?;
    let (pp, v) = (*cfg.parallel.pp, *cfg.parallel.virtual_stages);
    let spec = cfg.model_spec()?;
    let tp = TpRank {
        rank: coord.tp,
        size: *cfg.parallel.tp,
    };
    (0..v)
        .map(|slot| {
            let layers = &plan.stages[slot * pp + coord.pp].layers;
            let mut chunk = Model::new(&spec, layers, cfg.train.seed, tp)?;
            load(&mut chunk)?;
            Ok(chunk)
        })
        .collect()
}

/// Evaluates the model of `cfg` (weights from `load`) on `windows`, on this rank of the
/// layout `comms`; every rank of the job calls it.
pub fn evaluate(
    cfg: &Config,
    comms: &mut ParallelComms,
    load: LoadWeights<'_>,
    windows: &Windows,
    opts: EvalOptions,
) -> Result<EvalResult> {
    cfg.check_world(comms.world.size())?;
    tch::set_num_threads(*cfg.train.threads as i32);
    let coord = comms.coord;
    let chunks = build_chunks(cfg, coord, load)?;
    let (pp, v, dp) = (
        *cfg.parallel.pp,
        *cfg.parallel.virtual_stages,
        *cfg.parallel.dp,
    );
    let layout = PipelineLayout {
        pp,
        n_chunks: pp * v,
    };
    let has_first = layout.rank_of(0).0 == coord.pp;
    let has_last = layout.rank_of(layout.n_chunks - 1).0 == coord.pp;
    let seq = windows.seq_len;
    if seq != cfg.model_spec()?.shape.seq_len {
        return Err(Error::Internal(format!(
            "windows of {seq} tokens for a model of seq_len {}",
            cfg.model_spec()?.shape.seq_len
        )));
    }
    let n = windows.count();
    let (mine_first, mine_n) = (
        coord.dp * n / dp,
        (coord.dp + 1) * n / dp - coord.dp * n / dp,
    );
    let m = cfg
        .train
        .eval_microbatches
        .map_or(*cfg.parallel.microbatches, |c| *c);
    let mut schedules: HashMap<usize, Schedule> = HashMap::new();
    let (mut weighted, mut tokens) = (0.0f64, 0.0f64);
    let mut logits = Vec::new();
    for pass in passes(mine_first, mine_n, m, *cfg.parallel.micro_batch_size) {
        if let std::collections::hash_map::Entry::Vacant(e) = schedules.entry(pass.microbatches) {
            let s = Schedule::build_virtual(ScheduleKind::ForwardOnly, pp, v, pass.microbatches)
                .and_then(|s| s.lower())
                .map_err(|source| Error::Plan {
                    path: cfg.source.display().to_string(),
                    source,
                })?;
            e.insert(s);
        }
        let data = pass_data(cfg, windows, pass, has_first, has_last, opts)?;
        let stats = run_actions(
            &schedules[&pass.microbatches].ranks[coord.pp],
            &chunks,
            comms.pp.as_mut(),
            comms.tp.as_mut(),
            layout,
            &data,
            false,
        )?;
        if has_last && coord.tp == 0 {
            let per_mb = (pass.rows * seq) as f64;
            weighted += stats.loss_sum * per_mb;
            tokens += per_mb * pass.microbatches as f64;
        }
        for (mb, z) in stats.logits {
            for r in 0..pass.rows {
                let row = z.f_get(r as i64).map_err(Error::torch("logits row"))?;
                logits.push((pass.first + mb * pass.rows + r, row));
            }
        }
    }
    let mut sums = [weighted, tokens];
    comms.world.all_reduce_sum(&mut sums)?;
    for comm in [
        &mut comms.world,
        &mut comms.pp,
        &mut comms.tp,
        &mut comms.dp,
    ] {
        comm.flush()?;
    }
    let loss = sums[0] / sums[1].max(1.0);
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: sums[1] as usize,
        windows: n,
        coord,
        logits,
    })
}

/// The inputs (first chunk) and targets (last chunk) of one pass.
fn pass_data(
    cfg: &Config,
    windows: &Windows,
    pass: Pass,
    has_first: bool,
    has_last: bool,
    opts: EvalOptions,
) -> Result<StepData> {
    let seq = windows.seq_len;
    let (mut tokens, mut targets) = (Vec::new(), Vec::new());
    for mb in 0..pass.microbatches {
        let (x, y) = windows.rows(pass.first + mb * pass.rows, pass.rows);
        if has_first {
            tokens.push(tokens_tensor(x, pass.rows, seq)?);
        }
        if has_last {
            targets.push(tokens_tensor(y, pass.rows, seq)?);
        }
    }
    let spec = cfg.model_spec()?;
    Ok(StepData {
        tokens,
        targets,
        hidden_shape: vec![pass.rows as i64, seq as i64, spec.shape.d_model as i64],
        hidden_kind: spec.kind,
        microbatches: pass.microbatches,
        keep_logits: opts.keep_logits,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_cover_every_window_once() {
        for (n, m, mbs) in [
            (0, 2, 2),
            (1, 2, 2),
            (9, 2, 2),
            (8, 2, 2),
            (7, 3, 2),
            (5, 1, 4),
        ] {
            let ps = passes(3, n, m, mbs);
            let mut next = 3;
            for p in &ps {
                assert_eq!(p.first, next, "{n} {m} {mbs}: {ps:?}");
                assert!(p.rows >= 1 && p.microbatches >= 1 && p.microbatches <= m);
                next += p.rows * p.microbatches;
            }
            assert_eq!(next, 3 + n, "{n} {m} {mbs}: {ps:?}");
        }
    }
}
