//! Durable file-system steps of the save protocol: fsync a file or a directory, and
//! replace a small file atomically (write a temp file, fsync it, rename it over the
//! target, fsync the directory).
//!
//! Invariant: after [`write_atomic`] returns, the new content survives a power loss, and
//! at no moment does a reader see a partial file under the target name.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Maps an I/O error on `path` to the engine's error.
pub fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Flushes a directory's entries (renames, creations) to disk.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `bytes` to `dir/name` atomically and durably.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}{}", super::TMP_SUFFIX));
    let target = dir.join(name);
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(io_err(&target))?;
    fsync_dir(dir)
}
