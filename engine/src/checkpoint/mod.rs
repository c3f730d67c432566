//! Layout-free, crash-safe, verifiable sharded checkpoints.
//!
//! A checkpoint root (`checkpoint.dir`) holds complete checkpoints `step-000123/`, a
//! `latest` file naming the newest one, and possibly stale `step-N.tmp/` directories left
//! by a crashed save (ignored on load, removed by the next save). A checkpoint directory
//! holds one safetensors file per writing rank (`rank-00003.safetensors`) and
//! `manifest.json` ([`Manifest`]).
//!
//! * Writing ([`save`]): every rank passes the tensors it owns, each with the
//!   [`ShardSpec`](crate::shard::ShardSpec) that places it in the global tensor; each block
//!   is stored as one safetensors entry, by global offset. Nothing is gathered: only the
//!   small piece tables travel to rank 0, which writes the manifest.
//! * Crash safety: files go to `step-N.tmp/` and are fsynced; rank 0 then writes the
//!   manifest, renames the directory to `step-N/`, fsyncs the root, and replaces `latest`
//!   the same way (temp file, fsync, rename, fsync). A crash at any moment leaves the
//!   previous checkpoint and `latest` intact.
//! * Reading ([`Checkpoint`]): any layout fills its local tensors from every overlapping
//!   stored piece, memory-mapped, after checking each file's sha256.
//!
//! Invariant: a directory named `step-N/` (no `.tmp`) is complete: its manifest was
//! written after every file it lists was fsynced, and the rename is atomic.

mod fsutil;
mod manifest;
mod prune;
mod read;
mod resume;
mod verify;
mod write;

pub use manifest::{
    intersect, DType, FileEntry, Layout, Manifest, Piece, TensorEntry, FORMAT, FORMAT_VERSION,
};
pub use prune::{list_checkpoints, read_latest, resolve};
pub use read::{Checkpoint, ReadOptions};
pub use resume::RESUME_LATEST;
pub use verify::{human_bytes, inspect, verify, Summary, VerifyReport};
pub use write::{save, SaveFault, SaveMeta, SaveOptions, SavedTensor};

use crate::error::Error;
use std::path::{Path, PathBuf};

/// Name of the manifest inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// Name of the pointer file inside a checkpoint root.
pub const LATEST: &str = "latest";
/// Suffix of a checkpoint directory still being written.
pub const TMP_SUFFIX: &str = ".tmp";

/// `step-000123`: the directory name of the checkpoint taken after `step` steps.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// The step of a complete checkpoint directory name (`step-000123` → 123).
pub fn parse_step_dir(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The safetensors file written by world rank `rank`.
pub fn rank_file_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// A user-facing checkpoint error (exit code 2) naming the path and, if any, the tensor.
pub fn checkpoint_error(
    path: &Path,
    tensor: &str,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        problem: one_line(problem.into()),
        fix: fix.into(),
    }
}

/// Error messages are one line: OS and serde messages occasionally are not.
fn one_line(s: String) -> String {
    if s.contains('\n') {
        s.split_whitespace().collect::<Vec<_>>().join(" ")
    } else {
        s
    }
}

/// `root/step-N` for a checkpoint root.
pub fn step_dir(root: &Path, step: usize) -> PathBuf {
    root.join(step_dir_name(step))
}

#[cfg(test)]
mod tests;
