//! `strata plan` (tables, JSON, --auto) and `strata profile` end to end, and the
//! partitioner's bad-input errors at the CLI: one line, exit code 2, naming the field and
//! the numbers.

use std::time::Duration;
use strata_tests::{assert_clean_error, repo_root, run_strata, scratch, write, Run};

const LIMIT: Duration = Duration::from_secs(60);

fn plan_text(name: &str, text: &str, extra: &[&str]) -> Run {
    let dir = scratch(name);
    let cfg = write(&dir, "cfg.yaml", text);
    let mut args = vec!["plan", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    run_strata(&args, &[], LIMIT)
}

fn tiny(parallel: &str) -> String {
    format!(
        "model: {{vocab: 64, seq_len: 16, d_model: 48, n_heads: 6, n_layers: 4, d_ff: 96}}
parallel: {{{parallel}}}
train: {{steps: 1, lr: 1.0e-2, data: random}}
output: {{dir: runs/plan-cli}}
"
    )
}

#[test]
fn llama_48_plans() {
    let cfg = repo_root().join("configs/llama-48.yaml");
    let run = run_strata(&["plan", cfg.to_str().unwrap()], &[], LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for needle in [
        "llama model",
        "embed, block.0-",
        "head",
        "imbalance (max/mean stage time)",
        "optim",
        "cap 80.00GiB",
    ] {
        assert!(
            run.stdout.contains(needle),
            "`{needle}` not in:\n{}",
            run.stdout
        );
    }
    let run = run_strata(&["plan", cfg.to_str().unwrap(), "--json"], &[], LIMIT);
    let plan: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(plan["model"]["arch"], "llama");
    assert_eq!(plan["stages"].as_array().unwrap().len(), 4);
    assert_eq!(plan["stages"][3]["rank"], 3);
}

#[test]
fn auto_plans_world_1024_quickly() {
    let cfg = repo_root().join("configs/llama-48.yaml");
    let run = run_strata(
        &[
            "plan",
            cfg.to_str().unwrap(),
            "--auto",
            "--world",
            "1024",
            "--global-batch",
            "1024",
            "--memory-gib",
            "80",
            "--dtype-bytes",
            "2",
        ],
        &[],
        2 * LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("world 1024") && run.stdout.contains("rejected layout families"),
        "{}",
        run.stdout
    );
    // A guard against a search that blows up, not a benchmark: this process starts
    // libtorch (seconds on a loaded 2-core machine) while the profile test of this file
    // runs mpiexec ranks next to it (alone it takes about 3 s, mostly loading libtorch;
    // 4.6 s measured at load average 7.5). The search itself is timed in-process by
    // partitioner's world_1024_finds_layouts_that_fit_fast (well under a second).
    assert!(run.elapsed < Duration::from_secs(60), "{:?}", run.elapsed);
}

#[test]
fn bad_layouts_name_the_field_and_numbers() {
    let base = "pp: 2, microbatches: 4, micro_batch_size: 2";
    let run = plan_text("tp-heads", &tiny(&format!("{base}, tp: 4")), &[]);
    assert_clean_error(&run, &["model.n_heads = 6", "parallel.tp = 4"]);
    let run = plan_text(
        "pp-layers",
        &tiny("pp: 5, microbatches: 4, micro_batch_size: 2"),
        &[],
    );
    assert_clean_error(&run, &["parallel.pp = 5", "model.n_layers = 4"]);
    let run = plan_text(
        "mem",
        &tiny(&format!("{base}, partition: optimal, memory_gib: 0.00001")),
        &[],
    );
    assert_clean_error(
        &run,
        &["parallel.memory_gib", "needs at least", "bytes", "stage"],
    );
    let run = plan_text(
        "tp-ok",
        &tiny(&format!("{base}, tp: 2, schedule: 1f1b")),
        &[],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("vocab-parallel"), "{}", run.stdout);
}

#[test]
fn profile_then_plan_by_measured_time() {
    let dir = scratch("profile");
    let prof = dir.join("profile.json");
    let cfg = write(
        &dir,
        "cfg.yaml",
        &tiny("pp: 2, microbatches: 4, micro_batch_size: 2, partition: profile, profile: profile.json"),
    );
    let run = run_strata(
        &[
            "profile",
            cfg.to_str().unwrap(),
            "--out",
            prof.to_str().unwrap(),
            "--runs",
            "2",
        ],
        &[],
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // Measured on the real ranks under mpiexec: communication curves, the sgemm peak,
    // the optimizer, an idle rank's memory and layer timings with every rank busy.
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&prof).unwrap()).unwrap();
    let c = &p["calibration"];
    assert_eq!(c["world"], 2, "{c}");
    for key in ["p2p", "matmul", "step", "memory"] {
        assert!(c[key].is_object(), "no {key} in {c}");
    }
    assert!(c["p2p"]["one_way"].as_array().unwrap().len() >= 5);
    assert!(c["matmul"]["flops_per_s"].as_f64().unwrap() > 1e8);
    assert!(c["memory"]["baseline_bytes"].as_u64().unwrap() > 10 << 20);
    assert!(c["all_reduce"][0]["tensor_all_reduce"].is_array(), "{c}");
    assert!(c["layer_sets"].as_array().unwrap().len() >= 4);
    // At tp = 2 every tp group timed its shards with their all-reduces inside; the tp = 1
    // sets carry how much slower a chunk runs than its layers alone.
    let sets = c["layer_sets"].as_array().unwrap();
    assert!(
        sets.iter()
            .any(|s| s["tp"] == 2 && s["collectives"] == true),
        "{c}"
    );
    assert!(
        sets.iter()
            .any(|s| s["tp"] == 1 && s["chunk_scale"][0].as_f64().is_some_and(|k| k > 0.0)),
        "{c}"
    );
    // At the config's micro-batch size, for tp = 1 and 2: the chunk ratio at each depth
    // (1, 2, 4 blocks and the whole model), and at tp = 1 the zero-bubble split.
    for tp in [1, 2] {
        let set = sets
            .iter()
            .find(|s| s["tp"] == tp && s["micro_batch_size"] == 2)
            .unwrap();
        let depths: Vec<u64> = set["chunk_depths"]
            .as_array()
            .unwrap_or_else(|| panic!("no chunk_depths at tp = {tp}: {set}"))
            .iter()
            .map(|d| d["blocks"].as_u64().unwrap())
            .collect();
        assert_eq!(depths, [1, 2, 4], "{set}");
    }
    let split = &sets
        .iter()
        .find(|s| s["tp"] == 1 && s["micro_batch_size"] == 2)
        .unwrap()["split_scale"];
    assert!(split[0].as_f64().is_some_and(|i| i > 0.0), "{c}");
    assert!(split[1].as_f64().is_some_and(|w| w > 0.0), "{c}");
    // ... and the same chunk holding 1, 2 and all 4 microbatches (2 is the reference).
    let stash = &sets
        .iter()
        .find(|s| s["tp"] == 1 && s["micro_batch_size"] == 2)
        .unwrap()["stash_scale"];
    let held: Vec<u64> = stash
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["blocks"].as_u64().unwrap())
        .collect();
    assert_eq!(held, [1, 2, 4], "{c}");
    assert_eq!(stash[1]["fwd"].as_f64(), Some(1.0), "{c}");
    assert!(c["activation_footprint"][0]["measured_bytes"]
        .as_u64()
        .is_some());
    assert!(run.stdout.contains("p2p: latency"), "{}", run.stdout);
    let run = run_strata(&["plan", cfg.to_str().unwrap()], &[], LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("profile split"), "{}", run.stdout);
    assert!(
        run.stdout.contains("costs from the profile") && run.stdout.contains("rank 1 peak memory"),
        "{}",
        run.stdout
    );
    // The auto-planner prices layouts from the same profile.
    let run = run_strata(
        &["plan", cfg.to_str().unwrap(), "--auto", "--world", "2"],
        &[],
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stdout.contains("priced from the profile"),
        "{}",
        run.stdout
    );
    // Without a profile it says so.
    let bare = write(
        &dir,
        "bare.yaml",
        &tiny("pp: 2, microbatches: 4, micro_batch_size: 2"),
    );
    let run = run_strata(
        &["plan", bare.to_str().unwrap(), "--auto", "--world", "2"],
        &[],
        LIMIT,
    );
    assert!(run.stdout.contains("no profile"), "{}", run.stdout);
    let run = run_strata(
        &[
            "plan",
            bare.to_str().unwrap(),
            "--auto",
            "--world",
            "2",
            "--profile",
            prof.to_str().unwrap(),
        ],
        &[],
        LIMIT,
    );
    assert!(
        run.stdout.contains("priced from the profile"),
        "{}",
        run.stdout
    );
}
