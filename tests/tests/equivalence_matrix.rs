//! The equivalence matrix (issue 11): every schedule × the layouts (2,1,1), (1,2,1),
//! (2,2,1), (2,2,2) × both architectures × tied and untied embeddings reproduces one
//! process: the loss of every step within 1e-5, the step-1 gradient of every parameter
//! (gathered back to full shape) within 1e-5, and `grad_norm` of every step within 1e-5,
//! all relative. In-process (crossbeam transport), small models, so it runs in CI.
//!
//! The single-process reference is itself checked against transformers (PyTorch autograd)
//! in the outside-reference tests; here every layout must agree with it.

use engine::{Config, RunOptions, RunSummary};
use std::path::Path;
use strata_tests::{arch_config, full_grads, rel, rel_diff, run_local_with, scratch, SCHEDULES};

const LAYOUTS: [(usize, usize, usize); 4] = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (2, 2, 2)];
const TOL: f64 = 1e-5;
const STEPS: usize = 3;

fn run(
    arch: &str,
    tie: bool,
    (pp, tp, dp): (usize, usize, usize),
    schedule: &str,
) -> Vec<RunSummary> {
    let out = scratch(&format!("matrix-{arch}-{tie}-{pp}{tp}{dp}-{schedule}"));
    let text = arch_config(arch, tie, pp, tp, dp, schedule, STEPS, &out);
    let cfg = Config::parse(&text, Path::new("matrix.yaml")).unwrap();
    let opts = RunOptions {
        capture_grads_at: Some(1),
        ..RunOptions::default()
    };
    run_local_with(&cfg, &opts)
}

/// Runs one (arch, tie) slice of the matrix; returns the worst relative differences.
fn matrix(arch: &str, tie: bool) {
    let reference = run(arch, tie, (1, 1, 1), "gpipe");
    let (ref_losses, ref_norms) = (&reference[0].losses, &reference[0].grad_norms);
    let ref_grads = full_grads(&reference);
    assert_eq!(
        ref_norms.len(),
        STEPS,
        "grad_clip must report grad_norm every step"
    );
    assert!(ref_grads.len() > 20, "{} parameters", ref_grads.len());
    let (mut cases, mut worst) = (0, [0.0f64; 3]);
    for schedule in SCHEDULES {
        for layout in LAYOUTS {
            let what = format!("{arch} tied={tie} {schedule} (pp, tp, dp) = {layout:?}");
            let runs = run(arch, tie, layout, schedule);
            for (i, (a, b)) in runs[0].losses.iter().zip(ref_losses).enumerate() {
                worst[0] = worst[0].max(rel(*a, *b));
                assert!(rel(*a, *b) <= TOL, "{what}: step {} loss {a} vs {b}", i + 1);
            }
            for (i, (a, b)) in runs[0].grad_norms.iter().zip(ref_norms).enumerate() {
                worst[2] = worst[2].max(rel(*a, *b));
                assert!(
                    rel(*a, *b) <= TOL,
                    "{what}: step {} grad_norm {a} vs {b}",
                    i + 1
                );
            }
            assert_eq!(runs[0].losses.len(), STEPS, "{what}");
            assert_eq!(runs[0].grad_norms.len(), STEPS, "{what}");
            let grads = full_grads(&runs);
            assert_eq!(
                grads.keys().collect::<Vec<_>>(),
                ref_grads.keys().collect::<Vec<_>>(),
                "{what}"
            );
            for (name, g) in &grads {
                let d = rel_diff(g, &ref_grads[name]);
                worst[1] = worst[1].max(d);
                assert!(
                    d <= TOL,
                    "{what}: gradient of {name} differs by {d:e} (relative)"
                );
            }
            cases += 1;
        }
    }
    eprintln!(
        "matrix {arch} tied={tie}: {cases} cases; worst relative difference: loss {:.2e}, gradients {:.2e}, grad_norm {:.2e}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn gpt_untied_matrix() {
    matrix("gpt", false);
}

#[test]
fn gpt_tied_matrix() {
    matrix("gpt", true);
}

#[test]
fn llama_untied_matrix() {
    matrix("llama", false);
}

#[test]
fn llama_tied_matrix() {
    matrix("llama", true);
}
