//! In-process equivalence: every pipeline layout and schedule reproduces the
//! single-process losses, on the crossbeam transport (no mpiexec needed); and the
//! engine's measured stash matches each schedule's memory bound.

use engine::{Config, RunOptions, RunSummary};
use std::path::Path;
use strata_tests::{
    arch_config, assert_losses_match, repo_root, run_local, run_local_with, scratch, tiny_config,
    SCHEDULES,
};

fn config_text(pp: usize, schedule: &str, steps: usize) -> String {
    tiny_config(
        pp,
        schedule,
        steps,
        &scratch(&format!("local-{pp}-{schedule}")),
    )
}

fn config(text: &str) -> Config {
    Config::parse(text, Path::new("inline.yaml")).unwrap()
}

#[test]
fn every_schedule_and_layout_matches_single_process() {
    let reference = run_local(&config(&config_text(1, "gpipe", 5))).losses;
    assert_eq!(reference.len(), 5);
    assert!(reference.iter().all(|l| l.is_finite() && *l > 0.0));
    for schedule in SCHEDULES {
        for pp in [2, 4] {
            let losses = run_local(&config(&config_text(pp, schedule, 5))).losses;
            assert_losses_match(
                &reference,
                &losses,
                1e-5,
                1e-4,
                &format!("pp={pp} {schedule}"),
            );
        }
    }
}

fn layout_run(pp: usize, tp: usize, dp: usize, tie: bool) -> Vec<RunSummary> {
    let out = scratch(&format!("local-3d-{pp}-{tp}-{dp}-{tie}"));
    let text = arch_config("gpt", tie, pp, tp, dp, "1f1b", 3, &out);
    run_local_with(&config(&text), &RunOptions::default())
}

#[test]
fn tied_embeddings_change_the_model() {
    let untied = layout_run(2, 1, 1, false)[0].losses.clone();
    let tied = layout_run(2, 1, 1, true)[0].losses.clone();
    assert_ne!(untied, tied);
}

#[test]
fn measured_stash_respects_each_schedule_bound() {
    let (p, m) = (4, 8);
    for schedule in ["gpipe", "1f1b", "zb-h1"] {
        let text =
            config_text(p, schedule, 2).replace("microbatches: 4", &format!("microbatches: {m}"));
        let stash = run_local(&config(&text)).peak_stash;
        for (i, &s) in stash.iter().enumerate() {
            match schedule {
                // GPipe holds every microbatch before the first backward.
                "gpipe" => assert_eq!(s, m, "gpipe stage {i}: {stash:?}"),
                // 1F1B (and ZB-H1, which keeps its memory) hold at most p - i.
                _ => {
                    assert!(
                        s <= p - i,
                        "{schedule} stage {i} held {s} > {}: {stash:?}",
                        p - i
                    );
                    assert_eq!(s, p - i, "{schedule} stage {i}: {stash:?}");
                }
            }
        }
    }
    // Interleaved: rank i holds microbatches of several chunks at once.
    let text = config_text(2, "interleaved-1f1b", 2);
    let stash = run_local(&config(&text)).peak_stash;
    assert!(stash.iter().all(|&s| (2..=2 * 4).contains(&s)), "{stash:?}");
}

#[test]
fn training_reduces_the_loss() {
    // Characters of tinyshakespeare: the unigram statistics alone are learnt in a few steps.
    let data = repo_root().join("data/tinyshakespeare.txt");
    for arch in ["gpt", "llama"] {
        let out = scratch(&format!("learn-{arch}"));
        let text = arch_config(arch, false, 2, 1, 1, "1f1b", 30, &out)
            .replace("vocab: 64", "vocab: auto")
            .replace("data: random", &format!("data: {}", data.display()))
            .replace("lr: 1.0e-2", "lr: 3.0e-3");
        let losses = run_local(&config(&text)).losses;
        assert!(losses[29] < losses[0] - 0.5, "{arch}: {losses:?}");
    }
}
