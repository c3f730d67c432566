//! Which weights a pruning method removes: keep-masks (1 = kept, 0 = pruned) for linear
//! weights stored `[in, out]` (`Y = XA`).
//!
//! * [`magnitude`]: the `round(s · n)` smallest `|w|` of one weight (ties broken by
//!   position, as `torch.topk` does for `torch.nn.utils.prune.l1_unstructured`);
//! * [`global_magnitude`]: the `round(s · Σn)` smallest `|w|` over several weights at once;
//! * [`two_four`]: in every 4 consecutive weights of a row of the weight in
//!   `nn.Linear`'s `[out, in]` layout (4 consecutive inputs of one output), keep the 2
//!   largest `|w|` (NVIDIA's 2:4 semi-structured sparsity).
//!
//! Invariant: masks have the weight's shape and dtype `Uint8`; exactly the requested
//! number of weights is pruned.

use crate::error::{Error, Result};
use crate::model::Ctx;
use tch::{Kind, Tensor};

const C: &str = "pruning mask";

/// Keeps all but the `round(sparsity · numel)` smallest `|w|` of `w`.
pub fn magnitude(w: &Tensor, sparsity: f64) -> Result<Tensor> {
    let n = w.numel();
    let k = ((sparsity * n as f64).round() as usize).min(n);
    let flat = w
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_abs())
        .and_then(|t| t.f_reshape([-1]))
        .ctx(C)?;
    let mut mask = Tensor::f_ones([n as i64], (Kind::Uint8, w.device())).ctx(C)?;
    if k > 0 {
        let (_, idx) = flat.f_topk(k as i64, 0, false, true).ctx(C)?;
        let _ = mask.f_index_fill_(0, &idx, 0).ctx(C)?;
    }
    mask.f_reshape(w.size()).ctx(C)
}

/// Keep-masks for `weights` that prune the `round(sparsity · Σ numel)` smallest `|w|`
/// over all of them together.
pub fn global_magnitude(weights: &[&Tensor], sparsity: f64) -> Result<Vec<Tensor>> {
    let flats: Vec<Tensor> = weights
        .iter()
        .map(|w| {
            w.f_to_kind(Kind::Float)
                .and_then(|t| t.f_abs())
                .and_then(|t| t.f_reshape([-1]))
        })
        .collect::<std::result::Result<_, _>>()
        .ctx(C)?;
    let all = Tensor::f_cat(&flats, 0).ctx(C)?;
    let mask = magnitude(&all, sparsity)?;
    let mut out = Vec::with_capacity(weights.len());
    let mut at = 0i64;
    for w in weights {
        let n = w.numel() as i64;
        out.push(
            mask.f_narrow(0, at, n)
                .and_then(|m| m.f_reshape(w.size()))
                .ctx(C)?,
        );
        at += n;
    }
    Ok(out)
}

/// The 2:4 keep-mask of `w` (`[in, out]`, `in` divisible by 4).
pub fn two_four(w: &Tensor) -> Result<Tensor> {
    let size = w.size();
    let (fan_in, fan_out) = (size[0], size[1]);
    if fan_in % 4 != 0 {
        return Err(Error::Internal(format!(
            "2:4 needs the input dimension divisible by 4, got {fan_in}"
        )));
    }
    // [out, in/4, 4]: groups of 4 consecutive inputs of one output.
    let groups = w
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_abs())
        .and_then(|t| t.f_transpose(0, 1))
        .and_then(|t| t.f_reshape([fan_out, fan_in / 4, 4]))
        .ctx(C)?;
    let (_, keep) = groups.f_topk(2, 2, true, true).ctx(C)?;
    let mask = Tensor::f_zeros([fan_out, fan_in / 4, 4], (Kind::Uint8, w.device()))
        .and_then(|m| m.f_scatter_value(2, &keep, 1))
        .ctx(C)?;
    mask.f_reshape([fan_out, fan_in])
        .and_then(|m| m.f_transpose(0, 1))
        .and_then(|m| m.f_contiguous())
        .ctx(C)
}

/// Fraction of zeros in a keep-mask.
pub fn sparsity_of(mask: &Tensor) -> f64 {
    let kept = mask.sum(Kind::Int64).int64_value(&[]) as f64;
    1.0 - kept / mask.numel().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w() -> Tensor {
        let v: Vec<f32> = (0..48).map(|k| ((k as f32) * 0.913).sin()).collect();
        Tensor::from_slice(&v).view([8, 6])
    }

    #[test]
    fn masks_prune_exactly_the_requested_share() {
        let m = magnitude(&w(), 0.5).unwrap();
        assert_eq!(m.size(), [8, 6]);
        assert_eq!(sparsity_of(&m), 0.5);
        // The kept weights are the largest: min kept |w| >= max pruned |w|.
        let a = w().abs();
        let kept_min = a
            .masked_select(&m.to_kind(Kind::Bool))
            .min()
            .double_value(&[]);
        let pruned_max = a.masked_select(&m.eq(0)).max().double_value(&[]);
        assert!(kept_min >= pruned_max);
        let g = global_magnitude(&[&w(), &(w() * 10.0)], 0.5).unwrap();
        let pruned = |m: &Tensor| m.eq(0).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(pruned(&g[0]) + pruned(&g[1]), 48);
        assert!(pruned(&g[0]) > pruned(&g[1]), "the small weights go first");
        let t = two_four(&w()).unwrap();
        assert_eq!(sparsity_of(&t), 0.5);
        // Every group of 4 inputs of every output keeps 2.
        let per_group = t
            .transpose(0, 1)
            .reshape([6, 2, 4])
            .sum_dim_intlist(2, false, Kind::Int64);
        assert_eq!(per_group.min().int64_value(&[]), 2);
        assert_eq!(per_group.max().int64_value(&[]), 2);
    }
}
