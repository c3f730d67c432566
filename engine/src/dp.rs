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
