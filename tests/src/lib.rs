//! Helpers for Strata's end-to-end tests: tiny configs, running the `strata` binary with a
//! time limit (so a hang fails the test instead of stalling CI), reading metrics, and
//! running the engine in-process on the local (crossbeam) transport.

pub mod hf;

pub use hf::{max_rel_diff, run_hf_reference, venv_python};

use engine::comm::groups::ParallelComms;
use engine::model::sharding::assemble;
use engine::shard::ShardSpec;
use engine::tch::Tensor;
use engine::{Config, RunOptions, RunSummary};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `target/<profile>/strata`, next to the test executable's `deps/` directory.
pub fn strata_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("strata");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build --release -p launcher` (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny 8-layer GPT on seeded random tokens, 4 microbatches per step; the interleaved
/// schedule gets 2 virtual stages per rank.
pub fn tiny_config(pp: usize, schedule: &str, steps: usize, out: &Path) -> String {
    layout_config(pp, 1, 1, schedule, steps, out)
}

/// The tiny GPT on a `pp × tp × dp` layout. The global batch stays 4 × 2 sequences
/// whatever `dp` is (each replica gets 4 / dp microbatches), so every layout computes
/// the same loss as one process.
pub fn layout_config(
    pp: usize,
    tp: usize,
    dp: usize,
    schedule: &str,
    steps: usize,
    out: &Path,
) -> String {
    let v = if schedule == "interleaved-1f1b" { 2 } else { 1 };
    let m = 4 / dp;
    format!(
        "model: {{vocab: 64, seq_len: 16, d_model: 32, n_heads: 4, n_layers: 8, d_ff: 64}}
parallel: {{pp: {pp}, tp: {tp}, dp: {dp}, microbatches: {m}, micro_batch_size: 2, schedule: {schedule}, virtual_stages: {v}}}
train: {{steps: {steps}, lr: 1.0e-2, seed: 7, data: random, eval_every: 0, log_every: 1, grad_clip: 1.0}}
output: {{dir: {}}}
",
        out.display()
    )
}

/// A tiny model of either architecture on a `pp × tp × dp` layout: GPT as
/// [`layout_config`]; LLaMA with grouped-query attention (4 query heads sharing 2
/// key/value heads, so tp = 2 splits the key/value heads too), `tie` for tied embeddings.
#[allow(clippy::too_many_arguments)]
pub fn arch_config(
    arch: &str,
    tie: bool,
    pp: usize,
    tp: usize,
    dp: usize,
    schedule: &str,
    steps: usize,
    out: &Path,
) -> String {
    let extra = match arch {
        "llama" => format!("arch: llama, n_kv_heads: 2, tie_embeddings: {tie}"),
        _ => format!("tie_embeddings: {tie}"),
    };
    layout_config(pp, tp, dp, schedule, steps, out)
        .replace("d_ff: 64}", &format!("d_ff: 64, {extra}}}"))
}

/// Every training schedule a config can name.
pub const SCHEDULES: [&str; 4] = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1"];

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// What a finished (or killed) command produced.
#[derive(Debug)]
pub struct Run {
    /// Exit code; None if it was killed by a signal or the time limit.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
}

/// Runs `strata args...` with extra environment, killing it after `limit`.
pub fn run_strata(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Run {
    let mut cmd = Command::new(strata_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with_limit(cmd, limit)
}

/// Runs a command, killing it (and failing `timed_out`) after `limit`.
pub fn run_with_limit(cmd: Command, limit: Duration) -> Run {
    run_with_limit_tick(cmd, limit, |_| {})
}

/// Like [`run_with_limit`], calling `tick` with the child every 20 ms while it runs (to
/// signal or kill processes of a job from outside). On the time limit the child and every
/// process it started are killed: mpiexec puts each rank in a session of its own, so a
/// process-group kill would miss the ranks, and one left alive would hold the output pipes
/// open and hang the test instead of failing it.
pub fn run_with_limit_tick(
    mut cmd: Command,
    limit: Duration,
    mut tick: impl FnMut(&std::process::Child),
) -> Run {
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let out = read_to_end(child.stdout.take().unwrap());
    let err = read_to_end(child.stderr.take().unwrap());
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            timed_out = true;
            kill_tree(child.id());
            break child.wait().unwrap();
        }
        tick(&child);
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    // A process that outlived the child (a leaked rank) may hold the pipes: wait a while,
    // then kill what is left of the tree, and never wait forever.
    let collect = |rx: std::sync::mpsc::Receiver<String>| {
        rx.recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| "(output still open 10 s after the process ended)".into())
    };
    Run {
        code: status.code(),
        stdout: collect(out),
        stderr: collect(err),
        elapsed,
        timed_out,
    }
}

/// Reads `r` to its end on a thread; the text arrives on the returned channel.
fn read_to_end(mut r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = r.read_to_end(&mut bytes);
        let _ = tx.send(String::from_utf8_lossy(&bytes).into_owned());
    });
    rx
}

/// The live descendants of `pid` (children, grandchildren, ...), read from /proc.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // `pid (comm) state ppid ...`: comm may contain spaces, so split after the `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((p, ppid));
        }
    }
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|e| e.1 == p).map(|e| e.0));
        i += 1;
    }
    found.remove(0);
    found
}

