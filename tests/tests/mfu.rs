//! MFU in the run's numbers: every step reports model FLOP/s per rank and MFU, and they
//! are the model FLOPs of the step (computed here by hand from the shape) over its step
//! time and the ranks, and that over the peak (`parallel.hardware.device_tflops` without a
//! profile).

use engine::{Config, PeakSource, RunOptions};
use std::path::Path;
use strata_tests::{layout_config, run_local_with, scratch};

#[test]
fn mfu_is_model_flops_over_step_time_and_the_peak() {
    let out = scratch("mfu");
    // The tiny GPT: b = 2, s = 16, d = 32, f = 64, V = 64, 8 blocks; 4 microbatches over
    // dp = 2 (2 each), pp = 2: 4 ranks.
    let text = layout_config(2, 1, 2, "1f1b", 2, &out).replace(
        "virtual_stages: 1}",
        "virtual_stages: 1, hardware: {device_tflops: 0.5}}",
    );
    let cfg = Config::parse(&text, Path::new("mfu.yaml")).unwrap();
    let runs = run_local_with(&cfg, &RunOptions::default());
    let s = &runs[0];
    let fwd = 1024.0 + 8.0 * (64.0 * (4.0 * 1024.0 + 4096.0) + 65536.0) + 131072.0;
    let flops_per_step = 3.0 * fwd * 4.0;
    let f = s
        .flops
        .as_ref()
        .expect("rank 0 reports what MFU is against");
    assert_eq!(f.flops_per_step, flops_per_step);
    assert_eq!(f.source, PeakSource::Hardware { default: false });
    assert_eq!(f.peak_per_rank, 0.5e12);
    assert_eq!(s.mfu.len(), 2);
    for (i, &tps) in s.tokens_per_s.iter().enumerate() {
        let step_s = (4 * 2 * 16) as f64 / tps;
        let per_rank = flops_per_step / step_s / 4.0;
        let rel = |a: f64, b: f64| (a - b).abs() / b;
        assert!(rel(s.flops_per_s_per_rank[i], per_rank) < 1e-9, "step {i}");
        assert!(rel(s.mfu[i], per_rank / 0.5e12) < 1e-9, "step {i}");
        assert!(s.mfu[i] > 0.0 && s.mfu[i] < 1.0, "{}", s.mfu[i]);
    }
}
