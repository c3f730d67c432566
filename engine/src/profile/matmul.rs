//! The sgemm peak of one rank at the profile's thread count, every rank multiplying at
//! once (as they compute at once in a run): the best FLOP/s over a few square sizes, each
//! the median of several products.
//!
//! Invariant: the FLOP count of an `n × n` by `n × n` product is `2n³`.

use super::timing::collective_median;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use partitioner::profile::MatmulPeak;
use tch::{Kind, Tensor};

/// Measures [`MatmulPeak`] over `sizes` (collective over `comm`).
pub fn sgemm_peak(
    comm: &mut dyn Communicator,
    sizes: &[usize],
    threads: usize,
    runs: usize,
) -> Result<MatmulPeak> {
    let mut best = MatmulPeak {
        threads,
        flops_per_s: 0.0,
        n: 0,
    };
    for &n in sizes {
        let opts = (Kind::Float, tch::Device::Cpu);
        let a = Tensor::f_randn([n as i64, n as i64], opts).map_err(Error::torch("sgemm"))?;
        let b = Tensor::f_randn([n as i64, n as i64], opts).map_err(Error::torch("sgemm"))?;
        let s = collective_median(comm, 1, runs, |_| {
            a.f_matmul(&b).map(drop).map_err(Error::torch("sgemm"))
        })?;
        let flops = 2.0 * (n as f64).powi(3) / s.max(1e-12);
        if flops > best.flops_per_s {
            best.flops_per_s = flops;
            best.n = n;
        }
    }
    Ok(best)
}
