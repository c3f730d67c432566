//! Weight-only int8: per-output-channel symmetric scales and the int8 matmul.
//!
//! A linear weight `A` (`[in, out]`, `Y = XA`) is stored as `q = round(Aᵀ / s)` clamped to
//! `[−127, 127]` (`[out, in]`, int8) and `s = max_i |A[i, o]| / 127` per output channel
//! (`[out]`, f32), so `Aᵀ ≈ diag(s) q`. The product runs on the int8 weights with
//! libtorch's `_weight_int8pack_mm(X, q, s)` (`X [m, in]`, `q [out, in]` contiguous,
//! `s [out]` in X's dtype); on the CPU only its bfloat16 kernel is vectorised (the f32
//! and f16 ones are scalar loops, 5–15× slower than an f32 GEMM), so activations enter it
//! in bfloat16 ([`Int8Weight::compute`]) and the output is cast back.
//!
//! Invariant: nothing here widens a whole weight to f32 except [`dequantize`] (export),
//! one tensor at a time.

use crate::error::{Error, Result};
use crate::model::Ctx;
use tch::{Device, Kind, Tensor};

/// The activation dtype the int8 kernel runs in on `device` for a model in `kind`.
pub fn compute_kind(kind: Kind, device: Device) -> Kind {
    match device {
        Device::Cpu => Kind::BFloat16,
        _ => kind,
    }
}

/// `(q [out, in] int8, s [out] f32)` of a weight `a` (`[in, out]`, any float kind).
pub fn quantize(a: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = "int8 quantisation";
    let at = a
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_transpose(0, 1))
        .ctx(c)?;
    let amax = at.f_abs().and_then(|t| t.f_amax([1], false)).ctx(c)?;
    // An all-zero channel (pruned) keeps scale 1 and codes 0.
    let scale = amax
        .f_div_scalar(127.0)
        .and_then(|s| s.f_where_scalarother(&amax.f_gt(0.0)?, 1.0))
        .ctx(c)?;
    let q = at
        .f_div(&scale.f_unsqueeze(1).ctx(c)?)
        .and_then(|t| t.f_round())
        .and_then(|t| t.f_clamp(-127.0, 127.0))
        .and_then(|t| t.f_to_kind(Kind::Int8))
        .and_then(|t| t.f_contiguous())
        .ctx(c)?;
    Ok((q, scale))
}

/// `A = (diag(s) q)ᵀ` as f32 `[in, out]` (for export and checks).
pub fn dequantize(q: &Tensor, s: &Tensor) -> Result<Tensor> {
    q.f_to_kind(Kind::Float)
        .and_then(|t| t.f_mul(&s.f_to_kind(Kind::Float)?.f_unsqueeze(1)?))
        .and_then(|t| t.f_transpose(0, 1))
        .and_then(|t| t.f_contiguous())
        .ctx("int8 dequantisation")
}

/// A linear layer's int8 weight on one rank.
#[derive(Debug)]
pub struct Int8Weight {
    /// `[out_local, in_local]`, int8, contiguous.
    pub q: Tensor,
    /// `[out_local]`, in `compute`.
    pub scale: Tensor,
    /// The activation dtype of the kernel.
    pub compute: Kind,
}

impl Int8Weight {
    /// From the stored codes and f32 scales, for a model computing in `kind` on `device`.
    pub fn new(q: Tensor, scale: &Tensor, kind: Kind, device: Device) -> Result<Int8Weight> {
        let compute = compute_kind(kind, device);
        if q.kind() != Kind::Int8 || q.dim() != 2 || scale.size() != [q.size()[0]] {
            return Err(Error::Internal(format!(
                "int8 weight {:?} {:?} with scales {:?}",
                q.kind(),
                q.size(),
                scale.size()
            )));
        }
        Ok(Int8Weight {
            q: q.f_to(device)
                .and_then(|t| t.f_contiguous())
                .ctx("int8 weight")?,
            scale: scale
                .f_to_kind(compute)
                .and_then(|t| t.f_to(device))
                .ctx("int8 scales")?,
            compute,
        })
    }

    /// `X Aᵢ` for `x` (`[..., in]`): the int8 kernel on the flattened rows.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let c = "int8 matmul";
        let dims = x.size();
        let width_in = *dims.last().unwrap_or(&0);
        let rows = x
            .f_reshape([-1, width_in])
            .and_then(|t| t.f_to_kind(self.compute))
            .and_then(|t| t.f_contiguous())
            .ctx(c)?;
        let y = rows
            .f_internal_weight_int8pack_mm(&self.q, &self.scale)
            .and_then(|y| y.f_to_kind(x.kind()))
            .ctx(c)?;
        let mut out = dims.clone();
        *out.last_mut().unwrap_or(&mut 0) = self.q.size()[0];
        y.f_reshape(out.as_slice()).ctx(c)
    }

    /// Bytes of the codes and scales.
    pub fn bytes(&self) -> usize {
        self.q.numel() + self.scale.numel() * self.scale.kind().elt_size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Normal values from Strata's keyed generator (never torch's global one).
    fn normal(key: u64, shape: &[i64]) -> Tensor {
        let mut rng = Rng::from_key(&[key]);
        let n: i64 = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        Tensor::from_slice(&v).view(shape)
    }

    #[test]
    fn codes_scales_and_matmul_match_the_dense_product() {
        let a = normal(1, &[48, 20]);
        let _ = a.narrow(1, 3, 1).fill_(0.0); // a pruned output channel
        let (q, s) = quantize(&a).unwrap();
        assert_eq!(
            (q.size(), q.kind(), s.size()),
            (vec![20, 48], Kind::Int8, vec![20])
        );
        assert_eq!(q.abs().max().int64_value(&[]), 127);
        assert_eq!(s.double_value(&[3]), 1.0);
        let back = dequantize(&q, &s).unwrap();
        let err = (&back - &a).abs().max().double_value(&[]);
        let step = s.max().double_value(&[]);
        assert!(err <= 0.5 * step + 1e-6, "{err} {step}");
        let w = Int8Weight::new(q, &s, Kind::Float, Device::Cpu).unwrap();
        let x = normal(2, &[2, 3, 48]);
        let y = w.matmul(&x).unwrap();
        assert_eq!((y.size(), y.kind()), (vec![2, 3, 20], Kind::Float));
        let want = x.matmul(&back);
        let rel = (&y - &want).norm().double_value(&[]) / want.norm().double_value(&[]);
        assert!(rel < 1e-2, "{rel}");
    }
}
