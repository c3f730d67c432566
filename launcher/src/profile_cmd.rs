//! `strata profile` and `strata profile-worker`.
//!
//! `profile` times each layer kind in this process (the profile's `layers`, which
//! `parallel.partition: profile` reads), then runs `mpiexec -n <world> strata
//! profile-worker` to measure, on the real ranks and through the engine's transport, what
//! the planner needs to predict a step: layer timings with every rank busy, point-to-point
//! and all-reduce curves, the sgemm peak, the optimizer's cost and an idle rank's memory
//! (`engine::profile::calibrate`). It writes one profile JSON and prints a summary.
//!
//! Invariant: the profile-worker job writes its result to a file that `profile` reads
//! back; a failed job is an error (exit 1), never a profile without its calibration.

use crate::launch::{mpiexec_command, run_job, LaunchError};
use engine::comm::groups::ParallelComms;
use engine::comm::mpi::MpiComm;
use engine::flight::{FlightRecorder, Group, DEFAULT_CAPACITY};
use engine::profile::calibrate::{calibrate, CalibrateOptions};
use engine::watchdog::Watch;
use engine::Config;
use mpi::topology::Communicator as _;
use partitioner::plan::{bytes, human, seconds};
use partitioner::profile::{Calibration, Profile};
use partitioner::ModelShape;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// What `strata profile` was asked for.
#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Experiment YAML file.
    pub config: PathBuf,
    /// Output file (default: <output.dir>/profile.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Timed repetitions per measurement (the median is kept).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Ranks of the measuring MPI job (default: the config's pp·tp·dp).
    #[arg(long)]
    pub world: Option<usize>,
    /// mpiexec to use (default: `mpiexec` on PATH).
    #[arg(long, env = "STRATA_MPIEXEC")]
    pub mpiexec: Option<PathBuf>,
    #[command(flatten)]
    pub sets: crate::Sets,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LaunchError + '_ {
    move |source| {
        LaunchError::Engine(engine::Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Micro-batch sizes the calibration times: the auto-planner's and the config's.
fn micro_batch_sizes(cfg: &Config) -> Vec<usize> {
    let mut v = vec![1, 2, 4, 8, *cfg.parallel.micro_batch_size];
    v.sort_unstable();
    v.dedup();
    v
}

/// Runs `strata profile`.
pub fn profile(args: &ProfileArgs) -> Result<(), LaunchError> {
    let path = args.config.as_path();
    let overrides = args.sets.parse()?;
    let cfg = Config::load_for_profile(path, &overrides)?;
    // Layer timings and footprints under the allocator policy the training ranks use.
    engine::alloc::apply(cfg.train.allocator)?;
    let shape = cfg.shape()?;
    let world = args.world.unwrap_or(cfg.world_size());
    if world == 0 {
        return Err(LaunchError::Engine(engine::Error::Config {
            path: path.display().to_string(),
            field: "--world".into(),
            problem: "must be at least 1".into(),
            fix: "pass e.g. --world 2, or leave it out for the config's pp·tp·dp".into(),
        }));
    }
    let opts = engine::profile::ProfileOptions {
        runs: args.runs.max(1),
        threads: *cfg.train.threads,
        ..Default::default()
    };
    let mut prof = engine::profile::profile_layers(&shape, *cfg.parallel.micro_batch_size, &opts)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| cfg.output_dir().join("profile.json"));
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    prof.calibration = run_workers(path, &out, world, args)?;
    let text = serde_json::to_string_pretty(&prof).expect("profile serialises");
    std::fs::write(&out, text + "\n").map_err(io_err(&out))?;
    print_summary(&prof, &shape, *cfg.parallel.micro_batch_size);
    println!(
        "wrote {}; `strata plan CONFIG` and `strata plan --auto` use it with `parallel.profile: {}` (and `parallel.partition: profile` splits by it)",
        out.display(),
        out.display()
    );
    Ok(())
}

/// Runs the profile-worker job and reads back its [`Calibration`].
fn run_workers(
    config: &Path,
    out: &Path,
    world: usize,
    args: &ProfileArgs,
) -> Result<Calibration, LaunchError> {
    let part = out.with_extension("calibration.json");
    let (mut cmd, program) = mpiexec_command(args.mpiexec.as_deref(), world, "profile-worker")?;
    cmd.arg("--config")
        .arg(std::path::absolute(config).unwrap_or_else(|_| config.to_path_buf()))
        .arg("--out")
        .arg(std::path::absolute(&part).unwrap_or_else(|_| part.clone()))
        .arg("--runs")
        .arg(args.runs.max(1).to_string())
        .args(args.sets.set.iter().flat_map(|s| ["--set", s.as_str()]));
    run_job(cmd, &program, "")?;
    let text = std::fs::read_to_string(&part).map_err(io_err(&part))?;
    let _ = std::fs::remove_file(&part);
    serde_json::from_str(&text).map_err(|e| {
        LaunchError::Engine(engine::Error::Internal(format!(
            "the profile workers wrote an unreadable calibration: {e}"
        )))
    })
}

/// One rank of the measuring job; rank 0 writes the calibration to `out`.
pub fn worker(config: &Path, out: &Path, runs: usize, sets: &crate::Sets) -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("strata profile-worker: error: MPI was already initialised");
        return ExitCode::from(1);
    };
    let world = universe.world();
    let rank = world.rank();
    let result = sets
        .parse()
        .and_then(|o| Config::load_for_profile(config, &o))
        .and_then(|cfg| {
            engine::alloc::apply(cfg.train.allocator)?;
            let shape = cfg.shape()?;
            let sizes = micro_batch_sizes(&cfg);
            // Curves reach past the largest activation message (4x), within [64 KiB, 16 MiB].
            let largest = 4 * sizes.iter().max().unwrap_or(&1) * shape.seq_len * shape.d_model;
            let opts = CalibrateOptions {
                runs: runs.max(1),
                threads: *cfg.train.threads,
                micro_batch_sizes: sizes,
                footprint_micro_batch_size: *cfg.parallel.micro_batch_size,
                max_stash: *cfg.parallel.microbatches,
                max_message_bytes: (4 * largest).next_power_of_two().clamp(1 << 16, 16 << 20),
                max_grad_bytes: 4 * partitioner::LayerGraph::new(&shape, 1, 4)
                    .map(|g| g.total_params() as usize)
                    .unwrap_or(0),
            };
            // Every blocking wait of the measuring job has the config's deadlines.
            let me = partitioner::Rank(rank as usize);
            let flight = FlightRecorder::new(me, None, DEFAULT_CAPACITY);
            let watch = Watch::new(flight, None, cfg.watchdog(), None);
            let mut comm = MpiComm::new(world.duplicate(), Group::World, watch.clone())?;
            let mut groups = |mesh| ParallelComms::from_mpi(world.duplicate(), mesh, &watch);
            calibrate(&shape, &mut comm, &mut groups, &opts)
        });
    match result {
        Ok(cal) if rank == 0 => {
            let text = serde_json::to_string_pretty(&cal).expect("calibration serialises");
            if let Err(e) = std::fs::write(out, text) {
                eprintln!("strata profile-worker: error: {}: {e}", out.display());
                world.abort(1);
            }
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata profile-worker rank {rank}: error: {e}");
            world.abort(if e.is_user_error() { 2 } else { 1 })
        }
    }
}

