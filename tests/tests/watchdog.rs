//! The watchdog under mpiexec: a stopped, killed, hung or panicking rank ends the job
//! within seconds with one line naming it (with its mesh coordinates, the step, and what
//! the other ranks were waiting on), and the live ranks dump their flight records;
//! SIGTERM stops every rank at the same step boundary and exits 0.
//!
//! The jobs of this file run one at a time (they share 2 cores with everything else), and
//! faults are injected with `STRATA_FAIL_AT=RANK:STEP:MODE` (at the rank's first backward
//! of that step, so always in the middle of a step) or sent from outside, like a user or
//! the OOM killer would.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use strata_tests::{layout_config, run_with_limit_tick, scratch, strata_bin, write, Run};

/// One job of this file at a time.
static JOBS: Mutex<()> = Mutex::new(());

/// Within this the job must be over (the bound), measured from the moment the
/// fault can strike (the step before it logged) or the signal is sent: at least 5× the
/// limits the tests configure (heartbeat_s 5, timeout_s 6). Never from launch: start-up
/// (MPI, libtorch, the model) on a loaded machine is not what is measured.
const BOUND: Duration = Duration::from_secs(30);

/// A pp × dp job of the tiny GPT, `steps` long, with the watchdog's limits.
fn config(dir: &Path, pp: usize, dp: usize, steps: usize, watchdog: &str) -> PathBuf {
    let out = dir.join("run");
    let text = layout_config(pp, 1, dp, "1f1b", steps, &out).replace(
        "virtual_stages: 1}",
        &format!("virtual_stages: 1, {watchdog}}}"),
    );
    write(dir, "cfg.yaml", &text)
}

/// Past this, a test's job is killed (all its processes) and the test fails: a guard
/// against hangs only, measured from launch (start-up included), so far above [`BOUND`].
const LIMIT: Duration = Duration::from_secs(120);

/// `strata launch CFG` with extra environment that injects a fault in step `fault_step`;
/// returns what the job printed and how long it ran after step `fault_step - 1` was
/// logged (the fault strikes after that, in the middle of `fault_step`).
fn launch(cfg: &Path, env: &[(&str, &str)], fault_step: usize) -> (Run, Duration) {
    let mut cmd = launch_cmd(cfg);
    cmd.envs(env.iter().copied());
    let metrics = cfg.parent().unwrap().join("run/metrics.jsonl");
    let mut armed = None;
    let _one = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();
    let run = run_with_limit_hook(cmd, cfg, |_| {
        if armed.is_none() && logged(&metrics) + 1 >= fault_step {
            armed = Some(Instant::now());
        }
    });
    // Not seen while the job ran (it ended between two looks): it ran ~0 s after it.
    let after = armed.map_or(Duration::ZERO, |t| {
        (start + run.elapsed).saturating_duration_since(t)
    });
    eprintln!("job: {:?} in all, {after:?} after the fault", run.elapsed);
    (run, after)
}

fn launch_cmd(cfg: &Path) -> Command {
    let mut cmd = Command::new(strata_bin());
    cmd.args(["launch", cfg.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Every process whose command line names `cfg`: the launcher, mpiexec and the ranks.
fn job_pids(cfg: &Path) -> Vec<i32> {
    let cfg = cfg.to_str().unwrap();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(cfg)
                .then_some(pid)
        })
        .collect()
}

/// The lines of stderr that contain `needle`.
fn lines_with<'a>(run: &'a Run, needle: &str) -> Vec<&'a str> {
    run.stderr.lines().filter(|l| l.contains(needle)).collect()
}

/// The ranks that the job's abort took down are not reported as killed.
fn assert_no_death_reports(run: &Run) {
    let deaths = lines_with(run, "was killed by signal");
    assert!(deaths.is_empty(), "spurious: {deaths:?}");
}

