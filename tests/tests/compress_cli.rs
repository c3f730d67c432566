//! `strata generate` and `strata quantize` end to end through the binary: a character
//! model trained for a few steps by `strata launch` generates text on one rank and over
//! mpiexec (pp = 2, tp = 2) with the same greedy tokens; the same seed repeats sampled
//! text; the measurements line names prefill and decode tokens/s, p50/p99 time per token,
//! peak memory and idle share per rank; `quantize` writes an int8 checkpoint that
//! `generate` runs on every layout; bad flags exit 2 with one line naming the flag.

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
train: {{steps: 3, lr: 1.0e-2, seed: 7, data: {}, eval_every: 0, log_every: 1}}
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