/// A measured ratio curve as `N{unit} F.FFx/B.BBx, ...` (N: blocks or microbatches).
fn curve(points: &[partitioner::profile::ChunkScale], unit: &str) -> String {
    let parts: Vec<String> = points
        .iter()
        .map(|c| format!("{}{unit} {:.2}x/{:.2}x", c.blocks, c.fwd, c.bwd))
        .collect();
    parts.join(", ")
}

fn print_summary(prof: &Profile, shape: &ModelShape, mbs: usize) {
    for l in &prof.layers {
        println!(
            "{:<6} forward {:>10}  backward {:>10}  (one process, median of {})",
            l.kind,
            seconds(l.fwd_s),
            seconds(l.bwd_s),
            l.runs
        );
    }
    let c = &prof.calibration;
    if let Some(set) = c.layer_set(mbs, 1, c.world) {
        for l in &set.layers {
            println!(
                "{:<6} forward {:>10}  backward {:>10}  ({} ranks busy at once)",
                l.kind,
                seconds(l.fwd_s),
                seconds(l.bwd_s),
                set.concurrent
            );
        }
        if let Some((f, b)) = set.chunk_scale {
            println!(
                "chunk (embed, blocks, head; 2 microbatches stashed): forward {f:.2}x, backward {b:.2}x its layers timed alone"
            );
        }
        if let Some((i, w)) = set.split_scale {
            println!("zero-bubble split backward: I {i:.2}x, W {w:.2}x the fused backward");
        }
    }
    for set in c.layer_sets.iter().filter(|s| !s.stash_scale.is_empty()) {
        println!(
            "microbatches stashed in a chunk (forward/backward against 2): {}",
            curve(&set.stash_scale, "")
        );
    }
    for set in c.layer_sets.iter().filter(|s| !s.chunk_depths.is_empty()) {
        println!(
            "chunk depth at tp = {} (forward/backward against its layers alone): {}",
            set.tp,
            curve(&set.chunk_depths, " blocks")
        );
    }
    for set in c
        .layer_sets
        .iter()
        .filter(|s| s.tp > 1 && s.micro_batch_size == mbs)
    {
        for l in &set.layers {
            println!(
                "{:<6} forward {:>10}  backward {:>10}  (tp = {} shard with its all-reduces, {} ranks busy at once)",
                l.kind,
                seconds(l.fwd_s),
                seconds(l.bwd_s),
                set.tp,
                set.concurrent
            );
        }
    }
    if let Some(m) = &c.matmul {
        println!(
            "sgemm peak per rank: {}FLOP/s at {} thread(s) (n = {})",
            human(m.flops_per_s, ""),
            m.threads,
            m.n
        );
    }
    let msg = (4 * mbs * shape.seq_len * shape.d_model) as u64;
    if let Some(p) = &c.p2p {
        println!(
            "p2p: latency {}, {} per {} activation message, bandwidth {}B/s (memcpy {}B/s){}",
            seconds(p.one_way.latency_s()),
            seconds(p.one_way.at(msg)),
            bytes(msg),
            human(p.one_way.bandwidth_bytes_s(), ""),
            human(p.memcpy_bytes_s, ""),
            match p.stalls_above_bytes {
                Some(n) => format!(
                    "; messages of {} and more wait for the sender's next communicator call",
                    bytes(n)
                ),
                None => String::new(),
            }
        );
    }
    for g in &c.all_reduce {
        println!(
            "all-reduce over {} {} ranks: latency {}, {} per {}",
            g.size,
            g.group,
            seconds(g.all_reduce.latency_s()),
            seconds(g.all_reduce.at(msg)),
            bytes(msg)
        );
    }
    if let Some(s) = &c.step {
        println!(
            "AdamW: {}/buffer + {}/Melement; world scalar all-reduce {}",
            seconds(s.adamw_fixed_s),
            seconds(s.adamw_element_s * 1e6),
            seconds(s.scalar_all_reduce_s)
        );
    }
    if let Some(m) = &c.memory {
        println!(
            "idle rank memory {} (machine {})",
            bytes(m.baseline_bytes),
            bytes(m.machine_bytes)
        );
    }
}

/// `strata p2p` (under `mpiexec -n 2`): Strata's tensor transport against raw MPI and
/// memcpy, 8 B to `max_mib` MiB; rank 0 prints the table and the load average.
pub fn p2p(rounds: usize, max_mib: usize) -> ExitCode {
    use engine::profile::p2p;
    let Some(universe) = mpi::initialize() else {
        eprintln!("strata p2p: error: MPI was already initialised");
        return ExitCode::from(1);
    };
    let world = universe.world();
    let rank = world.rank();
    let before = p2p::load_average();
    let mut opts = p2p::Options {
        rounds: rounds.max(1),
        ..p2p::Options::default()
    };
    opts.sizes.retain(|&n| n <= max_mib.max(1) << 20);
    match p2p::run(world.duplicate(), &opts) {
        Ok(rows) if rank == 0 => {
            println!(
                "strata p2p: 2 ranks, median of {} rounds per size, interleaved (raw MPI, Strata, memcpy each round)",
                opts.rounds
            );
            println!("load average before: {before}");
            print!("{}", p2p::table(&rows));
            println!("load average after:  {}", p2p::load_average());
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata p2p rank {rank}: error: {e}");
            world.abort(if e.is_user_error() { 2 } else { 1 })
        }
    }
}
