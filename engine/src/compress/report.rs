//! `strata compress-report DENSE [VARIANT ...]`: one table of a dense checkpoint and its
//! compressed variants (quantised, pruned, fine-tuned after pruning): what each is (from
//! its manifest), its validation loss and the difference to the dense model's, the bytes
//! of its weights on disk, and its prefill and decode tokens/s at batch 1.
//!
//! * loss: exactly `strata eval CHECKPOINT` on one rank ([`EvalJob::run_single`]): the
//!   mean cross-entropy over the consecutive windows of the validation split (or `--data`);
//! * weight bytes: the manifest's model tensors (dense weights, int8 codes and scales,
//!   biases, norms, embeddings), without optimizer state and pruning masks, which are
//!   counted apart;
//! * speed: `strata generate` on one rank ([`GenerateJob::run_single`]), greedy, one fixed
//!   prompt, a fixed number of new tokens; one untimed warm-up per variant, then `runs`
//!   rounds that visit every variant in turn (so slow drifts of a shared machine hit all
//!   of them), and the median of the rounds.
//!
//! Invariant: every variant is evaluated on the same tokens as the dense model and
//! generates from the same prompt; a variant whose vocabulary or evaluation text differs
//! is refused (exit 2) naming it.

use crate::checkpoint::{Checkpoint, Manifest};
use crate::compress::prune::neurons::{NeuronInfo, MANIFEST_KEY as NEURONS_KEY};
use crate::compress::prune::{Method, PruneInfo, Scope, MANIFEST_KEY as PRUNE_KEY};
use crate::error::{Error, Result};
use crate::eval::{EvalJob, LayoutArg};
use crate::generate::{GenerateJob, Request, Sampling};
use crate::quant::{QuantInfo, MANIFEST_KEY as QUANT_KEY};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Prefixes of optimizer-state tensors in a training checkpoint.
const OPTIMIZER_PREFIX: &str = "optim.";
/// Suffix of pruning masks.
const MASK_SUFFIX: &str = ".mask";

/// What to measure.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Text to evaluate instead of each checkpoint's validation split.
    pub data: Option<PathBuf>,
    /// The generation prompt (default: the first `prompt_len` characters of the evaluated
    /// text).
    pub prompt: Option<String>,
    pub prompt_len: usize,
    pub max_new_tokens: usize,
    /// Timed generations per variant (after one warm-up).
    pub runs: usize,
    /// Intra-op threads of the generations.
    pub threads: usize,
    /// Skip the generations (loss and bytes only).
    pub no_speed: bool,
}

/// One checkpoint's row.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub path: PathBuf,
    /// What the manifest says was done: `dense`, `int8`, `magnitude 50%`, ...
    pub variant: String,
    pub step: usize,
    pub val_loss: f64,
    /// `val_loss` minus the dense model's.
    pub delta: f64,
    /// Bytes of the model tensors as stored (see the module doc).
    pub weight_bytes: u64,
    pub mask_bytes: u64,
    pub optimizer_bytes: u64,
    /// Bytes of the checkpoint's files.
    pub file_bytes: u64,
    /// Medians over the timed runs (0 with `no_speed`).
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    /// Every timed run's decode tokens/s, in order.
    pub decode_runs: Vec<f64>,
}

/// The whole table.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompressReport {
    pub data: PathBuf,
    pub eval_tokens: usize,
    pub prompt: String,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub runs: usize,
    pub threads: usize,
    pub rows: Vec<Row>,
}

