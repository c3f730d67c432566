//! The gradient reductions between a step's backward and its optimizer update: tied
//! embeddings (summed over the pipeline), data parallelism (averaged over replicas),
//! global-norm clipping (over the whole model), and capture for equivalence tests.
//!
//! Invariant: after [`reduce`], every replica and every copy of a tied embedding holds the
//! same gradient, so identical AdamW updates keep them equal.

use super::setup::RankState;
use crate::comm::groups::ParallelComms;
use crate::dp::{all_reduce_mean_grads, sum_tied_embedding_grads};
use crate::error::{Error, Result};
use crate::model::Param;
use crate::shard::ShardSpec;
use std::time::Instant;

/// A parameter's gradient as one rank holds it (a shard, with tensor parallelism).
#[derive(Clone, Debug)]
pub struct CapturedGrad {
    pub name: String,
    pub shape: Vec<i64>,
    pub values: Vec<f32>,
    pub tied_copy: bool,
    /// Where the local gradient sits in the full one.
    pub spec: ShardSpec,
}

/// Sums tied-embedding gradients over the pipeline, averages all over replicas, and
/// under sequence parallelism sums the sequence-split regions' replicated parameters
/// over the tp group (after the replicas, as Megatron's `finalize_model_grads`). The
/// replicas' average is the buckets started during the backward, then the rest (see
/// [`crate::dp::overlap`]).
pub fn reduce(rank: &RankState, comms: &mut ParallelComms) -> Result<()> {
    if let Some(numel) = rank.tied_numel {
        sum_tied_embedding_grads(&rank.params, numel, comms.pp.as_mut())?;
    }
    match &rank.grad_sync {
        Some(sync) => sync.finish(&rank.flat, &mut comms.dp)?,
        None => all_reduce_mean_grads(&rank.flat, comms.dp.as_mut())?,
    }
    if rank
        .chunks
        .iter()
        .any(crate::model::Model::sequence_parallel)
    {
        sum_sequence_parallel_grads(&rank.params, comms.tp.as_mut())?;
    }
    Ok(())
}

/// Sums the gradients of the [`Param::sequence_parallel`] parameters over the tp group,
/// in one all-reduce of their concatenation: each tp rank's gradient covers only its
/// block of token rows, and the sum is the whole microbatch's (identical on every rank, so the
/// replicated parameters stay equal).
pub fn sum_sequence_parallel_grads(
    params: &[Param],
    tp: &mut dyn crate::comm::Communicator,
) -> Result<()> {
    let grads: Vec<tch::Tensor> = params
        .iter()
        .filter(|p| p.sequence_parallel)
        .map(|p| p.tensor.grad())
        .collect();
    if grads.is_empty() || tp.size() == 1 {
        return Ok(());
    }
    let c = "sequence-parallel gradients";
    let flat = tch::Tensor::f_cat(
        &grads
            .iter()
            .map(|g| g.f_reshape([-1]))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::torch(c))?,
        0,
    )
    .map_err(Error::torch(c))?;
    let summed = crate::model::tape::all_reduce(&flat, tp, crate::comm::ReduceOp::Sum)?;
    let mut at = 0;
    tch::no_grad(|| {
        for mut g in grads {
            let n = g.numel() as i64;
            let part = summed
                .f_narrow(0, at, n)
                .and_then(|s| s.f_view(g.size().as_slice()))
                .map_err(Error::torch(c))?;
            g.f_copy_(&part).map_err(Error::torch(c))?;
            at += n;
        }
        Ok(())
    })
}

/// With `clip`, the global gradient norm (every parameter counted once over the whole
/// mesh), after scaling the gradients down to it when larger; the seconds spent waiting
/// in the all-reduce are added to `wait_s`.
pub fn clip(
    rank: &RankState,
    comms: &mut ParallelComms,
    clip: Option<f64>,
    wait_s: &mut f64,
) -> Result<Option<f64>> {
    let Some(clip) = clip else { return Ok(None) };
    // Replicas hold identical gradients: count each parameter once, and one replicated
    // over the tp group on its owner only.
    let mut sq = [if comms.coord.dp == 0 {
        rank.flat.owned_grad_sq_norm()?
    } else {
        0.0
    }];
    let t_reduce = Instant::now();
    comms.world.all_reduce_sum(&mut sq)?;
    *wait_s += t_reduce.elapsed().as_secs_f64();
    let norm = sq[0].sqrt();
    if norm > clip {
        rank.flat.scale_grads(clip / (norm + 1e-6))?;
    }
    Ok(Some(norm))
}

/// Copies this rank's gradients (for equivalence tests).
pub fn capture(params: &[Param]) -> Result<Vec<CapturedGrad>> {
    params
        .iter()
        .map(|p| {
            let g = p.tensor.grad();
            let n = g.numel();
            let mut values = vec![0f32; n];
            g.f_to_kind(tch::Kind::Float)
                .and_then(|g| g.f_contiguous())
                .and_then(|g| g.f_view([-1]).map(|v| v.f_copy_data(&mut values, n)))
                .map_err(Error::torch("capturing gradients"))?
                .map_err(Error::torch("capturing gradients"))?;
            Ok(CapturedGrad {
                name: p.name.clone(),
                shape: g.size(),
                values,
                tied_copy: p.tied_copy,
                spec: p.spec.clone(),
            })
        })
        .collect()
}
