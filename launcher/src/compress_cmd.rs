//! `strata quantize` and `strata prune`: offline transforms of a checkpoint into a new,
//! smaller one (see `engine::compress`).

use crate::launch::LaunchError;
use clap::Args;
use engine::checkpoint::human_bytes;
use engine::compress::quantize::quantize_checkpoint;
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
