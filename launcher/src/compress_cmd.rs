//! `strata quantize` and `strata prune`: offline transforms of a checkpoint into a new,
//! smaller one; `strata compress-report`: the dense model and its variants side by side
//! (see `engine::compress`).

use crate::launch::LaunchError;
use clap::Args;
use engine::checkpoint::human_bytes;
use engine::compress::prune::neurons::{prune_neurons, DEFAULT_MULTIPLE_OF};
use engine::compress::prune::{prune_checkpoint, Method, PruneOptions, Scope};
use engine::compress::quantize::quantize_checkpoint;
use engine::compress::report::{compress_report, ReportOptions};
use engine::quant::Scheme;
use std::path::PathBuf;

/// Flags of `strata quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A Strata checkpoint (step-NNNNNN directory or checkpoint root).
    pub checkpoint: PathBuf,
    /// Where to write the quantised checkpoint (a checkpoint root: DIR/step-N and
    /// DIR/latest).
    #[arg(long)]
    pub out: PathBuf,
    /// The scheme: int8 (weight-only, symmetric, one scale per output channel).
    #[arg(long, default_value = "int8")]
    pub scheme: String,
}

pub fn quantize(args: &QuantizeArgs) -> Result<(), LaunchError> {
    let scheme = Scheme::parse(&args.scheme)?;
    let q = quantize_checkpoint(&args.checkpoint, &args.out, scheme)?;
    println!(
        "quantised {} linear weights to {}: {} -> {} on disk ({:.1}%), written to {}",
        q.weights,
        q.scheme.name(),
        human_bytes(q.bytes_before),
        human_bytes(q.bytes_after),
        100.0 * q.bytes_after as f64 / q.bytes_before.max(1) as f64,
        q.dir.display()
    );
    Ok(())
}

/// Flags of `strata prune`.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// A dense (or already pruned) Strata checkpoint.
    pub checkpoint: PathBuf,
    /// Where to write the pruned checkpoint (a checkpoint root: DIR/step-N and DIR/latest).
    #[arg(long)]
    pub out: PathBuf,
    /// Share of the blocks' linear weights to remove, in (0, 1) (2:4: always 0.5;
    /// neurons: the share of each block's MLP hidden units).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// magnitude (smallest |w|), 2:4 (2 of every 4 consecutive inputs of an output),
    /// sensitivity (per-layer sparsity from a validation-loss scan) or neurons (remove
    /// whole MLP hidden units: a smaller model with a per-layer d_ff).
    #[arg(long)]
    pub method: String,
    /// Magnitude only: layer (each weight to the sparsity, the default) or global (one
    /// ranking over the whole model).
    #[arg(long)]
    pub scope: Option<String>,
    /// Sensitivity only: validation batches (of the run's micro-batch size) per loss.
    #[arg(long, default_value_t = 8)]
    pub eval_batches: usize,
    /// Neurons only: every block's kept width is a multiple of this (default 8), so each
    /// tp size that divides it can split the pruned model.
    #[arg(long)]
    pub multiple_of: Option<usize>,
}

pub fn prune(args: &PruneArgs) -> Result<(), LaunchError> {
    let method = Method::parse(&args.method)?;
    if method == Method::Neurons {
        return prune_units(args);
    }
    if args.multiple_of.is_some() {
        return Err(engine::Error::usage(
            "--multiple-of",
            format!(
                "--multiple-of applies to --method neurons, not {}",
                method.name()
            ),
            "leave --multiple-of out",
        )
        .into());
    }
    let opts = PruneOptions {
        method,
        sparsity: args.sparsity,
        scope: args.scope.as_deref().map(Scope::parse).transpose()?,
        eval_batches: args.eval_batches,
    };
    let p = prune_checkpoint(&args.checkpoint, &args.out, &opts)?;
    if let Some(scan) = &p.scan {
        println!("{}", scan.table());
    }
    println!(
        "pruned {} weights ({} parameters) with {} to {:.1}% sparsity (target {:.1}%): {} -> {} on disk (masks included), written to {}",
        p.info.weights.len(),
        p.info.weights.iter().map(|w| w.params).sum::<usize>(),
        p.info.method.name(),
        100.0 * p.info.sparsity,
        100.0 * p.info.target,
        human_bytes(p.bytes_before),
        human_bytes(p.bytes_after),
        p.dir.display()
    );
    Ok(())
}

/// Flags of `strata compress-report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The dense checkpoint (the first row; deltas are against it).
    pub dense: PathBuf,
    /// Compressed variants of it: quantised, pruned or fine-tuned-after-pruning
    /// checkpoints (step-NNNNNN directories or checkpoint roots).
    pub variants: Vec<PathBuf>,
    /// Evaluate this text file instead of each checkpoint's validation split.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The generation prompt (default: the first --prompt-len characters of the
    /// evaluated text).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Length of the default prompt, in characters.
    #[arg(long, default_value_t = 16)]
    pub prompt_len: usize,
    /// New tokens per timed generation (prompt + new tokens must fit model.seq_len).
    #[arg(long, default_value_t = 48)]
    pub max_new_tokens: usize,
    /// Timed generations per checkpoint, after one warm-up; the table shows the median.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Intra-op threads of the generations.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Losses and bytes only (no generation).
    #[arg(long)]
    pub no_speed: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn report(args: &ReportArgs) -> Result<(), LaunchError> {
    for (flag, n) in [("--runs", args.runs), ("--threads", args.threads)] {
        if n == 0 {
            return Err(engine::Error::usage(
                flag,
                "must be at least 1",
                format!("pass e.g. {flag} 3"),
            )
            .into());
        }
    }
    let opts = ReportOptions {
        data: args.data.clone(),
        prompt: args.prompt.clone(),
        prompt_len: args.prompt_len,
        max_new_tokens: args.max_new_tokens,
        runs: args.runs,
        threads: args.threads,
        no_speed: args.no_speed,
    };
    let r = compress_report(&args.dense, &args.variants, &opts)?;
    if args.json {
        let text = serde_json::to_string(&r).map_err(|e| engine::Error::Internal(e.to_string()))?;
        println!("{text}");
    } else {
        print!("{}", r.table());
    }
    Ok(())
}

/// `strata prune --method neurons`: the per-layer table, then one summary line.
fn prune_units(args: &PruneArgs) -> Result<(), LaunchError> {
    if args.scope.is_some() {
        return Err(engine::Error::usage(
            "--scope",
            "--scope applies to magnitude pruning, not neurons",
            "leave --scope out",
        )
        .into());
    }
    let multiple_of = args.multiple_of.unwrap_or(DEFAULT_MULTIPLE_OF);
    let p = prune_neurons(&args.checkpoint, &args.out, args.sparsity, multiple_of)?;
    print!("{}", p.table());
    println!(
        "removed {:.1}% of the MLP hidden units (target {:.1}%, widths multiples of {}): {} -> {} parameters, {} -> {} on disk, AdamW moments {}; written to {}",
        100.0
            * (1.0
                - p.info.layers.iter().map(|c| c.d_ff_after).sum::<usize>() as f64
                    / p.info.layers.iter().map(|c| c.d_ff_before).sum::<usize>().max(1) as f64),
        100.0 * p.info.target,
        p.info.multiple_of,
        p.params_before,
        p.params_after,
        human_bytes(p.bytes_before),
        human_bytes(p.bytes_after),
        if p.moments { "sliced the same way" } else { "absent in the source" },
        p.dir.display()
    );
    Ok(())
}
