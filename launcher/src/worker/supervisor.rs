//! The supervisor: the process that mpiexec (or srun) starts for a rank. It runs the rank
//! as its child — the same `strata worker` command line, marked by [`CHILD_ENV`] — with
//! a black box (a shared memory page, see `engine::watchdog::blackbox`) in which the
//! rank mirrors its identity, step and current event. When the child dies from a signal
//! (SIGKILL, the OOM killer, a segfault) the supervisor prints one line naming the rank
//! and what it was doing, and exits 128 + the signal, which ends the job. Otherwise it
//! exits with the child's code.
//!
//! Why a second process: MPICH's launcher SIGKILLs every rank as soon as one dies, so no
//! surviving rank can say which one it was; the supervisor lives until it has said it.
//!
//! Invariants: the supervisor never initialises MPI; it keeps the inherited MPI
//! start-up descriptors open until the child is gone, so the launcher sees the rank end
//! only after the report; signals meant for the rank (mpiexec and Slurm signal the whole
//! process group) are ignored here; the child dies with the supervisor
//! (`PR_SET_PDEATHSIG`). `STRATA_SUPERVISE=0` turns it off (the rank runs directly).

use engine::watchdog::blackbox::{BlackBox, Snapshot, FD_ENV};
use engine::watchdog::rank_name;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitCode};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Set in the child's environment: "you are the rank, not the supervisor".
pub const CHILD_ENV: &str = "STRATA_WORKER_CHILD";
/// `STRATA_SUPERVISE=0` runs the rank without a supervisor.
pub const SUPERVISE_ENV: &str = "STRATA_SUPERVISE";

/// True if this process should supervise (it is not the child, supervision is on, and
/// the platform has what it needs).
pub fn wanted() -> bool {
    cfg!(target_os = "linux")
        && std::env::var_os(CHILD_ENV).is_none()
        && std::env::var(SUPERVISE_ENV).map_or(true, |v| v != "0")
}

/// This rank's number and the job's size, from the launcher's environment (MPICH's
/// Hydra, Open MPI, PMIx, Slurm), for reports made before the rank said it itself.
fn rank_from_env() -> (Option<usize>, Option<usize>) {
    let first = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok()?.parse::<usize>().ok())
    };
    (
        first(&[
            "PMI_RANK",
            "OMPI_COMM_WORLD_RANK",
            "PMIX_RANK",
            "SLURM_PROCID",
        ]),
        first(&["PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS"]),
    )
}

/// The one line reporting a rank killed by `signal`.
pub fn death_report(signal: i32, seen: &Snapshot) -> String {
    let (env_rank, env_size) = rank_from_env();
    let rank = seen.rank.map(|r| r.0).or(env_rank);
    let who = match rank {
        Some(r) => rank_name(partitioner::Rank(r), seen.coord),
        None => "a rank".into(),
    };
    let prefix = match (rank, env_size) {
        (Some(r), Some(n)) => format!("strata worker rank {r}/{n}: error: "),
        (Some(r), None) => format!("strata worker rank {r}: error: "),
        _ => "strata worker: error: ".into(),
    };
    let name = signal_hook::low_level::signal_name(signal).unwrap_or("an unknown signal");
    let doing = match (seen.rank, seen.doing) {
        (None, _) => " during start-up".to_string(),
        (Some(_), Some(w)) => {
            let now_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let for_s = now_us.saturating_sub(seen.since_unix_us) as f64 * 1e-6;
            format!(" at step {} in {} (for {for_s:.1} s)", seen.step, w.label())
        }
        (Some(_), None) => format!(" at step {}, between actions", seen.step),
    };
    let fix = match signal {
        libc::SIGKILL => "if nobody killed it on purpose, look for the OOM killer in the kernel log (`dmesg`) and lower the memory per rank",
        libc::SIGSEGV | libc::SIGBUS | libc::SIGABRT | libc::SIGILL | libc::SIGFPE => "a crash in native code (libtorch or MPI): rerun with a core dump or a debugger attached to that rank",
        _ => "find out who sent that signal; SIGTERM and SIGINT stop a job cleanly",
    };
    format!("{prefix}{who} was killed by signal {signal} ({name}){doing}; the job is stopped; fix: {fix}")
}

/// Runs the rank as a child process and reports its death. Never initialises MPI.
pub fn supervise() -> ExitCode {
    let fatal = |what: String| -> ExitCode {
        eprintln!("strata worker: error: {what}; fix: set {SUPERVISE_ENV}=0 to run the rank without a supervisor");
        ExitCode::from(1)
    };
    let (blackbox, fd) = match BlackBox::create() {
        Ok(b) => b,
        Err(e) => return fatal(format!("cannot create the rank's black box: {e}")),
    };
    // mpiexec and Slurm signal the whole process group: the rank handles SIGTERM and
    // SIGINT, so here they are caught and ignored (a handler, unlike SIG_IGN, is not
    // inherited by the child).
    let ignored = Arc::new(AtomicBool::new(false));
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let _ = signal_hook::flag::register(sig, ignored.clone());
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return fatal(format!("cannot find the strata executable: {e}")),
    };
    let mut cmd = Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(CHILD_ENV, "1")
        .env(FD_ENV, fd.to_string());
    // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            Ok(())
        });
    }
    let status = match cmd.spawn().and_then(|mut child| child.wait()) {
        Ok(s) => s,
        Err(e) => return fatal(format!("cannot run the rank process: {e}")),
    };
    if let Some(code) = status.code() {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let signal = status.signal().unwrap_or(0);
    let line = death_report(signal, &blackbox.read());
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{line}\n").as_bytes());
    let _ = err.flush();
    ExitCode::from((128 + signal).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::flight::What;
    use partitioner::mesh::MeshCoord;
    use partitioner::Rank;

    #[test]
    fn a_killed_rank_is_named_with_its_coordinates_step_and_action() {
        let seen = Snapshot {
            rank: Some(Rank(1)),
            coord: Some(MeshCoord {
                pp: 1,
                tp: 0,
                dp: 0,
            }),
            step: 3,
            doing: Some(What::Action {
                action: "1B0".parse().unwrap(),
                eval: false,
            }),
            since_unix_us: 0,
            consistent: true,
        };
        let line = death_report(libc::SIGKILL, &seen);
        assert!(
            line.contains(
                "rank 1 (pp 1, tp 0, dp 0) was killed by signal 9 (SIGKILL) at step 3 in 1B0"
            ) && line.contains("fix:")
                && !line.contains('\n'),
            "{line}"
        );
        let early = Snapshot {
            rank: None,
            coord: None,
            step: 0,
            doing: None,
            since_unix_us: 0,
            consistent: true,
        };
        assert!(death_report(libc::SIGSEGV, &early).contains("(SIGSEGV) during start-up"));
    }
}
