//! Issue 8, must-show 1 and 2, in-process: a run stopped after 3 steps and resumed
//! equals an uninterrupted 6-step run bit for bit (losses, gradient norms, final weights
//! and AdamW state), and a checkpoint saved at (pp 2, tp 2, dp 1, 1F1B) resumes on other
//! layouts and schedules with the same next losses.

use engine::checkpoint::Checkpoint;
use engine::{Config, RunOptions, RunSummary};
use std::path::Path;
use strata_tests::{
    assert_losses_match, layout_config, read_losses, run_local_with, scratch, write,
};

/// The tiny GPT on a layout, 6 steps, a checkpoint every 3 steps; optionally resumed.
fn config(
    dir: &Path,
    name: &str,
    layout: (usize, usize, usize, &str),
    resume: Option<&str>,
) -> Config {
    let (pp, tp, dp, schedule) = layout;
    let mut text = layout_config(pp, tp, dp, schedule, 6, &dir.join(name));
    text.push_str("checkpoint: {every: 3}\n");
    if let Some(r) = resume {
        text = text.replace("grad_clip: 1.0}", &format!("grad_clip: 1.0, resume: {r}}}"));
    }
    let path = write(dir, &format!("{name}.yaml"), &text);
    Config::load(&path).unwrap()
}

fn run(cfg: &Config, stop_after: Option<usize>) -> RunSummary {
    let opts = RunOptions {
        write_outputs: true,
        stop_after,
        ..RunOptions::default()
    };
    run_local_with(cfg, &opts).swap_remove(0)
}

/// Every tensor of two checkpoints (weights and moments) and their trainer state agree
/// bit for bit.
fn assert_same_checkpoint(a: &Path, b: &Path) {
    let (mut ca, mut cb) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let names: Vec<String> = ca.manifest().tensors.keys().cloned().collect();
    assert_eq!(
        names,
        cb.manifest().tensors.keys().cloned().collect::<Vec<_>>()
    );
    assert!(names.iter().any(|n| n.starts_with("optim.exp_avg_sq.")));
    assert_eq!(ca.manifest().train_state, cb.manifest().train_state);
    for name in &names {
        let (ta, tb) = (ca.read_full(name).unwrap(), cb.read_full(name).unwrap());
        assert!(
            ta.equal(&tb),
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn exact_resume(name: &str, layout: (usize, usize, usize, &str)) {
    let dir = scratch(name);
    let full = run(&config(&dir, "full", layout, None), None);
    let first = run(&config(&dir, "part", layout, None), Some(3));
    assert_eq!(first.losses.len(), 3);
    let part = dir.join("part");
    assert!(part.join("checkpoints/step-000003/manifest.json").is_file());
    assert!(!part.join("checkpoints/step-000006").exists());
    let rest = run(&config(&dir, "part", layout, Some("latest")), None);
    let joined: Vec<f64> = first.losses.iter().chain(&rest.losses).copied().collect();
    assert_eq!(joined, full.losses, "losses");
    let norms: Vec<f64> = first
        .grad_norms
        .iter()
        .chain(&rest.grad_norms)
        .copied()
        .collect();
    assert_eq!(norms, full.grad_norms, "grad norms");
    // metrics.jsonl continues: 6 lines, the uninterrupted run's losses.
    assert_eq!(read_losses(&part), full.losses);
    assert_same_checkpoint(
        &dir.join("full/checkpoints/step-000006"),
        &part.join("checkpoints/step-000006"),
    );
    assert_same_checkpoint(
        &dir.join("full/checkpoints/step-000003"),
        &part.join("checkpoints/step-000003"),
    );
}

#[test]
fn exact_resume_pp2_1f1b() {
    exact_resume("resume-pp2", (2, 1, 1, "1f1b"));
}

#[test]
fn exact_resume_2x2x2() {
    exact_resume("resume-222", (2, 2, 2, "1f1b"));
}

#[test]
fn resume_on_other_layouts_and_schedules() {
    let dir = scratch("reshard");
    let full = run(&config(&dir, "full", (2, 2, 1, "1f1b"), None), None);
    let saved = dir.join("full/checkpoints/step-000003");
    let saved_s = saved.display().to_string();
    for (i, layout) in [
        (1, 1, 1, "gpipe"),
        (1, 2, 2, "1f1b"),
        (2, 1, 1, "interleaved-1f1b"),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = config(&dir, &format!("l{i}"), layout, Some(&saved_s));
        let resumed = run(&cfg, None);
        assert_losses_match(
            &full.losses[3..],
            &resumed.losses,
            1e-5,
            1e-5,
            &format!("resumed at {layout:?}"),
        );
    }
}