/// SIGKILLs `pid` and every process it started (collected first, so none is orphaned
/// out of reach).
pub fn kill_tree(pid: u32) {
    let mut pids = descendants(pid);
    pids.push(pid);
    let _ = Command::new("kill")
        .arg("-9")
        .args(pids.iter().map(|p| p.to_string()))
        .stderr(Stdio::null())
        .status();
}

/// Asserts a clean bad-input failure: exit code 2, no hang or panic, and one line on
/// stderr that starts `strata: error: `, gives a fix, and contains every needle.
pub fn assert_clean_error(run: &Run, needles: &[&str]) {
    assert!(!run.timed_out, "hung");
    assert_eq!(
        run.code,
        Some(2),
        "stdout: {}\nstderr: {}",
        run.stdout,
        run.stderr
    );
    let err = run.stderr.trim_end();
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("strata: error: "), "{err}");
    assert!(err.contains("fix:"), "no fix in: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
}

/// Losses of every step in `dir/metrics.jsonl`.
pub fn read_losses(dir: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

/// Runs a config in-process, one thread per rank on the local transport; returns rank 0's
/// summary (per-step losses, per-rank peak stash and bubble).
pub fn run_local(cfg: &Config) -> RunSummary {
    run_local_with(cfg, &RunOptions::default()).swap_remove(0)
}

/// Runs a config in-process with `opts`; returns every rank's summary, in rank order.
pub fn run_local_with(cfg: &Config, opts: &RunOptions) -> Vec<RunSummary> {
    let comms = ParallelComms::local(cfg.mesh().unwrap()).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|mut comms| {
            let (cfg, opts) = (cfg.clone(), opts.clone());
            std::thread::spawn(move || {
                let result = engine::train(&cfg, &mut comms, &opts);
                if result.is_err() {
                    comms.world.abort_peers();
                }
                result
            })
        })
        .collect();
    handles
        .into_iter()
        .enumerate()
        .map(|(r, h)| {
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("rank {r}: {e}"))
        })
        .collect()
}

/// Asserts two loss curves agree: step 1 within `first_rel` and every step within
/// `all_rel`, relative.
pub fn assert_losses_match(
    reference: &[f64],
    other: &[f64],
    first_rel: f64,
    all_rel: f64,
    what: &str,
) {
    assert_eq!(reference.len(), other.len(), "{what}: step counts differ");
    let rel = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-12);
    assert!(
        rel(reference[0], other[0]) <= first_rel,
        "{what}: step 1 {} vs {}",
        reference[0],
        other[0]
    );
    for (i, (a, b)) in reference.iter().zip(other).enumerate() {
        assert!(
            rel(*a, *b) <= all_rel,
            "{what}: step {} loss {a} vs {b}",
            i + 1
        );
    }
}

