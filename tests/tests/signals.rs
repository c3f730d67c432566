//! `strata launch` under signals: SIGTERM is forwarded to the job (which checkpoints and
//! exits 0, and `train.resume: latest` continues it with the losses of an uninterrupted
//! run), the launcher never exits while a process of its job still runs, a second signal
//! escalates to SIGKILL after the grace period, and ranks orphaned by a dying mpiexec are
//! waited for and reaped.
//!
//! Processes are found by a marker unique to each test (its scratch path) in their
//! command lines, so concurrent tests never see each other's.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use strata_tests::{
    assert_losses_match, read_losses, run_strata, scratch, strata_bin, tiny_config, write,
};

/// Live (non-zombie) processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true);
        if cmdline.contains(marker) && !zombie && pid != std::process::id() as i32 {
            found.push((pid, cmdline));
        }
    }
    found
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ready() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Reads `child`'s stderr on a thread as it arrives: the text so far, and the reader
/// (done at end of file).
fn tee_stderr(child: &mut Child) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let mut stderr = child.stderr.take().unwrap();
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            let mut t = sink.lock().unwrap();
            t.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (text, reader)
}

/// Waits for `child` to exit (killing it after `limit`); returns its exit code and stderr.
fn finish(mut child: Child, limit: Duration) -> (Option<i32>, String) {
    let tee = tee_stderr(&mut child);
    finish_teed(child, tee, limit)
}

