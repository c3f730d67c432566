//! Data parallelism: averaging gradients over the data-parallel group with bucketed
//! all-reduces that work in place on the flat gradient buffers ([`crate::flat`]): each
//! bucket is a contiguous view of at most [`BUCKET_BYTES`] of a group's buffer, summed
//! across the group in one collective directly in the buffer's memory (no packing), then
//! divided by the group size.
//!
//! Training overlaps that reduction with the backward ([`overlap::GradSync`]: buckets
//! started as soon as their gradients are final, through post-accumulate-grad hooks
//! ([`hook`]) and the executor's action boundaries); [`all_reduce_mean_grads`] is the
//! synchronous form (profiling, and the reference the overlap is bit-identical to).
//!
//! Invariant: after [`all_reduce_mean_grads`] or [`overlap::GradSync::finish`], every
//! replica holds bit-identical gradients (the collective's result is the same on every
//! rank).

pub mod hook;
pub mod overlap;

pub use overlap::GradSync;

use crate::comm::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::flat::FlatBuffers;
use crate::model::Param;
use tch::{Kind, Tensor};

/// Largest bucket, in bytes (25 MiB, PyTorch DDP's default).
pub const BUCKET_BYTES: usize = 25 << 20;

/// The f32 elements of a contiguous CPU tensor, for a collective to work on in place.
///
/// # Safety
/// `t` must be a contiguous f32 CPU tensor that outlives the slice, and nothing else may
/// touch its memory while the slice is alive.
unsafe fn f32_slice_mut(t: &mut Tensor) -> &mut [f32] {
    std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel())
}

/// Averages every gradient buffer of `flat` over `dp`. A no-op for a group of one.
pub fn all_reduce_mean_grads(flat: &FlatBuffers, dp: &mut dyn Communicator) -> Result<()> {
    let n = dp.size();
    if n == 1 {
        return Ok(());
    }
    let per_bucket = (BUCKET_BYTES / 4) as i64;
    for g in &flat.groups {
        if g.kind != Kind::Float || !g.grads.is_contiguous() || g.grads.device() != tch::Device::Cpu
        {
            return Err(Error::Internal(format!(
                "data-parallel all-reduce needs contiguous f32 CPU gradients, got {:?}",
                g.kind
            )));
        }
        let total = g.grads.numel() as i64;
        let mut start = 0;
        while start < total {
            let len = per_bucket.min(total - start);
            let mut bucket = g
                .grads
                .f_narrow(0, start, len)
                .map_err(Error::torch("gradient bucket"))?;
            // SAFETY: a contiguous slice of the f32 CPU buffer, used only by this call.
            dp.all_reduce_f32(unsafe { f32_slice_mut(&mut bucket) }, ReduceOp::Sum)?;
            let _ = bucket
                .f_mul_scalar_(1.0 / n as f64)
                .map_err(Error::torch("gradient average"))?;
            start += len;
        }
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
