//! Sequence parallelism (`parallel.sequence_parallel: true`, Megatron style) changes no
//! number that matters: on (1,2,1), (2,2,1) and (1,2,2), GPT and LLaMA, tied and untied,
//! the losses and `grad_norm` of every step and every step-1 gradient (the norm weights'
//! included: they are summed over tp before the optimizer) equal the same layout without
//! it within the equivalence suite's tolerance (1e-5 relative). The only differences are
//! summation orders: a norm weight's gradient is summed per block of token rows, then
//! over tp. Micro-batch sizes that tp does not divide (1 and 3 sequences over tp = 2: a
//! block is half a sequence, or straddles two) on one stage and on a pipeline, where the
//! stages send blocks. Also: full and selective recomputation on top of it, one run under
//! mpiexec, and the config errors.

use engine::{Config, RunOptions, RunSummary};
use std::path::Path;
use std::time::Duration;
use strata_tests::{
    arch_config, assert_clean_error, assert_same_training, read_losses, rel, run_local_with,
    run_strata, scratch, write,
};

const TOL: f64 = 1e-5;
const STEPS: usize = 3;

fn config(
    arch: &str,
    tie: bool,
    (pp, tp, dp): (usize, usize, usize),
    schedule: &str,
    extra: &str,
    out: &Path,
) -> String {
    arch_config(arch, tie, pp, tp, dp, schedule, STEPS, out)
        .replace("virtual_stages:", &format!("{extra}virtual_stages:"))
}

/// A run of `config` with `micro_batch_size: mbs` (the suite's configs use 2).
fn run(
    arch: &str,
    tie: bool,
    layout: (usize, usize, usize),
    schedule: &str,
    extra: &str,
    mbs: usize,
) -> Vec<RunSummary> {
    let (pp, tp, dp) = layout;
    let tag = extra.replace([':', ',', ' '], "");
    let out = scratch(&format!(
        "sp-{arch}-{tie}-{pp}{tp}{dp}-{schedule}-{tag}-mbs{mbs}"
    ));
    let text = config(arch, tie, layout, schedule, extra, &out)
        .replace("micro_batch_size: 2", &format!("micro_batch_size: {mbs}"));
    let cfg = Config::parse(&text, Path::new("sp.yaml")).unwrap();
    let opts = RunOptions {
        capture_grads_at: Some(1),
        ..RunOptions::default()
    };
    run_local_with(&cfg, &opts)
}

/// Sequence parallelism on (plus `extra` keys) against off, on one layout.
fn same_numbers(arch: &str, tie: bool, layout: (usize, usize, usize), schedule: &str, extra: &str) {
    same_numbers_at(arch, tie, layout, schedule, extra, 2);
}

/// [`same_numbers`] with microbatches of `mbs` sequences.
fn same_numbers_at(
    arch: &str,
    tie: bool,
    layout: (usize, usize, usize),
    schedule: &str,
    extra: &str,
    mbs: usize,
) {
    let what = format!("{arch} tied={tie} {schedule} (pp, tp, dp) = {layout:?} mbs {mbs} {extra}");
    let off = run(arch, tie, layout, schedule, "", mbs);
    let on = run(
        arch,
        tie,
        layout,
        schedule,
        &format!("sequence_parallel: true, {extra}"),
        mbs,
    );
    let worst = assert_same_training(&what, &on, &off, STEPS, TOL);
    // Every tp rank holds the same (summed) gradient of a replicated norm weight.
    let norm = |s: &RunSummary| {
        s.grads
            .iter()
            .find(|g| g.name.ends_with("ln2.weight"))
            .map(|g| g.values.clone())
    };
    let per_rank: Vec<_> = on.iter().filter_map(norm).collect();
    assert!(per_rank.len() >= 2, "{what}");
    let first_stage: Vec<_> = on
        .iter()
        .filter(|s| s.coord.unwrap().pp == 0 && s.coord.unwrap().dp == 0)
        .filter_map(norm)
        .collect();
    assert!(
        first_stage.windows(2).all(|w| w[0] == w[1]),
        "{what}: tp ranks disagree"
    );
    eprintln!("{what}: worst gradient difference {worst:.2e}");
}

