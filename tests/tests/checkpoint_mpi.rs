//! Issue 8, must-show 2 (one case) and 3, under mpiexec: a rank aborted in the middle of a
//! checkpoint save (STRATA_FAIL_AT=RANK:save:STEP) leaves `latest` on the previous,
//! verifiable checkpoint; training resumes from it on another layout with the same losses
//! and metrics.jsonl continues; a flipped byte is refused by `verify` and by a resume, exit
//! 2, naming the file.

use std::path::Path;
use std::time::Duration;
use strata_tests::{assert_clean_error, layout_config, read_losses, run_strata, scratch, write};

const LIMIT: Duration = Duration::from_secs(180);

fn config(dir: &Path, layout: (usize, usize), steps: usize, resume: bool) -> String {
    let mut text = layout_config(layout.0, layout.1, 1, "1f1b", steps, &dir.join("run"));
    text.push_str("checkpoint: {every: 3}\n");
    if resume {
        text = text.replace("grad_clip: 1.0}", "grad_clip: 1.0, resume: latest}");
    }
    text
}

fn latest(root: &Path) -> String {
    std::fs::read_to_string(root.join("latest"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn killed_mid_save_then_resumed_on_another_layout_then_corrupted() {
    let dir = scratch("ckpt-mpi");
    let root = dir.join("run/checkpoints");
    // pp 2: rank 1 aborts inside the save of step 6, after writing part of its file.
    let cfg = write(&dir, "crash.yaml", &config(&dir, (2, 1), 6, false));
    let run = run_strata(
        &["launch", cfg.to_str().unwrap()],
        &[("STRATA_FAIL_AT", "1:save:6")],
        LIMIT,
    );
    assert!(!run.timed_out, "hung: {}", run.stderr);
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("injected crash in the checkpoint save of step 6"),
        "{}",
        run.stderr
    );
    assert_eq!(latest(&root), "step-000003");
    assert!(root.join("step-000006.tmp").is_dir() && !root.join("step-000006").exists());
    let verify = run_strata(
        &["checkpoint", "verify", root.to_str().unwrap()],
        &[],
        LIMIT,
    );
    assert_eq!(verify.code, Some(0), "{}", verify.stderr);
    assert!(verify.stdout.contains("step 3"), "{}", verify.stdout);
    let crashed = read_losses(&dir.join("run"));
    assert_eq!(crashed.len(), 5, "steps 1-5 were logged before the crash");

    // Resume from `latest` on tp 2 (was pp 2): steps 4-6 repeat the crashed run's losses.
    let cfg = write(&dir, "resume.yaml", &config(&dir, (1, 2), 6, true));
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("resuming from") && run.stdout.contains("resumed from"),
        "{}",
        run.stdout
    );
    let losses = read_losses(&dir.join("run"));
    assert_eq!(losses.len(), 6, "metrics.jsonl continues: {losses:?}");
    assert_eq!(
        &losses[..3],
        &crashed[..3],
        "the lines before the checkpoint are kept"
    );
    for (a, b) in losses[3..5].iter().zip(&crashed[3..5]) {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs(),
            "resumed {a} vs uninterrupted {b}"
        );
    }
    assert_eq!(latest(&root), "step-000006");
    assert!(
        !root.join("step-000006.tmp").exists(),
        "the stale save was cleaned up"
    );

    // A flipped byte: verify and a resume refuse it, exit 2, naming the file.
    let file = root.join("step-000006/rank-00001.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(&file, &bytes).unwrap();
    let run = run_strata(
        &["checkpoint", "verify", root.to_str().unwrap()],
        &[],
        LIMIT,
    );
    assert_clean_error(&run, &[file.to_str().unwrap(), "checksum mismatch"]);
    let cfg = write(&dir, "again.yaml", &config(&dir, (2, 1), 9, true));
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
    assert_clean_error(&run, &[file.to_str().unwrap(), "checksum mismatch"]);
}
