//! Bad input gets a one-line error naming the field and the fix, exit code 2, and never a
//! panic or a hang.

use std::time::Duration;
use strata_tests::{assert_clean_error, repo_root, run_strata, scratch, tiny_config, write, Run};

fn launch_text(name: &str, text: &str, env: &[(&str, &str)]) -> Run {
    let dir = scratch(name);
    let cfg = write(&dir, "cfg.yaml", text);
    run_strata(
        &["launch", cfg.to_str().unwrap()],
        env,
        Duration::from_secs(60),
    )
}

fn good(name: &str) -> String {
    tiny_config(2, "gpipe", 2, &scratch(name).join("run"))
}

#[test]
fn yaml_syntax_error() {
    // An unterminated quoted string on line 3.
    let text = good("syn").replace("data: random", "data: \"random");
    assert_clean_error(
        &launch_text("syntax", &text, &[]),
        &["YAML syntax error at line"],
    );
}

#[test]
fn unknown_key() {
    let text = good("unk").replace("d_ff: 64", "d_ff: 64, dropout: 0.1");
    assert_clean_error(
        &launch_text("unknown", &text, &[]),
        &["model", "unknown field `dropout`"],
    );
}

#[test]
fn pp_larger_than_layers() {
    let text = good("pp").replace("pp: 2", "pp: 9");
    assert_clean_error(
        &launch_text("pp", &text, &[]),
        &["parallel.pp = 9", "model.n_layers = 8"],
    );
}

#[test]
fn missing_data_file() {
    let text = good("data").replace("data: random", "data: no/such/file.txt");
    assert_clean_error(
        &launch_text("data", &text, &[]),
        &["train.data", "file not found", "no/such/file.txt"],
    );
}

#[test]
fn non_positive_microbatches() {
    for bad in ["0", "-3"] {
        let text = good("mb").replace("microbatches: 4", &format!("microbatches: {bad}"));
        assert_clean_error(
            &launch_text("mb", &text, &[]),
            &["parallel.microbatches", "positive"],
        );
    }
}

#[test]
fn heads_not_divisible_by_tp() {
    let text = good("tp3").replace("tp: 1", "tp: 3");
    assert_clean_error(
        &launch_text("tp3", &text, &[]),
        &["model.n_heads = 4 is not divisible by parallel.tp = 3"],
    );
}

#[test]
fn tp_larger_than_heads() {
    let text = good("tp8")
        .replace("pp: 2", "pp: 1")
        .replace("tp: 1", "tp: 8");
    assert_clean_error(
        &launch_text("tp8", &text, &[]),
        &["parallel.tp = 8", "exceeds model.n_heads = 4"],
    );
}

#[test]
fn world_not_pp_tp_dp() {
    // Started by hand with the wrong number of ranks (strata launch computes it).
    let dir = scratch("world");
    let cfg = write(&dir, "cfg.yaml", &good("world").replace("tp: 1", "tp: 2"));
    let mut cmd = std::process::Command::new("mpiexec");
    cmd.args(["-n", "3"])
        .arg(strata_tests::strata_bin())
        .args(["worker", "--config", cfg.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let run = strata_tests::run_with_limit(cmd, Duration::from_secs(60));
    assert!(!run.timed_out, "hung");
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("world size 3 != parallel.pp · parallel.tp · parallel.dp = 2 · 2 · 1 = 4")
            && run.stderr.contains("fix:"),
        "{}",
        run.stderr
    );
}

#[test]
fn mpiexec_missing_from_path() {
    let run = launch_text("nompi", &good("nompi"), &[("PATH", "/nonexistent")]);
    assert_clean_error(&run, &["mpiexec", "not found on PATH"]);
}

#[test]
fn plan_prints_table_and_json() {
    let cfg = repo_root().join("configs/gpt-tiny.yaml");
    let run = run_strata(
        &["plan", cfg.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("embed, block.0-3") && run.stdout.contains("block.4-7, head"),
        "{}",
        run.stdout
    );
    let run = run_strata(
        &["plan", cfg.to_str().unwrap(), "--json"],
        &[],
        Duration::from_secs(30),
    );
    let plan: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(plan["model"]["vocab"], 65);
    assert_eq!(plan["stages"].as_array().unwrap().len(), 2);
}

#[test]
fn recompute_and_sequence_parallel_keys() {
    let base = good("policy");
    let run = launch_text(
        "recompute-bad",
        &base.replace("schedule: gpipe", "schedule: gpipe, recompute: some"),
        &[],
    );
    assert_clean_error(&run, &["parallel.recompute", "unknown variant `some`"]);
    // Sequence parallelism splits tensor-parallel regions: at tp = 1 it is refused, by
    // `strata plan` as by `strata launch`.
    let sp = base.replace(
        "schedule: gpipe",
        "schedule: gpipe, sequence_parallel: true",
    );
    let run = launch_text("sp-tp1", &sp, &[]);
    assert_clean_error(&run, &["parallel.sequence_parallel", "parallel.tp = 1"]);
    let dir = scratch("sp-plan");
    let cfg = write(&dir, "cfg.yaml", &sp);
    let run = run_strata(
        &["plan", cfg.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    );
    assert_clean_error(&run, &["parallel.sequence_parallel", "parallel.tp = 1"]);
    // With tp > 1, and any recompute mode, the planner models them.
    let ok = base.replace(
        "schedule: gpipe",
        "schedule: gpipe, tp: 2, recompute: full, sequence_parallel: true",
    );
    let ok = ok.replace("tp: 1,", "");
    let cfg = write(&dir, "ok.yaml", &ok);
    let run = run_strata(
        &["plan", cfg.to_str().unwrap()],
        &[],
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("rank 0 peak memory"), "{}", run.stdout);
    // Sequence parallelism splits each sequence into tp blocks: an odd one is refused.
    let odd = ok.replace("seq_len: 16", "seq_len: 15");
    let run = launch_text("sp-odd", &odd, &[]);
    assert_clean_error(&run, &["model.seq_len", "parallel.sequence_parallel"]);
}

/// `strata plan CONFIG | head`, with a reader that is gone before the first line: the
/// printing commands end quietly (SIGPIPE, like other Unix tools), never with a panic.
#[test]
fn printing_commands_end_quietly_when_stdout_is_closed() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let dir = scratch("epipe");
    let cfg = write(&dir, "cfg.yaml", &good("epipe"));
    let cfg = cfg.to_str().unwrap();
    let llama = repo_root().join("configs/llama-48.yaml");
    let llama = llama.to_str().unwrap();
    let commands: [&[&str]; 4] = [
        &["plan", cfg],
        &["plan", cfg, "--json"],
        &[
            "plan",
            llama,
            "--auto",
            "--world",
            "64",
            "--memory-gib",
            "80",
        ],
        &["simulate", cfg, "--svg", "/dev/null"],
    ];
    for args in commands {
        let mut fds = [0; 2];
        // SAFETY: pipe(2) fills the two descriptors, which we then own.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let (read, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        drop(read);
        let out = std::process::Command::new(strata_tests::strata_bin())
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(write_end))
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        // Killed by SIGPIPE (like `cat` or `grep`), or exited 0: never Rust's panic code 101.
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.code() == Some(0),
            "{args:?}: {:?}: {stderr}",
            out.status
        );
    }
}
