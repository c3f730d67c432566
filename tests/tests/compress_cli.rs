//! `strata generate` and `strata quantize` end to end through the binary: a character
//! model trained for a few steps by `strata launch` generates text on one rank and over
//! mpiexec (pp = 2, tp = 2) with the same greedy tokens; the same seed repeats sampled
//! text; the measurements line names prefill and decode tokens/s, p50/p99 time per token,
//! peak memory and idle share per rank; `quantize` writes an int8 checkpoint that
//! `generate` runs on every layout, and `strata eval` evaluates on every layout;
//! `compress-report` puts the dense model, its int8 and pruned variants in one table whose
//! losses are `strata eval`'s and whose bytes are the safetensors files' payloads; bad
//! flags exit 2 with one line naming the flag.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use strata_tests::{assert_clean_error, repo_root, run_strata, scratch, write, Run};

const LIMIT: Duration = Duration::from_secs(240);

/// A 4-layer character GPT (seq_len 32) trained 3 steps on tinyshakespeare; its
/// checkpoint root, made once per test binary.
fn trained() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = scratch("compress-cli-train");
        let data = repo_root().join("data/tinyshakespeare.txt");
        let cfg = format!(
            "model: {{vocab: auto, seq_len: 32, d_model: 32, n_heads: 4, n_layers: 4, d_ff: 64}}
parallel: {{pp: 1, tp: 1, dp: 1, microbatches: 2, micro_batch_size: 2, schedule: gpipe}}
train: {{steps: 3, lr: 1.0e-2, seed: 7, data: {}, eval_every: 0, log_every: 1, threads: 1}}
output: {{dir: {}}}
",
            data.display(),
            dir.join("run").display()
        );
        let cfg = write(&dir, "train.yaml", &cfg);
        let run = strata(&["launch", cfg.to_str().unwrap()]);
        assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
        dir.join("run/checkpoints")
    })
}

fn strata(args: &[&str]) -> Run {
    run_strata(args, &[], LIMIT)
}

fn ok(run: Run) -> Run {
    assert!(!run.timed_out, "hung: {}", run.stderr);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    run
}

/// `strata generate SOURCE --json` with extra flags: the texts.
fn texts(source: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["generate", source.to_str().unwrap(), "--json"];
    args.extend_from_slice(extra);
    let run = ok(strata(&args));
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    v["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn generate_prints_text_then_measurements_and_layouts_agree() {
    let ckpt = trained();
    let run = ok(strata(&[
        "generate",
        ckpt.to_str().unwrap(),
        "--prompt",
        "ROMEO:",
        "--max-new-tokens",
        "8",
    ]));
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{}", run.stdout);
    assert!(lines[0].starts_with("ROMEO:"), "{}", run.stdout);
    assert_eq!(lines[0].chars().count(), 6 + 8, "{}", run.stdout);
    for needle in [
        "prefill", "decode", "tokens/s", "p50", "p99", "rank 0", "peak", "idle",
    ] {
        assert!(
            lines[1].contains(needle),
            "`{needle}` missing: {}",
            lines[1]
        );
    }

    // Several prompts, greedy: one rank and pp = 2 × tp = 2 over mpiexec agree.
    let dir = scratch("compress-cli-generate");
    let prompts = write(&dir, "prompts.txt", "ROMEO:\n\nFirst Citizen:\nTo be\n");
    let p = prompts.to_str().unwrap();
    let one = texts(ckpt, &["--prompts", p, "--max-new-tokens", "10"]);
    assert_eq!(one.len(), 3, "empty lines are skipped: {one:?}");
    assert!(one[1].starts_with("First Citizen:"), "{one:?}");
    let four = texts(
        ckpt,
        &[
            "--prompts",
            p,
            "--max-new-tokens",
            "10",
            "--layout",
            "pp=2,tp=2",
        ],
    );
    assert_eq!(one, four);
    let run = ok(strata(&[
        "generate",
        ckpt.to_str().unwrap(),
        "--prompts",
        p,
        "--max-new-tokens",
        "4",
        "--layout",
        "pp=2,tp=2",
    ]));
    let last = run.stdout.lines().last().unwrap();
    for r in 0..4 {
        assert!(last.contains(&format!("rank {r} ")), "{last}");
    }

    // Sampling: the same seed repeats, another seed (almost surely) does not.
    let sample = |seed: &str| {
        texts(
            ckpt,
            &[
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "24",
                "--temperature",
                "1.0",
                "--top-k",
                "20",
                "--top-p",
                "0.95",
                "--seed",
                seed,
            ],
        )
    };
    assert_eq!(sample("3"), sample("3"));
    assert_ne!(sample("3"), sample("4"));

    // Threads per rank: the checkpoint's train.threads unless --threads says otherwise.
    let threads = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            ckpt.to_str().unwrap(),
            "--json",
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "2",
        ];
        args.extend_from_slice(extra);
        let run = ok(strata(&args));
        let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        v["report"]["ranks"][0]["threads"].as_u64().unwrap()
    };
    assert_eq!(threads(&[]), 1);
    assert_eq!(threads(&["--threads", "2"]), 2);
}

