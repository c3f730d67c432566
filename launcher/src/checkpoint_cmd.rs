//! `strata checkpoint inspect|verify PATH`: summarise a checkpoint, or re-hash every file
//! of it. PATH is a `step-NNNNNN` directory or a checkpoint root (then `latest`).
//!
//! Invariant: read-only; a damaged or missing checkpoint is a one-line error, exit 2.

use crate::launch::LaunchError;
use clap::Subcommand;
use engine::checkpoint;
use std::path::PathBuf;

/// What `strata checkpoint` does.
#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// Print the step, the layout it was saved under, every tensor (dtype, shape, bytes)
    /// and every file (rank, bytes, sha256).
    Inspect {
        /// A step-NNNNNN directory, or a checkpoint root (its `latest` is used).
        path: PathBuf,
        /// Print one JSON object instead.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every file against the manifest and check sizes and headers; exit 2 naming
    /// the first damaged file.
    Verify {
        /// A step-NNNNNN directory, or a checkpoint root (its `latest` is used).
        path: PathBuf,
    },
}

pub fn run(cmd: &CheckpointCmd) -> Result<(), LaunchError> {
    match cmd {
        CheckpointCmd::Inspect { path, json } => {
            let summary = checkpoint::inspect(path)?;
            if *json {
                let text = serde_json::to_string_pretty(&summary)
                    .map_err(|e| engine::Error::Internal(e.to_string()))?;
                println!("{text}");
            } else {
                print!("{summary}");
            }
        }
        CheckpointCmd::Verify { path } => {
            let r = checkpoint::verify(path)?;
            println!(
                "ok: {} (step {}): {} files, {} tensors, {}, every sha256 matches",
                r.dir.display(),
                r.step,
                r.files,
                r.tensors,
                checkpoint::human_bytes(r.bytes)
            );
        }
    }
    Ok(())
}
