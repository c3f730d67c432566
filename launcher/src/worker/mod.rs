//! `strata worker`: one MPI rank of a job (started by mpiexec, mpirun or srun).
//!
//! * The process mpiexec starts is a small [`supervisor`] that runs the rank as its
//!   child, so a rank that dies without a word (SIGKILL, the OOM killer, a segfault) is
//!   still named, with what it was doing.
//! * The rank runs MPI with `MPI_THREAD_MULTIPLE` and a heartbeat thread (the watchdog,
//!   see `engine::watchdog`): a stuck or silent peer, a timeout, an error or a panic
//!   dumps every live rank's flight record, prints one line naming the rank, and aborts
//!   the job (`MPI_Abort`), so nothing hangs.
//! * SIGTERM/SIGINT: the first asks the ranks to stop together at the next step boundary
//!   ("preempted at step N", exit 0); a second exits at once (128 + the signal).
//!
//! Exit codes: 0 success (or preempted); 1 run-time failure; 2 bad input.

pub mod supervisor;

use engine::checkpoint::SaveFault;
use engine::comm::groups::ParallelComms;
use engine::flight::{Fault, FaultMode, FlightRecorder, DEFAULT_CAPACITY};
use engine::watchdog::blackbox::BlackBox;
use engine::watchdog::heartbeat::{Aborter, Heartbeat};
use engine::watchdog::Watch;
use engine::{Config, RunOptions};
use mpi::environment::Threading;
use mpi::raw::AsRaw;
use mpi::topology::{Communicator as _, SimpleCommunicator};
use partitioner::Rank;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Runs `strata worker`: the supervisor, or (in the supervised child) the rank itself.
pub fn run(config: &Path, sets: &crate::Sets) -> ExitCode {
    if supervisor::wanted() {
        return supervisor::supervise();
    }
    rank_main(config, sets)
}

/// A failure to inject, from `STRATA_FAIL_AT` (tests of failure handling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailAt {
    pub rank: Rank,
    pub step: usize,
    pub how: FailHow,
}

/// How an injected failure happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailHow {
    /// An error at the start of the step (`RANK:STEP` or `RANK:STEP:error`).
    Error,
    /// Death inside the checkpoint save of the step (`RANK:save:STEP`).
    InSave,
    /// A fault at the rank's first backward of the step (`RANK:STEP:MODE`).
    MidStep(FaultMode),
}

/// Parses `STRATA_FAIL_AT`: `RANK:STEP` (an error at the start of the step),
/// `RANK:save:STEP` (die inside that step's checkpoint save) or `RANK:STEP:MODE` with MODE
/// one of error, stop (SIGSTOP), kill (SIGKILL), panic or hang, at the rank's first
/// backward of the step.
pub fn parse_fail_at(v: &str) -> Result<FailAt, String> {
    let bad = || {
        format!(
            "STRATA_FAIL_AT = `{v}`: expected RANK:STEP, RANK:save:STEP, or RANK:STEP:MODE with MODE one of error, stop, kill, panic, hang; fix: e.g. STRATA_FAIL_AT=1:3 (fail at step 3), 1:save:4 (die inside the checkpoint save of step 4) or 1:3:stop, or unset it"
        )
    };
    let parts: Vec<&str> = v.split(':').map(str::trim).collect();
    let (rank, step, how) = match parts.as_slice() {
        [r, "save", s] => (r, s, FailHow::InSave),
        [r, s] => (r, s, FailHow::Error),
        [r, s, mode] => {
            let how = match *mode {
                "error" => FailHow::Error,
                "stop" => FailHow::MidStep(FaultMode::Stop),
                "kill" => FailHow::MidStep(FaultMode::Kill),
                "panic" => FailHow::MidStep(FaultMode::Panic),
                "hang" => FailHow::MidStep(FaultMode::Hang),
                _ => return Err(bad()),
            };
            (r, s, how)
        }
        _ => return Err(bad()),
    };
    Ok(FailAt {
        rank: Rank(rank.parse().map_err(|_| bad())?),
        step: step.parse().map_err(|_| bad())?,
        how,
    })
}