/// Relative difference of two scalars, against `b`.
pub fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// Asserts that `other` trained like `reference` within `tol` (relative): `steps` losses and
/// grad_norms, and every step-1 gradient (runs made with `capture_grads_at: Some(1)`).
/// Returns the worst gradient difference.
pub fn assert_same_training(
    what: &str,
    other: &[RunSummary],
    reference: &[RunSummary],
    steps: usize,
    tol: f64,
) -> f64 {
    assert_eq!(reference[0].losses.len(), steps, "{what}");
    assert_eq!(other[0].losses.len(), steps, "{what}");
    assert_eq!(other[0].grad_norms.len(), steps, "{what}");
    let (o, r) = (&other[0], &reference[0]);
    for (i, (a, b)) in o.losses.iter().zip(&r.losses).enumerate() {
        assert!(rel(*a, *b) <= tol, "{what}: step {} loss {a} vs {b}", i + 1);
    }
    for (i, (a, b)) in o.grad_norms.iter().zip(&r.grad_norms).enumerate() {
        let d = rel(*a, *b);
        assert!(d <= tol, "{what}: step {} grad_norm {a} vs {b}", i + 1);
    }
    let (a, b) = (full_grads(other), full_grads(reference));
    assert!(a.len() > 20, "{what}: {} parameters", a.len());
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}"
    );
    let mut worst = 0.0f64;
    for (name, g) in &a {
        let d = rel_diff(g, &b[name]);
        worst = worst.max(d);
        assert!(
            d <= tol,
            "{what}: the step-1 gradient of {name} differs by {d:e}"
        );
    }
    worst
}

/// Captured gradients of every parameter, reassembled to full shape from the
/// tensor-parallel shards of data-parallel replica 0 (tied copies skipped: after the
/// pipeline sum they equal the embedding's).
pub fn full_grads(summaries: &[RunSummary]) -> BTreeMap<String, Tensor> {
    let mut shards: BTreeMap<String, Vec<(ShardSpec, Tensor)>> = BTreeMap::new();
    for s in summaries {
        if s.coord.unwrap().dp != 0 {
            continue;
        }
        for g in s.grads.iter().filter(|g| !g.tied_copy) {
            let t = Tensor::from_slice(&g.values).view(g.shape.as_slice());
            shards
                .entry(g.name.clone())
                .or_default()
                .push((g.spec.clone(), t));
        }
    }
    shards
        .into_iter()
        .map(|(name, parts)| {
            let refs: Vec<_> = parts.iter().map(|(s, t)| (s, t)).collect();
            let full = assemble(&name, &refs).unwrap();
            (name, full)
        })
        .collect()
}

/// `|a − b| / |b|` (norms), the relative difference of two tensors.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).norm().double_value(&[]);
    diff / b.norm().double_value(&[]).max(1e-30)
}

/// Weights for generation tests: every parameter a fixed function of its name, scaled so
/// that logits are far apart (greedy choices then do not hinge on rounding). Norm weights
/// are `1 + 0.1·N(0, 1)`, everything else `std · N(0, 1)`.
pub struct TestWeights {
    pub seed: u64,
    pub std: f64,
}

impl engine::generate::Weights for TestWeights {
    fn load(&mut self, name: &str, spec: &ShardSpec, dst: &Tensor) -> engine::Result<()> {
        use engine::model::{init_param, Init};
        let norm = name.contains(".ln") || name.contains("norm") || name.contains("ln_f");
        let init = if norm {
            Init::Normal(0.1)
        } else {
            Init::Normal(self.std)
        };
        let mut full = init_param(
            self.seed,
            partitioner::LayerKind::Embedding,
            name,
            &spec.global_shape,
            init,
        )?;
        if norm && name.ends_with("weight") {
            full += 1.0;
        }
        let shape: Vec<usize> = dst.size().iter().map(|&d| d as usize).collect();
        let local = engine::model::sharding::take_local(&full, spec, &shape)?;
        engine::tch::no_grad(|| dst.shallow_clone().copy_(&local));
        Ok(())
    }
}

