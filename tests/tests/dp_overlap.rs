//! The data-parallel gradient all-reduce overlaps the backward (issue 12, engine::dp::overlap):
//!
//! * order, read from each rank's flight recorder (sequence numbers and one clock, never a
//!   timing threshold): bucket all-reduces of the data-parallel group start *inside* the
//!   step's last backward action (tp = 1: post-accumulate-grad hooks) or, with interleaved
//!   chunks, before the rank's last backward action ends;
//! * numbers: with tp = 1 (the hooked path the equivalence matrix's (2,2,2) cases do not
//!   take) every schedule reproduces the one-process losses, step-1 gradients and
//!   grad_norm within 1e-5, and the bucket size changes no bit of the result.
//!
//! In-process (crossbeam transport), tiny models.

use engine::comm::groups::ParallelComms;
use engine::flight::{CommOp, Entry, FlightRecorder, Group, What};
use engine::{Config, RunOptions, RunSummary};
use partitioner::ActionKind;
use std::path::Path;
use strata_tests::{arch_config, full_grads, rel_diff, run_local_with, scratch, SCHEDULES};

/// Runs `cfg` in-process; returns every rank's summary and flight recorder.
fn run_recorded(cfg: &Config) -> Vec<(RunSummary, FlightRecorder)> {
    let comms = ParallelComms::local(cfg.mesh().unwrap()).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|mut comms| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let flight = comms.flight().unwrap().clone();
                let result = engine::train(&cfg, &mut comms, &RunOptions::default());
                if result.is_err() {
                    comms.world.abort_peers();
                }
                result.map(|s| (s, flight))
            })
        })
        .collect();
    handles
        .into_iter()
        .enumerate()
        .map(|(r, h)| {
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("rank {r}: {e}"))
        })
        .collect()
}

fn config(pp: usize, dp: usize, schedule: &str, bucket_mb: f64, name: &str) -> Config {
    let out = scratch(name);
    let text = arch_config("gpt", false, pp, 1, dp, schedule, 2, &out).replace(
        "parallel: {",
        &format!("parallel: {{dp_bucket_mb: {bucket_mb}, "),
    );
    let text = text.replace("output: {", "checkpoint: {enabled: false}\noutput: {");
    Config::parse(&text, Path::new("overlap.yaml")).unwrap()
}

/// Step 2's bucket starts on the dp group, and its last whole/input backward action.
fn step2(entries: &[Entry]) -> (Vec<Entry>, Entry) {
    let starts: Vec<Entry> = entries
        .iter()
        .filter(|e| e.step == 2)
        .filter(|e| {
            matches!(
                e.what,
                What::Comm {
                    op: CommOp::StartAllReduce,
                    group: Group::Dp,
                    ..
                }
            )
        })
        .copied()
        .collect();
    let last_backward = entries
        .iter()
        .filter(|e| e.step == 2)
        .filter(|e| {
            matches!(e.what, What::Action { action, eval: false }
                if matches!(action.kind, ActionKind::Backward | ActionKind::InputGrad))
        })
        .max_by_key(|e| e.seq)
        .copied()
        .expect("step 2 has a backward");
    (starts, last_backward)
}

/// One replica per rank (pp = 1, tp = 1): the hooks start buckets in the middle of the
/// last microbatch's backward, several of them before that backward ends.
#[test]
fn buckets_start_inside_the_last_backward() {
    let cfg = config(1, 2, "1f1b", 0.004, "overlap-inside");
    for (summary, flight) in run_recorded(&cfg) {
        let coord = summary.coord.unwrap();
        let entries = flight.entries();
        let (starts, b) = step2(&entries);
        assert!(
            starts.len() >= 4,
            "dp {}: {} bucket starts",
            coord.dp,
            starts.len()
        );
        let end = b.end.expect("the backward ended");
        let inside = starts
            .iter()
            .filter(|s| s.seq > b.seq && s.start <= end)
            .count();
        assert!(
            inside * 2 >= starts.len(),
            "dp {}: only {inside} of {} bucket all-reduces started inside the last backward",
            coord.dp,
            starts.len()
        );
        assert!(
            starts.iter().all(|s| s.end.is_some()),
            "every bucket completed"
        );
    }
}

/// Interleaved chunks: a later chunk's buckets start before the rank's last backward (of
/// an earlier chunk) ends, on every rank.
#[test]
fn interleaved_chunks_start_before_the_last_backward_ends() {
    let cfg = config(2, 2, "interleaved-1f1b", 25.0, "overlap-interleaved");
    for (summary, flight) in run_recorded(&cfg) {
        let c = summary.coord.unwrap();
        let entries = flight.entries();
        let (starts, b) = step2(&entries);
        let end = b.end.expect("the backward ended");
        assert!(
            starts.iter().any(|s| s.start <= end && s.seq < b.seq),
            "pp {} dp {}: no bucket started before the last backward began",
            c.pp,
            c.dp
        );
    }
}

fn run_grads(pp: usize, dp: usize, schedule: &str, tie: bool, bucket_mb: f64) -> Vec<RunSummary> {
    let out = scratch(&format!("overlap-eq-{pp}{dp}-{schedule}-{tie}-{bucket_mb}"));
    let text = arch_config("gpt", tie, pp, 1, dp, schedule, 2, &out)
        .replace(
            "parallel: {",
            &format!("parallel: {{dp_bucket_mb: {bucket_mb}, "),
        )
        .replace("output: {", "checkpoint: {enabled: false}\noutput: {");
    let cfg = Config::parse(&text, Path::new("overlap.yaml")).unwrap();
    let opts = RunOptions {
        capture_grads_at: Some(1),
        ..RunOptions::default()
    };
    run_local_with(&cfg, &opts)
}

/// tp = 1 with data parallelism, every schedule, tied and untied: the one-process losses,
/// gradients and grad_norm within 1e-5; small and large buckets bit-identical.
#[test]
fn overlapped_replicas_match_one_process() {
    for tie in [false, true] {
        let reference = run_grads(1, 1, "gpipe", tie, 25.0);
        let ref_grads = full_grads(&reference);
        for schedule in SCHEDULES {
            let what = format!("{schedule} tied={tie} (pp 2, dp 2)");
            let small = run_grads(2, 2, schedule, tie, 0.004);
            let large = run_grads(2, 2, schedule, tie, 25.0);
            assert_eq!(
                small[0].losses, large[0].losses,
                "{what}: bucket size changed the losses"
            );
            assert_eq!(small[0].grad_norms, large[0].grad_norms, "{what}");
            for (a, b) in small[0].losses.iter().zip(&reference[0].losses) {
                assert!((a - b).abs() <= 1e-5 * b.abs(), "{what}: loss {a} vs {b}");
            }
            for (a, b) in small[0].grad_norms.iter().zip(&reference[0].grad_norms) {
                assert!(
                    (a - b).abs() <= 1e-5 * b.abs(),
                    "{what}: grad_norm {a} vs {b}"
                );
            }
            let grads = full_grads(&small);
            let large_grads = full_grads(&large);
            for (name, g) in &grads {
                let d = rel_diff(g, &ref_grads[name]);
                assert!(d <= 1e-5, "{what}: gradient of {name} differs by {d:e}");
                assert!(
                    g.equal(&large_grads[name]),
                    "{what}: {name} depends on the bucket size"
                );
            }
        }
    }
}