/// Prints `line` in one write.
fn print_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{line}\n").as_bytes());
    let _ = err.flush();
}

/// Prints `msg`, gives mpiexec a moment to forward it, then aborts the job.
pub(crate) fn report_and_abort(world: &SimpleCommunicator, msg: String, code: i32) -> ! {
    print_line(&msg);
    std::thread::sleep(std::time::Duration::from_millis(300));
    world.abort(code)
}

/// The message of a panic, with where it happened.
fn panic_text(info: &std::panic::PanicHookInfo<'_>) -> String {
    let payload = info.payload();
    let msg = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    match info.location() {
        Some(l) => format!("{msg} at {}:{}", l.file(), l.line()),
        None => msg,
    }
}

/// Until the heartbeat runs: a panic prints the rank and aborts the job.
fn install_early_panic_hook(rank: Rank, size: usize) {
    std::panic::set_hook(Box::new(move |info| {
        print_line(&format!(
            "strata worker rank {rank}/{size}: panic: {}",
            panic_text(info)
        ));
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: MPI is initialised (the hook is installed after MPI_Init).
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 1);
        }
    }));
}

/// Once the heartbeat runs: a panic on any thread dumps every rank's flight record,
/// prints the rank, and aborts the job.
fn install_panic_hook(aborter: Aborter, rank: Rank, size: usize) {
    std::panic::set_hook(Box::new(move |info| {
        let line = format!(
            "strata worker rank {rank}/{size}: panic: {}",
            panic_text(info)
        );
        aborter.abort(line, 1)
    }));
}

/// SIGTERM and SIGINT: the first sets the stop flag (the job stops at the next step
/// boundary); a second exits at once with 128 + the signal's number.
fn install_signal_handlers() -> std::io::Result<engine::preempt::StopFlag> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGTERM, SIGINT] {
        // Registered first, so it sees the flag before this signal sets it.
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, flag.clone())?;
        signal_hook::flag::register(sig, flag.clone())?;
    }
    Ok(flag)
}