/// Runs a generation job in-process on a `pp × tp` layout (one thread per rank), each
/// rank loading from `weights()`; returns rank 0's report.
pub fn generate_local(
    setup: &engine::generate::ModelSetup,
    job: &engine::generate::Job,
    weights: impl Fn() -> Box<dyn engine::generate::Weights> + Send + Sync + Clone + 'static,
) -> engine::generate::Report {
    use engine::generate::Source;
    let mesh = partitioner::mesh::Mesh::new(setup.pp(), setup.tp, 1).unwrap();
    let comms = ParallelComms::local(mesh).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|mut comms| {
            let (setup, job, weights) = (setup.clone(), job.clone(), weights.clone());
            std::thread::spawn(move || {
                let mut w = weights();
                let result =
                    engine::generate::run(&setup, Source::Trained(w.as_mut()), &job, &mut comms);
                if result.is_err() {
                    comms.world.abort_peers();
                }
                result
            })
        })
        .collect();
    let mut report = None;
    for (r, h) in handles.into_iter().enumerate() {
        let out = h
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("rank {r}: {e}"));
        if r == 0 {
            report = out;
        }
    }
    report.expect("rank 0 reports")
}

/// Writes a checkpoint (one rank, tp = pp = 1) of the model of `config_yaml` (a config
/// whose `model.vocab` is a number) with [`TestWeights`] values, under `root`; returns
/// its `step-N` directory.
pub fn write_test_checkpoint(root: &Path, config_yaml: &str, weights: TestWeights) -> PathBuf {
    use engine::checkpoint::{save, Layout, SaveMeta, SaveOptions, SavedTensor};
    use engine::generate::Weights;
    let cfg = Config::parse(config_yaml, &root.join("config.yaml")).unwrap();
    let spec = cfg.model_spec().unwrap();
    let layers = engine::compress::model_layers(spec.shape.n_layers);
    let model = engine::model::Model::for_inference(
        &spec,
        &layers,
        engine::model::sharding::TpRank::SINGLE,
    )
    .unwrap();
    let mut w = weights;
    let tensors: Vec<SavedTensor> = model
        .params()
        .iter()
        .filter(|p| !p.tied_copy)
        .map(|p| {
            w.load(&p.name, &p.spec, &p.tensor).unwrap();
            SavedTensor {
                name: p.name.clone(),
                tensor: p.tensor.shallow_clone(),
                spec: p.spec.clone(),
            }
        })
        .collect();
    let meta = SaveMeta {
        step: 1,
        config: cfg.resolved_yaml().unwrap(),
        vocab: None,
        plan: serde_json::Value::Null,
        layout: Layout {
            pp: 1,
            tp: 1,
            dp: 1,
            virtual_stages: 1,
            schedule: "gpipe".into(),
        },
        train_state: serde_json::Value::Null,
        extra: Default::default(),
    };
    let mut comm = engine::comm::local::LocalComm::group(1).pop().unwrap();
    save(root, &meta, &tensors, &mut comm, &SaveOptions::default()).unwrap()
}

/// The whole model of checkpoint `dir` as one chunk on one rank (pp = tp = 1), and its spec.
pub fn load_single(dir: &Path) -> (engine::model::Model, engine::model::ModelSpec) {
    use engine::generate::load::CheckpointWeights;
    use engine::generate::{ModelSetup, Source};
    let t = engine::compress::Trained::open(dir).unwrap();
    let setup = ModelSetup::new(t.spec.clone(), 1, 1).unwrap();
    let ckpt = engine::checkpoint::Checkpoint::open(dir).unwrap();
    let mut w = CheckpointWeights::new(ckpt).unwrap();
    let coord = partitioner::mesh::MeshCoord {
        pp: 0,
        dp: 0,
        tp: 0,
    };
    let model = setup
        .build_chunk(coord, &mut Source::Trained(&mut w))
        .unwrap();
    (model, t.spec)
}
