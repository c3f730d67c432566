//! Data parallelism: averaging gradients over the data-parallel group with bucketed
//! all-reduces (as Horovod and PyTorch DDP do): gradients are packed, in parameter order,
//! into flat f32 buckets of at most [`BUCKET_BYTES`], each bucket is summed across the
//! group in one collective, divided by the group size and unpacked.
//!
//! Invariant: after [`all_reduce_mean_grads`], every replica holds bit-identical
//! gradients (the collective's result is the same on every rank).

use crate::comm::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::model::Param;
use tch::{Kind, Tensor};

/// Largest bucket, in bytes (25 MiB, PyTorch DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

/// Averages the gradients of `params` over `dp`. A no-op for a group of one.
pub fn all_reduce_mean_grads(params: &[Param], dp: &mut dyn Communicator) -> Result<()> {
    let n = dp.size();
    if n == 1 {
        return Ok(());
    }
    let torch = |what: &'static str| Error::torch(what);
    let mut start = 0;
    while start < params.len() {
        // Fill one bucket (always at least one parameter).
        let mut end = start;
        let mut elems = 0usize;
        while end < params.len()
            && (end == start || (elems + params[end].tensor.numel()) * 4 <= BUCKET_BYTES)
        {
            elems += params[end].tensor.numel();
            end += 1;
        }
        let mut flat = vec![0f32; elems];
        let mut at = 0;
        for p in &params[start..end] {
            let g = p.tensor.grad();
            let k = p.tensor.numel();
            g.f_to_kind(Kind::Float)
                .and_then(|g| g.f_contiguous())
                .and_then(|g| {
                    g.f_view([-1])
                        .map(|v| v.f_copy_data(&mut flat[at..at + k], k))
                })
                .map_err(torch("packing gradients"))?
                .map_err(torch("packing gradients"))?;
            at += k;
        }
        dp.all_reduce_f32(&mut flat, ReduceOp::Sum)?;
        let scale = 1.0 / n as f32;
        flat.iter_mut().for_each(|x| *x *= scale);
        let mut at = 0;
        tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
            for p in &params[start..end] {
                let k = p.tensor.numel();
                let mut g = p.tensor.grad();
                let avg = Tensor::f_from_slice(&flat[at..at + k])?.f_view(g.size().as_slice())?;
                g.f_copy_(&avg)?;
                at += k;
            }
            Ok(())
        })
        .map_err(torch("unpacking gradients"))?;
        start = end;
    }
    Ok(())
}

/// Tied word embeddings across pipeline stages: the first chunk's embedding `E` and the
/// last chunk's copy of it (used as the LM head, logits = h Eᵀ) must see the same gradient,
/// `∂L/∂E = ∂L/∂E|embedding + ∂L/∂E|head`. Sums the gradients of every local copy of
/// `embed.wte` (shards, with tensor parallelism) over the pipeline group and writes the sum
/// back into each copy, so identical AdamW updates keep the copies equal. Every rank of
/// the pipeline group calls it; ranks without a copy contribute zeros of `numel` elements.
pub fn sum_tied_embedding_grads(
    params: &[Param],
    numel: usize,
    pp: &mut dyn Communicator,
) -> Result<()> {
    let copies: Vec<&Param> = params.iter().filter(|p| p.name == "embed.wte").collect();
    let mut sum = vec![0f32; numel];
    let mut buf = vec![0f32; numel];
    for p in &copies {
        if p.tensor.numel() != numel {
            return Err(Error::Internal(format!(
                "tied embedding copy has {} elements, expected {numel}",
                p.tensor.numel()
            )));
        }
        p.tensor
            .grad()
            .f_contiguous()
            .and_then(|g| g.f_view([-1]).map(|v| v.f_copy_data(&mut buf, numel)))
            .map_err(Error::torch("reading a tied gradient"))?
            .map_err(Error::torch("reading a tied gradient"))?;
        sum.iter_mut().zip(&buf).for_each(|(s, b)| *s += b);
    }
    pp.all_reduce_f32(&mut sum, ReduceOp::Sum)?;
    tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
        for p in &copies {
            let mut g = p.tensor.grad();
            let total = Tensor::f_from_slice(&sum)?.f_view(g.size().as_slice())?;
            g.f_copy_(&total)?;
        }
        Ok(())
    })
    .map_err(Error::torch("writing tied gradients"))
}
