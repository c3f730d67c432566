//! The bad-input corpus: every case is a config edit, a flag, a data file or an
//! environment variable that a user can get wrong. Each must exit with code 2 before any
//! rank starts, on one stderr line that starts `strata: error:`, names the field, gives a
//! fix and holds no panic text (`assert_clean_error`; one line also proves that the
//! launcher never printed "launching").
//!
//! To add a case, append a [`Case`] to [`CASES`]: `edit` rewrites the base config
//! (`{dir}` is the case's scratch directory), `files` are written into that directory,
//! `args` is the command line (`{cfg}` is the edited config), and `needles` must all
//! appear in the error.

use std::time::Duration;
use strata_tests::{assert_clean_error, repo_root, run_strata, scratch, tiny_config, Run};

/// One bad input.
struct Case {
    name: &'static str,
    /// (from, to) replacements applied to the base config, in order.
    edit: &'static [(&'static str, &'static str)],
    /// Files written into the case directory: (name, contents).
    files: &'static [(&'static str, &'static [u8])],
    /// The command line; `{cfg}` is the config, `{dir}` the case directory, `{demo}`
    /// configs/demo.yaml, `{configs}` the configs directory.
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
    needles: &'static [&'static str],
}

const BASE: Case = Case {
    name: "",
    edit: &[],
    files: &[],
    args: &["launch", "{cfg}"],
    env: &[],
    needles: &[],
};

/// 40 characters: too few for one window of seq_len 16 in the 10% validation split.
const FORTY: &[u8] = b"First Citizen: Before we proceed any fu\n";
/// Enough text (about 360 characters) for one window of seq_len 16 in each split.
const PROSE: &[u8] = b"First Citizen: Before we proceed any further, hear me speak.
All: Speak, speak. First Citizen: You are all resolved rather to die than to famish?
All: Resolved. resolved. First Citizen: First, you know Caius Marcius is chief enemy to
the people. All: We know't, we know't. First Citizen: Let us kill him, and we'll have
corn at our own price.\n";
const NOT_UTF8: &[u8] =
    b"hello\nworld \xff\xfe and then plenty more ordinary text to read past it\n";

