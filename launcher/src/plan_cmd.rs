//! `strata plan`.
//!
//! Prints the pipeline plan of a config as a table (per stage: layers, params, FLOPs,
//! memory broken down, predicted time; then the imbalance), the tensor-parallel shard
//! plan, the memory model's peak per rank, and the step time predicted by the cost model
//! (`partitioner::predict`: the configured schedule simulated with measured costs when a
//! profile is given); or the `Plan` as JSON. With `--auto` it searches layouts for the
//! config's model and global batch instead, priced by the same cost model. It only plans,
//! so it accepts configs the engine cannot run yet (llama, recompute, sequence
//! parallelism).

use crate::launch::LaunchError;
use engine::Config;
use partitioner::auto::{self, AutoSpec};
use partitioner::plan::{bytes, seconds};
use partitioner::predict::{predict_step, StepOptions};
use partitioner::{Plan, Profile};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What `strata plan` was asked for.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// Experiment YAML file.
    pub config: PathBuf,
    /// Print the plan (or the --auto result) as JSON (the schema the engine consumes).
    #[arg(long)]
    pub json: bool,
    /// Search (pp, tp, dp, microbatches, schedule, virtual stages) for the config's
    /// model and global batch, and rank the layouts by predicted step time.
    #[arg(long)]
    pub auto: bool,
    /// World size for --auto (default: the config's pp·tp·dp).
    #[arg(long)]
    pub world: Option<usize>,
    /// Per-device memory cap in GiB (overrides parallel.memory_gib).
    #[arg(long)]
    pub memory_gib: Option<f64>,
    /// How many --auto candidates to print.
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Sequences per optimizer step for --auto (default: the config's
    /// dp · microbatches · micro_batch_size).
    #[arg(long)]
    pub global_batch: Option<usize>,
    /// Bytes per element for --auto (4 = fp32 like the engine, 2 = bf16).
    #[arg(long, default_value_t = 4)]
    pub dtype_bytes: usize,
    /// Profile from `strata profile` to price the plan with (overrides parallel.profile).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    #[command(flatten)]
    pub sets: crate::Sets,
}

fn plan_error(path: &Path) -> impl Fn(partitioner::Error) -> engine::Error + '_ {
    move |source| engine::Error::Plan {
        path: path.display().to_string(),
        source,
    }
}

fn bad_flag(path: &Path, field: &str, problem: String, fix: &str) -> LaunchError {
    LaunchError::Engine(engine::Error::Config {
        path: path.display().to_string(),
        field: field.into(),
        problem,
        fix: fix.into(),
    })
}

/// Runs `strata plan`.
pub fn plan(args: &PlanArgs) -> Result<(), LaunchError> {
    let path = args.config.as_path();
    if let Some(g) = args.memory_gib {
        if !(g.is_finite() && g > 0.0) {
            return Err(bad_flag(
                path,
                "--memory-gib",
                format!("must be a positive number of GiB, got {g}"),
                "pass e.g. --memory-gib 80",
            ));
        }
    }
    for (flag, given) in [
        ("--world", args.world.is_some()),
        ("--global-batch", args.global_batch.is_some()),
    ] {
        if given && !args.auto {
            return Err(bad_flag(
                path,
                flag,
                "only used with --auto".into(),
                "add --auto to search layouts",
            ));
        }
    }
    if !matches!(args.dtype_bytes, 1 | 2 | 4 | 8) {
        return Err(bad_flag(
            path,
            "--dtype-bytes",
            format!("must be 1, 2, 4 or 8, got {}", args.dtype_bytes),
            "pass --dtype-bytes 2 for bf16 or 4 for fp32",
        ));
    }
    let mut cfg = Config::load_for_profile(path, &args.sets.parse()?)?;
    if let Some(p) = &args.profile {
        cfg.parallel.profile = Some(
            std::path::absolute(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
        );
    }
    if args.auto {
        return auto_plan(&cfg, args);
    }
    cfg.plan()?;
    let mut spec = cfg.plan_spec(&cfg.shape()?)?;
    if let Some(g) = args.memory_gib {
        spec.memory_cap_bytes = Some((g * (1u64 << 30) as f64) as u64);
    }
    let plan = Plan::build(&spec).map_err(plan_error(path))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("plan serialises")
        );
        return Ok(());
    }
    print!("{}", plan.table());
    if plan.tp > 1 {
        println!("{}", plan.tp_plan.summary());
    }
    if let (Some(cap), true) = (
        plan.memory_cap_bytes,
        plan.method != "optimal"
            && plan
                .rank_memory_bytes()
                .iter()
                .any(|&m| m > spec.memory_cap_bytes.unwrap_or(u64::MAX)),
    ) {
        println!(
            "warning: a stage exceeds parallel.memory_gib ({}); parallel.partition: optimal splits under the cap",
            bytes(cap)
        );
    }
    print_memory(&plan);
    let step = StepOptions {
        grad_clip: cfg.train.grad_clip.is_some(),
        tied: cfg.model.tie_embeddings,
    };
    match predict_step(&plan, &spec.cost_model(), step) {
        Ok(p) => {
            let bubbles: Vec<String> = p
                .bubble
                .iter()
                .map(|b| format!("{:.1}%", 100.0 * b))
                .collect();
            println!(
                "schedule {}: predicted step {} (the schedule simulated with costs {}: schedule {} + optimizer and reductions {}), {:.0} tokens/s, bubble per rank: {}",
                cfg.parallel.schedule,
                seconds(p.step_s),
                if spec.profile.is_some() { "from the profile" } else { "from parallel.hardware, no profile" },
                seconds(p.pipeline_s),
                seconds(p.step_s - p.pipeline_s),
                cfg.tokens_per_step() as f64 / p.step_s,
                bubbles.join(", ")
            );
        }
        Err(e) => println!(
            "schedule {}: no prediction (the schedule does not simulate: {})",
            cfg.parallel.schedule,
            e.to_string().lines().next().unwrap_or("")
        ),
    }
    Ok(())
}

