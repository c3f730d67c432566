//! Helpers for the tests against Hugging Face transformers: the venv's Python running
//! tests/python/hf_reference.py offline, in-process evaluation, and gathering
//! tensor-parallel logits back to full shape.

use crate::{repo_root, run_with_limit, write};
use engine::comm::groups::ParallelComms;
use engine::eval::{evaluate, EvalOptions, EvalResult, Windows};
use engine::tch::{Kind, Tensor};
use engine::Config;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The cached venv's Python (torch + transformers, installed by scripts/setup.sh);
/// `STRATA_PYTHON` overrides it.
pub fn venv_python() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_PYTHON") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("STRATA_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/strata"),
        PathBuf::from,
    );
    cache.join("torch-2.11.0/bin/python")
}

/// Runs `tests/python/hf_reference.py` on `jobs` (see its docstring) in one offline
/// Python process, with `dir` as its scratch space; panics with its output on failure.
pub fn run_hf_reference(jobs: &serde_json::Value, dir: &Path) {
    let python = venv_python();
    assert!(
        python.is_file(),
        "{} is missing: run scripts/setup.sh (it installs torch and transformers for the tests)",
        python.display()
    );
    let jobs_path = write(dir, "jobs.json", &jobs.to_string());
    let mut cmd = Command::new(python);
    cmd.arg(repo_root().join("tests/python/hf_reference.py"))
        .arg(&jobs_path)
        .env("HF_HUB_OFFLINE", "1")
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("HF_HOME", dir.join("hf-home"))
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("OMP_NUM_THREADS", "1")
        .env("PYTHONWARNINGS", "ignore")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let run = run_with_limit(cmd, Duration::from_secs(300));
    assert!(
        !run.timed_out && run.code == Some(0),
        "hf_reference.py failed ({:?}); if transformers is missing, run scripts/setup.sh\nstdout: {}\nstderr: {}",
        run.code,
        run.stdout,
        run.stderr
    );
}

/// The largest |a − b| over max|a| of two tensors of the same shape (0 when both are 0).
pub fn max_rel_diff(a: &engine::tch::Tensor, b: &engine::tch::Tensor) -> f64 {
    use engine::tch::Kind;
    assert_eq!(a.size(), b.size(), "shapes differ");
    let scale = a.abs().max().double_value(&[]).max(1e-30);
    let diff = (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[]);
    diff / scale
}

/// Evaluates `cfg`'s model (weights: its `model.init_from`, else the seeded init) on
/// `windows` in-process, one thread per rank; every rank's result, in rank order.
pub fn run_local_eval(cfg: &Config, windows: &Windows, opts: EvalOptions) -> Vec<EvalResult> {
    let comms = ParallelComms::local(cfg.mesh().unwrap()).unwrap();
    let handles: Vec<_> = comms
        .into_iter()
        .map(|mut comms| {
            let (cfg, windows) = (cfg.clone(), windows.clone());
            std::thread::spawn(move || {
                let load = |chunk: &mut engine::model::Model| {
                    engine::hf::load_init_from(&cfg, chunk.params())
                };
                let result = evaluate(&cfg, &mut comms, &load, &windows, opts);
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

/// The logits `[windows, seq_len, vocab]` of an evaluation with `keep_logits`, gathered
/// from the tensor-parallel vocabulary shards (padding columns dropped).
pub fn gather_logits(results: &[EvalResult], vocab: usize) -> Tensor {
    let mut shards: BTreeMap<usize, BTreeMap<usize, Tensor>> = BTreeMap::new();
    for r in results {
        for (w, z) in &r.logits {
            shards
                .entry(*w)
                .or_default()
                .insert(r.coord.tp, z.shallow_clone());
        }
    }
    let rows: Vec<Tensor> = shards
        .into_values()
        .map(|by_tp| {
            let parts: Vec<Tensor> = by_tp.into_values().collect();
            Tensor::cat(&parts, -1).narrow(-1, 0, vocab as i64)
        })
        .collect();
    Tensor::stack(&rows, 0).to_kind(Kind::Float)
}

/// Windows whose rows are exactly `(inputs, targets)` rows of `seq_len` (targets being
/// the inputs shifted by one, as the training batches are).
pub fn windows_of_rows(inputs: &[i64], targets: &[i64], seq_len: usize) -> Windows {
    let mut stream = Vec::new();
    for (x, y) in inputs.chunks(seq_len).zip(targets.chunks(seq_len)) {
        assert_eq!(
            &x[1..],
            &y[..seq_len - 1],
            "targets are not the shifted inputs"
        );
        stream.extend_from_slice(x);
        stream.push(y[seq_len - 1]);
    }
    Windows::from_tokens(&stream, seq_len)
}

/// Reads a safetensors file written by hf_reference.py: its tensors and metadata.
pub fn read_reference(
    path: &Path,
) -> (
    BTreeMap<String, Tensor>,
    std::collections::HashMap<String, String>,
) {
    engine::hf::safetensors_io::read_all(path).unwrap()
}