#[test]
fn quantize_writes_an_int8_checkpoint_that_generates_on_every_layout() {
    let ckpt = trained();
    let dir = scratch("compress-cli-quantize");
    let out = dir.join("int8");
    let run = ok(strata(&[
        "quantize",
        ckpt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--scheme",
        "int8",
    ]));
    assert!(
        run.stdout.contains("quantised 17 linear weights to int8"),
        "{}",
        run.stdout
    );
    let inspect = ok(strata(&["checkpoint", "verify", out.to_str().unwrap()]));
    assert!(inspect.stdout.contains("step 3"), "{}", inspect.stdout);
    let one = texts(&out, &["--prompt", "ROMEO:", "--max-new-tokens", "10"]);
    let four = texts(
        &out,
        &[
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "10",
            "--layout",
            "pp=2,tp=2",
        ],
    );
    assert_eq!(one, four);
    // A second quantisation of a quantised checkpoint is refused.
    let again = strata(&[
        "quantize",
        out.to_str().unwrap(),
        "--out",
        dir.join("twice").to_str().unwrap(),
    ]);
    assert_clean_error(&again, &["int8"]);
}

#[test]
fn bad_flags_exit_2_naming_the_flag() {
    let ckpt = trained();
    let c = ckpt.to_str().unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", c];
        if !extra.contains(&"--max-new-tokens") {
            args.extend(["--max-new-tokens", "4"]);
        }
        args.extend_from_slice(extra);
        strata(&args)
    };
    assert_clean_error(&gen(&["--prompt", "ROMEO€"]), &["--prompt", "'€'"]);
    assert_clean_error(&gen(&[]), &["--prompt"]);
    assert_clean_error(
        &gen(&["--prompt", "a", "--max-new-tokens", "40"]),
        &["--max-new-tokens", "sliding window", "31"],
    );
    assert_clean_error(&gen(&["--prompt", "a", "--layout", "pp=5"]), &["--layout"]);
    assert_clean_error(&gen(&["--prompt", "a", "--layout", "tp=3"]), &["--layout"]);
    assert_clean_error(
        &gen(&["--prompt", "a", "--layout", "pp2"]),
        &["--layout", "pp=P,tp=T"],
    );
    assert_clean_error(&gen(&["--prompt", "a", "--top-p", "2"]), &["--top-p"]);
    assert_clean_error(&gen(&["--prompt", "a", "--top-k", "0"]), &["--top-k"]);
    assert_clean_error(&gen(&["--prompt", "a", "--threads", "0"]), &["--threads"]);
    assert_clean_error(
        &gen(&["--prompt", "a", "--temperature=-1"]),
        &["--temperature"],
    );
    let missing = scratch("compress-cli-missing").join("nothing");
    assert_clean_error(
        &strata(&["generate", missing.to_str().unwrap(), "--prompt", "a"]),
        &["nothing"],
    );
    let out = scratch("compress-cli-bad").join("q");
    let quant = |scheme: &str| {
        strata(&[
            "quantize",
            c,
            "--out",
            out.to_str().unwrap(),
            "--scheme",
            scheme,
        ])
    };
    assert_clean_error(&quant("int4"), &["--scheme"]);
    assert_clean_error(&quant("fp7"), &["--scheme", "fp7"]);
    assert!(!out.exists(), "a refused quantisation writes nothing");
}

/// `strata eval SOURCE --json --data DATA --layout L`: the loss.
fn eval_loss(source: &Path, data: &Path, layout: &str) -> f64 {
    let run = ok(strata(&[
        "eval",
        source.to_str().unwrap(),
        "--json",
        "--data",
        data.to_str().unwrap(),
        "--layout",
        layout,
    ]));
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    v["loss"].as_f64().unwrap()
}

/// Bytes of tensor data in a checkpoint's safetensors files (file sizes minus the 8-byte
/// length and the JSON header).
fn payload_bytes(step_dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(step_dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
            total += bytes.len() as u64 - 8 - header;
        }
    }
    total
}

