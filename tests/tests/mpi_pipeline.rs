//! Multi-process tests under mpiexec: pipeline layouts reproduce the single-process
//! losses, and a rank that fails mid-run takes the job down quickly, naming itself.

use std::time::{Duration, Instant};
use strata_tests::{
    arch_config, assert_losses_match, read_losses, run_strata, run_with_limit_tick, scratch,
    strata_bin, tiny_config, write, SCHEDULES,
};

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
    let chunks = if schedule == "interleaved-1f1b" {
        2 * pp
    } else {
        pp
    };
    assert_eq!(plan["stages"].as_array().unwrap().len(), chunks);
    read_losses(&out)
}

/// `grad_norm` of every step in `dir/metrics.jsonl`.
fn read_grad_norms(dir: &std::path::Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// LLaMA (grouped-query attention, rotary, SwiGLU) on multi-process layouts and schedules,
/// tied and untied: losses and grad_norm of every step match one process.
#[test]
fn llama_under_mpiexec_matches_single_process() {
    let run = |tie: bool, (pp, tp, dp): (usize, usize, usize), schedule: &str| {
        let dir = scratch(&format!("mpi-llama-{pp}{tp}{dp}-{schedule}-{tie}"));
        let out = dir.join("run");
        let cfg = write(
            &dir,
            "cfg.yaml",
            &arch_config("llama", tie, pp, tp, dp, schedule, 3, &out),
        );
        let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
        assert_eq!(
            run.code,
            Some(0),
            "llama {pp}{tp}{dp} {schedule}:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        (read_losses(&out), read_grad_norms(&out))
    };
    for tie in [false, true] {
        let (ref_loss, ref_norm) = run(tie, (1, 1, 1), "gpipe");
        for (layout, schedule) in [
            ((2, 2, 1), "zb-h1"),
            ((2, 2, 2), "1f1b"),
            ((2, 1, 1), "interleaved-1f1b"),
        ] {
            let what = format!("mpiexec llama {layout:?} {schedule} tied={tie}");
            let (loss, norm) = run(tie, layout, schedule);
            assert_losses_match(&ref_loss, &loss, 1e-5, 1e-5, &what);
            assert_losses_match(&ref_norm, &norm, 1e-5, 1e-5, &format!("{what} grad_norm"));
        }
    }
}

#[test]
fn every_schedule_under_mpiexec_matches_single_process() {
    let reference = launch(1, "gpipe", 5);
    assert_eq!(reference.len(), 5);
    for schedule in SCHEDULES {
        for pp in [2, 4] {
            let losses = launch(pp, schedule, 5);
            let what = format!("mpiexec pp={pp} {schedule}");
            assert_losses_match(&reference, &losses, 1e-5, 1e-4, &what);
        }
    }
}

/// 3-D layouts under mpiexec (MPI sub-communicators cut with MPI_Comm_split), tied and
/// untied, against the single-process run.
#[test]
fn three_d_layouts_under_mpiexec_match_single_process() {
    let run = |pp: usize, tp: usize, dp: usize, tie: bool| {
        let dir = scratch(&format!("mpi-3d-{pp}-{tp}-{dp}-{tie}"));
        let out = dir.join("run");
        let text = arch_config("gpt", tie, pp, tp, dp, "1f1b", 3, &out);
        let cfg = write(&dir, "cfg.yaml", &text);
        let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
        assert_eq!(
            run.code,
            Some(0),
            "({pp},{tp},{dp}) tie={tie}:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        read_losses(&out)
    };
    for tie in [false, true] {
        let reference = run(1, 1, 1, tie);
        for (pp, tp, dp) in [(2, 2, 1), (2, 2, 2), (2, 1, 2)] {
            let what = format!("mpiexec (pp, tp, dp) = ({pp}, {tp}, {dp}), tied = {tie}");
            assert_losses_match(&reference, &run(pp, tp, dp, tie), 1e-5, 1e-5, &what);
        }
    }
}

#[test]
fn trace_json_has_a_track_per_rank_and_named_spans() {
    let dir = scratch("mpi-trace");
    let out = dir.join("run");
    let cfg = write(&dir, "cfg.yaml", &tiny_config(2, "1f1b", 5, &out));
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let text = std::fs::read_to_string(out.join("trace.json")).unwrap();
    let trace: serde_json::Value = serde_json::from_str(&text).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    for rank in 0..2 {
        let mine: Vec<&str> = events
            .iter()
            .filter(|e| e["tid"] == rank && e["ph"] == "X")
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        // 3 traced steps x 4 microbatches of F and B on this rank's chunk.
        let f = mine.iter().filter(|n| n.starts_with("F mb=")).count();
        let b = mine.iter().filter(|n| n.starts_with("B mb=")).count();
        assert_eq!((f, b), (12, 12), "rank {rank}: {mine:?}");
        let name = format!("F mb=3 chunk={rank}");
        assert!(mine.contains(&name.as_str()), "{mine:?}");
        let waits = mine.iter().filter(|n| n.starts_with("wait RECV_")).count();
        assert!(waits >= 12, "rank {rank} has {waits} waits");
    }
    // metrics.jsonl: per-rank bubble and stash every step.
    let line = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let ranks = first["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    assert_eq!(ranks[0]["peak_stash"], 2);
    assert_eq!(ranks[1]["peak_stash"], 1);
    assert!(ranks[0]["bubble"].as_f64().unwrap() >= 0.0);
}

#[test]
fn simulate_prints_the_grid_and_writes_svg() {
    let dir = scratch("simulate");
    let text =
        tiny_config(4, "1f1b", 2, &dir.join("run")).replace("microbatches: 4", "microbatches: 8");
    let cfg = write(&dir, "cfg.yaml", &text);
    let svg = dir.join("t.svg");
    let args = [
        "simulate",
        cfg.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ];
    let run = run_strata(&args, &[], LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("rank  3 | 3F0   3B0   3F1"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("mean predicted bubble"),
        "{}",
        run.stdout
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(picture.matches("<title>").count(), 4 * 16);
}

#[test]
fn failing_rank_stops_the_job_quickly_and_is_named() {
    let dir = scratch("mpi-fail");
    let cfg = write(
        &dir,
        "cfg.yaml",
        &tiny_config(2, "gpipe", 50, &dir.join("run")),
    );
    let mut cmd = std::process::Command::new(strata_bin());
    cmd.args(["launch", cfg.to_str().unwrap()])
        .env("STRATA_FAIL_AT", "1:3")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // "Quickly" counts from the failure (at the start of step 3, once step 2 is logged),
    // not from launch: MPI and libtorch start-up on a loaded machine is not measured.
    let metrics = dir.join("run/metrics.jsonl");
    let logged = || std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count());
    let mut armed = None;
    let start = Instant::now();
    let run = run_with_limit_tick(cmd, LIMIT, |_| {
        if armed.is_none() && logged() >= 2 {
            armed = Some(Instant::now());
        }
    });
    assert!(!run.timed_out, "the job hung after a rank failed");
    // Not seen while the job ran (it ended between two looks, 20 ms apart): ~0 s.
    let after = armed.map_or(Duration::ZERO, |t| {
        (start + run.elapsed).saturating_duration_since(t)
    });
    assert!(
        after < Duration::from_secs(30),
        "took {after:?} after the failure ({:?} in all)",
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