const CASES: &[Case] = &[
    // --- config syntax, keys and types ---
    Case {
        name: "yaml syntax",
        edit: &[("data: random", "data: \"random")],
        needles: &["YAML syntax error at line"],
        ..BASE
    },
    Case {
        name: "unknown model key",
        edit: &[("d_ff: 64", "d_ff: 64, dropout: 0.1")],
        needles: &["model", "unknown field `dropout`"],
        ..BASE
    },
    Case {
        name: "unknown section",
        edit: &[("output:", "extra: {a: 1}\noutput:")],
        needles: &["extra", "unknown field `extra`"],
        ..BASE
    },
    Case {
        name: "missing section",
        edit: &[("output: {dir: {dir}/run}", "")],
        needles: &["missing field `output`"],
        ..BASE
    },
    Case {
        name: "missing key",
        edit: &[("d_model: 32, ", "")],
        needles: &["model", "missing field `d_model`"],
        ..BASE
    },
    Case {
        name: "wrong type",
        edit: &[("steps: 2", "steps: ten")],
        needles: &["train.steps", "invalid type"],
        ..BASE
    },
    Case {
        name: "negative steps",
        edit: &[("steps: 2", "steps: -5")],
        needles: &["train.steps", "positive"],
        ..BASE
    },
    Case {
        name: "zero microbatches",
        edit: &[("microbatches: 4", "microbatches: 0")],
        needles: &["parallel.microbatches", "positive"],
        ..BASE
    },
    Case {
        name: "too many microbatches",
        edit: &[("microbatches: 4", "microbatches: 5000")],
        needles: &["parallel.microbatches", "1024"],
        ..BASE
    },
    Case {
        name: "pp over layers",
        edit: &[("pp: 2", "pp: 9")],
        needles: &["parallel.pp = 9", "model.n_layers = 8"],
        ..BASE
    },
    Case {
        name: "tp does not divide heads",
        edit: &[("tp: 1", "tp: 3")],
        needles: &["parallel.tp = 3"],
        ..BASE
    },
    Case {
        name: "unknown schedule",
        edit: &[("schedule: gpipe", "schedule: pipedream")],
        needles: &["parallel.schedule", "pipedream"],
        ..BASE
    },
    Case {
        name: "too many virtual stages",
        edit: &[("virtual_stages: 1", "virtual_stages: 5")],
        needles: &["parallel.virtual_stages"],
        ..BASE
    },
    Case {
        name: "unknown partition",
        edit: &[("schedule: gpipe", "schedule: gpipe, partition: greedy")],
        needles: &["parallel.partition", "unknown variant"],
        ..BASE
    },
    Case {
        name: "unknown hardware key",
        edit: &[("schedule: gpipe", "schedule: gpipe, hardware: {tflops: 3}")],
        needles: &["parallel.hardware", "tflops"],
        ..BASE
    },
    Case {
        name: "negative memory cap",
        edit: &[("schedule: gpipe", "schedule: gpipe, memory_gib: -2")],
        needles: &["parallel.memory_gib"],
        ..BASE
    },
    Case {
        name: "zero lr",
        edit: &[("lr: 1.0e-2", "lr: 0")],
        needles: &["train.lr", "positive"],
        ..BASE
    },
    Case {
        name: "nan lr",
        edit: &[("lr: 1.0e-2", "lr: .nan")],
        needles: &["train.lr"],
        ..BASE
    },
    Case {
        name: "beta1 of one",
        edit: &[("seed: 7", "seed: 7, beta1: 1.0")],
        needles: &["train.beta1", "[0, 1)"],
        ..BASE
    },
    Case {
        name: "negative weight decay",
        edit: &[("seed: 7", "seed: 7, weight_decay: -0.1")],
        needles: &["train.weight_decay"],
        ..BASE
    },
    Case {
        name: "zero grad clip",
        edit: &[("grad_clip: 1.0", "grad_clip: 0")],
        needles: &["train.grad_clip"],
        ..BASE
    },
    Case {
        name: "min_lr above lr",
        edit: &[("seed: 7", "seed: 7, min_lr: 1.0")],
        needles: &["train.min_lr"],
        ..BASE
    },
    Case {
        name: "vocab auto on random data",
        edit: &[("vocab: 64", "vocab: auto")],
        needles: &["model.vocab", "random"],
        ..BASE
    },
    Case {
        name: "vocab of one",
        edit: &[("vocab: 64", "vocab: 1")],
        needles: &["model.vocab", "at least 2"],
        ..BASE
    },
    Case {
        name: "unknown activation",
        edit: &[("d_ff: 64", "d_ff: 64, activation: relu")],
        needles: &["model.activation", "unknown variant"],
        ..BASE
    },
    Case {
        name: "unknown architecture",
        edit: &[("d_ff: 64", "d_ff: 64, arch: mamba")],
        needles: &["model.arch", "unknown variant"],
        ..BASE
    },
    Case {
        name: "per-layer d_ff of the wrong length",
        edit: &[("d_ff: 64", "d_ff: [64, 64, 32]")],
        needles: &["model.d_ff", "one entry per block", "n_layers = 8"],
        ..BASE
    },
    Case {
        name: "per-layer d_ff with a zero entry",
        edit: &[("d_ff: 64", "d_ff: [64, 0, 64, 64, 64, 64, 64, 64]")],
        needles: &["model.d_ff", "positive integer"],
        ..BASE
    },
    Case {
        name: "per-layer d_ff not divisible by tp",
        edit: &[
            ("d_ff: 64", "d_ff: [64, 64, 40, 64, 64, 64, 64, 63]"),
            ("tp: 1", "tp: 2"),
            ("pp: 2", "pp: 1"),
        ],
        needles: &["model.d_ff", "entry 7", "parallel.tp = 2", "multiple of 2"],
        ..BASE
    },
    Case {
        name: "neuron pruning sparsity outside (0, 1)",
        args: &[
            "prune",
            "{dir}/ckpt",
            "--out",
            "{dir}/out",
            "--method",
            "neurons",
            "--sparsity",
            "1.5",
        ],
        needles: &["--sparsity", "outside (0, 1)"],
        ..BASE
    },
    Case {
        name: "neuron pruning multiple of zero",
        args: &[
            "prune",
            "{dir}/ckpt",
            "--out",
            "{dir}/out",
            "--method",
            "neurons",
            "--sparsity",
            "0.5",
            "--multiple-of",
            "0",
        ],
        needles: &["--multiple-of", "positive integer"],
        ..BASE
    },
    Case {
        name: "multiple-of without neurons",
        args: &[
            "prune",
            "{dir}/ckpt",
            "--out",
            "{dir}/out",
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--multiple-of",
            "8",
        ],
        needles: &["--multiple-of", "--method neurons"],
        ..BASE
    },
    Case {
        name: "kv heads do not divide heads",
        edit: &[("d_ff: 64", "d_ff: 64, n_kv_heads: 3")],
        needles: &["model.n_kv_heads"],
        ..BASE
    },
    Case {
        name: "empty output dir",
        edit: &[("dir: {dir}/run", "dir: \"\"")],
        needles: &["output.dir", "empty"],
        ..BASE
    },
    Case {
        name: "config file missing",
        args: &["launch", "{dir}/no-such.yaml"],
        needles: &["(file)", "cannot read the config"],
        ..BASE
    },
    Case {
        name: "config is a directory",
        args: &["launch", "{dir}"],
        needles: &["(file)", "cannot read the config"],
        ..BASE
    },
    // --- the output directory ---
    Case {
        name: "output dir below a file",
        edit: &[("dir: {dir}/run", "dir: {dir}/afile/run")],
        files: &[("afile", b"not a directory")],
        needles: &["output.dir", "is a file, not a directory"],
        ..BASE
    },
    Case {
        name: "output dir is a file",
        edit: &[("dir: {dir}/run", "dir: {dir}/afile")],
        files: &[("afile", b"not a directory")],
        needles: &["output.dir", "is a file"],
        ..BASE
    },
    Case {
        name: "output dir not writable",
        edit: &[("dir: {dir}/run", "dir: /proc/strata-no-such/run")],
        needles: &["output.dir", "not writable"],
        ..BASE
    },
    // --- data files ---
    Case {
        name: "data file missing",
        edit: &[("data: random", "data: no/such/file.txt")],
        needles: &["train.data", "file not found", "no/such/file.txt"],
        ..BASE
    },
    Case {
        name: "data is a directory",
        edit: &[("data: random", "data: {dir}")],
        needles: &["train.data", "is a directory"],
        ..BASE
    },
    Case {
        name: "data not utf-8",
        edit: &[("data: random", "data: bad.txt")],
        files: &[("bad.txt", NOT_UTF8)],
        needles: &[
            "train.data",
            "not UTF-8",
            "byte offset 12",
            "line 2",
            "iconv",
        ],
        ..BASE
    },
    Case {
        name: "data too small for the validation split",
        edit: &[("data: random", "data: small.txt")],
        files: &[("small.txt", FORTY)],
        needles: &[
            "train.data",
            "40 characters",
            "validation split",
            "model.seq_len + 1 = 17",
        ],
        ..BASE
    },
    Case {
        name: "empty data file",
        edit: &[("data: random", "data: empty.txt")],
        files: &[("empty.txt", b"")],
        needles: &["train.data", "0 characters"],
        ..BASE
    },
    Case {
        name: "vocab smaller than the data",
        edit: &[
            ("data: random", "data: text.txt"),
            ("vocab: 64", "vocab: 4"),
        ],
        files: &[("text.txt", PROSE)],
        needles: &["model.vocab", "distinct characters"],
        ..BASE
    },
    Case {
        name: "seq_len too long for random data",
        edit: &[("seq_len: 16", "seq_len: 7000")],
        needles: &["model.seq_len", "validation split", "at most 6553"],
        ..BASE
    },
    // --- memory ---
    // Both cases must be refused on any machine CI may run on, so each asks for terabytes
    // (9.4 TiB and 3.6 TiB), not for the 148 GiB and 225 GiB that a big runner could hold
    // (it would then start the job instead of refusing it).
    Case {
        name: "plan exceeds the machine's memory",
        args: &[
            "launch",
            "{demo}",
            "--set",
            "model.seq_len=100000",
            "--set",
            "parallel.micro_batch_size=1024",
            "--set",
            "output.dir={dir}/run",
        ],
        needles: &["model.seq_len = 100000", "MemTotal", "too much"],
        ..BASE
    },
    Case {
        name: "llama-48 does not fit this machine",
        args: &[
            "launch",
            "{configs}/llama-48.yaml",
            "--set",
            "parallel.dp=16",
            "--set",
            "output.dir={dir}/run",
        ],
        needles: &["llama-48.yaml", "8.77B parameters", "MemTotal", "too much"],
        ..BASE
    },
    // --- flags ---
    Case {
        name: "--set without =",
        args: &["launch", "{cfg}", "--set", "train.steps"],
        needles: &["--set train.steps", "KEY=VALUE"],
        ..BASE
    },
    Case {
        name: "--set empty key part",
        args: &["launch", "{cfg}", "--set", "train..steps=3"],
        needles: &["--set train..steps=3", "empty part"],
        ..BASE
    },
    Case {
        name: "--set unknown key",
        args: &["launch", "{cfg}", "--set", "train.stepz=3"],
        needles: &["train", "unknown field `stepz`", "from --set train.stepz=3"],
        ..BASE
    },
    Case {
        name: "--set bad value",
        args: &["launch", "{cfg}", "--set", "train.steps=0"],
        needles: &["train.steps", "positive", "from --set train.steps=0"],
        ..BASE
    },
    Case {
        name: "--set below a value",
        args: &["launch", "{cfg}", "--set", "train.steps.x=1"],
        needles: &["--set train.steps.x=1", "`train.steps` is a value"],
        ..BASE
    },
    Case {
        name: "profile --set bad model key",
        args: &["profile", "{cfg}", "--set", "model.d_model=0"],
        needles: &["model.d_model", "from --set model.d_model=0"],
        ..BASE
    },
    Case {
        name: "--set value not yaml",
        args: &["launch", "{cfg}", "--set", "train.data=[1"],
        needles: &["--set train.data=[1", "not valid YAML"],
        ..BASE
    },
    Case {
        name: "--set layout the model cannot split",
        args: &["launch", "{cfg}", "--set", "parallel.pp=16"],
        needles: &["parallel.pp = 16"],
        ..BASE
    },
    Case {
        name: "plan --set",
        args: &["plan", "{cfg}", "--set", "parallel.tp=3"],
        needles: &["parallel.tp = 3"],
        ..BASE
    },
    Case {
        name: "simulate --set",
        args: &["simulate", "{cfg}", "--set", "parallel.schedule=pipedream"],
        needles: &["parallel.schedule"],
        ..BASE
    },
    Case {
        name: "plan --memory-gib negative",
        args: &["plan", "{cfg}", "--memory-gib=-1"],
        needles: &["--memory-gib"],
        ..BASE
    },
    Case {
        name: "plan --dtype-bytes 3",
        args: &["plan", "{cfg}", "--dtype-bytes", "3"],
        needles: &["--dtype-bytes"],
        ..BASE
    },
    Case {
        name: "plan --world without --auto",
        args: &["plan", "{cfg}", "--world", "8"],
        needles: &["--world", "--auto"],
        ..BASE
    },
    Case {
        name: "launch --grace-s negative",
        args: &["launch", "{cfg}", "--grace-s=-1"],
        needles: &["--grace-s"],
        ..BASE
    },
    Case {
        name: "launch --mpiexec missing",
        args: &["launch", "{cfg}", "--mpiexec", "/no/such/mpiexec"],
        needles: &["/no/such/mpiexec", "not found"],
        ..BASE
    },
    Case {
        name: "STRATA_FAIL_AT malformed",
        env: &[("STRATA_FAIL_AT", "soon")],
        needles: &["STRATA_FAIL_AT", "RANK:STEP"],
        ..BASE
    },
    Case {
        name: "STRATA_FAIL_AT rank outside the job",
        env: &[("STRATA_FAIL_AT", "7:1")],
        needles: &["STRATA_FAIL_AT", "outside this job's 2 ranks"],
        ..BASE
    },
    Case {
        name: "STRATA_WAIT unknown",
        env: &[("STRATA_WAIT", "nap")],
        needles: &["STRATA_WAIT", "hybrid"],
        ..BASE
    },
    Case {
        name: "STRATA_P2P_FOLD not a byte count",
        env: &[("STRATA_P2P_FOLD", "4k")],
        needles: &["STRATA_P2P_FOLD", "1024"],
        ..BASE
    },
    // --- checkpoints: train.resume, checkpoint.*, strata checkpoint ---
    Case {
        name: "resume from a missing path",
        edit: &[("grad_clip: 1.0}", "grad_clip: 1.0, resume: {dir}/nowhere}")],
        needles: &["train.resume", "no checkpoint at", "nowhere"],
        ..BASE
    },
    Case {
        name: "resume from a directory without checkpoints",
        edit: &[("grad_clip: 1.0}", "grad_clip: 1.0, resume: {dir}/empty}")],
        files: &[("empty/notes.txt", b"nothing saved here")],
        needles: &["train.resume", "holds no complete checkpoint"],
        ..BASE
    },
    Case {
        name: "resume from a file",
        edit: &[("grad_clip: 1.0}", "grad_clip: 1.0, resume: {dir}/ck.txt}")],
        files: &[("ck.txt", b"not a checkpoint")],
        needles: &["train.resume", "no such checkpoint directory"],
        ..BASE
    },
    Case {
        name: "resume latest with a dangling pointer",
        edit: &[
            ("grad_clip: 1.0}", "grad_clip: 1.0, resume: latest}"),
            (
                "output: {dir: {dir}/run}",
                "output: {dir: {dir}/run}\ncheckpoint: {dir: {dir}/ck}",
            ),
        ],
        files: &[("ck/latest", b"step-000005\n")],
        needles: &["train.resume", "latest", "not a complete checkpoint"],
        ..BASE
    },
    Case {
        name: "resume from a damaged manifest",
        edit: &[(
            "grad_clip: 1.0}",
            "grad_clip: 1.0, resume: {dir}/ck/step-000001}",
        )],
        files: &[("ck/step-000001/manifest.json", b"{ not json")],
        needles: &["train.resume", "manifest.json", "does not parse"],
        ..BASE
    },
    Case {
        name: "empty checkpoint dir",
        edit: &[(
            "output: {dir: {dir}/run}",
            "output: {dir: {dir}/run}\ncheckpoint: {dir: ''}",
        )],
        needles: &["checkpoint.dir", "is empty"],
        ..BASE
    },
    Case {
        name: "checkpoint dir is a file",
        edit: &[(
            "output: {dir: {dir}/run}",
            "output: {dir: {dir}/run}\ncheckpoint: {dir: {dir}/afile}",
        )],
        files: &[("afile", b"not a directory")],
        needles: &["checkpoint.dir", "not a directory"],
        ..BASE
    },
    Case {
        name: "checkpoint dir not writable",
        edit: &[(
            "output: {dir: {dir}/run}",
            "output: {dir: {dir}/run}\ncheckpoint: {dir: /proc/strata-no-such/ck}",
        )],
        needles: &["checkpoint.dir", "not writable"],
        ..BASE
    },
    Case {
        name: "unknown checkpoint key",
        edit: &[(
            "output: {dir: {dir}/run}",
            "output: {dir: {dir}/run}\ncheckpoint: {every: 2, keeep: 1}",
        )],
        needles: &["checkpoint", "unknown field `keeep`"],
        ..BASE
    },
    Case {
        name: "checkpoint verify of a missing directory",
        args: &["checkpoint", "verify", "{dir}/step-000099"],
        needles: &["step-000099", "no such checkpoint directory"],
        ..BASE
    },
    Case {
        name: "checkpoint inspect of a root without checkpoints",
        args: &["checkpoint", "inspect", "{dir}"],
        needles: &["holds no complete checkpoint"],
        ..BASE
    },
    Case {
        name: "checkpoint inspect of a damaged manifest",
        args: &["checkpoint", "inspect", "{dir}/ck/step-000001"],
        files: &[("ck/step-000001/manifest.json", b"{\"step\": 1, \"vers")],
        needles: &["manifest.json", "does not parse"],
        ..BASE
    },
    // --- strata report ---
    Case {
        name: "report of a missing directory",
        args: &["report", "{dir}/no-such-run"],
        needles: &["RUN_DIR", "not a directory"],
        ..BASE
    },
    Case {
        name: "report without metrics",
        args: &["report", "{dir}"],
        needles: &["metrics.jsonl", "cannot read it"],
        ..BASE
    },
    Case {
        name: "report of damaged metrics",
        args: &["report", "{dir}"],
        files: &[(
            "metrics.jsonl",
            b"{\"step\":1,\"loss\":4.0,\"tokens_per_s\":1.0,\"step_s\":1.0}\n{\"step\":2,\"lo",
        )],
        needles: &["metrics.jsonl", "line 2", "damaged"],
        ..BASE
    },
];

