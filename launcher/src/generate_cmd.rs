//! `strata generate SOURCE --prompt TEXT | --prompts FILE [...]`: text generation on any
//! `pp × tp` layout. Every user error is found before a rank starts ([`GenerateJob`]);
//! one rank runs in this process, more are started as `mpiexec -n <pp·tp> strata
//! generate-worker --job FILE`. World rank 0 prints each prompt with its continuation,
//! then one line of measurements (or one JSON object with `--json`).

use crate::launch::{mpiexec_command, run_job, LaunchError};
use clap::Args;
use engine::comm::groups::ParallelComms;
use engine::flight::{FlightRecorder, DEFAULT_CAPACITY};
use engine::generate::{GenerateJob, Report, Request, Sampling};
use engine::watchdog::{Deadlines, Watch};
use mpi::topology::Communicator as _;
use partitioner::mesh::Mesh;
use partitioner::Rank;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Flags of `strata generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// A Strata checkpoint (step-NNNNNN directory or checkpoint root; dense, pruned or
    /// quantised), a Hugging Face directory with a character vocab.json, or a config YAML
    /// (its seeded initial weights, for speed measurements).
    pub source: PathBuf,
    /// The prompt.
    #[arg(long, conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A file of prompts, one per line (empty lines are skipped).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 decodes greedily; otherwise the softmax temperature of sampling.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Sample from the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample from the smallest set of most likely tokens whose probability reaches p.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Seed of the sampler (Strata's own generator: the same seed repeats the text on any
    /// layout).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Pipeline stages and tensor-parallel shards, `pp=P,tp=T` (each defaults to 1).
    #[arg(long, default_value = "pp=1,tp=1")]
    pub layout: String,
    /// Microbatches the prompts are split into (default: one per pipeline stage).
    #[arg(long)]
    pub microbatches: Option<usize>,
    /// Recompute the whole sequence for every token instead of using the KV cache.
    #[arg(long)]
    pub no_kv_cache: bool,
    /// libtorch intra-op threads per rank (default: the checkpoint's or config's
    /// `train.threads`; for a Hugging Face directory, the cores shared out over the ranks).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print one JSON object (texts, tokens and measurements) instead.
    #[arg(long)]
    pub json: bool,
    /// mpiexec to use for more than one rank (default: `mpiexec` on PATH).
    #[arg(long, env = "STRATA_MPIEXEC")]
    pub mpiexec: Option<PathBuf>,
}

/// Parses `pp=P,tp=T`.
fn parse_layout(s: &str) -> Result<(usize, usize), engine::Error> {
    let bad = |problem: String| {
        engine::Error::usage(
            "--layout",
            problem,
            "write it as pp=P,tp=T, e.g. --layout pp=2,tp=1",
        )
    };
    let (mut pp, mut tp) = (1, 1);
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("`{part}` is not KEY=N")))?;
        let n: usize = v.trim().parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
            bad(format!(
                "{} = `{}` is not a positive integer",
                k.trim(),
                v.trim()
            ))
        })?;
        match k.trim() {
            "pp" => pp = n,
            "tp" => tp = n,
            "dp" if n == 1 => {}
            "dp" => {
                return Err(bad(
                    "generation has no data parallelism (dp must be 1)".into()
                ))
            }
            other => return Err(bad(format!("unknown key `{other}` (use pp and tp)"))),
        }
    }
    Ok((pp, tp))
}

fn prompts(args: &GenerateArgs) -> Result<Vec<String>, engine::Error> {
    match (&args.prompt, &args.prompts) {
        (Some(p), _) => Ok(vec![p.clone()]),
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                engine::Error::usage(
                    "--prompts",
                    format!("cannot read {}: {e}", file.display()),
                    "pass a UTF-8 text file with one prompt per line",
                )
            })?;
            Ok(text
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect())
        }
        (None, None) => Ok(Vec::new()),
    }
}

/// `strata generate`.
pub fn generate(args: &GenerateArgs) -> Result<(), LaunchError> {
    let (pp, tp) = parse_layout(&args.layout)?;
    let req = Request {
        source: args.source.clone(),
        prompts: prompts(args)?,
        max_new_tokens: args.max_new_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            seed: args.seed,
        },
        pp,
        tp,
        microbatches: args.microbatches,
        kv_cache: !args.no_kv_cache,
        threads: args.threads,
    };
    let job = GenerateJob::prepare(&req)?;
    if job.world_size() == 1 {
        let report = job.run_single()?;
        print_report(&job, &report, args.json);
        return Ok(());
    }
    spawn(&job, args)
}

/// Writes the job next to a temporary directory and runs the workers under mpiexec.
fn spawn(job: &GenerateJob, args: &GenerateArgs) -> Result<(), LaunchError> {
    let dir = std::env::temp_dir().join(format!("strata-generate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|source| engine::Error::Io {
        path: dir.clone(),
        source,
    })?;
    let path = dir.join("job.json");
    let text = serde_json::to_string(&(job, args.json))
        .map_err(|e| engine::Error::Internal(e.to_string()))?;
    std::fs::write(&path, text).map_err(|source| engine::Error::Io {
        path: path.clone(),
        source,
    })?;
    let (mut cmd, program) =
        mpiexec_command(args.mpiexec.as_deref(), job.world_size(), "generate-worker")?;
    cmd.arg("--job").arg(&path);
    let status = run_job(cmd, &program, "a generation rank failed");
    let _ = std::fs::remove_dir_all(&dir);
    status
}

/// One MPI rank of `strata generate`.
pub fn worker(job_path: &Path) -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("strata generate-worker: error: MPI was already initialised");
        return ExitCode::from(1);
    };
    let world = universe.world();
    let (rank, size) = (Rank(world.rank() as usize), world.size() as usize);
    let result = (|| -> Result<(), engine::Error> {
        let text = std::fs::read_to_string(job_path).map_err(|source| engine::Error::Io {
            path: job_path.to_path_buf(),
            source,
        })?;
        let (job, json): (GenerateJob, bool) = serde_json::from_str(&text)
            .map_err(|e| engine::Error::Internal(format!("generation job: {e}")))?;
        if job.world_size() != size {
            return Err(engine::Error::Internal(format!(
                "the job needs {} ranks, mpiexec started {size}",
                job.world_size()
            )));
        }
        let mesh =
            Mesh::new(job.pp, job.tp, 1).map_err(|e| engine::Error::Internal(e.to_string()))?;
        let flight = FlightRecorder::new(rank, mesh.coords(rank).ok(), DEFAULT_CAPACITY);
        let watch = Watch::new(flight, Some(mesh), Deadlines::default(), None);
        let mut comms = ParallelComms::from_mpi(universe.world(), mesh, &watch)?;
        if let Some(report) = job.run(&mut comms)? {
            print_report(&job, &report, json);
        }
        Ok(())
    })();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = if e.is_user_error() { 2 } else { 1 };
            crate::worker::report_and_abort(
                &world,
                format!("strata generate rank {rank}/{size}: error: {e}"),
                code,
            )
        }
    }
}

fn print_report(job: &GenerateJob, report: &Report, json: bool) {
    let texts: Vec<String> = report
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| job.text(i, t))
        .collect();
    if json {
        let v = serde_json::json!({"texts": texts, "report": report});
        println!("{v}");
        return;
    }
    for (i, t) in texts.iter().enumerate() {
        if texts.len() > 1 {
            println!("--- {} ---", i + 1);
        }
        println!("{t}");
    }
    println!("{}", report.summary_line());
}

#[cfg(test)]
mod tests {
    use super::parse_layout;

    #[test]
    fn layouts_parse() {
        assert_eq!(parse_layout("pp=2,tp=2").unwrap(), (2, 2));
        assert_eq!(parse_layout("tp=2").unwrap(), (1, 2));
        for bad in ["pp=0", "pp2", "xp=1", "dp=2"] {
            let e = parse_layout(bad).unwrap_err();
            assert!(
                e.is_user_error() && e.to_string().contains("--layout"),
                "{e}"
            );
        }
    }
}
