//! Full activation recomputation (`parallel.recompute: full`) changes no number: on the
//! layouts where each mechanism differs (one fused autograd graph with a tied embedding
//! shared by the embedding and the head; the zero-bubble I/W split; tensor-parallel cut
//! tapes; pipeline chunks; interleaved chunks; data parallelism), the losses, the
//! `grad_norm` of every step and every step-1 gradient are bit-identical to the same
//! layout without recomputation. In-process, small models.

use engine::{Config, RunOptions, RunSummary};
use std::path::Path;
use strata_tests::{arch_config, full_grads, run_local_with, scratch};

const STEPS: usize = 3;

fn run(
    arch: &str,
    tie: bool,
    (pp, tp, dp): (usize, usize, usize),
    schedule: &str,
    recompute: &str,
) -> Vec<RunSummary> {
    let name = format!("recompute-{arch}-{tie}-{pp}{tp}{dp}-{schedule}-{recompute}");
    let out = scratch(&name);
    let text = arch_config(arch, tie, pp, tp, dp, schedule, STEPS, &out).replace(
        "virtual_stages:",
        &format!("recompute: {recompute}, virtual_stages:"),
    );
    let cfg = Config::parse(&text, Path::new("recompute.yaml")).unwrap();
    let opts = RunOptions {
        capture_grads_at: Some(1),
        ..RunOptions::default()
    };
    run_local_with(&cfg, &opts)
}

/// Recompute on and off give the same bits on one layout.
fn same_bits(arch: &str, tie: bool, layout: (usize, usize, usize), schedule: &str) {
    let what = format!("{arch} tied={tie} {schedule} (pp, tp, dp) = {layout:?}");
    let plain = run(arch, tie, layout, schedule, "none");
    let recomputed = run(arch, tie, layout, schedule, "full");
    assert_eq!(plain[0].losses.len(), STEPS, "{what}");
    assert_eq!(plain[0].grad_norms.len(), STEPS, "{what}");
    assert_eq!(plain[0].losses, recomputed[0].losses, "{what}: losses");
    assert_eq!(
        plain[0].grad_norms, recomputed[0].grad_norms,
        "{what}: grad_norm"
    );
    let (a, b) = (full_grads(&plain), full_grads(&recomputed));
    assert!(a.len() > 20, "{what}: {} parameters", a.len());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, g) in &a {
        assert!(
            g.equal(&b[name]),
            "{what}: the step-1 gradient of {name} differs with recomputation"
        );
    }
}

#[test]
fn fused_tied_one_process() {
    same_bits("gpt", true, (1, 1, 1), "gpipe");
    same_bits("llama", true, (1, 1, 1), "1f1b");
}

#[test]
fn zero_bubble_split() {
    same_bits("gpt", true, (1, 1, 1), "zb-h1");
    same_bits("llama", false, (2, 1, 1), "zb-h1");
}

#[test]
fn tensor_parallel_cut_tapes() {
    same_bits("gpt", true, (1, 2, 1), "1f1b");
    same_bits("llama", true, (2, 2, 1), "zb-h1");
}

#[test]
fn pipeline_interleaved_and_data_parallel() {
    same_bits("gpt", false, (2, 1, 1), "interleaved-1f1b");
    same_bits("llama", false, (2, 1, 2), "1f1b");
}