/// [`finish`] for a child whose stderr is already read by [`tee_stderr`].
fn finish_teed(
    mut child: Child,
    (text, reader): (Arc<Mutex<String>>, JoinHandle<()>),
    limit: Duration,
) -> (Option<i32>, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            // Leave nothing running behind a failed test: a second signal escalates.
            signal(&child, libc::SIGTERM);
            std::thread::sleep(Duration::from_secs(12));
            let _ = child.kill();
            panic!("the launcher did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join().unwrap();
    let text = text.lock().unwrap().clone();
    (status.code(), text)
}

fn launch(args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(strata_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn metrics_lines(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// The step N of the one `preempted at step N; …` line in `stderr`.
fn preempted_step(stderr: &str) -> usize {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("preempted at step "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    lines[0]
        .split("preempted at step ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", lines[0]))
}

#[test]
fn sigterm_to_launch_checkpoints_leaves_no_orphan_ranks_and_resumes_exactly() {
    let dir = scratch("sig-term");
    let out = dir.join("run");
    let cfg = write(&dir, "cfg.yaml", &tiny_config(2, "1f1b", 100_000, &out));
    let marker = cfg.to_str().unwrap();
    let child = launch(&["launch", marker], &[]);
    // Both ranks are training once the first steps are recorded.
    let started = wait_until(Duration::from_secs(90), || metrics_lines(&out) >= 3);
    if !started {
        signal(&child, libc::SIGTERM);
        let (code, stderr) = finish(child, Duration::from_secs(60));
        panic!("the run did not start: exit {code:?}: {stderr}");
    }
    // Each rank is a supervisor and its child (see `strata worker`): at least 2.
    let ranks = processes_with(marker)
        .into_iter()
        .filter(|(_, c)| c.contains(" worker ") && !c.contains("mpiexec"))
        .count();
    assert!(ranks >= 2, "{:?}", processes_with(marker));
    signal(&child, libc::SIGTERM);
    let (code, stderr) = finish(child, Duration::from_secs(60));
    // Checked the moment the launcher is gone: mpiexec and every rank went before it.
    let left = processes_with(marker);
    assert!(
        left.is_empty(),
        "still running after the launcher exited: {left:?}"
    );
    assert!(stderr.contains("SIGTERM received: forwarded"), "{stderr}");
    // The ranks saved a checkpoint at one step boundary and the job (and so the
    // launcher) exited 0.
    assert_eq!(code, Some(0), "{stderr}");
    let step = preempted_step(&stderr);
    assert!(out
        .join(format!("checkpoints/step-{step:06}/manifest.json"))
        .is_file());

    // `train.resume: latest` continues it: two more steps give the losses of a run that
    // was never interrupted.
    let total = (step + 2).to_string();
    let resume = run_strata(
        &[
            "launch",
            marker,
            "--set",
            "train.resume=latest",
            "--set",
            &format!("train.steps={total}"),
        ],
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(resume.code, Some(0), "{}", resume.stderr);
    let ref_out = dir.join("reference");
    let ref_cfg = write(
        &dir,
        "ref.yaml",
        &tiny_config(2, "1f1b", step + 2, &ref_out),
    );
    let reference = run_strata(
        &["launch", ref_cfg.to_str().unwrap()],
        &[],
        Duration::from_secs(120),
    );
    assert_eq!(reference.code, Some(0), "{}", reference.stderr);
    let (got, want) = (read_losses(&out), read_losses(&ref_out));
    assert_eq!(got.len(), step + 2, "{got:?}");
    assert_losses_match(
        &want,
        &got,
        1e-6,
        1e-6,
        "preempted + resumed vs uninterrupted",
    );
}

/// A stand-in for mpiexec, so the launcher's side is tested without MPI: it ignores
/// SIGTERM and SIGINT or not, and runs a `rank` (a shell whose $0 is the marker).
fn fake_mpiexec(dir: &Path, marker: &str, mode: &str) -> String {
    let body = match mode {
        // Ignores signals: only SIGKILL ends it.
        "stubborn" => format!("trap '' TERM INT\nsh -c 'sleep 300; true' {marker} &\nwait\n"),
        // Exits at once, leaving its rank behind in a new session.
        "orphaning" => format!("setsid sh -c 'sleep 300; true' {marker} &\nexit 0\n"),
        _ => unreachable!(),
    };
    let path = dir.join(format!("mpiexec-{mode}"));
    std::fs::write(&path, format!("#!/bin/bash\n{body}")).unwrap();
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&path)
        .status()
        .unwrap();
    path.to_str().unwrap().to_string()
}

/// A tiny config launched through a fake mpiexec of `mode` (grace 1 s): the marker its
/// "ranks" carry, and the `strata` arguments.
fn fake_job(name: &str, mode: &str) -> (String, Vec<String>) {
    let dir = scratch(name);
    let cfg = write(
        &dir,
        "cfg.yaml",
        &tiny_config(2, "1f1b", 2, &dir.join("run")),
    );
    let marker = format!("rank-marker-{}", dir.display());
    let fake = fake_mpiexec(&dir, &marker, mode);
    let args = [
        "launch",
        cfg.to_str().unwrap(),
        "--mpiexec",
        &fake,
        "--grace-s",
        "1",
    ];
    (marker, args.map(String::from).to_vec())
}

#[test]
fn second_signal_kills_a_job_that_ignores_the_first_after_the_grace_period() {
    let (marker, args) = fake_job("sig-stubborn", "stubborn");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = launch(&args, &[]);
    let tee = tee_stderr(&mut child);
    assert!(wait_until(Duration::from_secs(30), || !processes_with(
        &marker
    )
    .is_empty()));
    signal(&child, libc::SIGINT);
    // Two signals that reach the launcher before it has handled the first are one signal
    // (the kernel and the signal iterator both merge them): send the second only once the
    // launcher has said it forwarded the first, however long a loaded machine takes.
    let forwarded = wait_until(Duration::from_secs(30), || {
        tee.0.lock().unwrap().contains("SIGINT received: forwarded")
    });
    assert!(forwarded, "{}", tee.0.lock().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !processes_with(&marker).is_empty(),
        "the first signal is only forwarded"
    );
    let t = Instant::now();
    signal(&child, libc::SIGINT);
    let (code, stderr) = finish_teed(child, tee, Duration::from_secs(30));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("killing the job"), "{stderr}");
    let left = processes_with(&marker);
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn ranks_orphaned_by_mpiexec_are_reaped_before_the_launcher_exits() {
    let (marker, args) = fake_job("sig-orphan", "orphaning");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stderr) = finish(launch(&args, &[]), Duration::from_secs(30));
    assert_eq!(code, Some(0), "mpiexec itself succeeded: {stderr}");
    assert!(stderr.contains("outlived mpiexec"), "{stderr}");
    let left = processes_with(&marker);
    assert!(left.is_empty(), "left behind: {left:?}");
}
