//! `strata checkpoint verify` and `inspect`: re-hash every file of a checkpoint, and
//! summarise what it holds (step, layout, tensors, files, sizes).
//!
//! Invariant: both read only the manifest and the files; neither writes anything.

use super::manifest::{DType, Layout};
use super::read::{Checkpoint, ReadOptions};
use crate::error::Result;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// What `verify` checked.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    pub dir: PathBuf,
    pub step: usize,
    pub files: usize,
    pub tensors: usize,
    pub bytes: u64,
}

/// Re-hashes every file of the checkpoint at `path` (a step directory or a root) and
/// checks its size and header against the manifest.
pub fn verify(path: &Path) -> Result<VerifyReport> {
    let mut ck = Checkpoint::open_with(path, ReadOptions { verify: true })?;
    ck.check_all_files()?;
    let m = ck.manifest();
    Ok(VerifyReport {
        dir: ck.dir().to_path_buf(),
        step: m.step,
        files: m.files.len(),
        tensors: m.tensors.len(),
        bytes: m.total_bytes(),
    })
}

/// One tensor in a [`Summary`].
#[derive(Clone, Debug, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: u64,
    pub pieces: usize,
}

/// One file in a [`Summary`].
#[derive(Clone, Debug, Serialize)]
pub struct FileSummary {
    pub name: String,
    pub rank: usize,
    pub bytes: u64,
    pub sha256: String,
}

/// What `inspect` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub dir: PathBuf,
    pub step: usize,
    pub layout: Layout,
    pub tensors: Vec<TensorSummary>,
    pub files: Vec<FileSummary>,
    pub bytes: u64,
    pub train_state: serde_json::Value,
}

/// Summarises the checkpoint at `path` from its manifest (files are not read).
pub fn inspect(path: &Path) -> Result<Summary> {
    let ck = Checkpoint::open(path)?;
    let m = ck.manifest();
    Ok(Summary {
        dir: ck.dir().to_path_buf(),
        step: m.step,
        layout: m.layout.clone(),
        tensors: m
            .tensors
            .iter()
            .map(|(name, t)| TensorSummary {
                name: name.clone(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: t.bytes(),
                pieces: t.pieces.len(),
            })
            .collect(),
        files: m
            .files
            .iter()
            .map(|(name, f)| FileSummary {
                name: name.clone(),
                rank: f.rank,
                bytes: f.bytes,
                sha256: f.sha256.clone(),
            })
            .collect(),
        bytes: m.total_bytes(),
        train_state: m.train_state.clone(),
    })
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.layout;
        writeln!(f, "checkpoint {}", self.dir.display())?;
        writeln!(f, "step       {}", self.step)?;
        writeln!(
            f,
            "saved at   pp {}, tp {}, dp {}, virtual stages {}, schedule {}",
            l.pp, l.tp, l.dp, l.virtual_stages, l.schedule
        )?;
        let elements: u64 = self
            .tensors
            .iter()
            .map(|t| t.shape.iter().product::<usize>() as u64)
            .sum();
        writeln!(
            f,
            "contents   {} tensors, {elements} elements, {} in {} files",
            self.tensors.len(),
            human_bytes(self.bytes),
            self.files.len()
        )?;
        writeln!(
            f,
            "\n{:<44} {:<5} {:<16} {:>10} pieces",
            "tensor", "dtype", "shape", "bytes"
        )?;
        for t in &self.tensors {
            writeln!(
                f,
                "{:<44} {:<5} {:<16} {:>10} {}",
                t.name,
                format!("{:?}", t.dtype),
                format!("{:?}", t.shape),
                human_bytes(t.bytes),
                t.pieces
            )?;
        }
        writeln!(f, "\n{:<24} {:>5} {:>10}  sha256", "file", "rank", "bytes")?;
        for file in &self.files {
            writeln!(
                f,
                "{:<24} {:>5} {:>10}  {}",
                file.name,
                file.rank,
                human_bytes(file.bytes),
                file.sha256
            )?;
        }
        Ok(())
    }
}
