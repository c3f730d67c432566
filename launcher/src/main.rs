//! `strata`: plan a pipeline, launch it locally under mpiexec, or run as one MPI worker.
//!
//! Exit codes: 0 success; 1 the job failed at run time; 2 bad input (config, flags,
//! missing mpiexec) — always with a one-line message naming the field and the fix.

mod checkpoint_cmd;
mod compress_cmd;
mod eval_cmd;
mod export_cmd;
mod generate_cmd;
mod launch;
mod plan_cmd;
mod profile_cmd;
mod simulate_cmd;
mod worker;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
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
    /// Measure this machine for the planner: layer times (libtorch), and on the real
    /// ranks under mpiexec the p2p and all-reduce curves, the sgemm peak, the optimizer
    /// and an idle rank's memory; writes the profile JSON.
    Profile(profile_cmd::ProfileArgs),
    /// One rank of `strata profile`'s measuring job; started by `strata profile`.
    #[command(hide = true)]
    ProfileWorker {
        /// Experiment YAML file.
        #[arg(long)]
        config: PathBuf,
        /// Where rank 0 writes the measurements.
        #[arg(long)]
        out: PathBuf,
        /// Timed repetitions per measurement.
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
    /// Mean cross-entropy and perplexity of a checkpoint, Hugging Face directory or
    /// config over a text file's consecutive windows, on any layout (under mpiexec).
    Eval(eval_cmd::EvalArgs),
    /// Write a checkpoint as a Hugging Face directory (`--format hf`).
    Export(export_cmd::ExportArgs),
    /// Run one rank of `strata eval`; started by mpiexec.
    #[command(hide = true)]
    EvalWorker {
        /// The job file written by `strata eval`.
        #[arg(long)]
        job: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a checkpoint on any pp × tp layout (KV cache, pipelined
    /// microbatches); prints the texts, then prefill/decode tokens/s, time per token and
    /// peak memory and idle share per rank.
    Generate(generate_cmd::GenerateArgs),
    /// Quantise a checkpoint's linear weights (weight-only int8, per-output-channel
    /// symmetric scales) into a new checkpoint.
    Quantize(compress_cmd::QuantizeArgs),
    /// Prune a checkpoint's block linear weights (magnitude, 2:4 or sensitivity), storing
    /// the masks; training from it (train.resume) keeps pruned weights at zero.
    Prune(compress_cmd::PruneArgs),
    /// One rank of `strata generate`; started by mpiexec.
    #[command(hide = true)]
    GenerateWorker {
        #[arg(long)]
        job: PathBuf,
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
        Command::Plan(args) => plan_cmd::plan(&args),
        Command::Profile(args) => profile_cmd::profile(&args),
        Command::ProfileWorker { config, out, runs } => {
            return profile_cmd::worker(&config, &out, runs)
        }
        Command::Launch { config, mpiexec } => launch::launch(&config, mpiexec.as_deref()),
        Command::Simulate { config, svg } => simulate_cmd::simulate_config(&config, svg),
        Command::Checkpoint(cmd) => checkpoint_cmd::run(&cmd),
        Command::Eval(args) => eval_cmd::eval(&args),
        Command::Export(args) => export_cmd::export(&args),
        Command::EvalWorker { job, json } => return eval_cmd::worker(&job, json),
        Command::Generate(args) => generate_cmd::generate(&args),
        Command::Quantize(args) => compress_cmd::quantize(&args),
        Command::Prune(args) => compress_cmd::prune(&args),
        Command::GenerateWorker { job } => return generate_cmd::worker(&job),
        Command::Worker { config } => return worker::run(&config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
