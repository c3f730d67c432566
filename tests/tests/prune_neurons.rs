//! `strata prune --method neurons` and per-layer `model.d_ff`:
//! * the neuron-pruned model's logits equal transformers' DENSE model with exactly those
//!   hidden units zeroed (chosen on the Python side by the same documented score), GPT and
//!   LLaMA;
//! * a per-layer `d_ff` trains identically on (1,1,1), (2,2,1) and (1,2,2): losses,
//!   grad_norm and every step-1 gradient within 1e-5 (relative);
//! * a pruned checkpoint resumes training (`train.resume`) on another layout with the
//!   AdamW moments cut like the weights.

use engine::checkpoint::Checkpoint;
use engine::comm::local::LocalComm;
use engine::compress::prune::neurons::prune_neurons;
use engine::model::kv::KvCache;
use engine::tch::{Kind, Tensor};
use engine::{Config, RunOptions, RunSummary};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use strata_tests::{
    arch_config, full_grads, load_single, rel, rel_diff, repo_root, run_local_with, run_strata,
    run_with_limit, scratch, venv_python, write, write_test_checkpoint, TestWeights,
};

const TOL: f64 = 1e-5;

/// Fixed token ids `[2, 12]` below the tiny vocabulary (64).
fn token_rows() -> Vec<Vec<i64>> {
    (0..2)
        .map(|r| (0..12).map(|i| (i * 7 + 3 + 5 * r) % 64).collect())
        .collect()
}

/// Logits `[b, s, V]` of the whole checkpoint model on one rank (incremental decoding).
fn strata_logits(dir: &Path) -> Tensor {
    let (model, _) = load_single(dir);
    let flat: Vec<i64> = token_rows().concat();
    let tokens = Tensor::from_slice(&flat).view([2, 12]);
    let mut cache = KvCache::new(model.cache_shape(2, 12), None).unwrap();
    let mut tp = LocalComm::group(1).pop().unwrap();
    // One position at a time through the KV cache: the logits of every prefix.
    let steps: Vec<Tensor> = (0..12)
        .map(|i| {
            model
                .infer(&tokens.narrow(1, i, 1), &mut cache, &mut tp)
                .unwrap()
        })
        .collect();
    Tensor::stack(&steps, 1)
}

