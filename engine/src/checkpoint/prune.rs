//! The checkpoint root: listing complete checkpoints, following and updating `latest`,
//! resolving a user's path, pruning to `keep`, and removing stale `*.tmp` directories.
//!
//! Invariants: only `step-N/` directories holding a manifest count as checkpoints
//! (`*.tmp` never does); a checkpoint is deleted by first renaming it to a `*.tmp` name,
//! so a crash mid-delete never leaves a half-deleted directory that looks complete;
//! pruning never deletes a protected checkpoint (the one just written, the one `latest`
//! names).

use super::fsutil::{fsync_dir, io_err, write_atomic};
use super::{checkpoint_error, parse_step_dir, LATEST, MANIFEST, TMP_SUFFIX};
use crate::error::Result;
use std::path::{Path, PathBuf};

/// Complete checkpoints under `root`, oldest step first. A missing root has none.
pub fn list_checkpoints(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(root)(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_step_dir) else {
            continue;
        };
        let path = entry.path();
        if path.join(MANIFEST).is_file() {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The checkpoint `root/latest` names; without a `latest` file, the newest complete
/// checkpoint (a crash may come between the first rename and the first `latest`); None
/// when the root holds no checkpoint.
pub fn read_latest(root: &Path) -> Result<Option<PathBuf>> {
    let pointer = root.join(LATEST);
    match std::fs::read_to_string(&pointer) {
        Ok(text) => {
            let name = text.trim();
            let dir = root.join(name);
            if parse_step_dir(name).is_none() || !dir.join(MANIFEST).is_file() {
                return Err(checkpoint_error(
                    &pointer,
                    "",
                    format!("names `{name}`, which is not a complete checkpoint in {}", root.display()),
                    "point train.resume at one of the step-* directories there, or delete the `latest` file",
                ));
            }
            Ok(Some(dir))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(list_checkpoints(root)?.pop().map(|(_, p)| p))
        }
        Err(e) => Err(io_err(&pointer)(e)),
    }
}

/// The checkpoint directory a user's `path` means: the path itself when it holds a
/// manifest, else the checkpoint its `latest` names.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(MANIFEST).is_file() {
        return Ok(path.to_path_buf());
    }
    if !path.is_dir() {
        return Err(checkpoint_error(
            path,
            "",
            "no such checkpoint directory",
            "pass a step-NNNNNN directory or a checkpoint root (checkpoint.dir, default <output.dir>/checkpoints)",
        ));
    }
    read_latest(path)?.ok_or_else(|| {
        checkpoint_error(
            path,
            "",
            "holds no complete checkpoint (no manifest.json, no step-* directory)",
            "pass a step-NNNNNN directory or a checkpoint root that a run has saved into",
        )
    })
}

/// Points `root/latest` at `dir_name`, atomically and durably.
pub fn write_latest(root: &Path, dir_name: &str) -> Result<()> {
    write_atomic(root, LATEST, format!("{dir_name}\n").as_bytes())
}

/// Deletes a directory crash-safely: renamed to a `*.tmp` name first, then removed.
pub fn remove_checkpoint(dir: &Path) -> Result<()> {
    let mut doomed = dir.as_os_str().to_owned();
    doomed.push(format!(".deleted{TMP_SUFFIX}"));
    let doomed = PathBuf::from(doomed);
    std::fs::rename(dir, &doomed).map_err(io_err(dir))?;
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    std::fs::remove_dir_all(&doomed).map_err(io_err(&doomed))
}

/// Removes every `*.tmp` entry of the root (left by crashed saves or deletes).
pub fn clean_stale(root: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(root))?;
        let path = entry.path();
        let stale = entry.file_name().to_str().is_some_and(|n| {
            n.ends_with(TMP_SUFFIX) && (n.starts_with("step-") || n.starts_with(LATEST))
        });
        if !stale {
            continue;
        }
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(io_err(&path))?;
    }
    Ok(())
}

/// Keeps the newest `keep` complete checkpoints (0 keeps all), never deleting `protect`.
pub fn prune(root: &Path, keep: usize, protect: &[PathBuf]) -> Result<Vec<PathBuf>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let all = list_checkpoints(root)?;
    let excess = all.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for (_, dir) in all.into_iter().take(excess) {
        if protect.iter().any(|p| p == &dir) {
            continue;
        }
        remove_checkpoint(&dir)?;
        removed.push(dir);
    }
    Ok(removed)
}