/// Prints the memory model's peak per rank and what holds it.
fn print_memory(plan: &Plan) {
    for m in &plan.memory {
        println!(
            "rank {} peak memory {} = process {} + data {} + weights {} + grads {} + AdamW {} + activations {} + working {}",
            m.rank,
            bytes(m.peak),
            bytes(m.process),
            bytes(m.data),
            bytes(m.weights),
            bytes(m.grads),
            bytes(m.optimizer),
            bytes(m.activations),
            bytes(m.working)
        );
    }
}

/// `strata plan --auto`: searches layouts for the config's model and global batch.
fn auto_plan(cfg: &Config, args: &PlanArgs) -> Result<(), LaunchError> {
    let path = args.config.as_path();
    let shape = cfg.shape()?;
    let p = &cfg.parallel;
    let world = args.world.unwrap_or(cfg.world_size());
    let global_batch = args
        .global_batch
        .unwrap_or(*p.dp * *p.microbatches * *p.micro_batch_size);
    let mut spec = AutoSpec::new(shape.clone(), world, global_batch);
    spec.dtype_bytes = args.dtype_bytes;
    spec.hardware = p.hardware;
    spec.profile = match cfg.profile_path() {
        Some(file) => Some(Profile::load(&file).map_err(plan_error(path))?),
        None => None,
    };
    if let Some(profile) = &spec.profile {
        // Its layer timings hold at the micro-batch size it measured, and `strata plan`
        // refuses a profile at another one: search that size only (profile another size
        // with `strata profile --set parallel.micro_batch_size=N`).
        spec.micro_batch_sizes = vec![profile.micro_batch_size];
    }
    spec.step = StepOptions {
        grad_clip: cfg.train.grad_clip.is_some(),
        tied: cfg.model.tie_embeddings,
    };
    // Sequence parallelism applies to the searched layouts with tp > 1.
    spec.policy = partitioner::ActivationPolicy {
        recompute: p.recompute,
        sequence_parallel: p.sequence_parallel,
    };
    spec.data_bytes = cfg.data_source()?.resident_bytes();
    spec.top = args.top.max(1);
    spec.memory_cap_bytes = args
        .memory_gib
        .or(p.memory_gib)
        .map(|g| (g * (1u64 << 30) as f64) as u64);
    let t0 = Instant::now();
    let result = auto::search(&spec).map_err(plan_error(path))?;
    let took = t0.elapsed();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&result).expect("auto plan serialises")
        );
        return Ok(());
    }
    println!(
        "auto-plan: {} {} model, world {world}, global batch {global_batch} sequences ({} tokens), memory cap {}, priced {}; {} layouts evaluated in {:.0} ms",
        partitioner::plan::human(
            partitioner::LayerGraph::new(&shape, 1, 4)
                .map(|g| g.total_params() as f64)
                .unwrap_or(0.0),
            ""
        ),
        shape.arch.name(),
        global_batch * shape.seq_len,
        spec.memory_cap_bytes.map_or("none".into(), bytes),
        match &cfg.profile_path() {
            Some(p) => format!("from the profile {}", p.display()),
            None => "from parallel.hardware (no profile: pass --profile)".into(),
        },
        result.evaluated,
        took.as_secs_f64() * 1e3
    );
    println!(
        "{:>3} {:>4} {:>3} {:>4} {:>2} {:<17} {:>5} {:>4} {:>10} {:>13} {:>10} {:>7} {:>10}  memory per stage",
        "#", "pp", "tp", "dp", "v", "schedule", "m", "mbs", "step", "bubble", "peak mem", "imbal", "tokens/s"
    );
    for (i, c) in result.candidates.iter().enumerate() {
        let mem: Vec<String> = c.memory_per_rank.iter().map(|&m| bytes(m)).collect();
        let mem = if mem.len() > 8 {
            format!(
                "{} … {}",
                mem[..4].join(" "),
                mem[mem.len() - 2..].join(" ")
            )
        } else {
            mem.join(" ")
        };
        println!(
            "{:>3} {:>4} {:>3} {:>4} {:>2} {:<17} {:>5} {:>4} {:>10} {:>13} {:>10} {:>7.3} {:>10.0}  {mem}",
            i + 1,
            c.pp,
            c.tp,
            c.dp,
            c.virtual_stages,
            c.schedule.name(),
            c.microbatches,
            c.micro_batch_size,
            seconds(c.step_time_s),
            format!(
                "{:.1}% ({})",
                100.0 * c.bubble,
                if c.simulated { "sim" } else { "est" }
            ),
            bytes(c.peak_memory_bytes),
            c.imbalance,
            c.tokens_per_s,
        );
    }
    if !result.rejected.is_empty() {
        println!("rejected layout families (pp x tp x dp):");
        for r in &result.rejected {
            println!(
                "  pp {:>4} tp {:>3} dp {:>4}: {}",
                r.pp, r.tp, r.dp, r.reason
            );
        }
    }
    Ok(())
}
