//! Strata's causal-attention kernel for fp32 CPU tensors (`causal_attention.cpp`, a
//! libtorch autograd function): the same function as
//! `scaled_dot_product_attention(q, k, v, is_causal = true)` with its default scale, faster
//! than libtorch's CPU flash kernel at the head sizes CPU training uses (its backward
//! above all).
//!
//! Invariants: it saves for the backward what libtorch's flash kernel saves (q, k, v, the
//! output and one log-sum-exp per query row), so memory is unchanged; a head's result
//! depends only on that head's inputs (no thread-count or head-split dependence), so
//! tensor-parallel layouts stay bit-identical to one process; [`eligible`] says when it
//! applies, and everything else (other dtypes, devices, masks, long sequences) keeps
//! using libtorch's SDPA.

use crate::error::Result;
use std::ffi::{c_char, c_void};
use tch::{Device, Kind, Tensor};

/// The longest sequence the kernel takes: it keeps two `s × s` fp32 score matrices per
/// thread in the backward (2 × 16 MiB at 2048).
pub const MAX_SEQ: i64 = 2048;

extern "C" {
    fn strata_causal_attention(
        q: *mut c_void,
        k: *mut c_void,
        v: *mut c_void,
        out: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

/// Whether the kernel computes causal attention of these `[b, h, s, hd]` tensors: fp32 on
/// the CPU, one shape for q, k and v (after repeating grouped key/value heads), and
/// `s <= MAX_SEQ`.
pub fn eligible(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let size = q.size();
    size.len() == 4
        && size[2] <= MAX_SEQ
        && [q, k, v]
            .iter()
            .all(|t| t.kind() == Kind::Float && t.device() == Device::Cpu && t.size() == size)
}

/// Causal attention `[b, h, s, hd]` of `q`, `k`, `v` (see [`eligible`]), recorded for
/// autograd when an input requires grad; the result is laid out as `[b, s, h, hd]`, so
/// merging the heads copies nothing.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let mut out: *mut c_void = std::ptr::null_mut();
    super::shim::call("causal attention kernel", |err, err_len| {
        // SAFETY: q, k and v are live tch `torch::Tensor *` borrowed for the call; `out`
        // receives a fresh `new torch::Tensor` on success; `err` is a writable buffer of
        // `err_len` bytes.
        unsafe {
            strata_causal_attention(
                q.as_ptr() as *mut c_void,
                k.as_ptr() as *mut c_void,
                v.as_ptr() as *mut c_void,
                &mut out,
                err,
                err_len,
            )
        }
    })?;
    // SAFETY: on success `out` is a fresh `new torch::Tensor` the shim hands over.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

#[cfg(test)]
mod tests {
    //! Against libtorch's own SDPA and autograd in fp64 (the outside reference): outputs
    //! and the gradients of q, k and v, for shapes that exercise partial blocks, strided
    //! inputs (views of a fused projection, as the model passes them); the fp32 SDPA's own
    //! error bounds what is accepted.
    use super::*;

    /// A fused projection `[b, s, 3·h·hd]` (the leaf) and its q, k, v head views.
    fn qkv(b: i64, h: i64, s: i64, hd: i64, seed: i64, kind: Kind) -> (Tensor, [Tensor; 3]) {
        let leaf = seeded(seed)(&[b, s, 3 * h * hd])
            .to_kind(kind)
            .set_requires_grad(true);
        let parts = leaf.split(h * hd, -1);
        let heads = |t: &Tensor| t.view([b, s, h, hd]).transpose(1, 2);
        let views = [heads(&parts[0]), heads(&parts[1]), heads(&parts[2])];
        (leaf, views)
    }

    /// Deterministic values from a seed without touching torch's global generator.
    fn seeded(seed: i64) -> impl Fn(&[i64]) -> Tensor {
        move |shape: &[i64]| {
            let n: i64 = shape.iter().product();
            let idx = Tensor::arange(n, (Kind::Double, Device::Cpu));
            let x = ((idx * 0.618_033_988_75 + seed as f64 * 0.1).sin() * 43_758.545_3).frac();
            (x * 4.0 - 2.0).view(shape)
        }
    }

    /// (output, grad of the fused input) of attention by `f`, seeded with a fixed grad.
    fn run(
        b: i64,
        h: i64,
        s: i64,
        hd: i64,
        kind: Kind,
        f: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    ) -> (Tensor, Tensor) {
        let (leaf, [q, k, v]) = qkv(b, h, s, hd, 3, kind);
        let out = f(&q, &k, &v);
        let seed = seeded(9)(&[b, h, s, hd]).to_kind(kind);
        (&out * &seed).sum(kind).backward();
        (
            out.detach().to_kind(Kind::Double),
            leaf.grad().to_kind(Kind::Double),
        )
    }

    fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        Tensor::scaled_dot_product_attention(q, k, v, None::<&Tensor>, 0.0, true, None, false)
    }

    fn max_err(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn matches_sdpa_in_fp64_within_fp32_sdpa_error() {
        let shapes = [
            (2, 4, 128, 32),
            (1, 2, 37, 16),
            (3, 2, 100, 64),
            (1, 1, 1, 8),
            (1, 3, 65, 32),
        ];
        for &(b, h, s, hd) in &shapes {
            let (o64, g64) = run(b, h, s, hd, Kind::Double, &sdpa);
            let (o32, g32) = run(b, h, s, hd, Kind::Float, &sdpa);
            let (ok, gk) = run(b, h, s, hd, Kind::Float, &|q, k, v| {
                assert!(eligible(q, k, v));
                causal_attention(q, k, v).unwrap()
            });
            let (ref_o, ref_g) = (max_err(&o32, &o64), max_err(&g32, &g64));
            let (got_o, got_g) = (max_err(&ok, &o64), max_err(&gk, &g64));
            let what = format!("b{b} h{h} s{s} hd{hd}");
            assert!(
                got_o <= 4.0 * ref_o + 1e-7,
                "{what}: output {got_o:e} vs sdpa {ref_o:e}"
            );
            assert!(
                got_g <= 4.0 * ref_g + 1e-6,
                "{what}: grad {got_g:e} vs sdpa {ref_g:e}"
            );
        }
    }

    #[test]
    fn a_head_is_the_same_alone_or_among_others() {
        let (_, [q, k, v]) = qkv(2, 4, 96, 32, 5, Kind::Float);
        let all = causal_attention(&q, &k, &v).unwrap();
        let pick = |t: &Tensor| t.narrow(1, 1, 2);
        let part = causal_attention(&pick(&q), &pick(&k), &pick(&v)).unwrap();
        assert!(
            part.equal(&pick(&all)),
            "heads 1..3 alone differ from the same heads among 4"
        );
    }

    #[test]
    fn refuses_what_it_does_not_compute() {
        let (_, [q, k, v]) = qkv(1, 2, 8, 4, 1, Kind::Double);
        assert!(!eligible(&q, &k, &v));
        let err = causal_attention(&q, &k, &v).unwrap_err().to_string();
        assert!(err.contains("fp32 CPU"), "{err}");
    }
}