/// Builds the report of `dense` (first row) and `variants`.
pub fn compress_report(
    dense: &Path,
    variants: &[PathBuf],
    opts: &ReportOptions,
) -> Result<CompressReport> {
    let paths: Vec<PathBuf> = std::iter::once(dense.to_path_buf())
        .chain(variants.iter().cloned())
        .collect();
    let jobs = paths
        .iter()
        .map(|p| EvalJob::prepare(p, LayoutArg::default(), opts.data.as_deref()))
        .collect::<Result<Vec<_>>>()?;
    for (p, job) in paths.iter().zip(&jobs).skip(1) {
        same_text(p, job, &jobs[0])?;
    }
    let prompt = match &opts.prompt {
        Some(p) => p.clone(),
        None => default_prompt(&jobs[0], opts.prompt_len)?,
    };
    let gens = paths
        .iter()
        .map(|p| generate_job(p, &prompt, opts.max_new_tokens, opts.threads))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::with_capacity(paths.len());
    let mut widths = Vec::with_capacity(paths.len());
    let mut eval_tokens = 0;
    for (path, job) in paths.iter().zip(&jobs) {
        let eval = job.run_single()?;
        eval_tokens = eval.tokens;
        let (row, w) = describe(path, eval.loss)?;
        rows.push(row);
        widths.push(w);
    }
    let dense_loss = rows[0].val_loss;
    for (r, w) in rows.iter_mut().zip(&widths).skip(1) {
        if r.variant == "dense" && *w != widths[0] {
            // A model narrowed earlier (neuron pruning, then training that dropped the record).
            r.variant = format!("d_ff {w} (dense {})", widths[0]);
        }
    }
    for r in &mut rows {
        r.delta = r.val_loss - dense_loss;
    }
    if !opts.no_speed {
        measure_speed(&gens, &mut rows, opts)?;
    }
    Ok(CompressReport {
        data: jobs[0].data.clone(),
        eval_tokens,
        prompt_tokens: prompt.chars().count(),
        prompt,
        new_tokens: opts.max_new_tokens,
        runs: if opts.no_speed { 0 } else { opts.runs },
        threads: opts.threads,
        rows,
    })
}

/// True when `a` and `b` name one file (`dir/../data/x` and `data/x` do).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Refuses a variant that evaluates other tokens than the dense model.
fn same_text(path: &Path, job: &EvalJob, dense: &EvalJob) -> Result<()> {
    let problem = if job.vocab != dense.vocab {
        "its character vocabulary differs from the dense checkpoint's"
    } else if !same_file(&job.data, &dense.data) || job.part != dense.part {
        "it evaluates another text than the dense checkpoint (its train.data differs)"
    } else {
        return Ok(());
    };
    Err(Error::usage(
        &path.display().to_string(),
        problem,
        "compare variants made from the same dense checkpoint, or pass --data FILE",
    ))
}

/// The first `n` characters of the evaluated text.
fn default_prompt(job: &EvalJob, n: usize) -> Result<String> {
    let cfg = job.config()?;
    let windows = job.windows(&cfg)?;
    let (first, _) = windows.rows(0, 1);
    if n == 0 || n > first.len() {
        return Err(Error::usage(
            "--prompt-len",
            format!("{n} is outside 1..={} (the model's seq_len)", first.len()),
            "pass a shorter --prompt-len, or --prompt TEXT",
        ));
    }
    Ok(first[..n]
        .iter()
        .map(|&t| job.vocab.get(t as usize).copied().unwrap_or('?'))
        .collect())
}

fn generate_job(
    path: &Path,
    prompt: &str,
    max_new_tokens: usize,
    threads: usize,
) -> Result<GenerateJob> {
    GenerateJob::prepare(&Request {
        source: path.to_path_buf(),
        prompts: vec![prompt.to_string()],
        max_new_tokens,
        sampling: Sampling::greedy(),
        pp: 1,
        tp: 1,
        microbatches: None,
        kv_cache: true,
        threads: Some(threads.max(1)),
    })
}

/// A row's manifest facts and its loss (speed filled later), and the model's MLP widths as
/// the plan records them (`512`, `[256,256]`).
fn describe(path: &Path, val_loss: f64) -> Result<(Row, String)> {
    let ckpt = Checkpoint::open(path)?;
    let m = ckpt.manifest();
    let bytes = TensorBytes::of(m);
    let widths = m.plan["model"]["d_ff"].to_string().replace(' ', "");
    let row = Row {
        path: ckpt.dir().to_path_buf(),
        variant: variant_name(m)?,
        step: m.step,
        val_loss,
        delta: 0.0,
        weight_bytes: bytes.weights,
        mask_bytes: bytes.masks,
        optimizer_bytes: bytes.optimizer,
        file_bytes: m.files.values().map(|f| f.bytes).sum(),
        prefill_tokens_per_s: 0.0,
        decode_tokens_per_s: 0.0,
        decode_runs: Vec::new(),
    };
    Ok((row, widths))
}

