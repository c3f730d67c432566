//! Store tests with in-process ranks (one thread per rank on `LocalComm`): write under one
//! layout, read under another bit for bit, crash mid-save, corruption, pruning.

use super::*;
use crate::comm::local::{on_ranks, LocalComm};
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::shard::{Block, ShardSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("strata-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A global tensor of distinct random values (every bit pattern matters).
fn global(name: &str, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = Rng::from_key(&[crate::rng::hash_str(name)]);
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::from_slice(&v).view(dims.as_slice())
}

fn block(g: Vec<usize>, l: Vec<usize>, s: Vec<usize>) -> Block {
    Block {
        global_offset: g,
        local_offset: l,
        shape: s,
    }
}

/// The local tensor a spec describes, cut from the global tensor (padding = `pad`).
fn local_of(g: &Tensor, local_shape: &[usize], spec: &ShardSpec, pad: f64) -> Tensor {
    let dims: Vec<i64> = local_shape.iter().map(|&d| d as i64).collect();
    let out = Tensor::full(dims.as_slice(), pad, (g.kind(), Device::Cpu));
    for b in &spec.blocks {
        let mut src = g.shallow_clone();
        let mut dst = out.shallow_clone();
        for d in 0..b.shape.len() {
            src = src.narrow(d as i64, b.global_offset[d] as i64, b.shape[d] as i64);
            dst = dst.narrow(d as i64, b.local_offset[d] as i64, b.shape[d] as i64);
        }
        dst.copy_(&src);
    }
    out
}

fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    a.size() == b.size() && a.kind() == b.kind() && a.equal(b)
}

/// Layout A on 2 ranks: `w` [6, 8] by rows; `qkv` [4, 12] by heads inside q|k|v (three
/// column blocks per rank); `wte` [10, 4] padded to 12 rows by rows; `bias` [8] owned by
/// rank 0; an f64 and an i8 tensor owned by rank 1 (dtype ordering and alignment).
fn layout_a(rank: usize) -> Vec<(String, Vec<usize>, ShardSpec)> {
    let r = rank;
    let mut out = vec![
        (
            "w".to_string(),
            vec![3, 8],
            ShardSpec {
                global_shape: vec![6, 8],
                blocks: vec![block(vec![3 * r, 0], vec![0, 0], vec![3, 8])],
            },
        ),
        (
            "block.0.attn.qkv.weight".to_string(),
            vec![4, 6],
            ShardSpec {
                global_shape: vec![4, 12],
                blocks: (0..3)
                    .map(|j| block(vec![0, 4 * j + 2 * r], vec![0, 2 * j], vec![4, 2]))
                    .collect(),
            },
        ),
        (
            "embed.wte".to_string(),
            vec![6, 4],
            ShardSpec {
                global_shape: vec![10, 4],
                blocks: vec![block(vec![6 * r, 0], vec![0, 0], vec![6 - 2 * r, 4])],
            },
        ),
    ];
    if r == 0 {
        out.push(("bias".to_string(), vec![8], ShardSpec::full(&[8])));
    } else {
        out.push(("scale64".to_string(), vec![3], ShardSpec::full(&[3])));
        out.push(("codes8".to_string(), vec![5], ShardSpec::full(&[5])));
    }
    out
}

/// Layout B on 3 ranks: `w` by uneven column ranges; `qkv` replicated; `wte` padded to 12
/// rows, 4 per rank (rank 2: 2 real rows + 2 padding); the rest replicated.
fn layout_b(rank: usize) -> Vec<(String, Vec<usize>, ShardSpec)> {
    let r = rank;
    let cols = [(0, 3), (3, 3), (6, 2)][r];
    let rows = [4, 4, 2][r];
    vec![
        (
            "w".to_string(),
            vec![6, cols.1],
            ShardSpec {
                global_shape: vec![6, 8],
                blocks: vec![block(vec![0, cols.0], vec![0, 0], vec![6, cols.1])],
            },
        ),
        (
            "block.0.attn.qkv.weight".to_string(),
            vec![4, 12],
            ShardSpec::full(&[4, 12]),
        ),
        (
            "embed.wte".to_string(),
            vec![4, 4],
            ShardSpec {
                global_shape: vec![10, 4],
                blocks: vec![block(vec![4 * r, 0], vec![0, 0], vec![rows, 4])],
            },
        ),
        ("bias".to_string(), vec![8], ShardSpec::full(&[8])),
        ("scale64".to_string(), vec![3], ShardSpec::full(&[3])),
        ("codes8".to_string(), vec![5], ShardSpec::full(&[5])),
    ]
}

/// The global value of every test tensor (with `salt` mixed in, to tell saves apart).
fn globals(salt: &str) -> BTreeMap<String, Tensor> {
    let mut m = BTreeMap::new();
    for (name, shape) in [
        ("w", vec![6, 8]),
        ("block.0.attn.qkv.weight", vec![4, 12]),
        ("embed.wte", vec![10, 4]),
        ("bias", vec![8]),
    ] {
        m.insert(name.to_string(), global(&format!("{salt}{name}"), &shape));
    }
    m.insert(
        "scale64".into(),
        global(&format!("{salt}s"), &[3]).to_kind(Kind::Double) / 3.0,
    );
    m.insert(
        "codes8".into(),
        Tensor::from_slice(&[-128i8, -1, 0, 7, 127]),
    );
    m
}

fn meta(step: usize) -> SaveMeta {
    SaveMeta {
        step,
        config: "model: {}\n".into(),
        vocab: Some(vec!['a', 'b', '\n']),
        plan: serde_json::json!({"stages": 2}),
        layout: Layout {
            pp: 1,
            tp: 2,
            dp: 1,
            virtual_stages: 1,
            schedule: "1f1b".into(),
        },
        train_state: serde_json::json!({"step": step, "rng": [1, 2]}),
        extra: BTreeMap::new(),
    }
}

/// Saves `globals(salt)` under layout A on 2 ranks; `fault` makes rank 1 die mid-save.
fn save_a(
    root: &Path,
    step: usize,
    salt: &str,
    keep: usize,
    fault: Option<SaveFault>,
) -> Vec<Result<PathBuf>> {
    let (root, salt) = (root.to_path_buf(), salt.to_string());
    on_ranks(2, move |r, comm| {
        let g = globals(&salt);
        let tensors: Vec<SavedTensor> = layout_a(r)
            .into_iter()
            .map(|(name, local, spec)| SavedTensor {
                tensor: local_of(&g[&name], &local, &spec, -7.0),
                name,
                spec,
            })
            .collect();
        let opts = SaveOptions {
            keep,
            fault: fault.filter(|_| r == 1),
        };
        save(&root, &meta(step), &tensors, comm, &opts)
    })
}

/// Reads every tensor under layout B and checks it bit for bit against `globals(salt)`,
/// padding untouched.
fn check_b(path: &Path, salt: &str) {
    let g = globals(salt);
    for r in 0..3 {
        let mut ck = Checkpoint::open(path).unwrap();
        for (name, local, spec) in layout_b(r) {
            let dims: Vec<i64> = local.iter().map(|&d| d as i64).collect();
            let t = Tensor::full(dims.as_slice(), -3.0, (g[&name].kind(), Device::Cpu));
            ck.read_into(&name, &t, &spec).unwrap();
            let want = local_of(&g[&name], &local, &spec, -3.0);
            assert!(same_bits(&t, &want), "rank {r} {name}: {t} vs {want}");
        }
    }
}

#[test]
fn written_under_one_layout_read_under_another_bit_for_bit() {
    let root = scratch("reshard");
    for out in save_a(&root, 12, "x", 0, None) {
        assert_eq!(out.unwrap(), root.join("step-000012"));
    }
    assert_eq!(read_latest(&root).unwrap(), Some(root.join("step-000012")));
    check_b(&root, "x");
    check_b(&root.join("step-000012"), "x");
    // Whole tensors, and the manifest's bookkeeping.
    let mut ck = Checkpoint::open(&root).unwrap();
    let g = globals("x");
    for (name, t) in &g {
        assert!(same_bits(&ck.read_full(name).unwrap(), t), "{name}");
    }
    let m = ck.manifest();
    assert_eq!(m.step, 12);
    assert_eq!(m.vocab, Some(vec!['a', 'b', '\n']));
    assert_eq!(m.train_state["rng"], serde_json::json!([1, 2]));
    assert_eq!(m.tensors["block.0.attn.qkv.weight"].pieces.len(), 6);
    assert_eq!(m.files.len(), 2);
    // The files are plain safetensors: the crate reads them, with our metadata.
    let bytes = std::fs::read(root.join("step-000012/rank-00000.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let bias = st.tensor("bias").unwrap();
    assert_eq!(bias.shape(), &[8]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    assert!(st.tensor("w@3,0").is_err() && st.tensor("w@0,0").is_ok());
    let report = verify(&root).unwrap();
    assert_eq!((report.step, report.files, report.tensors), (12, 2, 6));
    let summary = inspect(&root).unwrap().to_string();
    assert!(
        summary.contains("embed.wte") && summary.contains("step       12"),
        "{summary}"
    );
}

#[test]
fn a_crash_mid_save_leaves_the_previous_checkpoint_loadable() {
    let root = scratch("crash");
    save_a(&root, 1, "one", 0, None).into_iter().for_each(|r| {
        r.unwrap();
    });
    let outs = save_a(&root, 2, "two", 0, Some(SaveFault::Fail));
    assert!(
        matches!(outs[1], Err(Error::Injected { step: 2 })),
        "{:?}",
        outs[1]
    );
    assert!(
        matches!(outs[0], Err(Error::PeerFailed(_))),
        "{:?}",
        outs[0]
    );
    // Part of rank 1's file is on disk, in the tmp directory only.
    let partial = root.join("step-000002.tmp/rank-00001.safetensors");
    assert!(partial.is_file());
    assert!(!root.join("step-000002").exists());
    assert_eq!(read_latest(&root).unwrap(), Some(root.join("step-000001")));
    assert_eq!(list_checkpoints(&root).unwrap().len(), 1);
    check_b(&root, "one");
    // The next save cleans the stale directory up.
    save_a(&root, 3, "three", 0, None)
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    assert!(!root.join("step-000002.tmp").exists());
    check_b(&root, "three");
    check_b(&root.join("step-000001"), "one");
}

/// Flips one byte at `at` bytes before the end of `path`.
fn flip_byte(path: &Path, from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let i = bytes.len() - from_end;
    bytes[i] ^= 0x40;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file_and_tensor() {
    let root = scratch("corrupt");
    save_a(&root, 4, "c", 0, None).into_iter().for_each(|r| {
        r.unwrap();
    });
    let dir = root.join("step-000004");
    let file1 = dir.join("rank-00001.safetensors");
    flip_byte(&file1, 3);
    let e = verify(&root).unwrap_err();
    let msg = e.to_string();
    assert!(e.is_user_error(), "{msg}");
    assert!(
        msg.contains(&file1.display().to_string()) && msg.contains("checksum mismatch"),
        "{msg}"
    );
    assert!(msg.contains("fix:") && !msg.contains('\n'), "{msg}");
    // Reading a tensor with a piece in the bad file refuses too; one stored only in the
    // good file still reads.
    let (_, local, spec) = layout_b(0).swap_remove(0);
    let t = Tensor::zeros([6, local[1] as i64], (Kind::Float, Device::Cpu));
    let mut ck = Checkpoint::open(&root).unwrap();
    ck.read_into(
        "bias",
        &Tensor::zeros([8], (Kind::Float, Device::Cpu)),
        &ShardSpec::full(&[8]),
    )
    .unwrap();
    let msg = ck.read_into("w", &t, &spec).unwrap_err().to_string();
    assert!(
        msg.contains("rank-00001.safetensors") && msg.contains("checksum"),
        "{msg}"
    );

    // Truncated.
    let bytes = std::fs::read(&file1).unwrap();
    std::fs::write(&file1, &bytes[..bytes.len() - 10]).unwrap();
    let msg = verify(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("rank-00001.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
    // Missing.
    std::fs::remove_file(&file1).unwrap();
    let msg = verify(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("rank-00001.safetensors") && msg.contains("cannot open"),
        "{msg}"
    );

    // Unknown tensor, wrong shape, wrong dtype: named, user errors.
    let mut ck = Checkpoint::open(&dir).unwrap();
    let e = ck
        .read_into(
            "nope",
            &Tensor::zeros([8], (Kind::Float, Device::Cpu)),
            &ShardSpec::full(&[8]),
        )
        .unwrap_err();
    assert!(
        e.is_user_error() && e.to_string().contains("(tensor nope)"),
        "{e}"
    );
    let e = ck
        .read_into(
            "bias",
            &Tensor::zeros([9], (Kind::Float, Device::Cpu)),
            &ShardSpec::full(&[9]),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("(tensor bias)") && e.to_string().contains("[8]"),
        "{e}"
    );
    let e = ck
        .read_into(
            "bias",
            &Tensor::zeros([8], (Kind::Double, Device::Cpu)),
            &ShardSpec::full(&[8]),
        )
        .unwrap_err();
    assert!(
        e.to_string().contains("F32") && e.to_string().contains("Double"),
        "{e}"
    );

    // A manifest that does not parse.
    std::fs::write(dir.join(MANIFEST), "{\"format\": ").unwrap();
    let e = Checkpoint::open(&dir).err().unwrap();
    assert!(
        e.is_user_error() && e.to_string().contains("does not parse"),
        "{e}"
    );
    // Not a checkpoint at all.
    let e = Checkpoint::open(&root.join("nowhere")).err().unwrap();
    assert!(
        e.is_user_error() && e.to_string().contains("no such checkpoint"),
        "{e}"
    );
}

#[test]
fn keep_prunes_old_checkpoints_and_resaving_a_step_replaces_it() {
    let root = scratch("keep");
    for step in 1..=5 {
        save_a(&root, step, &format!("s{step}"), 2, None)
            .into_iter()
            .for_each(|r| {
                r.unwrap();
            });
    }
    let steps: Vec<usize> = list_checkpoints(&root)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(steps, vec![4, 5]);
    assert_eq!(read_latest(&root).unwrap(), Some(root.join("step-000005")));
    // keep = 0 keeps everything; re-saving step 5 replaces its contents.
    save_a(&root, 5, "again", 0, None)
        .into_iter()
        .for_each(|r| {
            r.unwrap();
        });
    check_b(&root, "again");
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(TMP_SUFFIX))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Without `latest` the newest complete checkpoint is used; a dangling one is refused.
    std::fs::remove_file(root.join(LATEST)).unwrap();
    assert_eq!(read_latest(&root).unwrap(), Some(root.join("step-000005")));
    std::fs::write(root.join(LATEST), "step-000009\n").unwrap();
    let e = Checkpoint::open(&root).err().unwrap();
    assert!(
        e.is_user_error() && e.to_string().contains("step-000009"),
        "{e}"
    );
}

#[test]
fn ranks_that_own_nothing_write_no_file() {
    let root = scratch("owners");
    let outs = on_ranks(3, {
        let root = root.clone();
        move |r, comm| {
            let tensors = if r == 1 {
                vec![SavedTensor {
                    name: "only".into(),
                    tensor: global("only", &[2, 3]),
                    spec: ShardSpec::full(&[2, 3]),
                }]
            } else {
                Vec::new()
            };
            save(
                &root,
                &meta(1),
                &tensors,
                comm as &mut dyn Communicator,
                &SaveOptions::default(),
            )
        }
    });
    outs.into_iter().for_each(|r| {
        r.unwrap();
    });
    let ck = Checkpoint::open(&root).unwrap();
    assert_eq!(
        ck.manifest().files.keys().collect::<Vec<_>>(),
        vec!["rank-00001.safetensors"]
    );
    // Two ranks claiming the same block is an ownership bug, refused before commit.
    let outs = on_ranks(2, {
        let root = root.clone();
        move |_, comm| {
            let tensors = vec![SavedTensor {
                name: "dup".into(),
                tensor: global("dup", &[2]),
                spec: ShardSpec::full(&[2]),
            }];
            save(&root, &meta(2), &tensors, comm, &SaveOptions::default())
        }
    });
    let msg = outs[0].as_ref().unwrap_err().to_string();
    assert!(msg.contains("overlap"), "{msg}");
    assert!(outs[1].is_err());
    assert_eq!(read_latest(&root).unwrap(), Some(root.join("step-000001")));
}

/// A 1-rank save of one tensor under `root` with `config` as the manifest's config.
fn save_with_config(root: &Path, step: usize, config: String) {
    let mut comm = LocalComm::group(1).pop().unwrap();
    let mut m = meta(step);
    m.config = config;
    m.vocab = None;
    let tensors = vec![SavedTensor {
        name: "w".into(),
        tensor: global("w", &[2, 2]),
        spec: ShardSpec::full(&[2, 2]),
    }];
    save(root, &m, &tensors, &mut comm, &SaveOptions::default()).unwrap();
}

#[test]
fn train_resume_is_checked_before_the_run() {
    let dir = scratch("resume-cfg");
    let good = format!(
        "model: {{vocab: 32, seq_len: 8, d_model: 16, n_heads: 2, n_layers: 4, d_ff: 32}}
parallel: {{pp: 2, microbatches: 4, micro_batch_size: 2}}
train: {{steps: 6, lr: 1.0e-3, seed: 1, data: random}}
output: {{dir: {}}}
",
        dir.join("run").display()
    );
    let parse = |text: &str| crate::Config::parse(text, Path::new("x.yaml"));
    let with = |resume: &str| {
        good.replace(
            "data: random}",
            &format!("data: random, resume: {resume}}}"),
        )
    };
    // `latest` with nothing saved yet starts fresh.
    let cfg = parse(&with("latest")).unwrap();
    assert_eq!(cfg.checkpoint_dir(), dir.join("run/checkpoints"));
    assert_eq!(cfg.resume_from().unwrap(), None);
    // A path that does not exist names the key.
    let e = parse(&with("no/such/ckpt")).unwrap_err();
    assert!(e.is_user_error(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("train.resume") && msg.contains("no/such/ckpt") && msg.contains("fix:"),
        "{msg}"
    );
    // A checkpoint of this model resumes, by `latest` or by path; layouts may differ.
    let root = cfg.checkpoint_dir();
    save_with_config(&root, 3, cfg.resolved_yaml().unwrap());
    let cfg = parse(&with("latest").replace("pp: 2", "pp: 1")).unwrap();
    assert_eq!(cfg.resume_from().unwrap(), Some(root.join("step-000003")));
    let by_path = with(&root.display().to_string());
    assert_eq!(
        parse(&by_path).unwrap().resume_from().unwrap(),
        Some(root.join("step-000003"))
    );
    // Nothing left to train.
    let msg = parse(&with("latest").replace("steps: 6", "steps: 3"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("train.resume") && msg.contains("nothing is left to train"),
        "{msg}"
    );
    // Another model is refused by key.
    let msg = parse(&with("latest").replace("d_model: 16", "d_model: 32"))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("model.d_model = 16, but the config has 32"),
        "{msg}"
    );
    let msg = parse(&with("latest").replace("d_ff: 32}", "d_ff: 32, tie_embeddings: true}"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("model.tie_embeddings = false"), "{msg}");
    // A damaged manifest is refused naming the key and the file.
    std::fs::write(root.join("step-000003").join(MANIFEST), "[]").unwrap();
    let msg = parse(&with("latest")).unwrap_err().to_string();
    assert!(
        msg.contains("train.resume")
            && msg.contains("manifest.json")
            && msg.contains("does not parse"),
        "{msg}"
    );
    // checkpoint.* keys.
    let text = format!(
        "{good}checkpoint: {{every: 2, keep: 3, dir: {}}}\n",
        dir.join("ck").display()
    );
    let cfg = parse(&text).unwrap();
    assert_eq!(
        (
            cfg.checkpoint.every,
            cfg.checkpoint.keep,
            cfg.checkpoint.enabled
        ),
        (2, 3, true)
    );
    assert_eq!(cfg.checkpoint_dir(), dir.join("ck"));
    let msg = parse(&format!("{good}checkpoint: {{every: -1}}\n"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("checkpoint.every"), "{msg}");
    let msg = parse(&format!("{good}checkpoint: {{keepp: 1}}\n"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("unknown field `keepp`"), "{msg}");
}
