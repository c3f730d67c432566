//! The collectives of Megatron sequence parallelism on `[b, s, d]` activations: the
//! sequence (dim 1) is split into `p` equal blocks over the tensor-parallel group, rank
//! `r` holding tokens `[r·s/p, (r+1)·s/p)`.
//!
//! * [`all_gather`]: `[b, s/p, d]` blocks → the whole `[b, s, d]` on every rank;
//! * [`reduce_scatter`]: `[b, s, d]` partial sums → rank `r`'s block of their sum;
//! * [`split`]: a replicated `[b, s, d]` → rank `r`'s block (no communication).
//!
//! The communicator moves contiguous blocks, so the sequence blocks are put first
//! (`[p, b, s/p, d]`) around each collective: the collective reads the input tensor's
//! memory and writes the output tensor's (no host buffers), and the one permuting copy
//! is libtorch's.
//!
//! Invariant: `all_gather(split(x)) == x`, and `reduce_scatter` sums as the tensor-parallel
//! all-reduce does (at tp = 2 one addition per element, so sequence parallelism changes
//! no activation bit).

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

/// Gathers every rank's `[b, s/p, d]` block into `[b, s, d]`.
pub fn all_gather(t: &Tensor, tp: &mut dyn Communicator) -> Result<Tensor> {
    let p = tp.size() as i64;
    if p == 1 {
        return Ok(t.shallow_clone());
    }
    let c = "sequence-parallel all-gather";
    let (b, sl, d) = dims(t, "all-gather")?;
    let local = contiguous_f32(t, c)?;
    let blocks = Tensor::f_empty([p, b, sl, d], (Kind::Float, local.device())).ctx(c)?;
    with_slices(&local, &blocks, |send, recv| tp.all_gather_into(send, recv))?;
    blocks
        .f_permute([1, 0, 2, 3])
        .and_then(|x| x.f_contiguous())
        .and_then(|x| x.f_view([b, p * sl, d]))
        .and_then(|x| x.f_to_kind(t.kind()))
        .ctx(c)
}

/// Sums `[b, s, d]` over the group and returns this rank's `[b, s/p, d]` block.
pub fn reduce_scatter(t: &Tensor, tp: &mut dyn Communicator) -> Result<Tensor> {
    let p = tp.size() as i64;
    if p == 1 {
        return Ok(t.shallow_clone());
    }
    let c = "sequence-parallel reduce-scatter";
    let (b, s, d) = dims(t, "reduce-scatter")?;
    if s % p != 0 {
        return Err(Error::Internal(format!(
            "a sequence of {s} tokens does not split over {p} ranks"
        )));
    }
    let blocks = t
        .f_view([b, p, s / p, d])
        .and_then(|x| x.f_permute([1, 0, 2, 3]))
        .ctx(c)?;
    let blocks = contiguous_f32(&blocks, c)?;
    let out = Tensor::f_empty([b, s / p, d], (Kind::Float, blocks.device())).ctx(c)?;
    with_slices(&blocks, &out, |send, recv| {
        tp.reduce_scatter_into(send, recv)
    })?;
    out.f_to_kind(t.kind()).ctx(c)
}

/// Rank `rank`'s `[b, s/p, d]` block of a replicated `[b, s, d]`.
pub fn split(t: &Tensor, rank: usize, size: usize) -> Result<Tensor> {
    if size == 1 {
        return Ok(t.shallow_clone());
    }
    let (_, s, _) = dims(t, "split")?;
    if s % size as i64 != 0 {
        return Err(Error::Internal(format!(
            "a sequence of {s} tokens does not split over {size} ranks"
        )));
    }
    let n = s / size as i64;
    t.f_narrow(1, rank as i64 * n, n)
        .and_then(|x| x.f_contiguous())
        .ctx("sequence-parallel split")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::LocalComm;

    #[test]
    fn gather_scatter_and_split_agree() {
        let x = Tensor::arange(2 * 6 * 3, (Kind::Float, tch::Device::Cpu)).view([2, 6, 3]);
        let comms = LocalComm::group(3);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                let x = x.copy();
                std::thread::spawn(move || {
                    let r = c.rank().0;
                    let mine = split(&x, r, 3).unwrap();
                    assert_eq!(mine.size(), vec![2, 2, 3]);
                    let back = all_gather(&mine, &mut c).unwrap();
                    assert!(back.equal(&x));
                    // Every rank contributes (r + 1)·x: the sum is 6x, and each keeps its
                    // block.
                    let mine_x = x.f_mul_scalar((r + 1) as f64).unwrap();
                    let rs = reduce_scatter(&mine_x, &mut c).unwrap();
                    assert!(rs.equal(&split(&x, r, 3).unwrap().f_mul_scalar(6.0).unwrap()));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
