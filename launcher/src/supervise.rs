//! Runs the `mpiexec` job of `strata launch` to its end while SIGTERM and SIGINT arrive.
//!
//! mpiexec starts in its own process group with stdin closed, so a Ctrl-C at the terminal
//! reaches the launcher alone; the launcher forwards each signal to mpiexec, which
//! delivers it to every rank exactly once (MPICH's Hydra and Open MPI both forward
//! SIGTERM and SIGINT). Escalation: the first signal asks the ranks to checkpoint at the
//! next step boundary and exit 0; the second is forwarded too (the ranks then exit at
//! once) and starts a grace period; when it runs out, or at a third signal, the launcher
//! SIGKILLs mpiexec and every process below it.
//!
//! Invariant: the launcher never returns while a process of its job runs. It is a child
//! subreaper (Linux), so a rank orphaned by a dying mpiexec is re-parented to it and
//! waited for (and killed after the grace period) before it exits.

use crate::launch::LaunchError;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How a job ended.
#[derive(Debug)]
pub struct JobEnd {
    /// mpiexec's exit status.
    pub status: ExitStatus,
    /// The first signal that the launcher received and forwarded, if any.
    pub signal: Option<i32>,
}

/// The name of a signal we handle.
pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGTERM => "SIGTERM",
        SIGINT => "SIGINT",
        libc::SIGKILL => "SIGKILL",
        _ => "a signal",
    }
}

/// Spawns `cmd` (mpiexec) and waits for it and for every process below it, forwarding
/// SIGTERM and SIGINT; `grace` is how long the job has after a second signal.
pub fn run_job(mut cmd: Command, grace: Duration) -> Result<JobEnd, LaunchError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let spawn_err = |source| LaunchError::Spawn {
        program: program.clone(),
        source,
    };
    // Registered before the spawn: a signal in between is queued, not lost.
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(spawn_err)?;
    become_subreaper();
    cmd.process_group(0).stdin(Stdio::null());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let _guard = KillOnPanic;
    let pid = child.id() as libc::pid_t;
    let mut received = Vec::new();
    let mut kill_at: Option<Instant> = None;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break status;
        }
        for sig in signals.pending() {
            received.push(sig);
            match received.len() {
                1 => {
                    send(pid, sig);
                    tracing::warn!(
                        "{} received: forwarded to the job; the ranks stop at the next step boundary (send it again to stop at once)",
                        signal_name(sig)
                    );
                }
                2 => {
                    send(pid, sig);
                    kill_at = Some(Instant::now() + grace);
                    tracing::warn!(
                        "second signal ({}): forwarded; the job is killed if it has not exited in {} s",
                        signal_name(sig),
                        grace.as_secs_f64()
                    );
                }
                _ => kill_at = Some(Instant::now()),
            }
        }
        if kill_at.is_some_and(|t| Instant::now() >= t) {
            tracing::warn!("killing the job (SIGKILL to mpiexec and every rank)");
            kill_descendants();
            kill_at = None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    reap_orphans(grace);
    Ok(JobEnd {
        status,
        signal: received.first().copied(),
    })
}

/// If the launcher panics while supervising, the job must not outlive it unsupervised.
struct KillOnPanic;

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            kill_descendants();
        }
    }
}

fn send(pid: libc::pid_t, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Makes orphaned descendants re-parent to this process (Linux; a no-op elsewhere).
fn become_subreaper() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Waits for processes of the job that outlived mpiexec (re-parented to us as the
/// subreaper); SIGKILLs them if they are still there after `grace`.
fn reap_orphans(grace: Duration) {
    let deadline = Instant::now() + grace;
    let mut warned = false;
    loop {
        reap_exited();
        let left = descendants(std::process::id() as libc::pid_t);
        if left.is_empty() {
            return;
        }
        if !warned {
            tracing::warn!(
                "{} process(es) of the job outlived mpiexec; waiting up to {} s",
                left.len(),
                grace.as_secs_f64()
            );
            warned = true;
        }
        if Instant::now() >= deadline {
            kill_descendants();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reaps every exited child without blocking.
fn reap_exited() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid with a valid status pointer and WNOHANG.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
    }
}

/// SIGKILLs every process below this one.
fn kill_descendants() {
    for pid in descendants(std::process::id() as libc::pid_t) {
        send(pid, libc::SIGKILL);
    }
}

/// The live (not zombie) processes below `root`, from /proc.
fn descendants(root: libc::pid_t) -> Vec<libc::pid_t> {
    let procs = process_table();
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            procs
                .iter()
                .filter(|p| p.ppid == parent && !p.zombie)
                .map(|p| p.pid),
        );
        i += 1;
    }
    found.remove(0);
    found
}

struct ProcInfo {
    pid: libc::pid_t,
    ppid: libc::pid_t,
    zombie: bool,
}

/// (pid, parent, zombie?) of every process, from /proc/<pid>/stat.
fn process_table() -> Vec<ProcInfo> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: libc::pid_t = e.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let rest = &stat[stat.rfind(')')? + 2..];
        let mut fields = rest.split_whitespace();
        let state = fields.next()?;
        let ppid = fields.next()?.parse().ok()?;
        Some(ProcInfo {
            pid,
            ppid,
            zombie: state == "Z",
        })
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_found_and_waited_for() {
        let mut child = Command::new("sh")
            .args(["-c", "sleep 5 & wait"])
            .spawn()
            .unwrap();
        // Until sh has started its sleep: on a loaded machine that can take longer than
        // any fixed pause, so look again until it shows (sleep 5 outlives the search).
        let start = Instant::now();
        let mut below = descendants(std::process::id() as libc::pid_t);
        while below.len() < 2 && start.elapsed() < Duration::from_secs(4) {
            std::thread::sleep(Duration::from_millis(20));
            below = descendants(std::process::id() as libc::pid_t);
        }
        assert!(below.contains(&(child.id() as libc::pid_t)), "{below:?}");
        assert!(below.len() >= 2, "sh and its sleep: {below:?}");
        kill_descendants();
        assert!(!child.wait().unwrap().success());
    }
}
