//! Chunk timings: a chunk as the executor runs one (the embedding, `blocks` blocks and the
//! head in one [`Model`], [`STASH`] microbatches forward with their activations stashed,
//! then their backwards), against the sum of its layers timed one at a time. The ratios
//! ([`partitioner::profile::ChunkScale`]) are measured at several chunk depths, because
//! a deeper chunk has a larger working set (weights, autograd graph, stash) and runs each
//! block slower; at several stash depths (microbatches in flight), for the same reason;
//! and on the zero-bubble split backward (`I` then `W`), whose parts do not
//! add up to the fused backward.
//!
//! The chunks run on a warm heap, as a training rank's do. A rank keeps its heap from
//! step to step, but a profile loop that frees everything between repetitions lets glibc
//! trim the heap top (past twice its dynamic mmap threshold), so each repetition would
//! fault its stash's pages in again: the forward, which allocates the stash, read up to
//! 1.24x a training rank's. So the first repetition keeps one more microbatch's forward
//! of the chunk with the largest stash alive at its peak ([`Pin`]): it sits at the heap
//! top until the timings end, and the repetitions below it reuse their pages. No malloc
//! setting changes (a `mallopt` would freeze glibc's dynamic mmap threshold). The
//! zero-bubble split compares two backwards of one chunk and is not pinned.
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

/// One extra forward held from the peak of the first repetition to the end of the
/// timings, so that glibc cannot trim the heap under it (see the module docs).
#[derive(Default)]
pub struct Pin(Option<Forward>);

impl Pin {
    /// Whether the pin is already held.
    pub fn held(&self) -> bool {
        self.0.is_some()
    }
}

/// The index of the chunk among `chunks` ((blocks, stashed microbatches)) whose
/// repetition reaches the highest heap: the most blocks times microbatches held.
pub fn largest_stash(chunks: &[(usize, usize)]) -> Option<usize> {
    (0..chunks.len()).max_by_key(|&i| (chunks[i].0 * chunks[i].1, i))
}

/// One repetition: `depth` forwards, then their backwards (and with `split` the weight
/// work after all of them, as zero-bubble runs `W` late); seconds per microbatch. With
/// an empty `pin`, one more forward, run between the timed forwards and backwards at the
/// heap's peak, fills it.
fn one_rep(
    model: &Model,
    tokens: &tch::Tensor,
    depth: usize,
    split: bool,
    tp: &mut dyn Communicator,
    pin: Option<&mut Pin>,
) -> Result<ChunkTiming> {
    let t0 = Instant::now();
    let mut stash: Vec<Forward> = Vec::with_capacity(depth);
    for _ in 0..depth {
        stash.push(model.forward(tokens, Some(tokens), tp, Pass::Train { split })?);
    }
    let t1 = Instant::now();
    if let Some(pin) = pin.filter(|p| !p.held()) {
        pin.0 = Some(model.forward(tokens, Some(tokens), tp, Pass::Train { split })?);
    }
    let t1b = Instant::now();
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
        bwd_s: per(t1b, t2),
        weight_s: if split { per(t2, t3) } else { 0.0 },
    })
}

/// Times chunks of each (blocks, stashed microbatches) in `chunks` on tp rank `tp_rank`
/// (see the module docs), one repetition of every chunk in turn, so that a machine whose
/// speed drifts moves them alike, on a heap pinned at the largest chunk's peak ([`Pin`]);
/// `split` runs the zero-bubble backward. One timing per chunk.
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
    let (mut pin, pinned) = (Pin::default(), largest_stash(chunks));
    for rep in 0..opts.warmup + opts.runs {
        for (i, ((model, depth), times)) in models.iter().zip(reps.iter_mut()).enumerate() {
            let at_peak = (Some(i) == pinned).then_some(&mut pin);
            let t = one_rep(model, &tokens, *depth, split, tp, at_peak)?;
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
        let fused = one_rep(&model, &tokens, STASH, false, tp, None)?;
        let split = one_rep(&model, &tokens, STASH, true, tp, None)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;

    #[test]
    fn the_pin_goes_to_the_chunk_holding_the_most() {
        assert_eq!(largest_stash(&[(4, 2), (4, 1), (4, 8)]), Some(2));
        assert_eq!(largest_stash(&[(1, 2), (2, 2), (8, 2), (4, 2)]), Some(2));
        // Ties: the later chunk, so the pin is taken after every equal peak.
        assert_eq!(largest_stash(&[(2, 4), (4, 2)]), Some(1));
        assert_eq!(largest_stash(&[]), None);
    }

    #[test]
    fn the_first_repetition_fills_the_pin_and_no_later_one_refills_it() -> Result<()> {
        let shape = ModelShape::gpt(8, 4, 8, 2, 2, 16);
        let model = chunk_model(&shape, 2, TpRank::SINGLE)?;
        let tokens = random_tokens(&shape, 2, 8)?;
        let mut tp = LocalComm::group(1).pop().expect("one rank");
        let mut pin = Pin::default();
        one_rep(&model, &tokens, STASH, false, &mut tp, Some(&mut pin))?;
        assert!(pin.held());
        let held = pin.0.as_ref().map(|f| f.output.data_ptr());
        one_rep(&model, &tokens, STASH, false, &mut tp, Some(&mut pin))?;
        assert_eq!(pin.0.as_ref().map(|f| f.output.data_ptr()), held);
        // The pinned forward stays a live graph: its backward still runs.
        let out = pin.0.take().expect("held");
        model.backward(out, Grad::LossScale(1.0), &mut tp)?;
        Ok(())
    }

    #[test]
    fn pinned_timings_cover_every_chunk() -> Result<()> {
        let shape = ModelShape::gpt(8, 4, 8, 2, 2, 16);
        let opts = ProfileOptions {
            warmup: 1,
            runs: 2,
            threads: 1,
        };
        let mut tp = LocalComm::group(1).pop().expect("one rank");
        let chunks = [(1, 2), (2, 3), (2, 1)];
        let t = time_chunks(&shape, 2, &opts, &chunks, false, TpRank::SINGLE, &mut tp)?;
        assert_eq!(t.len(), chunks.len());
        assert!(t
            .iter()
            .all(|c| c.fwd_s > 0.0 && c.bwd_s > 0.0 && c.weight_s == 0.0));
        Ok(())
    }
}
