//! Chunk timings: a chunk as the executor runs one (the embedding, `blocks` blocks and the
//! head in one [`Model`], [`STASH`] microbatches forward with their activations stashed,
//! then their backwards), against the sum of its layers timed one at a time. The ratios
//! ([`partitioner::profile::ChunkScale`]) are measured at several chunk depths, because
//! a deeper chunk has a larger working set (weights, autograd graph, stash) and runs each
//! block slower; at several stash depths (microbatches in flight), for the same reason;
//! and on the zero-bubble split backward (`I` then `W`), whose parts do not
//! add up to the fused backward.
//!
//! Invariant: every timing is the median over `opts.runs` repetitions after
//! `opts.warmup`, per microbatch; with tp > 1 every rank of the tp group calls these
//! together (the shard's collectives go through `tp`).

use super::{median, random_tokens, ProfileOptions};
use crate::comm::Communicator;
use crate::error::Result;
use crate::model::sharding::TpRank;
use crate::model::tape::WeightWork;
use crate::model::{Forward, Grad, Model, ModelSpec, Pass};
use partitioner::profile::{ChunkScale, LayerTiming};
use partitioner::{LayerKind, ModelShape};
use std::time::Instant;

/// Microbatches stashed before their backwards.
pub const STASH: usize = 2;
/// Blocks of the chunk whose ratio stands for every depth in profiles without a curve.
pub const REFERENCE_BLOCKS: usize = 4;

/// Per-microbatch medians of one chunk: forward, backward (the `I` part when split) and
/// the split's `W` (0 when fused).
#[derive(Clone, Copy, Debug, Default)]
pub struct ChunkTiming {
    pub fwd_s: f64,
    pub bwd_s: f64,
    pub weight_s: f64,
}

fn chunk_model(shape: &ModelShape, blocks: usize, tp_rank: TpRank) -> Result<Model> {
    let mut layers = vec![LayerKind::Embedding];
    layers.extend((0..blocks).map(LayerKind::Block));
    layers.push(LayerKind::Head);
    Model::new(&ModelSpec::new(shape.clone()), &layers, 0, tp_rank)
}

/// One repetition: `depth` forwards, then their backwards (and with `split` the weight
/// work after all of them, as zero-bubble runs `W` late); seconds per microbatch.
fn one_rep(
    model: &Model,
    tokens: &tch::Tensor,
    depth: usize,
    split: bool,
    tp: &mut dyn Communicator,
) -> Result<ChunkTiming> {
    let t0 = Instant::now();
    let mut stash: Vec<Forward> = Vec::with_capacity(depth);
    for _ in 0..depth {
        stash.push(model.forward(tokens, Some(tokens), tp, Pass::Train { split })?);
    }
    let t1 = Instant::now();
    let mut work = WeightWork::default();
    while let Some(out) = stash.pop() {
        work.extend(model.backward(out, Grad::LossScale(1.0), tp)?.1);
    }
    let t2 = Instant::now();
    work.run()?;
    let t3 = Instant::now();
    let per = |a: Instant, b: Instant| (b - a).as_secs_f64() / depth.max(1) as f64;
    Ok(ChunkTiming {
        fwd_s: per(t0, t1),
        bwd_s: per(t1, t2),
        weight_s: if split { per(t2, t3) } else { 0.0 },
    })
}

/// Times chunks of each (blocks, stashed microbatches) in `chunks` on tp rank `tp_rank`
/// (see the module docs), one repetition of every chunk in turn, so that a machine whose
/// speed drifts moves them alike; `split` runs the zero-bubble backward. One timing per
/// chunk.
pub fn time_chunks(
    shape: &ModelShape,
    micro_batch_size: usize,
    opts: &ProfileOptions,
    chunks: &[(usize, usize)],
    split: bool,
    tp_rank: TpRank,
    tp: &mut dyn Communicator,
) -> Result<Vec<ChunkTiming>> {
    let models = chunks
        .iter()
        .map(|&(n, depth)| Ok((chunk_model(shape, n, tp_rank)?, depth)))
        .collect::<Result<Vec<_>>>()?;
    let tokens = random_tokens(shape, micro_batch_size, 8)?;
    let mut reps = vec![Vec::with_capacity(opts.runs); models.len()];
    for rep in 0..opts.warmup + opts.runs {
        for ((model, depth), times) in models.iter().zip(reps.iter_mut()) {
            let t = one_rep(model, &tokens, *depth, split, tp)?;
            if rep >= opts.warmup {
                times.push(t);
            }
            for p in model.params() {
                let _ = p.tensor.grad().f_zero_();
            }
        }
    }
    Ok(reps
        .into_iter()
        .map(|r| ChunkTiming {
            fwd_s: median(r.iter().map(|t| t.fwd_s).collect()),
            bwd_s: median(r.iter().map(|t| t.bwd_s).collect()),
            weight_s: median(r.iter().map(|t| t.weight_s).collect()),
        })
        .collect())
}

/// The sum of `layers` over a chunk of `blocks` blocks (embedding and head included):
/// (forward, backward).
fn layers_sum(layers: &[LayerTiming], blocks: usize) -> (f64, f64) {
    let time = |kind: &str| {
        layers
            .iter()
            .find(|l| l.kind == kind)
            .map_or((0.0, 0.0), |l| (l.fwd_s, l.bwd_s))
    };
    let (e, k, h) = (time("embed"), time("block"), time("head"));
    (
        e.0 + blocks as f64 * k.0 + h.0,
        e.1 + blocks as f64 * k.1 + h.1,
    )
}

