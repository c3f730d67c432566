//! The collectives of Megatron sequence parallelism on `[b, s, d]` activations, with the
//! split taken over the *flattened token rows*: seen as `[b·s, d]` (row `i·s + t` is
//! token `t` of sequence `i`), a microbatch's rows are cut into `p` equal contiguous
//! blocks over the tensor-parallel group, rank `r` holding rows `[r·n, (r+1)·n)`,
//! `n = b·s/p`. A block is stored contiguously with the shape `[b, s/p, d]`: those `n`
//! rows in order, so the shape is bookkeeping only (dim 1 of a block is *not* "tokens
//! `r·s/p ..` of every sequence"; for `b = 1` it happens to be). This is Megatron's
//! `[s, b, h]` trick for our `[b, s, d]` layout: a rank's block is one contiguous piece of
//! the whole activation, so no collective needs a permuting copy.
//!
//! * [`all_gather`]: the `p` blocks, concatenated in rank order straight into the
//!   caller's new `[b, s, d]` (no permute);
//! * [`reduce_scatter`]: `[b, s, d]` partial sums → rank `r`'s block of their sum, the
//!   collective reading the contiguous partials and writing the block (no permute);
//! * [`split`]: a replicated `[b, s, d]` → rank `r`'s block, a view of its rows (no
//!   communication, no copy when the input is contiguous).
//!
//! Only row-wise work may run on blocks (per-token norms, residual adds, biases added
//! after a reduction): it cannot tell which rows it got. Anything that needs a token's
//! position or its sequence (attention, positions, the loss) runs on the gathered whole.
//! The block's shape is the same as a `[b, s/p, d]` microbatch's, so code never infers
//! "block or whole" from a shape; it asks the tape's (or model's) sequence-parallel flag.
//!
//! Requirement: `s % p == 0` (checked by the config, `model.seq_len`); `b` is free (a
//! microbatch of 1 or 3 sequences splits over tp = 2 as well).
//!
//! Invariant: `all_gather(split(x)) == x`, and `reduce_scatter` sums each element as the
//! tensor-parallel all-reduce does (at tp = 2 one addition per element, and addition
//! commutes, so sequence parallelism changes no activation bit). The replicated
//! parameters' gradients are summed per block, then over tp, so they differ from the
//! unsplit sum (and from another block layout) only in rounding.

use super::Ctx;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

fn dims(t: &Tensor, what: &str) -> Result<(i64, i64, i64)> {
    match t.size().as_slice() {
        [b, s, d] => Ok((*b, *s, *d)),
        other => Err(Error::Internal(format!(
            "sequence-parallel {what} of a tensor of shape {other:?}, not [b, s, d]"
        ))),
    }
}

/// `t` as a contiguous f32 CPU tensor (a no-op for activations, which already are).
fn contiguous_f32(t: &Tensor, what: &str) -> Result<Tensor> {
    let t = t
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .ctx(what)?;
    if t.device() != tch::Device::Cpu {
        return Err(Error::Internal(format!(
            "sequence-parallel {what} needs a CPU tensor, got one on {:?}",
            t.device()
        )));
    }
    Ok(t)
}

/// Runs `f` on the f32 memory of `input` (read) and `out` (written).
fn with_slices(
    input: &Tensor,
    out: &Tensor,
    f: impl FnOnce(&[f32], &mut [f32]) -> Result<()>,
) -> Result<()> {
    let (n, m) = (input.numel(), out.numel());
    // SAFETY: both are contiguous f32 CPU tensors alive for the call; `out` is freshly
    // allocated, so the two do not overlap, and nothing else touches them meanwhile.
    let (send, recv) = unsafe {
        (
            std::slice::from_raw_parts(input.data_ptr() as *const f32, n),
            std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, m),
        )
    };
    f(send, recv)
}

/// Gathers every rank's `[b, s/p, d]` block (its contiguous rows, see the module docs)
/// into `[b, s, d]`: block `r` lands at rows `[r·n, (r+1)·n)`, written by the collective.
pub fn all_gather(t: &Tensor, tp: &mut dyn Communicator) -> Result<Tensor> {
    let p = tp.size() as i64;
    if p == 1 {
        return Ok(t.shallow_clone());
    }
    let c = "sequence-parallel all-gather";
    let (b, sl, d) = dims(t, "all-gather")?;
    let local = contiguous_f32(t, c)?;
    let whole = Tensor::f_empty([b, p * sl, d], (Kind::Float, local.device())).ctx(c)?;
    with_slices(&local, &whole, |send, recv| tp.all_gather_into(send, recv))?;
    whole.f_to_kind(t.kind()).ctx(c)
}

/// Sums `[b, s, d]` over the group and returns this rank's block of the sum (its rows
/// `[r·n, (r+1)·n)` as `[b, s/p, d]`), reduce-scattered straight from the partials.
pub fn reduce_scatter(t: &Tensor, tp: &mut dyn Communicator) -> Result<Tensor> {
    let p = tp.size() as i64;
    if p == 1 {
        return Ok(t.shallow_clone());
    }
    let c = "sequence-parallel reduce-scatter";
    let (b, s, d) = dims(t, "reduce-scatter")?;
    let sl = block_len(s, p)?;
    let whole = contiguous_f32(t, c)?;
    let out = Tensor::f_empty([b, sl, d], (Kind::Float, whole.device())).ctx(c)?;
    with_slices(&whole, &out, |send, recv| {
        tp.reduce_scatter_into(send, recv)
    })?;
    out.f_to_kind(t.kind()).ctx(c)
}

