//! A backward seeded with given output gradients (`torch.autograd.backward(outputs,
//! grads)`), through the C++ shim `seeded_backward.cpp`, since tch seeds only with ones.
//!
//! It replaces the surrogate `Σ sum(out ⊙ g)` a tch caller would otherwise differentiate:
//! that surrogate costs a multiply and a reduction over every seeded output in the forward
//! and another multiply in the backward, and holds the products until the backward. The
//! gradients are the same bits: the surrogate's gradient at `out` is `1 · g = g` exactly.
//!
//! Invariants: every output requires grad and has its seed's shape (checked, typed error);
//! returned tensors are owned by Rust (freed by tch's `Drop`).

use crate::error::{Error, Result};
use std::ffi::{c_char, c_void};
use tch::Tensor;

extern "C" {
    fn strata_seeded_backward(
        outputs: *mut *mut c_void,
        grads: *mut *mut c_void,
        n: usize,
        inputs: *mut *mut c_void,
        m: usize,
        results: *mut *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

fn ptrs(ts: &[&Tensor]) -> Vec<*mut c_void> {
    ts.iter().map(|t| t.as_ptr() as *mut c_void).collect()
}

/// Runs the backward of `seeds` (output, its gradient): with no `inputs`, accumulates into
/// the leaves' `.grad` and returns nothing; otherwise accumulates nothing and returns
/// d/d`inputs[j]` for each input (undefined where an input is not reached).
pub fn backward(seeds: &[(&Tensor, &Tensor)], inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
    if seeds.is_empty() {
        return Err(Error::Internal("a backward with no seeded output".into()));
    }
    let outs: Vec<&Tensor> = seeds.iter().map(|(o, _)| *o).collect();
    let grads: Vec<&Tensor> = seeds.iter().map(|(_, g)| *g).collect();
    let (mut outs, mut grads, mut ins) = (ptrs(&outs), ptrs(&grads), ptrs(inputs));
    let mut results: Vec<*mut c_void> = vec![std::ptr::null_mut(); inputs.len()];
    super::shim::call("seeded backward", |err, err_len| {
        // SAFETY: every pointer is a live tch `torch::Tensor *` borrowed for the call;
        // `results` has room for one pointer per input; `err` is a writable buffer of
        // `err_len` bytes.
        unsafe {
            strata_seeded_backward(
                outs.as_mut_ptr(),
                grads.as_mut_ptr(),
                outs.len(),
                ins.as_mut_ptr(),
                ins.len(),
                results.as_mut_ptr(),
                err,
                err_len,
            )
        }
    })?;
    Ok(results
        .into_iter()
        // SAFETY: on success each entry is a fresh `new torch::Tensor` the shim hands over.
        .map(|p| unsafe { Tensor::from_ptr(p.cast()) })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    fn leaf(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values)
            .view(shape)
            .set_requires_grad(true)
    }

    /// d/dx of `y = x² ⊙ w` seeded with `g` is `2·x·w·g`, and d/dw is `x²·g`.
    #[test]
    fn seeds_reach_the_leaves_exactly() {
        let x = leaf(&[1.0, -2.0, 3.0, 0.5], &[2, 2]);
        let w = leaf(&[0.25, 4.0, -1.0, 2.0], &[2, 2]);
        let y = x.square() * &w;
        let g = Tensor::from_slice(&[1.0f32, 0.5, -2.0, 3.0]).view([2, 2]);
        let got = backward(&[(&y, &g)], &[&x, &w]).unwrap();
        let want_x = &x.detach() * 2.0 * w.detach() * &g;
        let want_w = x.detach().square() * &g;
        assert!(got[0].equal(&want_x), "{got:?}");
        assert!(got[1].equal(&want_w));
        assert!(!x.grad().defined(), "the input form accumulates nothing");
    }

    /// With no inputs it accumulates into `.grad` like `backward()`, and two seeded outputs
    /// sharing a leaf add their contributions.
    #[test]
    fn accumulates_into_grads_and_sums_several_outputs() {
        let x = leaf(&[1.0, 2.0, 3.0], &[3]);
        let a = &x * 2.0;
        let b = &x * &x;
        let ga = Tensor::from_slice(&[1.0f32, 1.0, 1.0]);
        let gb = Tensor::from_slice(&[0.5f32, -1.0, 2.0]);
        assert!(backward(&[(&a, &ga), (&b, &gb)], &[]).unwrap().is_empty());
        let want = Tensor::from_slice(&[3.0f32, -2.0, 14.0]);
        assert!(x.grad().equal(&want), "{:?}", x.grad());
    }

    /// Bad seeds are typed errors, not aborts.
    #[test]
    fn mismatched_seeds_are_errors() {
        let x = leaf(&[1.0, 2.0], &[2]);
        let y = &x * 3.0;
        let wrong = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu));
        assert!(backward(&[(&y, &wrong)], &[]).is_err());
        let no_grad = Tensor::from_slice(&[1.0f32, 2.0]);
        let g = Tensor::ones([2], (Kind::Float, tch::Device::Cpu));
        assert!(backward(&[(&no_grad, &g)], &[]).is_err());
        assert!(backward(&[], &[]).is_err());
    }
}
