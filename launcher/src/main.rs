//! `strata`: plan a pipeline, launch it locally under mpiexec, or run as one MPI worker.
//!
//! Exit codes: 0 success; 1 the job failed at run time; 2 bad input (config, flags,
//! missing mpiexec) — always with a one-line message naming the field and the fix;
//! 128 + N when signal N (SIGTERM, SIGINT) stopped a launched job before it finished.

mod checkpoint_cmd;
mod compress_cmd;
mod eval_cmd;
mod export_cmd;
mod generate_cmd;
mod launch;
mod logging;
mod plan_cmd;
mod profile_cmd;
mod simulate_cmd;
mod supervise;
mod worker;

use clap::{Parser, Subcommand};
use engine::config::Override;
use std::io::Write;
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

/// `--set KEY=VALUE`, repeatable: overrides a config key before validation.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Sets {
    /// Override a config key, e.g. `--set train.steps=100 --set parallel.pp=4` (the
    /// value is YAML; checked like the file; recorded in the run's config.yaml).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl Sets {
    /// The parsed overrides; a malformed one is a bad-input error.
    pub fn parse(&self) -> Result<Vec<Override>, engine::Error> {
        self.set.iter().map(|s| Override::parse(s)).collect()
    }
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
    /// Point-to-point microbenchmark (osu_latency / osu_bw style) of the pipeline's tensor
    /// transport against raw MPI send/recv and memcpy, 8 B to 64 MiB; prints latency,
    /// bandwidth and the memcpy share per size. Run it as `mpiexec -n 2 strata p2p`.
    P2p {
        /// Timed rounds per size (the median is reported).
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Largest message, in MiB.
        #[arg(long, default_value_t = 64)]
        max_mib: usize,
    },
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
        #[command(flatten)]
        sets: Sets,
    },
    /// Run a config on this machine: spawns `mpiexec -n <pp·tp·dp> strata worker`.
    /// SIGTERM or SIGINT (Ctrl-C) is forwarded to the job; a second one stops it at once.
    Launch {
        /// Experiment YAML file.
        config: PathBuf,
        /// mpiexec to use (default: `mpiexec` on PATH).
        #[arg(long, env = "STRATA_MPIEXEC")]
        mpiexec: Option<PathBuf>,
        /// Seconds the job has to exit after a second SIGTERM/SIGINT before it is killed.
        #[arg(long, default_value_t = 10.0)]
        grace_s: f64,
        #[command(flatten)]
        sets: Sets,
    },
    /// Print a config's schedule grid, simulate it, and draw the predicted timeline (SVG).
    Simulate {
        /// Experiment YAML file.
        config: PathBuf,
        /// Where to write the SVG (default: <output.dir>/schedule.svg).
        #[arg(long)]
        svg: Option<PathBuf>,
        #[command(flatten)]
        sets: Sets,
    },
    /// Summarise a run directory (losses, tokens/s, bubble, memory, time split) and draw
    /// loss.svg and timeline.svg into it.
    Report {
        /// The run directory (a config's output.dir).
        run_dir: PathBuf,
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
    /// One table of a dense checkpoint and its compressed variants: val loss, delta,
    /// weight bytes on disk, decode and prefill tokens/s at batch 1.
    CompressReport(compress_cmd::ReportArgs),
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
        #[command(flatten)]
        sets: Sets,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Worker { config, sets } => return worker::run(config, sets),
        Command::EvalWorker { job, json } => return eval_cmd::worker(job, *json),
        Command::GenerateWorker { job } => return generate_cmd::worker(job),
        Command::P2p { rounds, max_mib } => return profile_cmd::p2p(*rounds, *max_mib),
        _ => {}
    }
    logging::init(None);
    if !matches!(cli.command, Command::Launch { .. }) {
        // Printing commands end quietly when their reader goes away (`strata plan | head`),
        // like other Unix tools; `launch` keeps ignoring SIGPIPE: it must outlive its job.
        // SAFETY: restoring a default signal disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Plan(args) => plan_cmd::plan(&args),
        Command::Profile(args) => profile_cmd::profile(&args),
        Command::ProfileWorker {
            config,
            out,
            runs,
            sets,
        } => return profile_cmd::worker(&config, &out, runs, &sets),
        Command::Launch {
            config,
            mpiexec,
            grace_s,
            sets,
        } => launch_cmd(&config, &sets, mpiexec.as_deref(), grace_s),
        Command::Simulate { config, svg, sets } => {
            simulate_cmd::simulate_config(&config, &sets, svg)
        }
        Command::Report { run_dir } => report(&run_dir),
        Command::Checkpoint(cmd) => checkpoint_cmd::run(&cmd),
        Command::Eval(args) => eval_cmd::eval(&args),
        Command::Export(args) => export_cmd::export(&args),
        Command::Generate(args) => generate_cmd::generate(&args),
        Command::Quantize(args) => compress_cmd::quantize(&args),
        Command::Prune(args) => compress_cmd::prune(&args),
        Command::CompressReport(args) => compress_cmd::report(&args),
        Command::EvalWorker { .. }
        | Command::GenerateWorker { .. }
        | Command::Worker { .. }
        | Command::P2p { .. } => {
            unreachable!("handled above")
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn the exit code into a panic's.
            let _ = writeln!(std::io::stderr(), "strata: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn launch_cmd(
    config: &Path,
    sets: &Sets,
    mpiexec: Option<&Path>,
    grace_s: f64,
) -> Result<(), launch::LaunchError> {
    if !(grace_s.is_finite() && grace_s >= 0.0) {
        return Err(launch::LaunchError::Env(format!(
            "--grace-s = {grace_s}: must be a number of seconds ≥ 0; fix: pass e.g. --grace-s 10"
        )));
    }
    launch::launch(&launch::LaunchArgs {
        config,
        overrides: &sets.parse()?,
        mpiexec,
        grace: std::time::Duration::from_secs_f64(grace_s),
    })
}

/// `strata report RUN_DIR`: prints the summary and writes the plots.
fn report(run_dir: &Path) -> Result<(), launch::LaunchError> {
    let report = engine::report::write_report(run_dir)?;
    let mut out = report.summary;
    for p in &report.written {
        out += &format!("wrote {}\n", p.display());
    }
    // `strata report DIR | head` closes stdout early: not an error.
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}