/// Rank `rank`'s block of a replicated `[b, s, d]`: rows `[rank·n, (rank+1)·n)` of its
/// `[b·s, d]` view, shaped `[b, s/p, d]` (a view of `t` when `t` is contiguous).
pub fn split(t: &Tensor, rank: usize, size: usize) -> Result<Tensor> {
    if size == 1 {
        return Ok(t.shallow_clone());
    }
    let (b, s, d) = dims(t, "split")?;
    let sl = block_len(s, size as i64)?;
    let n = b * sl;
    t.f_reshape([b * s, d])
        .and_then(|rows| rows.f_narrow(0, rank as i64 * n, n))
        .and_then(|x| x.f_view([b, sl, d]))
        .ctx("sequence-parallel split")
}

/// `s / p`, the second dimension of a block.
fn block_len(s: i64, p: i64) -> Result<i64> {
    if s % p != 0 {
        return Err(Error::Internal(format!(
            "a microbatch of sequences of {s} tokens does not split into {p} blocks of shape \
             [b, s/{p}, d]"
        )));
    }
    Ok(s / p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::on_ranks;

    /// A `[b, s, d]` of distinct values (integers: every sum below is exact).
    fn tokens(b: i64, s: i64, d: i64) -> Tensor {
        Tensor::arange(b * s * d, (Kind::Float, tch::Device::Cpu)).view([b, s, d])
    }

    /// Rank `r`'s block by definition: rows `[r·n, (r+1)·n)` of the `[b·s, d]` view.
    fn rows_of(x: &Tensor, r: i64, p: i64) -> Tensor {
        let (b, s, d) = dims(x, "test").unwrap();
        let n = b * s / p;
        x.reshape([b * s, d])
            .narrow(0, r * n, n)
            .reshape([b, s / p, d])
    }

    /// (b, s, p): microbatches divisible by p or not (1 and 3 sequences over 2 ranks), a
    /// block straddling two sequences, and p = 3, 4.
    const SHAPES: [(i64, i64, i64); 6] = [
        (2, 6, 3),
        (1, 8, 2),
        (3, 4, 2),
        (3, 6, 2),
        (2, 8, 4),
        (1, 6, 3),
    ];

    #[test]
    fn split_takes_contiguous_rows_without_copying() {
        for (b, s, p) in SHAPES {
            let x = tokens(b, s, 5);
            for r in 0..p {
                let mine = split(&x, r as usize, p as usize).unwrap();
                assert_eq!(mine.size(), vec![b, s / p, 5], "{b} {s} {p}");
                assert!(
                    mine.equal(&rows_of(&x, r, p)),
                    "rank {r} of (b, s, p) = {b} {s} {p}"
                );
                // A view of the replicated activation: its rows start at r·n·d floats.
                let offset = (r * b * s / p * 5) as usize * 4;
                assert_eq!(mine.data_ptr() as usize, x.data_ptr() as usize + offset);
            }
        }
    }

    #[test]
    fn all_gather_of_split_is_the_whole() {
        for (b, s, p) in SHAPES {
            let ranks = on_ranks(p as usize, move |r, c| {
                let x = tokens(b, s, 3);
                let back = all_gather(&split(&x, r, p as usize)?, c)?;
                assert_eq!(back.size(), vec![b, s, 3]);
                assert!(back.equal(&x), "rank {r} of (b, s, p) = {b} {s} {p}");
                Ok(())
            });
            ranks.into_iter().for_each(Result::unwrap);
        }
    }

    #[test]
    fn reduce_scatter_of_partial_sums_is_the_split_sum() {
        for (b, s, p) in SHAPES {
            let ranks = on_ranks(p as usize, move |r, c| {
                let x = tokens(b, s, 3);
                // Every rank contributes (r + 1)·x: the sum is p(p + 1)/2 · x, and each
                // keeps its rows of it.
                let partial = x.f_mul_scalar((r + 1) as f64).unwrap();
                let mine = reduce_scatter(&partial, c)?;
                let total = x.f_mul_scalar((p * (p + 1) / 2) as f64).unwrap();
                assert_eq!(mine.size(), vec![b, s / p, 3]);
                assert!(
                    mine.equal(&rows_of(&total, r as i64, p)),
                    "rank {r} of (b, s, p) = {b} {s} {p}"
                );
                Ok(())
            });
            ranks.into_iter().for_each(Result::unwrap);
        }
    }

    /// At tp = 2 the reduce-scatter adds each element once, as the all-reduce it replaces
    /// does: bit-identical to splitting `a + b` (non-integer values, so rounding shows).
    #[test]
    fn reduce_scatter_at_tp2_is_bit_identical_to_the_sum() {
        let part = |r: usize| {
            let x = tokens(3, 4, 7).f_mul_scalar(0.37 + r as f64).unwrap();
            x.f_sin().unwrap().f_mul_scalar(1.0e3).unwrap()
        };
        let ranks = on_ranks(2, move |r, c| {
            let sum = part(0).f_add(&part(1)).unwrap();
            let mine = reduce_scatter(&part(r), c)?;
            assert!(mine.equal(&split(&sum, r, 2)?), "rank {r}");
            Ok(())
        });
        ranks.into_iter().for_each(Result::unwrap);
    }

    #[test]
    fn a_sequence_that_does_not_split_is_an_error() {
        let x = tokens(2, 5, 3);
        assert!(split(&x, 0, 2).is_err());
    }
}