/// The job failed (no hang, no panic) within [`BOUND`] of the fault (`after`).
fn assert_failed_fast(run: &Run, after: Duration) {
    assert!(!run.timed_out, "the job hung:\n{}", run.stderr);
    assert!(
        after < BOUND,
        "took {after:?} after the fault ({:?} in all):\n{}",
        run.elapsed,
        run.stderr
    );
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

/// Parses `flight-<rank>.json`; returns its events.
fn flight_events(run_dir: &Path, rank: usize) -> Vec<serde_json::Value> {
    let path = run_dir.join(format!("flight-{rank}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(doc["rank"], rank);
    doc["events"].as_array().unwrap().clone()
}

#[test]
fn a_stopped_rank_is_named_and_the_live_ranks_dump_flight_records() {
    let dir = scratch("wd-stop");
    // pp 2 × dp 2: rank 3 is (pp 1, dp 1); its watchers are rank 1 (its pipeline peer)
    // and rank 2 (its data-parallel peer).
    let cfg = config(&dir, 2, 2, 50, "heartbeat_s: 5, timeout_s: 120");
    let (run, after) = launch(&cfg, &[("STRATA_FAIL_AT", "3:3:stop")], 3);
    assert_failed_fast(&run, after);
    assert_no_death_reports(&run);
    let reports = lines_with(&run, "stopped responding");
    assert_eq!(reports.len(), 1, "not one report:\n{}", run.stderr);
    let line = reports[0];
    assert!(
        line.contains("rank 3 (pp 1, tp 0, dp 1) stopped responding: no heartbeat for"),
        "{line}"
    );
    // The reporter names what it was waiting in, in step 3: the backward from rank 3
    // (rank 1), or the data-parallel all-reduce with it (rank 2), either a blocking one
    // (`all_reduce dp`) or the wait for the buckets overlapped with the backward
    // (`wait_all_reduces dp`). Which watcher notices first is a race.
    let waits = [
        "was waiting in 0RECV_B",
        "all_reduce dp",
        "wait_all_reduces dp",
    ];
    assert!(
        waits.iter().any(|w| line.contains(w)) && line.contains(" at step 3 for "),
        "{line}"
    );
    let run_dir = dir.join("run");
    for rank in 0..3 {
        let events = flight_events(&run_dir, rank);
        assert!(!events.is_empty(), "rank {rank} recorded nothing");
        assert!(
            events.iter().any(|e| e["step"] == 3),
            "rank {rank}'s record does not reach step 3"
        );
    }
    assert!(
        !run_dir.join("flight-3.json").exists(),
        "the stopped rank cannot have dumped"
    );
    // The reporting rank's record ends in the wait that never finished.
    let waiter = flight_events(&run_dir, 1);
    let open: Vec<&serde_json::Value> = waiter.iter().filter(|e| e["state"] == "started").collect();
    assert!(
        open.iter()
            .any(|e| e["peer"] == 3 || e["name"] == "all_reduce dp"),
        "rank 1's open events: {open:?}"
    );
}

/// The pid of rank `rank`'s process (the supervised child) of the job run with `cfg`.
fn rank_pid(cfg: &Path, rank: usize) -> Option<i32> {
    let cfg = cfg.to_str().unwrap();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let read = |f: &str| std::fs::read(entry.path().join(f)).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&read("cmdline")).replace('\0', " ");
        if !cmdline.contains(" worker ") || !cmdline.contains(cfg) {
            continue;
        }
        let environ = String::from_utf8_lossy(&read("environ")).into_owned();
        let vars: Vec<&str> = environ.split('\0').collect();
        if vars.contains(&"STRATA_WORKER_CHILD=1")
            && vars.contains(&format!("PMI_RANK={rank}").as_str())
        {
            return Some(pid);
        }
    }
    None
}

/// Spawns `strata launch CFG`, waits until `steps` steps are logged, then runs `act`
/// once; returns what the job printed.
fn launch_then(cfg: &Path, steps: usize, act: impl FnOnce()) -> Run {
    let metrics = cfg.parent().unwrap().join("run/metrics.jsonl");
    let mut act = Some(act);
    let _one = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    run_with_limit_hook(launch_cmd(cfg), cfg, |_| {
        if act.is_some() && logged(&metrics) >= steps {
            (act.take().unwrap())();
        }
    })
}

/// Steps logged so far in a run's metrics.jsonl.
fn logged(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics).map_or(0, |t| t.lines().count())
}

