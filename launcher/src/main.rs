//! `strata`: plan a pipeline, launch it locally under mpiexec, or run as one MPI worker.
//!
//! Exit codes: 0 success; 1 the job failed at run time; 2 bad input (config, flags,
//! missing mpiexec) — always with a one-line message naming the field and the fix.

mod checkpoint_cmd;
mod launch;
mod plan_cmd;
mod simulate_cmd;

use clap::{Parser, Subcommand};
use engine::checkpoint::SaveFault;
use engine::comm::groups::ParallelComms;
use engine::{Config, RunOptions};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use partitioner::Rank;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Pipeline-, tensor- and data-parallel transformer training on libtorch and MPI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the pipeline plan of a config (per stage: layers, params, FLOPs, memory,
    /// predicted time), or search layouts with --auto.
    Plan(plan_cmd::PlanArgs),
    /// Time each layer kind forward and backward on this machine (libtorch) and write a
    /// profile for `parallel.partition: profile`.
    Profile {
        /// Experiment YAML file.
        config: PathBuf,
        /// Output file (default: <output.dir>/profile.json).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Timed repetitions per layer kind (the median is kept).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Run a config on this machine: spawns `mpiexec -n <pp·tp·dp> strata worker`.
    Launch {
        /// Experiment YAML file.
        config: PathBuf,
        /// mpiexec to use (default: `mpiexec` on PATH).
        #[arg(long, env = "STRATA_MPIEXEC")]
        mpiexec: Option<PathBuf>,
    },
    /// Print a config's schedule grid, simulate it, and draw the predicted timeline (SVG).
    Simulate {
        /// Experiment YAML file.
        config: PathBuf,
        /// Where to write the SVG (default: <output.dir>/schedule.svg).
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Inspect or verify a checkpoint (a step-NNNNNN directory or a checkpoint root).
    #[command(subcommand)]
    Checkpoint(checkpoint_cmd::CheckpointCmd),
    /// Run one rank of a job; started by mpiexec, mpirun or srun.
    Worker {
        /// Experiment YAML file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan_cmd::plan(&args),
        Command::Profile { config, out, runs } => plan_cmd::profile(&config, out, runs),
        Command::Launch { config, mpiexec } => launch::launch(&config, mpiexec.as_deref()),
        Command::Simulate { config, svg } => simulate_cmd::simulate_config(&config, svg),
        Command::Checkpoint(cmd) => checkpoint_cmd::run(&cmd),
        Command::Worker { config } => return worker(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// One MPI rank. Any error aborts the whole job (MPI_Abort), naming this rank.
fn worker(path: &Path) -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("strata worker: error: MPI was already initialised");
        return ExitCode::from(1);
    };
    let world = universe.world();
    let (rank, size) = (Rank(world.rank() as usize), world.size() as usize);
    let fail = |msg: String, code: i32| -> ! {
        report_and_abort(
            &world,
            format!("strata worker rank {rank}/{size}: error: {msg}"),
            code,
        )
    };
    let fail_at = match std::env::var("STRATA_FAIL_AT")
        .ok()
        .map(|v| parse_fail_at(&v))
    {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(msg)) => fail(msg, 2),
    };
    let opts = RunOptions {
        fail_at: fail_at.filter(|f| !f.in_save).map(|f| (f.rank, f.step)),
        fail_in_save: fail_at
            .filter(|f| f.in_save)
            .map(|f| (f.rank, f.step, SaveFault::Abort)),
        verbose: rank.0 == 0,
        write_outputs: true,
        ..RunOptions::default()
    };
    let result = Config::load(path).and_then(|cfg| {
        cfg.check_world(size)?;
        let mut comms = ParallelComms::from_mpi(universe.world(), cfg.mesh()?)?;
        engine::train(&cfg, &mut comms, &opts)
    });
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.is_user_error() { 2 } else { 1 };
            // Every rank sees the same config error: let rank 0 alone report it.
            if !e.is_user_error() || rank.0 == 0 {
                fail(e.to_string(), code);
            }
            // Give rank 0 time to print before this rank's abort tears the job down.
            std::thread::sleep(std::time::Duration::from_secs(2));
            world.abort(code);
        }
    }
}

/// Prints `msg` in one write, gives mpiexec a moment to forward it, then aborts the job.
fn report_and_abort(world: &SimpleCommunicator, msg: String, code: i32) -> ! {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{msg}\n").as_bytes());
    let _ = err.flush();
    drop(err);
    std::thread::sleep(std::time::Duration::from_millis(300));
    world.abort(code)
}

/// Where `STRATA_FAIL_AT` makes a rank fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FailAt {
    rank: Rank,
    step: usize,
    /// Inside the checkpoint save of that step (the rank aborts mid-write).
    in_save: bool,
}

/// Parses `STRATA_FAIL_AT=RANK:STEP` or `RANK:save:STEP`.
fn parse_fail_at(v: &str) -> Result<FailAt, String> {
    let parts: Vec<&str> = v.split(':').map(str::trim).collect();
    let (rank, step, in_save) = match parts.as_slice() {
        [r, s] => (r, s, false),
        [r, "save", s] => (r, s, true),
        _ => (&"", &"", false),
    };
    match (rank.parse(), step.parse()) {
        (Ok(r), Ok(step)) => Ok(FailAt {
            rank: Rank(r),
            step,
            in_save,
        }),
        _ => Err(format!(
            "STRATA_FAIL_AT = `{v}`: expected RANK:STEP or RANK:save:STEP; fix: e.g. STRATA_FAIL_AT=1:3 (fail at step 3) or 1:save:4 (die inside the checkpoint save of step 4), or unset it"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_at_forms() {
        let at = |rank, step, in_save| {
            Ok(FailAt {
                rank: Rank(rank),
                step,
                in_save,
            })
        };
        assert_eq!(parse_fail_at("1:3"), at(1, 3, false));
        assert_eq!(parse_fail_at(" 0 : save : 4"), at(0, 4, true));
        for bad in ["1", "1:x", "1:load:3", "a:3", "1:save:", ""] {
            let e = parse_fail_at(bad).unwrap_err();
            assert!(e.contains("RANK:save:STEP") && e.contains("fix:"), "{e}");
        }
    }
}
