//! `strata`: plan a pipeline, launch it locally under mpiexec, or run as one MPI worker.
//!
//! Exit codes: 0 success; 1 the job failed at run time; 2 bad input (config, flags,
//! missing mpiexec) — always with a one-line message naming the field and the fix.

mod launch;
mod plan_cmd;

use clap::{Parser, Subcommand};
use engine::comm::mpi::MpiComm;
use engine::comm::Communicator;
use engine::{Config, RunOptions};
use partitioner::Rank;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "strata",
    version,
    about = "Pipeline-parallel transformer training on libtorch and MPI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the pipeline plan of a config (per stage: layers, params, FLOPs).
    Plan {
        /// Experiment YAML file.
        config: PathBuf,
        /// Print the plan as JSON (the schema the engine consumes).
        #[arg(long)]
        json: bool,
    },
    /// Run a config on this machine: spawns `mpiexec -n <pp·tp·dp> strata worker`.
    Launch {
        /// Experiment YAML file.
        config: PathBuf,
        /// mpiexec to use (default: `mpiexec` on PATH).
        #[arg(long, env = "STRATA_MPIEXEC")]
        mpiexec: Option<PathBuf>,
    },
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
        Command::Plan { config, json } => plan_cmd::plan(&config, json),
        Command::Launch { config, mpiexec } => launch::launch(&config, mpiexec.as_deref()),
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
    let mut comm = MpiComm::new(universe.world());
    let (rank, size) = (comm.rank(), comm.size());
    let fail_at = match std::env::var("STRATA_FAIL_AT")
        .ok()
        .map(|v| parse_fail_at(&v))
    {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(msg)) => {
            eprintln!("strata worker rank {rank}/{size}: error: {msg}");
            comm.abort(2);
        }
    };
    let opts = RunOptions {
        fail_at,
        verbose: rank.0 == 0,
        write_outputs: true,
    };
    let result = Config::load(path).and_then(|cfg| engine::train(&cfg, &mut comm, &opts));
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.is_user_error() { 2 } else { 1 };
            // Every rank sees the same config error: let rank 0 alone report it.
            if !e.is_user_error() || rank.0 == 0 {
                eprintln!("strata worker rank {rank}/{size}: error: {e}");
            }
            comm.abort(code);
        }
    }
}

/// Parses `STRATA_FAIL_AT=RANK:STEP`.
fn parse_fail_at(v: &str) -> Result<(Rank, usize), String> {
    let parsed = v
        .split_once(':')
        .and_then(|(r, s)| Some((Rank(r.trim().parse().ok()?), s.trim().parse().ok()?)));
    parsed.ok_or_else(|| {
        format!(
            "STRATA_FAIL_AT = `{v}`: expected RANK:STEP; fix: e.g. STRATA_FAIL_AT=1:3, or unset it"
        )
    })
}
