//! `strata checkpoint inspect|verify`: exit 0 with a summary on a good checkpoint, exit 2
//! with a one-line error naming the file on a damaged or missing one.

use engine::checkpoint::{save, Layout, SaveMeta, SaveOptions, SavedTensor};
use engine::comm::local::LocalComm;
use engine::shard::{Block, ShardSpec};
use engine::tch::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use strata_tests::{assert_clean_error, run_strata, scratch, Run};

/// A 2-rank checkpoint of one [4, 3] tensor split by rows, plus a bias on rank 0.
fn make_checkpoint(root: &Path, step: usize) -> PathBuf {
    let handles: Vec<_> = LocalComm::group(2)
        .into_iter()
        .enumerate()
        .map(|(r, mut comm)| {
            let root = root.to_path_buf();
            std::thread::spawn(move || {
                let rows = Tensor::from_slice(&[r as f32; 6]).view([2, 3]);
                let mut tensors = vec![SavedTensor {
                    name: "block.0.mlp.fc1.weight".into(),
                    tensor: rows,
                    spec: ShardSpec {
                        global_shape: vec![4, 3],
                        blocks: vec![Block {
                            global_offset: vec![2 * r, 0],
                            local_offset: vec![0, 0],
                            shape: vec![2, 3],
                        }],
                    },
                }];
                if r == 0 {
                    tensors.push(SavedTensor {
                        name: "block.0.mlp.fc1.bias".into(),
                        tensor: Tensor::from_slice(&[1f32, 2.0, 3.0]),
                        spec: ShardSpec::full(&[3]),
                    });
                }
                let meta = SaveMeta {
                    step,
                    config: String::new(),
                    vocab: None,
                    plan: serde_json::Value::Null,
                    layout: Layout {
                        pp: 2,
                        tp: 1,
                        dp: 1,
                        virtual_stages: 1,
                        schedule: "1f1b".into(),
                    },
                    train_state: serde_json::json!({"step": step}),
                    extra: BTreeMap::new(),
                };
                save(&root, &meta, &tensors, &mut comm, &SaveOptions::default()).unwrap()
            })
        })
        .collect();
    let dirs: Vec<PathBuf> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    dirs[0].clone()
}

fn strata(args: &[&str]) -> Run {
    run_strata(args, &[], Duration::from_secs(30))
}

#[test]
fn inspect_and_verify_a_good_checkpoint() {
    let root = scratch("ckpt-cli-good").join("checkpoints");
    let dir = make_checkpoint(&root, 7);
    let root_s = root.to_str().unwrap();
    let run = strata(&["checkpoint", "inspect", root_s]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for needle in [
        "step       7",
        "pp 2, tp 1, dp 1",
        "block.0.mlp.fc1.weight",
        "[4, 3]",
        "rank-00001.safetensors",
    ] {
        assert!(
            run.stdout.contains(needle),
            "`{needle}` missing:\n{}",
            run.stdout
        );
    }
    let run = strata(&["checkpoint", "inspect", "--json", dir.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["step"], 7);
    assert_eq!(v["tensors"].as_array().unwrap().len(), 2);
    assert_eq!(v["files"].as_array().unwrap().len(), 2);
    let run = strata(&["checkpoint", "verify", root_s]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.starts_with("ok: ") && run.stdout.contains("step 7"),
        "{}",
        run.stdout
    );
}

#[test]
fn verify_refuses_damaged_checkpoints_with_exit_2() {
    let root = scratch("ckpt-cli-bad").join("checkpoints");
    let dir = make_checkpoint(&root, 2);
    let file = dir.join("rank-00000.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let run = strata(&["checkpoint", "verify", root.to_str().unwrap()]);
    assert_clean_error(&run, &[file.to_str().unwrap(), "checksum mismatch"]);
    // inspect reads only the manifest, so it still works on the damaged checkpoint.
    assert_eq!(
        strata(&["checkpoint", "inspect", dir.to_str().unwrap()]).code,
        Some(0)
    );

    std::fs::write(&file, &bytes[..100]).unwrap();
    let run = strata(&["checkpoint", "verify", dir.to_str().unwrap()]);
    assert_clean_error(&run, &["rank-00000.safetensors", "truncated"]);

    std::fs::write(dir.join("manifest.json"), "{ not json").unwrap();
    for cmd in ["inspect", "verify"] {
        let run = strata(&["checkpoint", cmd, dir.to_str().unwrap()]);
        assert_clean_error(&run, &["manifest.json", "does not parse"]);
    }
    let missing = root.join("step-000099");
    let run = strata(&["checkpoint", "verify", missing.to_str().unwrap()]);
    assert_clean_error(&run, &["step-000099", "no such checkpoint directory"]);
    let empty = scratch("ckpt-cli-empty");
    let run = strata(&["checkpoint", "inspect", empty.to_str().unwrap()]);
    assert_clean_error(&run, &["holds no complete checkpoint"]);
}
