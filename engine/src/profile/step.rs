//! Per-step costs outside the schedule, measured with the engine's own code on its flat
//! parameter buffers ([`crate::flat`]): the AdamW update ([`crate::optim::AdamW`]), the
//! owned squared gradient norm and the clip scaling, each fitted as
//! `fixed_s + element_s · elements` per buffer group, and the world's scalar all-reduce
//! that combines the norms.
//!
//! Invariant: the fit comes from two one-group buffers (small and large), timed with every
//! rank working at once.

use super::timing::{collective_median, median, seconds};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::flat::FlatBuffers;
use crate::model::params::init_grads;
use crate::model::Param;
use crate::optim::{AdamW, AdamWConfig};
use crate::shard::ShardSpec;
use partitioner::profile::StepCosts;
use tch::{Kind, Tensor};

/// A trainable `[numel]` parameter with a defined gradient of ones.
pub fn synthetic_param(name: &str, numel: usize) -> Result<Param> {
    let t = Tensor::f_randn([numel as i64], (Kind::Float, tch::Device::Cpu))
        .map_err(Error::torch("profile parameter"))?
        .set_requires_grad(true);
    let p = Param {
        name: name.to_string(),
        tensor: t,
        decay: true,
        spec: ShardSpec::full(&[numel]),
        owner: true,
        tied_copy: false,
        sequence_parallel: false,
    };
    init_grads(std::slice::from_ref(&p))?;
    tch::no_grad(|| p.tensor.grad().f_fill_(1.0).map(drop))
        .map_err(Error::torch("profile gradient"))?;
    Ok(p)
}

/// One flat buffer group of `numel` values with gradients of ones.
fn buffers(numel: usize) -> Result<(Vec<Param>, FlatBuffers)> {
    let params = vec![synthetic_param("p", numel)?];
    let flat = FlatBuffers::adopt(&params)?;
    tch::no_grad(|| flat.groups[0].grads.shallow_clone().f_fill_(1.0).map(drop))
        .map_err(Error::torch("profile gradient"))?;
    Ok((params, flat))
}

/// Solves `fixed + element·n = time` for two (elements, time) measurements.
fn fit(one: (f64, f64), two: (f64, f64)) -> (f64, f64) {
    let element = ((two.1 - one.1) / (two.0 - one.0)).max(0.0);
    ((one.1 - element * one.0).max(0.0), element)
}

/// Median seconds of `f` on `flat` (every rank at once).
fn timed(
    comm: &mut dyn Communicator,
    runs: usize,
    flat: &FlatBuffers,
    mut f: impl FnMut(&FlatBuffers) -> Result<()>,
) -> Result<f64> {
    collective_median(comm, 1, runs, |_| f(flat))
}

/// Measures [`StepCosts`] on every rank of `world` at once.
pub fn step_costs(world: &mut dyn Communicator, runs: usize) -> Result<StepCosts> {
    let (small_n, big_n) = (64usize << 10, 4usize << 20);
    let (_small_params, small) = buffers(small_n)?;
    let (_big_params, big) = buffers(big_n)?;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let per_size = |f: &mut dyn FnMut(&FlatBuffers) -> Result<()>,
                    comm: &mut dyn Communicator|
     -> Result<(f64, f64)> {
        let a = timed(comm, runs, &small, &mut *f)?;
        let b = timed(comm, runs, &big, &mut *f)?;
        Ok(fit((small_n as f64, a), (big_n as f64, b)))
    };
    let mut adam_small = AdamW::new(&small, cfg)?;
    let mut adam_big = AdamW::new(&big, cfg)?;
    let mut adam = |flat: &FlatBuffers| {
        if flat.groups[0].grads.numel() == small_n {
            adam_small.step(flat, 1e-4)
        } else {
            adam_big.step(flat, 1e-4)
        }
    };
    let (adamw_fixed_s, adamw_element_s) = per_size(&mut adam, world)?;
    let (norm_fixed_s, norm_element_s) =
        per_size(&mut |flat| flat.owned_grad_sq_norm().map(drop), world)?;
    let (clip_fixed_s, clip_element_s) = per_size(&mut |flat| flat.scale_grads(0.999), world)?;
    let mut scalar = Vec::new();
    for _ in 0..runs * 8 {
        world.barrier()?;
        let (dt, ()) = seconds(|| world.all_reduce_sum(&mut [1.0]))?;
        scalar.push(dt);
    }
    Ok(StepCosts {
        adamw_fixed_s,
        adamw_element_s,
        norm_fixed_s,
        norm_element_s,
        clip_fixed_s,
        clip_element_s,
        scalar_all_reduce_s: median(scalar),
    })
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn fit_recovers_both_terms() {
        let (a, b) = fit((1000.0, 1.0 + 2.0), (3000.0, 1.0 + 6.0));
        assert!(
            (a - 1.0).abs() < 1e-9 && (b - 0.002).abs() < 1e-12,
            "{a} {b}"
        );
    }
}