/// Runs the job of `cfg` (`cmd`), calling `tick` with the child while it runs; past
/// [`LIMIT`] every process the child started is killed (so a hung job fails the test
/// instead of stalling it), and afterwards any process still naming `cfg` (one orphaned
/// by a dead mpiexec) is killed too.
fn run_with_limit_hook(cmd: Command, cfg: &Path, tick: impl FnMut(&std::process::Child)) -> Run {
    let run = run_with_limit_tick(cmd, LIMIT, tick);
    for pid in job_pids(cfg) {
        kill(pid, 9);
    }
    run
}

fn kill(pid: i32, sig: i32) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    // (A process of the job may exit between the listing and the kill.)
    let _ = status;
}

#[test]
fn a_rank_killed_from_outside_is_named() {
    let dir = scratch("wd-kill");
    let cfg = config(&dir, 2, 1, 400, "heartbeat_s: 5, timeout_s: 120");
    let mut killed_at = None;
    let run = launch_then(&cfg, 3, || {
        let pid = rank_pid(&cfg, 1).expect("rank 1's process");
        kill(pid, 9);
        killed_at = Some(Instant::now());
    });
    let killed_at = killed_at.expect("the job reached step 3");
    // Measured from the kill to now (the job's end, and the clean-up after it).
    assert_failed_fast(&run, killed_at.elapsed());
    let reports = lines_with(&run, "was killed by signal 9 (SIGKILL)");
    assert_eq!(reports.len(), 1, "not one report:\n{}", run.stderr);
    assert!(
        reports[0].contains("rank 1 (pp 1, tp 0, dp 0) was killed by signal 9 (SIGKILL) at step "),
        "{}",
        reports[0]
    );
}