#[test]
fn pruned_logits_equal_torch_dense_with_the_units_zeroed() {
    let (sparsity, multiple) = (0.4, 4);
    for arch in ["gpt", "llama"] {
        let dir = scratch(&format!("neurons-ref-{arch}"));
        let cfg = arch_config(arch, false, 1, 1, 1, "gpipe", 1, &dir);
        let dense =
            write_test_checkpoint(&dir.join("dense"), &cfg, TestWeights { seed: 11, std: 0.1 });
        let pruned = prune_neurons(&dense, &dir.join("pruned"), Some(sparsity), multiple).unwrap();
        let widths: Vec<usize> = pruned.info.layers.iter().map(|c| c.d_ff_after).collect();
        assert!(widths.iter().all(|&w| w == 40), "{arch}: {widths:?}");
        let hf = dir.join("hf");
        engine::hf::from_checkpoint::export_checkpoint(&dense, &hf).unwrap();
        let tokens = write(
            &dir,
            "tokens.json",
            &serde_json::to_string(&token_rows()).unwrap(),
        );
        let out = dir.join("ref.safetensors");
        let mut cmd = Command::new(venv_python());
        cmd.arg(repo_root().join("tests/python/neuron_reference.py"))
            .arg(&hf)
            .arg(sparsity.to_string())
            .arg(multiple.to_string())
            .arg(&tokens)
            .arg(&out)
            .env("OMP_NUM_THREADS", "1")
            .env("HF_HUB_OFFLINE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let run = run_with_limit(cmd, Duration::from_secs(180));
        assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
        let r: HashMap<String, Tensor> = Tensor::read_safetensors(&out)
            .unwrap()
            .into_iter()
            .collect();
        let kept: Vec<i64> = Vec::try_from(&r["kept"]).unwrap();
        assert_eq!(
            kept,
            widths.iter().map(|&w| w as i64).collect::<Vec<_>>(),
            "{arch}: kept counts"
        );
        let ours = strata_logits(&pruned.dir).to_kind(Kind::Float);
        let theirs = &r["logits"];
        assert_eq!(ours.size(), theirs.size(), "{arch}");
        let d = rel_diff(&ours, theirs);
        let max_abs = (&ours - theirs).abs().max().double_value(&[]);
        eprintln!("{arch}: pruned vs torch dense-with-zeros: rel {d:.2e}, max abs {max_abs:.2e}");
        assert!(d <= TOL, "{arch}: logits differ by {d:e} (relative)");
        // The dense model's logits differ: the pruning removed something.
        let dense_logits = strata_logits(&dense).to_kind(Kind::Float);
        assert!(
            rel_diff(&dense_logits, theirs) > 1e-3,
            "{arch}: nothing pruned"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

const WIDTHS: &str = "d_ff: [64, 32, 48, 16, 64, 8, 40, 24]";
const STEPS: usize = 3;

fn train(arch: &str, (pp, tp, dp): (usize, usize, usize), schedule: &str) -> Vec<RunSummary> {
    let out = scratch(&format!("neurons-eq-{arch}-{pp}{tp}{dp}"));
    let text =
        arch_config(arch, false, pp, tp, dp, schedule, STEPS, &out).replace("d_ff: 64", WIDTHS);
    let cfg = Config::parse(&text, Path::new("per-layer.yaml")).unwrap();
    let opts = RunOptions {
        capture_grads_at: Some(1),
        ..RunOptions::default()
    };
    run_local_with(&cfg, &opts)
}

#[test]
fn per_layer_d_ff_trains_identically_on_every_layout() {
    for arch in ["gpt", "llama"] {
        let reference = train(arch, (1, 1, 1), "gpipe");
        let ref_grads = full_grads(&reference);
        let first = if arch == "gpt" { "fc1" } else { "gate" };
        let name = format!("block.5.mlp.{first}.weight");
        assert_eq!(ref_grads[&name].size(), [32, 8], "block 5 is 8 wide");
        for (layout, schedule) in [((2, 2, 1), "1f1b"), ((1, 2, 2), "gpipe")] {
            let what = format!("{arch} {layout:?} {schedule}");
            let runs = train(arch, layout, schedule);
            let (a, b) = (&runs[0], &reference[0]);
            assert_eq!(a.losses.len(), STEPS, "{what}");
            for (x, y) in a.losses.iter().zip(&b.losses) {
                assert!(rel(*x, *y) <= TOL, "{what}: loss {x} vs {y}");
            }
            for (x, y) in a.grad_norms.iter().zip(&b.grad_norms) {
                assert!(rel(*x, *y) <= TOL, "{what}: grad_norm {x} vs {y}");
            }
            let grads = full_grads(&runs);
            assert_eq!(grads.len(), ref_grads.len(), "{what}");
            for (name, g) in &grads {
                let d = rel_diff(g, &ref_grads[name]);
                assert!(d <= TOL, "{what}: gradient of {name} differs by {d:e}");
            }
        }
    }
}

#[test]
fn a_pruned_checkpoint_resumes_training_on_another_layout() {
    let dir = scratch("neurons-resume");
    let data = repo_root().join("data/tinyshakespeare.txt");
    let config = |steps: usize, pp: usize, tp: usize, widths: &str, resume: &str| {
        format!(
            "model: {{vocab: auto, seq_len: 16, d_model: 32, n_heads: 4, n_layers: 2, d_ff: {widths}}}
parallel: {{pp: {pp}, tp: {tp}, dp: 1, microbatches: 2, micro_batch_size: 2, schedule: gpipe}}
train: {{steps: {steps}, lr: 1.0e-2, seed: 7, data: {}, eval_every: 0, log_every: 1{resume}}}
output: {{dir: {}}}
",
            data.display(),
            dir.join(format!("run{pp}{tp}")).display()
        )
    };
    let cfg = write(&dir, "dense.yaml", &config(2, 1, 1, "64", ""));
    let limit = Duration::from_secs(240);
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], limit);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let pruned = dir.join("pruned");
    let src = dir.join("run11/checkpoints");
    let args = [
        "prune",
        src.to_str().unwrap(),
        "--out",
        pruned.to_str().unwrap(),
        "--method",
        "neurons",
        "--sparsity",
        "0.5",
    ];
    let run = run_strata(&args, &[], limit);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("| block.1 | 64 → 32 | 2080 |"),
        "{}",
        run.stdout
    );
    let mut before = Checkpoint::open(&pruned).unwrap();
    let m = before
        .read_full("optim.exp_avg.block.0.mlp.fc1.weight")
        .unwrap();
    assert_eq!(m.size(), [32, 32], "moments cut like the weights");
    let resume = format!(", resume: {}", pruned.join("step-000002").display());
    let cfg = write(&dir, "fine.yaml", &config(4, 1, 2, "[32, 32]", &resume));
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], limit);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let mut after = Checkpoint::open(&dir.join("run12/checkpoints")).unwrap();
    assert_eq!(after.manifest().step, 4);
    let w0 = before.read_full("block.1.mlp.fc2.weight").unwrap();
    let w1 = after.read_full("block.1.mlp.fc2.weight").unwrap();
    assert_eq!(w1.size(), [32, 32]);
    assert!(
        rel_diff(&w1, &w0) > 0.0,
        "fine-tuning moved the pruned model"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
