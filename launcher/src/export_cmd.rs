//! `strata export CHECKPOINT --format hf --out DIR`: a checkpoint (any layout) as a
//! Hugging Face directory that `transformers` loads with `from_pretrained` (see
//! [`engine::hf::from_checkpoint`]).

use crate::launch::LaunchError;
use clap::Args;
use std::path::PathBuf;

/// `strata export`'s arguments.
#[derive(Args)]
pub struct ExportArgs {
    /// A step-NNNNNN directory, or a checkpoint root (its `latest` is used).
    checkpoint: PathBuf,
    /// Output format: `hf` (Hugging Face: model.safetensors, config.json, vocab.json).
    #[arg(long, default_value = "hf")]
    format: String,
    /// Directory to write (created; its three files are replaced).
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: &ExportArgs) -> Result<(), LaunchError> {
    if args.format != "hf" {
        return Err(LaunchError::Engine(engine::Error::Config {
            path: "strata export".into(),
            field: "--format".into(),
            problem: format!("`{}` is not a supported format", args.format),
            fix: "use --format hf (Hugging Face transformers)".into(),
        }));
    }
    let done = engine::hf::export_checkpoint(&args.checkpoint, &args.out)?;
    println!(
        "exported {} (step {}): {} tensors, {} to {}; load it with transformers.AutoModelForCausalLM.from_pretrained({:?})",
        done.checkpoint.display(),
        done.step,
        done.tensors,
        engine::checkpoint::human_bytes(done.bytes),
        args.out.display(),
        args.out.display().to_string()
    );
    Ok(())
}
