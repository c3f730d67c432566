//! Model FLOPs utilisation (MFU): the model FLOP/s each rank achieves against the peak
//! FLOP/s of one rank.
//!
//! * Model FLOPs of a step are `3 ×` the forward FLOPs of the whole (unsharded) model for
//!   every sequence of the step: the forward, and a backward of twice its cost, as in
//!   PaLM's and Megatron's MFU. The forward FLOPs per layer are the partitioner's
//!   ([`partitioner::LayerGraph`]): `2mkn` per `[m, k] × [k, n]` matmul, attention's
//!   `QKᵀ` and `AV` counted in full (`4bs²d` per block, the usual convention, although a
//!   causal kernel skips half), element-wise work ignored. Recomputation
//!   (`parallel.recompute`), padding and pipeline bubbles are not model FLOPs: they lower
//!   the MFU, as they should.
//! * Per rank: model FLOPs / step time / world size.
//! * The peak of one rank is, in order: the fp32 sgemm peak that `strata profile` measured
//!   with every rank multiplying at once (`calibration.matmul` of `parallel.profile`),
//!   scaled linearly to `train.threads` when the profile used another thread count; else
//!   `parallel.hardware.device_tflops` (default 100, a GPU figure, stated as such in the
//!   run's first lines).
//! * The progress line shows MFU only against a measured peak or a `device_tflops` set to
//!   something other than the default ([`FlopsModel::peak_is_known`]): against the
//!   default GPU figure a CPU run would read 0.1%. `metrics.jsonl` always records it.
//!
//! Invariant: `mfu = flops_per_s_per_rank / peak_flops_per_rank`.

use crate::config::Config;
use crate::error::{Error, Result};
use partitioner::{LayerGraph, Plan, Profile};

/// Where the peak FLOP/s of a rank comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum PeakSource {
    /// `strata profile`'s sgemm peak, measured at `threads` libtorch threads per rank.
    Profile { threads: usize },
    /// `parallel.hardware.device_tflops`; `default` when it is the built-in default.
    Hardware { default: bool },
}

/// The fixed numbers behind a run's MFU.
#[derive(Clone, Debug, PartialEq)]
pub struct FlopsModel {
    /// Model FLOPs of one optimizer step (all replicas, all microbatches).
    pub flops_per_step: f64,
    /// Peak FLOP/s of one rank.
    pub peak_per_rank: f64,
    pub source: PeakSource,
    pub world: usize,
    /// `train.threads`.
    pub threads: usize,
}

/// Model FLOPs of one optimizer step of `plan`: `3 ×` the forward FLOPs of the unsharded
/// model over `dp · microbatches` microbatches.
pub fn model_flops_per_step(plan: &Plan) -> partitioner::Result<f64> {
    let graph = LayerGraph::new(&plan.model, plan.micro_batch_size, plan.dtype_bytes)?;
    let fwd: f64 = graph.nodes.iter().map(|n| n.cost.fwd_flops).sum();
    Ok(3.0 * fwd * (plan.microbatches * plan.dp) as f64)
}

impl FlopsModel {
    /// The run's model FLOPs and peak (see the module docs).
    pub fn new(cfg: &Config, plan: &Plan) -> Result<FlopsModel> {
        let threads = *cfg.train.threads;
        let plan_err = |source| Error::Plan {
            path: cfg.source.display().to_string(),
            source,
        };
        let profile = match cfg.profile_path() {
            Some(path) => Some(Profile::load(&path).map_err(plan_err)?),
            None => None,
        };
        let measured = profile
            .and_then(|p| p.calibration.matmul)
            .filter(|m| m.flops_per_s > 0.0 && m.threads > 0);
        let (peak_per_rank, source) = match measured {
            Some(m) => (
                m.flops_per_s * threads as f64 / m.threads as f64,
                PeakSource::Profile { threads: m.threads },
            ),
            None => {
                let tflops = cfg.parallel.hardware.device_tflops;
                let default = tflops == partitioner::Hardware::default().device_tflops;
                (tflops * 1e12, PeakSource::Hardware { default })
            }
        };
        Ok(FlopsModel {
            flops_per_step: model_flops_per_step(plan).map_err(plan_err)?,
            peak_per_rank,
            source,
            world: plan.pp * plan.tp * plan.dp,
            threads,
        })
    }

    /// Model FLOP/s of one rank for a step of `step_s` seconds, and its MFU.
    pub fn rate(&self, step_s: f64) -> (f64, f64) {
        if step_s <= 0.0 || self.world == 0 {
            return (0.0, 0.0);
        }
        let per_rank = self.flops_per_step / step_s / self.world as f64;
        (per_rank, per_rank / self.peak_per_rank)
    }

    /// Whether the peak is this machine's: measured by `strata profile`, or a
    /// `device_tflops` the config set (a value other than the built-in default).
    pub fn peak_is_known(&self) -> bool {
        self.source != PeakSource::Hardware { default: true }
    }

