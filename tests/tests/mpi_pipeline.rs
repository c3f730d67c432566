//! Multi-process tests under mpiexec: pipeline layouts reproduce the single-process
//! losses, and a rank that fails mid-run takes the job down quickly, naming itself.

use std::time::Duration;
use strata_tests::{assert_losses_match, read_losses, run_strata, scratch, tiny_config, write};

const LIMIT: Duration = Duration::from_secs(120);

fn launch(pp: usize, schedule: &str, steps: usize) -> Vec<f64> {
    let dir = scratch(&format!("mpi-{pp}-{schedule}"));
    let out = dir.join("run");
    let cfg = write(&dir, "cfg.yaml", &tiny_config(pp, schedule, steps, &out));
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
    assert_eq!(
        run.code,
        Some(0),
        "pp={pp} {schedule} failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    for f in ["config.yaml", "plan.json", "metrics.jsonl"] {
        assert!(out.join(f).is_file(), "{f} missing from the run directory");
    }
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("plan.json")).unwrap()).unwrap();
    assert_eq!(plan["stages"].as_array().unwrap().len(), pp);
    read_losses(&out)
}

#[test]
fn mpi_pipeline_matches_single_process() {
    let reference = launch(1, "gpipe", 5);
    assert_eq!(reference.len(), 5);
    for pp in [2, 4] {
        let losses = launch(pp, "gpipe", 5);
        assert_losses_match(
            &reference,
            &losses,
            1e-5,
            1e-4,
            &format!("mpiexec pp={pp} gpipe"),
        );
    }
    let losses = launch(2, "1f1b", 5);
    assert_losses_match(&reference, &losses, 1e-5, 1e-4, "mpiexec pp=2 1f1b");
}

#[test]
fn failing_rank_stops_the_job_quickly_and_is_named() {
    let dir = scratch("mpi-fail");
    let cfg = write(
        &dir,
        "cfg.yaml",
        &tiny_config(2, "gpipe", 50, &dir.join("run")),
    );
    let run = run_strata(
        &["launch", cfg.to_str().unwrap()],
        &[("STRATA_FAIL_AT", "1:3")],
        Duration::from_secs(60),
    );
    assert!(!run.timed_out, "the job hung after a rank failed");
    assert!(
        run.elapsed < Duration::from_secs(30),
        "took {:?}",
        run.elapsed
    );
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr
            .contains("rank 1/2: error: injected failure at step 3"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("the job failed"), "{}", run.stderr);
}
