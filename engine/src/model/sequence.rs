//! The collectives of Megatron sequence parallelism on `[b, s, d]` activations: the
//! sequence (dim 1) is split into `p` equal blocks over the tensor-parallel group, rank
//! `r` holding tokens `[r·s/p, (r+1)·s/p)`.
//!
//! * [`all_gather`]: `[b, s/p, d]` blocks → the whole `[b, s, d]` on every rank;
//! * [`reduce_scatter`]: `[b, s, d]` partial sums → rank `r`'s block of their sum;
//! * [`split`]: a replicated `[b, s, d]` → rank `r`'s block (no communication).
//!
//! The communicator moves contiguous blocks, so the sequence blocks are put first
//! (`[p, b, s/p, d]`) around each collective.
//!
//! Invariant: `all_gather(split(x)) == x`, and `reduce_scatter` sums exactly as the
//! all-reduce of `reduce_from_tp_region` does (the communicator's reduce-scatter), so
//! sequence parallelism changes no number.

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

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let t = t
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .ctx("sequence-parallel buffer")?;
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.f_view([-1])
        .and_then(|x| x.f_copy_data(&mut v, n))
        .ctx("sequence-parallel buffer")?;
    Ok(v)
}

/// Gathers every rank's `[b, s/p, d]` block into `[b, s, d]`.
pub fn all_gather(t: &Tensor, tp: &mut dyn Communicator) -> Result<Tensor> {
    let p = tp.size() as i64;
    if p == 1 {
        return Ok(t.shallow_clone());
    }
    let (b, sl, d) = dims(t, "all-gather")?;
    let local = to_vec(t)?;
    let mut out = vec![0f32; local.len() * p as usize];
    tp.all_gather_f32(&local, &mut out)?;
    Tensor::f_from_slice(&out)
        .and_then(|x| x.f_view([p, b, sl, d]))
        .and_then(|x| x.f_permute([1, 0, 2, 3]))
        .and_then(|x| x.f_contiguous())
        .and_then(|x| x.f_view([b, p * sl, d]))
        .ctx("sequence-parallel all-gather")
}

/// Sums `[b, s, d]` over the group and returns this rank's `[b, s/p, d]` block.
pub fn reduce_scatter(t: &Tensor, tp: &mut dyn Communicator) -> Result<Tensor> {
    let p = tp.size() as i64;
    if p == 1 {
        return Ok(t.shallow_clone());
    }
    let (b, s, d) = dims(t, "reduce-scatter")?;
    if s % p != 0 {
        return Err(Error::Internal(format!(
            "sequence of {s} tokens does not split over {p} ranks"
        )));
    }
    let blocks = t
        .f_view([b, p, s / p, d])
        .and_then(|x| x.f_permute([1, 0, 2, 3]))
        .ctx("sequence-parallel reduce-scatter")?;
    let full = to_vec(&blocks)?;
    let mut out = vec![0f32; full.len() / p as usize];
    tp.reduce_scatter_f32(&full, &mut out)?;
    Tensor::f_from_slice(&out)
        .and_then(|x| x.f_view([b, s / p, d]))
        .ctx("sequence-parallel reduce-scatter")
}

/// Rank `rank`'s `[b, s/p, d]` block of a replicated `[b, s, d]`.
pub fn split(t: &Tensor, rank: usize, size: usize) -> Result<Tensor> {
    if size == 1 {
        return Ok(t.shallow_clone());
    }
    let (_, s, _) = dims(t, "split")?;
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
                    // Every rank contributes x: the sum is 3x, and each keeps its block.
                    let rs = reduce_scatter(&x, &mut c).unwrap();
                    assert!(rs.equal(&split(&x, r, 3).unwrap().f_mul_scalar(3.0).unwrap()));
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
