//! Activation recomputation changes no number that matters. In-process, small models.
//!
//! * Full (`parallel.recompute: full`): on the layouts where each mechanism differs (one
//!   fused autograd graph with a tied embedding shared by the embedding and the head; the
//!   zero-bubble I/W split; tensor-parallel cut tapes; pipeline chunks; interleaved
//!   chunks; data parallelism), the losses, the `grad_norm` of every step and every
//!   step-1 gradient are bit-identical to the same layout without recomputation.
//! * Selective (`parallel.recompute: selective`): against `none` on the same layout, the
//!   loss and `grad_norm` of every step and every step-1 gradient (reassembled to full
//!   shape) agree within 1e-6 relative, on GPT and LLaMA, tp = 1 (where it cuts the
//!   otherwise fused graph) and tp = 2 with and without sequence parallelism, under 1F1B,
//!   GPipe, zero-bubble (zb-h1) and interleaved schedules, with data parallelism and tied
//!   embeddings. Not bit-identical: a weight gradient is formed as `Xᵀ dY` from the
//!   rebuilt input instead of inside autograd, and the cut graph adds a value's gradient
//!   contributions in another order.

use engine::{Config, RunOptions, RunSummary};
use std::path::Path;
use strata_tests::{arch_config, assert_same_training, full_grads, run_local_with, scratch};

const STEPS: usize = 3;

fn run(
    arch: &str,
    tie: bool,
    (pp, tp, dp): (usize, usize, usize),
    schedule: &str,
    recompute: &str,
) -> Vec<RunSummary> {
    let tag = recompute.replace([':', ',', ' '], "");
    let name = format!("recompute-{arch}-{tie}-{pp}{tp}{dp}-{schedule}-{tag}");
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

/// Selective recomputation: relative tolerance against `none`.
const TOL: f64 = 1e-6;

/// `extra` (recomputation and sequence-parallel keys) against none on one layout.
fn same_numbers(arch: &str, tie: bool, layout: (usize, usize, usize), schedule: &str, extra: &str) {
    let what = format!("{arch} tied={tie} {schedule} (pp, tp, dp) = {layout:?} {extra}");
    let none = run(arch, tie, layout, schedule, "none");
    let other = run(arch, tie, layout, schedule, extra);
    let worst = assert_same_training(&what, &other, &none, STEPS, TOL);
    eprintln!("{what}: worst gradient difference {worst:.2e}");
}

const SELECTIVE: &str = "selective";
const SELECTIVE_SP: &str = "selective, sequence_parallel: true";

#[test]
fn selective_gpt() {
    same_numbers("gpt", true, (1, 1, 1), "1f1b", SELECTIVE);
    same_numbers("gpt", false, (2, 1, 1), "zb-h1", SELECTIVE);
    same_numbers("gpt", false, (1, 2, 2), "gpipe", SELECTIVE);
    same_numbers("gpt", true, (2, 2, 1), "interleaved-1f1b", SELECTIVE_SP);
}

#[test]
fn selective_llama() {
    same_numbers("llama", false, (2, 1, 1), "interleaved-1f1b", SELECTIVE);
    same_numbers("llama", true, (1, 2, 1), "zb-h1", SELECTIVE);
    same_numbers("llama", false, (2, 2, 1), "zb-h1", SELECTIVE_SP);
    same_numbers("llama", true, (1, 2, 2), "1f1b", SELECTIVE_SP);
}
