//! `strata prune`: the masks of magnitude (per layer and global) and 2:4 pruning equal
//! PyTorch's own (torch.nn.utils.prune, torch.ao.pruning's WeightNormSparsifier); a pruned
//! checkpoint stores its masks, and training from it (train.resume) keeps the pruned
//! weights at exactly zero after every optimizer step while the others move, and saves
//! the masks again.

use engine::checkpoint::Checkpoint;
use engine::compress::prune::{mask_name, select, PruneInfo};
use engine::tch::{Kind, Tensor};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::Duration;
use strata_tests::{repo_root, run_strata, run_with_limit, scratch, venv_python, write};

const LIMIT: Duration = Duration::from_secs(240);

/// Weights with distinct magnitudes (no ties), [in, out].
fn weights() -> Vec<Tensor> {
    [(16i64, 12i64), (8, 20), (12, 8)]
        .iter()
        .enumerate()
        .map(|(l, &(i, o))| {
            let v: Vec<f32> = (0..i * o)
                .map(|k| ((k as f32 + 0.5) * (0.6180 + l as f32 * 0.1)).sin() * (1.0 + l as f32))
                .collect();
            Tensor::from_slice(&v).view([i, o])
        })
        .collect()
}

#[test]
fn masks_equal_torch_pruning() {
    let dir = scratch("prune-torch");
    let ws = weights();
    let named: Vec<(String, &Tensor)> = ws
        .iter()
        .enumerate()
        .map(|(i, w)| (format!("w{i}"), w))
        .collect();
    let src = dir.join("w.safetensors");
    Tensor::write_safetensors(&named, &src).unwrap();
    let out = dir.join("ref.safetensors");
    let mut cmd = Command::new(venv_python());
    cmd.arg(repo_root().join("tests/python/prune_reference.py"))
        .arg(&src)
        .arg(&out)
        .arg("0.4")
        .env("OMP_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let run = run_with_limit(cmd, Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let r: HashMap<String, Tensor> = Tensor::read_safetensors(&out)
        .unwrap()
        .into_iter()
        .collect();
    let same = |ours: &Tensor, theirs: &Tensor, what: &str| {
        let t = theirs.transpose(0, 1).to_kind(Kind::Uint8);
        let differ = ours.ne_tensor(&t).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            differ, 0,
            "{what}: {differ} mask entries differ from torch's"
        );
    };
    let refs: Vec<&Tensor> = ws.iter().collect();
    let global = select::global_magnitude(&refs, 0.4).unwrap();
    for (i, w) in ws.iter().enumerate() {
        same(
            &select::magnitude(w, 0.4).unwrap(),
            &r[&format!("layer{i}")],
            "l1_unstructured",
        );
        same(&global[i], &r[&format!("global{i}")], "global_unstructured");
        same(
            &select::two_four(w).unwrap(),
            &r[&format!("two4_{i}")],
            "2:4",
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

fn config(dir: &std::path::Path, steps: usize, resume: Option<&std::path::Path>) -> String {
    let data = repo_root().join("data/tinyshakespeare.txt");
    let resume = resume.map_or(String::new(), |p| format!(", resume: {}", p.display()));
    format!(
        "model: {{vocab: auto, seq_len: 32, d_model: 32, n_heads: 4, n_layers: 4, d_ff: 64}}
parallel: {{pp: 1, tp: 1, dp: 1, microbatches: 2, micro_batch_size: 2, schedule: gpipe}}
train: {{steps: {steps}, lr: 1.0e-2, seed: 7, data: {}, eval_every: 0, log_every: 1{resume}}}
output: {{dir: {}}}
",
        data.display(),
        dir.join("run").display()
    )
}

#[test]
fn training_from_a_pruned_checkpoint_keeps_pruned_weights_at_zero() {
    let dir = scratch("prune-train");
    let cfg = write(&dir, "train.yaml", &config(&dir, 3, None));
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let pruned = dir.join("pruned");
    let run = run_strata(
        &[
            "prune",
            dir.join("run/checkpoints").to_str().unwrap(),
            "--out",
            pruned.to_str().unwrap(),
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
        ],
        &[],
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let pdir = pruned.join("step-000003");
    // Fine-tune 3 more steps from the pruned checkpoint, on pp = 2.
    let fine = dir.join("fine");
    std::fs::create_dir_all(&fine).unwrap();
    let text = config(&fine, 6, Some(&pdir)).replace("pp: 1,", "pp: 2,");
    let cfg = write(&fine, "fine.yaml", &text);
    let run = run_strata(&["launch", cfg.to_str().unwrap()], &[], LIMIT);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let mut before = Checkpoint::open(&pdir).unwrap();
    let mut after = Checkpoint::open(&fine.join("run/checkpoints")).unwrap();
    assert_eq!(after.manifest().step, 6);
    let info = PruneInfo::from_extra(&after.manifest().extra)
        .unwrap()
        .unwrap();
    assert_eq!(info.weights.len(), 16);
    for w in &info.weights {
        let mask = after.read_full(&mask_name(&w.name)).unwrap();
        assert_eq!(
            mask,
            before.read_full(&mask_name(&w.name)).unwrap(),
            "{}",
            w.name
        );
        let (w0, w1) = (
            before.read_full(&w.name).unwrap(),
            after.read_full(&w.name).unwrap(),
        );
        let pruned = mask.eq(0);
        assert_eq!(
            pruned.sum(Kind::Int64).int64_value(&[]) as usize,
            w.params / 2
        );
        let max_pruned = w1.masked_select(&pruned).abs().max().double_value(&[]);
        assert_eq!(max_pruned, 0.0, "{}: a pruned weight moved", w.name);
        let moved = (w1 - w0)
            .masked_select(&mask.ne(0))
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 0.0, "{}: the kept weights were not trained", w.name);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