#[test]
fn a_hung_rank_times_out_naming_it_and_every_rank_dumps() {
    let dir = scratch("wd-hang");
    // Rank 1 hangs with its heartbeat alive: only the deadline can catch it.
    let cfg = config(&dir, 2, 1, 50, "heartbeat_s: 5, timeout_s: 6");
    let (run, after) = launch(&cfg, &[("STRATA_FAIL_AT", "1:3:hang")], 3);
    assert_failed_fast(&run, after);
    assert_no_death_reports(&run);
    let reports = lines_with(&run, "is stuck");
    assert_eq!(reports.len(), 1, "not one report:\n{}", run.stderr);
    let line = reports[0];
    for needle in [
        "rank 1 (pp 1, tp 0, dp 0) is stuck, last seen in 1B0 at step 3",
        "rank 0 (pp 0, tp 0, dp 0) waited ",
        " s in 0RECV_B0 (recv from rank 1",
        "at step 3 (parallel.timeout_s = 6)",
        "fix:",
    ] {
        assert!(line.contains(needle), "`{needle}` missing from: {line}");
    }
    // The wait is reported as measured when the deadline was noticed: 6.0 s, or a little
    // more when a loaded machine woke the waiting rank late (6.1 s reads the same), never
    // less.
    let waited: f64 = line
        .split("rank 0 (pp 0, tp 0, dp 0) waited ")
        .nth(1)
        .and_then(|t| t.split(" s in 0RECV_B0").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no wait in: {line}"));
    assert!((6.0..BOUND.as_secs_f64()).contains(&waited), "{line}");
    // The hung rank is alive: it dumps too, and its record ends in the hung action.
    let hung = flight_events(&dir.join("run"), 1);
    let last = hung.last().unwrap();
    assert_eq!(
        (last["name"].as_str(), last["state"].as_str()),
        (Some("1B0"), Some("started"))
    );
    assert!(!flight_events(&dir.join("run"), 0).is_empty());
}

#[test]
fn a_panic_names_the_rank_and_aborts_the_job() {
    let dir = scratch("wd-panic");
    let cfg = config(&dir, 2, 1, 50, "heartbeat_s: 5, timeout_s: 120");
    let (run, after) = launch(&cfg, &[("STRATA_FAIL_AT", "1:2:panic")], 2);
    assert!(!run.timed_out && after < BOUND, "{after:?}: {}", run.stderr);
    assert_ne!(run.code, Some(0));
    assert_no_death_reports(&run);
    let reports = lines_with(&run, "panic:");
    assert_eq!(reports.len(), 1, "{}", run.stderr);
    assert!(
        reports[0].starts_with("strata worker rank 1/2: panic: injected panic on rank 1"),
        "{}",
        reports[0]
    );
    for rank in 0..2 {
        assert!(!flight_events(&dir.join("run"), rank).is_empty());
    }
}

#[test]
fn sigterm_stops_every_rank_at_one_step_boundary_and_exits_0() {
    let dir = scratch("wd-term");
    let cfg = config(&dir, 2, 1, 400, "heartbeat_s: 5, timeout_s: 120");
    // Straight to mpiexec, which forwards it to every rank (as `strata launch` does).
    let mut cmd = Command::new("mpiexec");
    cmd.args(["-n", "2"])
        .arg(strata_bin())
        .args(["worker", "--config", cfg.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let metrics = dir.join("run/metrics.jsonl");
    let mut sent = false;
    let _one = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    let run = run_with_limit_hook(cmd, &cfg, |child| {
        if !sent && logged(&metrics) >= 3 {
            kill(child.id() as i32, 15);
            sent = true;
        }
    });
    assert!(sent, "never reached step 3:\n{}", run.stderr);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let line = lines_with(&run, "preempted at step");
    assert_eq!(line.len(), 1, "{}", run.stderr);
    let step: usize = line[0]
        .split("preempted at step ")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}", line[0]));
    assert!((3..400).contains(&step), "{}", line[0]);
    // Every rank stopped after the same step: rank 0 logged exactly that many.
    assert_eq!(logged(&metrics), step);
    // ... and saved the state after it, which is the one `train.resume: latest` finds.
    let ckpt = dir.join(format!("run/checkpoints/step-{step:06}"));
    assert!(
        line[0].contains(&format!("checkpoint saved to {}", ckpt.display()))
            && line[0].contains("resume with `train.resume: latest`"),
        "{}",
        line[0]
    );
    assert!(ckpt.join("manifest.json").is_file(), "{}", run.stderr);
    let latest = std::fs::read_to_string(dir.join("run/checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), format!("step-{step:06}"));
}

#[test]
fn a_second_sigterm_exits_at_once() {
    let dir = scratch("wd-term2");
    // Rank 1 hangs in step 3 (heartbeat alive, deadline far): no step boundary comes, so
    // the first SIGTERM cannot stop the job; only the second can, at once.
    let cfg = config(&dir, 2, 1, 400, "heartbeat_s: 5, timeout_s: 120");
    let mut cmd = Command::new("mpiexec");
    cmd.args(["-n", "2"])
        .arg(strata_bin())
        .args(["worker", "--config", cfg.to_str().unwrap()])
        .env("STRATA_FAIL_AT", "1:3:hang")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let metrics = dir.join("run/metrics.jsonl");
    let mut sent = 0;
    let mut second = None;
    let _one = JOBS.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();
    let run = run_with_limit_hook(cmd, &cfg, |child| {
        if sent == 0 && logged(&metrics) >= 2 {
            std::thread::sleep(Duration::from_secs(1));
            kill(child.id() as i32, 15);
            std::thread::sleep(Duration::from_secs(1));
            kill(child.id() as i32, 15);
            second = Some(Instant::now());
            sent = 2;
        }
    });
    assert_eq!(sent, 2, "never reached step 2:\n{}", run.stderr);
    // Ended within BOUND of the second signal, far before the 120 s deadline could end it.
    let after = (start + run.elapsed).saturating_duration_since(second.unwrap());
    assert!(!run.timed_out && after < BOUND, "{after:?}: {}", run.stderr);
    // The ranks exit 143 at once; what mpiexec (Hydra, which also acts on a second
    // signal) returns then varies (seen: 0), so the test checks that the job ended long
    // before any deadline could end it, with no clean stop and no checkpoint.
    assert!(
        !dir.join("run/checkpoints/latest").exists(),
        "{}",
        run.stderr
    );
    assert!(
        lines_with(&run, "preempted at step").is_empty(),
        "{}",
        run.stderr
    );
    assert_eq!(logged(&metrics), 2, "{}", run.stderr);
}
