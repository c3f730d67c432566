//! A launched run with `--set` overrides: the ranks get the same overrides (the run has the
//! overridden length and config.yaml records it), rank 0 writes the report at the end
//! (loss.svg, timeline.svg), and `strata report RUN_DIR` prints the summary again.
//! Progress: plain lines at `train.log_every` when stderr is a pipe, a live bar when the
//! launcher's stderr is a terminal (`STRATA_PROGRESS=bar` stands in for one here).

use std::time::Duration;
use strata_tests::{read_losses, run_strata, scratch, tiny_config, write};

#[test]
fn launch_with_overrides_writes_the_report_and_strata_report_prints_it() {
    let dir = scratch("report");
    let out = dir.join("run");
    let cfg = write(&dir, "cfg.yaml", &tiny_config(2, "1f1b", 100, &out));
    let run = run_strata(
        &[
            "launch",
            cfg.to_str().unwrap(),
            "--set",
            "train.steps=5",
            "--set",
            "train.eval_every=2",
        ],
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    // The workers trained 5 steps, not the file's 100, and the run records why.
    assert_eq!(read_losses(&out).len(), 5);
    let recorded = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(recorded.contains("steps: 5") && recorded.contains("eval_every: 2"));
    assert!(run.stdout.contains("val loss: final"), "{}", run.stdout);
    for f in ["loss.svg", "timeline.svg"] {
        std::fs::remove_file(out.join(f)).unwrap_or_else(|e| panic!("{f} missing: {e}"));
    }
    let report = run_strata(
        &["report", out.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(report.code, Some(0), "{}", report.stderr);
    let s = &report.stdout;
    for needle in [
        "5 steps (1 .. 5)",
        "pp 2 × tp 1 × dp 1, 1f1b",
        "train loss: first",
        "evaluations",
        "tokens/s",
        "bubble",
        "compute",
        "optimizer",
    ] {
        assert!(s.contains(needle), "`{needle}` missing from:\n{s}");
    }
    // One table row per rank.
    assert!(s.lines().any(|l| l.trim_start().starts_with("1 ")), "{s}");
    let loss = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(loss.starts_with("<svg") && loss.contains("train loss") && loss.contains("val loss"));
    let timeline = std::fs::read_to_string(out.join("timeline.svg")).unwrap();
    for needle in [
        "rank 0 (",
        "rank 1 (",
        "F forward",
        "B backward",
        "wait (receive)",
    ] {
        assert!(
            timeline.contains(needle),
            "`{needle}` missing from timeline.svg"
        );
    }
    // The forward and backward colours of `strata simulate`'s picture.
    let lower = timeline.to_lowercase();
    assert!(lower.contains("#4e79a7") && lower.contains("#e15759"));
}

/// The step numbers of rank 0's plain progress lines.
fn progress_steps(stderr: &str) -> Vec<usize> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("strata rank 0: step "))
        .map(|rest| rest.split('|').next().unwrap().trim().parse().unwrap())
        .collect()
}

#[test]
fn progress_is_plain_lines_when_piped_and_a_live_bar_on_a_terminal() {
    let dir = scratch("progress");
    let text =
        tiny_config(2, "1f1b", 5, &dir.join("lines")).replace("log_every: 1", "log_every: 2");
    let cfg = write(&dir, "cfg.yaml", &text);
    let cfg = cfg.to_str().unwrap();
    let limit = Duration::from_secs(120);
    // A configured peak: the line shows MFU against it.
    let peak = "parallel.hardware.device_tflops=0.5";
    let run = run_strata(
        &["launch", cfg, "--set", peak],
        &[("STRATA_PROGRESS", "lines")],
        limit,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // The first step, every log_every-th, and the last (evaluated) one.
    assert_eq!(
        progress_steps(&run.stderr),
        vec![1, 2, 4, 5],
        "{}",
        run.stderr
    );
    let first = run
        .stderr
        .lines()
        .find(|l| l.starts_with("strata rank 0: step     1 | loss "))
        .unwrap_or_else(|| panic!("{}", run.stderr));
    for needle in ["| val ", " tok/s", "| MFU ", "max bubble"] {
        assert!(first.contains(needle), "`{needle}` missing from {first}");
    }

    let bar_dir = format!("output.dir={}", dir.join("bar").display());
    let run = run_strata(
        &["launch", cfg, "--set", &bar_dir],
        &[("STRATA_PROGRESS", "bar"), ("COLUMNS", "160")],
        limit,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(progress_steps(&run.stderr).is_empty(), "{}", run.stderr);
    // The finished bar: position, loss, last val loss, tokens/s and ETA, redrawn in place
    // (ANSI line clears); no MFU against the default peak, a GPU figure (0.1% on a CPU).
    let bar = run
        .stderr
        .split(['\r', '\n'])
        .rfind(|l| l.contains("5/5"))
        .unwrap_or_else(|| panic!("no finished bar in {:?}", run.stderr));
    for needle in ["train [", "| loss ", "| val ", " tok/s", "| ETA "] {
        assert!(bar.contains(needle), "`{needle}` missing from {bar:?}");
    }
    assert!(
        !bar.contains("MFU"),
        "MFU against the default peak in {bar:?}"
    );
    assert!(run.stderr.contains("\x1b[2K"), "{:?}", run.stderr);
}
