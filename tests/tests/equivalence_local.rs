//! In-process equivalence: every pipeline layout and schedule reproduces the
//! single-process losses, on the crossbeam transport (no mpiexec needed).

use engine::Config;
use std::path::Path;
use strata_tests::{assert_losses_match, repo_root, run_local, scratch, tiny_config};

fn config(pp: usize, schedule: &str) -> Config {
    let out = scratch(&format!("local-{pp}-{schedule}"));
    Config::parse(
        &tiny_config(pp, schedule, 5, &out),
        Path::new("inline.yaml"),
    )
    .unwrap()
}

#[test]
fn pipeline_layouts_match_single_process() {
    let reference = run_local(&config(1, "gpipe"));
    assert_eq!(reference.len(), 5);
    assert!(reference.iter().all(|l| l.is_finite() && *l > 0.0));
    for schedule in ["gpipe", "1f1b"] {
        for pp in [2, 4] {
            let losses = run_local(&config(pp, schedule));
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

#[test]
fn training_reduces_the_loss() {
    // Characters of tinyshakespeare: the unigram statistics alone are learnt in a few steps.
    let out = scratch("local-learns");
    let data = repo_root().join("data/tinyshakespeare.txt");
    let text = tiny_config(2, "1f1b", 30, &out)
        .replace("vocab: 64", "vocab: auto")
        .replace("data: random", &format!("data: {}", data.display()))
        .replace("lr: 1.0e-2", "lr: 3.0e-3");
    let cfg = Config::parse(&text, Path::new("inline.yaml")).unwrap();
    let losses = run_local(&cfg);
    assert!(losses[29] < losses[0] - 0.5, "{:?}", losses);
}
