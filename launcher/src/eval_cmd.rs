//! `strata eval SOURCE [--data FILE] [--layout pp=..,tp=..,dp=..] [--json]`: mean
//! cross-entropy and perplexity of a checkpoint, a Hugging Face directory or a config's
//! model over a text file's consecutive windows (see [`engine::eval`]), on any layout.
//!
//! Like `strata launch`: the job is decided and checked here (bad input exits 2 before
//! any rank starts), written to a temporary JSON file, and run by
//! `mpiexec -n <pp·tp·dp> strata eval-worker --job FILE`; rank 0 prints the result.

use crate::launch::{mpiexec_command, run_job, LaunchError};
use clap::Args;
use engine::comm::groups::ParallelComms;
use engine::eval::{EvalJob, EvalResult, LayoutArg};
use engine::flight::{FlightRecorder, DEFAULT_CAPACITY};
use engine::watchdog::Watch;
use mpi::topology::Communicator as _;
use partitioner::Rank;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `strata eval`'s arguments.
#[derive(Args)]
pub struct EvalArgs {
    /// A Strata checkpoint (step-NNNNNN directory or checkpoint root), a Hugging Face
    /// model directory, or a config YAML (its initial weights).
    source: PathBuf,
    /// Text file to evaluate (default: the validation split, the last 10%, of the data
    /// the model was trained on; required for a Hugging Face directory).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Layout to run on, e.g. `pp=2,tp=2,dp=1` (each defaults to 1).
    #[arg(long)]
    layout: Option<String>,
    /// Print one JSON object {"loss", "perplexity", "tokens"} on stdout.
    #[arg(long)]
    json: bool,
    /// mpiexec to use (default: `mpiexec` on PATH).
    #[arg(long, env = "STRATA_MPIEXEC")]
    mpiexec: Option<PathBuf>,
}

fn parse_layout(text: Option<&str>) -> Result<LayoutArg, LaunchError> {
    let Some(text) = text else {
        return Ok(LayoutArg::default());
    };
    text.parse().map_err(|problem| {
        LaunchError::Engine(engine::Error::Config {
            path: "strata eval".into(),
            field: "--layout".into(),
            problem: format!("`{text}`: {problem}"),
            fix: "write e.g. --layout pp=2,tp=2,dp=1".into(),
        })
    })
}

/// Checks the job, then runs it under mpiexec.
pub fn eval(args: &EvalArgs) -> Result<(), LaunchError> {
    let layout = parse_layout(args.layout.as_deref())?;
    let job = EvalJob::prepare(&args.source, layout, args.data.as_deref())?;
    let world = job.config()?.world_size();
    let job_path = std::env::temp_dir().join(format!("strata-eval-{}.json", std::process::id()));
    let text = serde_json::to_string(&job).map_err(|e| engine::Error::Internal(e.to_string()))?;
    std::fs::write(&job_path, text).map_err(|source| engine::Error::Io {
        path: job_path.clone(),
        source,
    })?;
    let (mut cmd, program) = mpiexec_command(args.mpiexec.as_deref(), world, "eval-worker")?;
    cmd.arg("--job").arg(&job_path);
    if args.json {
        cmd.arg("--json");
    }
    let status = run_job(cmd, &program, "");
    let _ = std::fs::remove_file(&job_path);
    status
}

/// One rank of `strata eval`. Any error aborts the whole job, naming this rank.
pub fn worker(job_path: &Path, json: bool) -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("strata eval-worker: error: MPI was already initialised");
        return ExitCode::from(1);
    };
    let world = universe.world();
    let (rank, size) = (Rank(world.rank() as usize), world.size() as usize);
    let result = run_rank(job_path, &universe);
    match result {
        Ok((r, job)) => {
            if rank.0 == 0 {
                println!("{}", report(&r, &job, json));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = if e.is_user_error() { 2 } else { 1 };
            if !e.is_user_error() || rank.0 == 0 {
                crate::worker::report_and_abort(
                    &world,
                    format!("strata eval-worker rank {rank}/{size}: error: {e}"),
                    code,
                );
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
            world.abort(code)
        }
    }
}

fn run_rank(
    job_path: &Path,
    universe: &mpi::environment::Universe,
) -> engine::Result<(EvalResult, EvalJob)> {
    let text = std::fs::read_to_string(job_path).map_err(|source| engine::Error::Io {
        path: job_path.to_path_buf(),
        source,
    })?;
    let job: EvalJob =
        serde_json::from_str(&text).map_err(|e| engine::Error::Internal(e.to_string()))?;
    let cfg = job.config()?;
    cfg.check_world(universe.world().size() as usize)?;
    let mesh = cfg.mesh()?;
    let rank = Rank(universe.world().rank() as usize);
    let flight = FlightRecorder::new(rank, mesh.coords(rank).ok(), DEFAULT_CAPACITY);
    // Every wait is under the config's deadlines, so a lost rank cannot hang the eval.
    let watch = Watch::new(flight, Some(mesh), cfg.watchdog(), None);
    let mut comms = ParallelComms::from_mpi(universe.world(), mesh, &watch)?;
    let r = job.run(&mut comms)?;
    Ok((r, job))
}

/// The line rank 0 prints.
fn report(r: &EvalResult, job: &EvalJob, json: bool) -> String {
    if json {
        return serde_json::json!({"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens})
            .to_string();
    }
    let part = match job.part {
        engine::eval::DataPart::Whole => "",
        engine::eval::DataPart::Validation => " (validation split)",
    };
    format!(
        "eval: loss {:.4} | perplexity {:.3} | {} tokens in {} windows | {}{part}",
        r.loss,
        r.perplexity,
        r.tokens,
        r.windows,
        job.data.display()
    )
}