/// What the manifest's `extra` records, e.g. `int8`, `magnitude 50.0% (global)`,
/// `sensitivity 50.0% + int8`; `dense` when nothing.
pub fn variant_name(m: &Manifest) -> Result<String> {
    let mut parts = Vec::new();
    if let Some(p) = PruneInfo::from_extra(&m.extra)? {
        let scope = match (p.method, p.scope) {
            (Method::Magnitude, Scope::Global) => " (global)",
            _ => "",
        };
        parts.push(format!(
            "{} {:.1}%{scope}",
            p.method.name(),
            100.0 * p.sparsity
        ));
    }
    if let Some(n) = m.extra.get(NEURONS_KEY) {
        let info: NeuronInfo = serde_json::from_value(n.clone())
            .map_err(|e| Error::Internal(format!("extra.{NEURONS_KEY} of the manifest: {e}")))?;
        parts.push(format!("neurons {:.1}%", 100.0 * info.target));
    }
    if let Some(q) = QuantInfo::from_extra(&m.extra)? {
        parts.push(q.scheme.name().to_string());
    }
    for key in m.extra.keys() {
        if key != PRUNE_KEY && key != QUANT_KEY && key != NEURONS_KEY {
            parts.push(key.clone());
        }
    }
    Ok(if parts.is_empty() {
        "dense".into()
    } else {
        parts.join(" + ")
    })
}

/// A manifest's tensor bytes by role.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TensorBytes {
    pub weights: u64,
    pub masks: u64,
    pub optimizer: u64,
}

impl TensorBytes {
    pub fn of(m: &Manifest) -> TensorBytes {
        let mut b = TensorBytes::default();
        for (name, t) in &m.tensors {
            let slot = if name.starts_with(OPTIMIZER_PREFIX) {
                &mut b.optimizer
            } else if name.ends_with(MASK_SUFFIX) {
                &mut b.masks
            } else {
                &mut b.weights
            };
            *slot += t.bytes();
        }
        b
    }
}

/// Warm-up, then `runs` rounds over every variant; medians into the rows.
fn measure_speed(gens: &[GenerateJob], rows: &mut [Row], opts: &ReportOptions) -> Result<()> {
    tch::set_num_threads(opts.threads.max(1) as i32);
    for g in gens {
        g.run_single()?;
    }
    let mut prefill = vec![Vec::new(); gens.len()];
    for _ in 0..opts.runs.max(1) {
        for (i, g) in gens.iter().enumerate() {
            let r = g.run_single()?;
            prefill[i].push(r.prefill_tokens_per_s);
            rows[i].decode_runs.push(r.decode_tokens_per_s);
        }
    }
    for (row, p) in rows.iter_mut().zip(&prefill) {
        row.prefill_tokens_per_s = median(p);
        row.decode_tokens_per_s = median(&row.decode_runs);
    }
    Ok(())
}

/// The median (mean of the middle two for an even count; 0 for none).
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => 0.5 * (s[n / 2 - 1] + s[n / 2]),
    }
}

impl CompressReport {
    /// The table as Markdown, with a heading line saying what was measured.
    pub fn table(&self) -> String {
        let dense = self.rows.first().map_or(1, |r| r.weight_bytes.max(1)) as f64;
        let mut out = format!(
            "val loss over {} tokens of {}; speed: batch 1, a {}-token prompt, {} new tokens, greedy, {} thread(s), median of {} run(s)\n\n",
            self.eval_tokens,
            self.data.display(),
            self.prompt_tokens,
            self.new_tokens,
            self.threads,
            self.runs
        );
        out.push_str("| variant | step | val loss | delta | weight bytes | of dense | decode tok/s | prefill tok/s | checkpoint |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {:.4} | {:+.4} | {} | {:.1}% | {:.1} | {:.1} | {} |\n",
                r.variant,
                r.step,
                r.val_loss,
                r.delta,
                r.weight_bytes,
                100.0 * r.weight_bytes as f64 / dense,
                r.decode_tokens_per_s,
                r.prefill_tokens_per_s,
                r.path.display()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), 0.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }

    #[test]
    fn one_file_named_two_ways_is_the_same_text() {
        let dir = std::env::temp_dir().join(format!("strata-same-file-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::create_dir_all(dir.join("bench")).unwrap();
        std::fs::write(dir.join("data/a.txt"), "abc").unwrap();
        std::fs::write(dir.join("data/b.txt"), "abc").unwrap();
        let a = dir.join("data/a.txt");
        assert!(same_file(&dir.join("bench/../data/a.txt"), &a));
        assert!(!same_file(&dir.join("data/b.txt"), &a));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