/// One MPI rank. Any error aborts the whole job (MPI_Abort), naming this rank.
fn rank_main(path: &Path, sets: &crate::Sets) -> ExitCode {
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        eprintln!("strata worker: error: MPI was already initialised");
        return ExitCode::from(1);
    };
    let world = universe.world();
    let (rank, size) = (Rank(world.rank() as usize), world.size() as usize);
    install_early_panic_hook(rank, size);
    crate::logging::init(Some(rank.0));
    let prefix = format!("strata worker rank {rank}/{size}: error: ");
    let fail =
        |msg: String, code: i32| -> ! { report_and_abort(&world, format!("{prefix}{msg}"), code) };
    if threading != Threading::Multiple {
        fail(
            format!("this MPI library provides {threading:?} threading, but the watchdog's heartbeat thread needs MPI_THREAD_MULTIPLE; fix: use an MPI built with thread support (MPICH and Open MPI are by default)"),
            1,
        );
    }
    let stop = install_signal_handlers().unwrap_or_else(|e| {
        fail(
            format!("cannot install the SIGTERM/SIGINT handlers: {e}"),
            1,
        )
    });
    let fail_at = match std::env::var("STRATA_FAIL_AT")
        .ok()
        .map(|v| parse_fail_at(&v))
    {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(msg)) => fail(msg, 2),
    };
    // The ranks that share this machine (and its memory) with this one.
    let ranks_here = world.split_shared(rank.0 as i32).size() as usize;
    let loaded = sets.parse().and_then(|overrides| {
        let cfg = Config::load_with(path, &overrides)?;
        cfg.check_world(size)?;
        cfg.check_host_memory(&cfg.plan()?, ranks_here)?;
        Ok(cfg)
    });
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => {
            // Every rank sees the same config error: let rank 0 alone report it.
            let code = if e.is_user_error() { 2 } else { 1 };
            if !e.is_user_error() || rank.0 == 0 {
                fail(e.to_string(), code);
            }
            // Give rank 0 time to print before this rank's abort tears the job down. Rank
            // 0's own abort (300 ms after its line) normally ends the job first, so this
            // wait costs nothing; it is long because a starved rank 0 on a loaded machine
            // must still get its line out (with 2 s the job could end silently).
            std::thread::sleep(std::time::Duration::from_secs(10));
            world.abort(code);
        }
    };
    let mesh = cfg.mesh().unwrap_or_else(|e| fail(e.to_string(), 2));
    if let Err(e) = engine::alloc::apply(cfg.train.allocator) {
        fail(e.to_string(), if e.is_user_error() { 2 } else { 1 });
    }
    let flight = FlightRecorder::new(rank, mesh.coords(rank).ok(), DEFAULT_CAPACITY);
    if let Some(bb) = BlackBox::from_env() {
        flight.attach_blackbox(bb);
    }
    let mut opts = RunOptions {
        verbose: rank.0 == 0,
        write_outputs: true,
        stop: Some(stop),
        ..RunOptions::default()
    };
    match fail_at {
        Some(f) if f.rank == rank => match f.how {
            FailHow::Error => opts.fail_at = Some((rank, f.step)),
            FailHow::InSave => opts.fail_in_save = Some((rank, f.step, SaveFault::Abort)),
            FailHow::MidStep(mode) => flight.arm(Fault { step: f.step, mode }),
        },
        _ => {}
    }
    let watch = Watch::new(flight, Some(mesh), cfg.watchdog(), Some(cfg.output_dir()));
    let heartbeat = Heartbeat::start(world.as_raw(), watch.clone(), prefix.clone())
        .unwrap_or_else(|e| fail(e.to_string(), 1));
    let aborter = heartbeat.aborter();
    install_panic_hook(aborter.clone(), rank, size);
    let result = ParallelComms::from_mpi(universe.world(), mesh, &watch)
        .and_then(|mut comms| engine::train(&cfg, &mut comms, &opts));
    let summary = match result {
        Ok(summary) => summary,
        Err(e) => aborter.abort(
            format!("{prefix}{e}"),
            if e.is_user_error() { 2 } else { 1 },
        ),
    };
    if let Err(e) = heartbeat.finish() {
        aborter.abort(format!("{prefix}{e}"), 1);
    }
    if rank.0 == 0 {
        write_run_report(&cfg);
    }
    if let (Some(step), 0) = (summary.preempted_at, rank.0) {
        print_line(&format!(
            "strata: {}",
            engine::preempt::preempted_message(step, summary.preempt_checkpoint.as_deref())
        ));
    }
    ExitCode::SUCCESS
}

/// Rank 0, after a successful (or preempted) run: the report into the run directory.
/// The training itself succeeded, so a failure here is a warning, not a failed job.
fn write_run_report(cfg: &Config) {
    match engine::report::write_report(&cfg.output_dir()) {
        Ok(report) => {
            print!("{}", report.summary);
            let names: Vec<String> = report
                .written
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            tracing::info!("wrote {}", names.join(", "));
        }
        Err(e) => tracing::warn!("the run finished, but its report failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_at_forms() {
        let at = |rank, step, how| {
            Ok(FailAt {
                rank: Rank(rank),
                step,
                how,
            })
        };
        let f = parse_fail_at;
        assert_eq!(f("1:3"), at(1, 3, FailHow::Error));
        assert_eq!(f(" 0 : save : 4"), at(0, 4, FailHow::InSave));
        assert_eq!(f("0:2:error"), at(0, 2, FailHow::Error));
        for (mode, m) in [
            ("stop", FaultMode::Stop),
            ("kill", FaultMode::Kill),
            ("panic", FaultMode::Panic),
            ("hang", FaultMode::Hang),
        ] {
            assert_eq!(f(&format!("2:5:{mode}")), at(2, 5, FailHow::MidStep(m)));
        }
        for bad in [
            "", "1", "1:x", "1:load:3", "a:3", "1:save:", "1:2:nap", "1:2:3:4",
        ] {
            let e = f(bad).unwrap_err();
            assert!(e.contains("RANK:save:STEP") && e.contains("fix:"), "{e}");
        }
    }
}