fn ratio(chunk: f64, sum: f64) -> f64 {
    if sum > 0.0 {
        chunk / sum
    } else {
        1.0
    }
}

/// The chunk depths a curve measures: 1, 2, 4, ... up to the model's blocks, and the
/// model's blocks (the chunk of a pipeline of one stage).
pub fn depths(n_layers: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..)
        .map(|k| 1usize << k)
        .take_while(|&b| b < n_layers)
        .collect();
    v.push(n_layers.max(1));
    v
}

/// The chunk ratio of each depth in `blocks` (`layers`: this rank's layer timings at the
/// same micro-batch size and tp degree). The planner multiplies these same layer timings
/// by the ratio, so a chunk of a measured depth is predicted at its measured time.
pub fn depth_curve(
    shape: &ModelShape,
    micro_batch_size: usize,
    opts: &ProfileOptions,
    layers: &[LayerTiming],
    blocks: &[usize],
    tp_rank: TpRank,
    tp: &mut dyn Communicator,
) -> Result<Vec<ChunkScale>> {
    let chunks: Vec<(usize, usize)> = blocks.iter().map(|&n| (n, STASH)).collect();
    let times = time_chunks(shape, micro_batch_size, opts, &chunks, false, tp_rank, tp)?;
    Ok(blocks
        .iter()
        .zip(times)
        .map(|(&n, t)| {
            let (f, b) = layers_sum(layers, n);
            ChunkScale {
                blocks: n,
                fwd: ratio(t.fwd_s, f),
                bwd: ratio(t.bwd_s, b),
            }
        })
        .collect())
}

/// How much slower a chunk of [`REFERENCE_BLOCKS`] blocks runs than the sum of its layers
/// timed one at a time, forward and backward: the allocator growing and faulting in the
/// stashed activations, a bigger autograd graph. A ratio below 1 is kept (the layers
/// alone then carried the overhead).
pub fn chunk_scale(
    shape: &ModelShape,
    micro_batch_size: usize,
    opts: &ProfileOptions,
    layers: &[LayerTiming],
    tp: &mut dyn Communicator,
) -> Result<(f64, f64)> {
    let blocks = shape.n_layers.clamp(1, REFERENCE_BLOCKS);
    let c = depth_curve(
        shape,
        micro_batch_size,
        opts,
        layers,
        &[blocks],
        TpRank::SINGLE,
        tp,
    )?;
    Ok(c.first().map_or((1.0, 1.0), |c| (c.fwd, c.bwd)))
}

/// The zero-bubble split of a [`REFERENCE_BLOCKS`] chunk's backward against its fused
/// backward, timed alternately so that both see the same machine: (`I`, `W`) as
/// fractions of the fused backward.
pub fn split_scale(
    shape: &ModelShape,
    micro_batch_size: usize,
    opts: &ProfileOptions,
    tp: &mut dyn Communicator,
) -> Result<(f64, f64)> {
    let blocks = shape.n_layers.clamp(1, REFERENCE_BLOCKS);
    let model = chunk_model(shape, blocks, TpRank::SINGLE)?;
    let tokens = random_tokens(shape, micro_batch_size, 8)?;
    let (mut i, mut w) = (Vec::new(), Vec::new());
    for rep in 0..opts.warmup + opts.runs {
        let fused = one_rep(&model, &tokens, STASH, false, tp)?;
        let split = one_rep(&model, &tokens, STASH, true, tp)?;
        if rep >= opts.warmup {
            i.push(ratio(split.bwd_s, fused.bwd_s));
            w.push(ratio(split.weight_s, fused.bwd_s));
        }
        for p in model.params() {
            let _ = p.tensor.grad().f_zero_();
        }
    }
    Ok((median(i), median(w)))
}

/// The stash depths a stash curve measures: 1, [`STASH`] and `most` (the config's
/// microbatches: GPipe's in flight).
pub fn stash_depths(most: usize) -> Vec<usize> {
    let mut v = vec![1, STASH, most.max(1)];
    v.sort_unstable();
    v.dedup();
    v
}

/// A [`REFERENCE_BLOCKS`] chunk with each of `stashes` microbatches in flight against the
/// same chunk with [`STASH`], timed in turn (the ratio at [`STASH`] is 1).
pub fn stash_curve(
    shape: &ModelShape,
    micro_batch_size: usize,
    opts: &ProfileOptions,
    stashes: &[usize],
    tp: &mut dyn Communicator,
) -> Result<Vec<ChunkScale>> {
    let blocks = shape.n_layers.clamp(1, REFERENCE_BLOCKS);
    let mut chunks = vec![(blocks, STASH)];
    chunks.extend(
        stashes
            .iter()
            .filter(|&&k| k != STASH)
            .map(|&k| (blocks, k)),
    );
    let times = time_chunks(
        shape,
        micro_batch_size,
        opts,
        &chunks,
        false,
        TpRank::SINGLE,
        tp,
    )?;
    let base = times.first().copied().unwrap_or_default();
    let mut curve: Vec<ChunkScale> = chunks
        .iter()
        .zip(&times)
        .map(|(&(_, k), t)| ChunkScale {
            blocks: k,
            fwd: ratio(t.fwd_s, base.fwd_s),
            bwd: ratio(t.bwd_s, base.bwd_s),
        })
        .collect();
    curve.sort_by_key(|c| c.blocks);
    Ok(curve)
}