/// Runs one case; returns its result.
fn run_case(i: usize, case: &Case) -> Run {
    let dir = scratch(&format!("bad-{i}"));
    let d = dir.to_str().unwrap();
    let mut text = tiny_config(2, "gpipe", 2, &dir.join("run")).replace(d, "{dir}");
    for (from, to) in case.edit {
        assert!(
            text.contains(from),
            "case `{}`: `{from}` not in {text}",
            case.name
        );
        text = text.replace(from, to);
    }
    let cfg = dir.join("cfg.yaml");
    std::fs::write(&cfg, text.replace("{dir}", d)).unwrap();
    for (name, bytes) in case.files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    let demo = repo_root().join("configs/demo.yaml");
    let configs = repo_root().join("configs");
    let args: Vec<String> = case
        .args
        .iter()
        .map(|a| {
            a.replace("{cfg}", cfg.to_str().unwrap())
                .replace("{dir}", d)
                .replace("{demo}", demo.to_str().unwrap())
                .replace("{configs}", configs.to_str().unwrap())
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_strata(&args, case.env, Duration::from_secs(60))
}

#[test]
fn every_bad_input_exits_2_before_ranks_start_naming_the_field() {
    assert!(CASES.len() >= 40, "the corpus has {} cases", CASES.len());
    let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), CASES.len(), "case names must be unique");
    // Four at a time: each case is one short process that fails before mpiexec.
    let failures: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                s.spawn(move || {
                    let mut failed = Vec::new();
                    for (i, case) in CASES.iter().enumerate().skip(w).step_by(4) {
                        let run = run_case(i, case);
                        let check = std::panic::catch_unwind(|| {
                            assert_clean_error(&run, case.needles);
                        });
                        if let Err(e) = check {
                            let msg = e
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_default();
                            failed.push(format!("case `{}`: {msg}", case.name));
                        }
                    }
                    failed
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}