#[test]
fn gpt_on_every_tp_layout() {
    same_numbers("gpt", false, (1, 2, 1), "1f1b", "");
    same_numbers("gpt", true, (2, 2, 1), "zb-h1", "");
    same_numbers("gpt", true, (1, 2, 2), "gpipe", "");
}

#[test]
fn llama_on_every_tp_layout() {
    same_numbers("llama", true, (1, 2, 1), "gpipe", "");
    same_numbers("llama", false, (2, 2, 1), "interleaved-1f1b", "");
    same_numbers("llama", true, (1, 2, 2), "1f1b", "");
}

/// tp = 2 with microbatches of 1 and 3 sequences: rank 0's block is the first half of a
/// sequence, or a whole sequence and the first half of the next; with pp = 2 the stages
/// send and receive those blocks.
#[test]
fn microbatches_that_tp_does_not_divide() {
    same_numbers_at("gpt", false, (1, 2, 1), "1f1b", "", 1);
    same_numbers_at("gpt", true, (2, 2, 1), "zb-h1", "", 3);
    same_numbers_at("llama", false, (2, 2, 1), "1f1b", "", 1);
    same_numbers_at("llama", true, (1, 2, 2), "gpipe", "", 3);
    same_numbers_at("llama", false, (2, 2, 1), "gpipe", "recompute: full, ", 3);
    same_numbers_at("gpt", false, (2, 2, 1), "1f1b", "recompute: selective, ", 1);
}

#[test]
fn with_full_recomputation() {
    same_numbers("llama", false, (2, 2, 1), "1f1b", "recompute: full, ");
}

#[test]
fn a_sequence_that_does_not_split_is_refused() {
    let out = scratch("sp-indivisible");
    let text = config(
        "gpt",
        false,
        (1, 2, 1),
        "1f1b",
        "sequence_parallel: true, ",
        &out,
    )
    .replace("seq_len: 16", "seq_len: 15");
    let err = Config::parse(&text, Path::new("sp.yaml")).unwrap_err();
    assert!(err.is_user_error(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("model.seq_len") && msg.contains("parallel.sequence_parallel"),
        "{msg}"
    );
    let text = config(
        "gpt",
        false,
        (1, 1, 1),
        "1f1b",
        "sequence_parallel: true, ",
        &out,
    );
    let err = Config::parse(&text, Path::new("sp.yaml")).unwrap_err();
    assert!(
        err.is_user_error() && err.to_string().contains("parallel.tp"),
        "{err}"
    );
    // The CLI maps it to exit 2 before any rank starts.
    let dir = scratch("sp-indivisible-cli");
    let bad = config(
        "gpt",
        false,
        (1, 2, 1),
        "1f1b",
        "sequence_parallel: true, ",
        &dir.join("run"),
    )
    .replace("seq_len: 16", "seq_len: 15");
    let cfg = write(&dir, "cfg.yaml", &bad);
    let run = run_strata(
        &["launch", cfg.to_str().unwrap()],
        &[],
        Duration::from_secs(60),
    );
    assert_clean_error(&run, &["model.seq_len", "parallel.sequence_parallel"]);
}

/// Under mpiexec (MPI's all-gather and reduce-scatter): tp = 2 with and without sequence
/// parallelism give the same losses and grad_norm.
#[test]
fn under_mpiexec() {
    let launch = |sp: bool| {
        let dir = scratch(&format!("sp-mpi-{sp}"));
        let out = dir.join("run");
        let extra = if sp { "sequence_parallel: true, " } else { "" };
        let text = config("llama", true, (1, 2, 1), "1f1b", extra, &out);
        let cfg = write(&dir, "cfg.yaml", &text);
        let run = run_strata(
            &["launch", cfg.to_str().unwrap()],
            &[],
            Duration::from_secs(120),
        );
        assert_eq!(
            run.code,
            Some(0),
            "sp={sp}:\n{}\n{}",
            run.stdout,
            run.stderr
        );
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let norms: Vec<f64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["grad_norm"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        (read_losses(&out), norms)
    };
    let (off, on) = (launch(false), launch(true));
    assert_eq!(on.0.len(), STEPS);
    for (a, b) in on.0.iter().zip(&off.0).chain(on.1.iter().zip(&off.1)) {
        assert!(
            rel(*a, *b) <= TOL,
            "mpiexec: {a} vs {b} (losses then grad_norms)"
        );
    }
}