    /// The run's line saying what MFU is measured against.
    pub fn describe(&self) -> String {
        let peak = format!("{:.1} GFLOP/s per rank", self.peak_per_rank / 1e9);
        let what = match self.source {
            PeakSource::Profile { threads } if threads == self.threads => {
                format!(
                    "the fp32 sgemm peak `strata profile` measured ({threads} threads per rank)"
                )
            }
            PeakSource::Profile { threads } => format!(
                "the fp32 sgemm peak `strata profile` measured at {threads} threads per rank, \
                 scaled to train.threads = {}",
                self.threads
            ),
            PeakSource::Hardware { default: false } => {
                "parallel.hardware.device_tflops, not a measured peak".into()
            }
            PeakSource::Hardware { default: true } => {
                "the default parallel.hardware.device_tflops (a GPU figure, not a measured \
                 peak: the progress line leaves MFU out; set parallel.profile to a `strata \
                 profile` output)"
                    .into()
            }
        };
        format!(
            "mfu: {:.3} GFLOP of model FLOPs per step, against {peak}, {what}",
            self.flops_per_step / 1e9
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use partitioner::profile::{Calibration, MatmulPeak};
    use std::path::Path;

    const TINY: &str =
        "model: {vocab: 64, seq_len: 16, d_model: 32, n_heads: 4, n_layers: 8, d_ff: 64}
parallel: {pp: 2, tp: 1, dp: 2, microbatches: 2, micro_batch_size: 2, schedule: 1f1b}
train: {steps: 1, lr: 1.0e-3, data: random, threads: 3}
output: {dir: /tmp/strata-flops-test}
";

    /// GPT forward FLOPs of one microbatch (b = 2, s = 16, d = 32, f = 64, V = 64, 8
    /// blocks), by hand: positions `bsd`, per block `2bs(4d² + 2df) + 4bs²d`, head `2bsdV`.
    const FWD: f64 =
        1024.0 + 8.0 * (32.0 * 2.0 * (4.0 * 1024.0 + 2.0 * 2048.0) + 65536.0) + 131072.0;

    #[test]
    fn model_flops_and_the_default_peak() {
        let cfg = Config::parse(TINY, Path::new("/tmp/flops.yaml")).unwrap();
        let plan = cfg.plan().unwrap();
        let f = FlopsModel::new(&cfg, &plan).unwrap();
        // 3 × forward × (2 microbatches × 2 replicas).
        assert_eq!(f.flops_per_step, 3.0 * FWD * 4.0);
        assert_eq!(f.source, PeakSource::Hardware { default: true });
        assert!(!f.peak_is_known());
        assert_eq!(f.peak_per_rank, 100e12);
        let (per_rank, mfu) = f.rate(2.0);
        assert_eq!(per_rank, f.flops_per_step / 2.0 / 4.0);
        assert_eq!(mfu, per_rank / 100e12);
        assert!(
            f.describe().contains("not a measured peak"),
            "{}",
            f.describe()
        );
    }

    #[test]
    fn a_configured_device_peak_is_known() {
        let mut cfg = Config::parse(TINY, Path::new("/tmp/flops.yaml")).unwrap();
        cfg.parallel.hardware.device_tflops = 50.0;
        let f = FlopsModel::new(&cfg, &cfg.plan().unwrap()).unwrap();
        assert_eq!(f.source, PeakSource::Hardware { default: false });
        assert!(f.peak_is_known());
        assert_eq!(f.peak_per_rank, 50e12);
    }

    #[test]
    fn the_profile_peak_scaled_to_the_run_threads() {
        let mut cfg = Config::parse(TINY, Path::new("/tmp/flops.yaml")).unwrap();
        let plan = cfg.plan().unwrap();
        let dir = std::env::temp_dir().join(format!("strata-flops-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("profile.json");
        let profile = Profile {
            device: "cpu".into(),
            threads: 2,
            model: plan.model.clone(),
            micro_batch_size: 2,
            dtype_bytes: 4,
            layers: Vec::new(),
            calibration: Calibration {
                world: 4,
                matmul: Some(MatmulPeak {
                    threads: 2,
                    flops_per_s: 50e9,
                    n: 512,
                }),
                ..Calibration::default()
            },
        };
        std::fs::write(&path, serde_json::to_string(&profile).unwrap()).unwrap();
        cfg.parallel.profile = Some(path.display().to_string());
        let f = FlopsModel::new(&cfg, &plan).unwrap();
        assert_eq!(f.source, PeakSource::Profile { threads: 2 });
        assert!(f.peak_is_known());
        // Measured at 2 threads, run at train.threads = 3.
        assert_eq!(f.peak_per_rank, 75e9);
        assert!(f.describe().contains("scaled to train.threads = 3"));
        let (per_rank, mfu) = f.rate(1.0);
        assert_eq!(mfu, per_rank / 75e9);
        std::fs::remove_dir_all(&dir).ok();
    }
}