#[test]
fn compress_report_agrees_with_eval_and_the_files() {
    let ckpt = trained();
    let c = ckpt.to_str().unwrap();
    let dir = scratch("compress-cli-report");
    let (q, p) = (dir.join("int8"), dir.join("magnitude"));
    ok(strata(&["quantize", c, "--out", q.to_str().unwrap()]));
    ok(strata(&[
        "prune",
        c,
        "--out",
        p.to_str().unwrap(),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
    ]));
    // A short text (the full validation split takes ~4 s of CPU per evaluation).
    let full = std::fs::read_to_string(repo_root().join("data/tinyshakespeare.txt")).unwrap();
    let data = write(&dir, "val.txt", &full[full.len() - 4000..]);
    // eval understands int8 checkpoints on every layout (the vocabulary of 65 pads to 66
    // columns at tp = 2: the int8 head keeps the padding).
    let q_loss = eval_loss(&q, &data, "pp=1");
    assert!((eval_loss(&q, &data, "pp=2,tp=2") - q_loss).abs() < 1e-4);
    let args = [
        "compress-report",
        c,
        q.to_str().unwrap(),
        p.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--prompt-len",
        "6",
        "--max-new-tokens",
        "8",
        "--runs",
        "2",
    ];
    let run = ok(strata(&[&args[..], &["--json"]].concat()));
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    let field = |r: usize, k: &str| rows[r][k].as_f64().unwrap();
    let bytes = |r: usize, k: &str| rows[r][k].as_u64().unwrap();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["variant"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dense", "int8", "magnitude 50.0%"]);
    for (r, source) in [ckpt, q.as_path(), p.as_path()].iter().enumerate() {
        let want = if r == 1 {
            q_loss
        } else {
            eval_loss(source, &data, "pp=1")
        };
        assert_eq!(
            field(r, "val_loss"),
            want,
            "row {r}: strata eval says {want}"
        );
        assert!((field(r, "delta") - (want - field(0, "val_loss"))).abs() < 1e-12);
        assert!(field(r, "decode_tokens_per_s") > 0.0 && field(r, "prefill_tokens_per_s") > 0.0);
        assert_eq!(rows[r]["decode_runs"].as_array().unwrap().len(), 2);
    }
    assert!(
        field(1, "delta").abs() < 0.05,
        "int8 moved the loss too far"
    );
    assert_eq!(
        (v["prompt_tokens"].as_u64(), v["new_tokens"].as_u64()),
        (Some(6), Some(8))
    );
    // Bytes: the dense checkpoint holds weights and AdamW's two moments of each; int8
    // holds only its codes, scales and the other model tensors; the pruned one holds the
    // dense weights, one byte of mask per pruned weight, and the moments.
    let dense_dir = ckpt.join("step-000003");
    let w = bytes(0, "weight_bytes");
    assert_eq!(bytes(0, "optimizer_bytes"), 2 * w);
    assert_eq!(3 * w, payload_bytes(&dense_dir));
    assert_eq!(
        bytes(1, "weight_bytes"),
        payload_bytes(&q.join("step-000003"))
    );
    assert!(bytes(1, "weight_bytes") * 2 < w);
    assert_eq!(bytes(2, "weight_bytes"), w);
    let masks = bytes(2, "mask_bytes");
    assert!(masks > 0);
    assert_eq!(
        w + masks + bytes(2, "optimizer_bytes"),
        payload_bytes(&p.join("step-000003"))
    );
    for (r, row) in rows.iter().enumerate() {
        let on_disk: u64 = std::fs::read_dir(row["path"].as_str().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(bytes(r, "file_bytes"), on_disk);
    }
    // The table: a heading line, then one row per checkpoint with its loss.
    let table = ok(strata(&[&args[..], &["--no-speed"]].concat())).stdout;
    assert!(
        table.contains("| variant | step | val loss | delta | weight bytes"),
        "{table}"
    );
    for (r, name) in names.iter().enumerate() {
        let cell = format!("| {name} | 3 | {:.4} |", field(r, "val_loss"));
        assert!(table.contains(&cell), "`{cell}` missing: {table}");
    }
    // Bad input: a missing variant, an empty prompt window, too many tokens, zero runs.
    let missing = dir.join("nothing");
    let d = data.to_str().unwrap();
    let bad = |extra: &[&str]| strata(&[&["compress-report", c, "--data", d][..], extra].concat());
    assert_clean_error(&bad(&[missing.to_str().unwrap()]), &["nothing"]);
    assert_clean_error(&bad(&["--prompt-len", "40"]), &["--prompt-len"]);
    assert_clean_error(
        &bad(&["--prompt-len", "8", "--max-new-tokens", "30"]),
        &["--max-new-tokens", "sliding window"],
    );
    assert_clean_error(&bad(&["--runs", "0"]), &["--runs"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn prune_refuses_a_sparsity_outside_0_1_and_unknown_methods() {
    let ckpt = trained();
    let out = scratch("compress-cli-prune-bad").join("p");
    let prune = |method: &str, sparsity: &str| {
        strata(&[
            "prune",
            ckpt.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--method",
            method,
            &format!("--sparsity={sparsity}"),
        ])
    };
    for s in ["0", "1", "1.5", "-0.2"] {
        assert_clean_error(&prune("magnitude", s), &["--sparsity", "outside (0, 1)"]);
    }
    assert_clean_error(&prune("sensitivity", "1"), &["--sparsity"]);
    assert_clean_error(&prune("2:4", "0.7"), &["--sparsity"]);
    assert_clean_error(&prune("random", "0.5"), &["--method", "random"]);
    assert!(!out.exists(), "a refused pruning writes nothing");
}
