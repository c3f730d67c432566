//! Loading on any layout: a rank fills each local tensor from every stored piece that
//! overlaps one of its blocks, reading the files memory-mapped.
//!
//! Each file is checked once, the first time a piece of it is needed: its size against
//! the manifest (truncation), its sha256 (corruption; unless [`ReadOptions::verify`] is
//! off), and its safetensors header against the manifest's pieces. Only then are bytes
//! copied, one bounded run of rows at a time.
//!
//! Invariants: a tensor is filled only when the checkpoint agrees with the caller on its
//! dtype and global shape; every element of every block of the caller's spec is written
//! exactly once (the manifest's pieces cover each tensor exactly); local elements outside
//! the spec's blocks (vocabulary padding) are left as they are.

use super::manifest::{intersect, Manifest, Piece, TensorEntry};
use super::prune::resolve;
use super::write::{hex, CHUNK_BYTES};
use super::{checkpoint_error, DType};
use crate::error::{Error, Result};
use crate::shard::{Block, ShardSpec};
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// How files are checked before use.
#[derive(Clone, Copy, Debug)]
pub struct ReadOptions {
    /// Hash every file before its first use and refuse a mismatch (default on). Off, only
    /// sizes and headers are checked and only the overlapping pages are read.
    pub verify: bool,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions { verify: true }
    }
}

/// An open checkpoint directory.
pub struct Checkpoint {
    dir: PathBuf,
    manifest: Manifest,
    opts: ReadOptions,
    /// Files mapped and checked so far.
    maps: HashMap<String, Mmap>,
}

const DAMAGED_FIX: &str = "the checkpoint is damaged: resume from an older step-* directory (`strata checkpoint verify` checks one)";

impl Checkpoint {
    /// Opens a checkpoint directory, or the one a checkpoint root's `latest` names, and
    /// validates its manifest.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        Self::open_with(path, ReadOptions::default())
    }

    /// [`Checkpoint::open`] with explicit options.
    pub fn open_with(path: &Path, opts: ReadOptions) -> Result<Checkpoint> {
        let dir = resolve(path)?;
        let manifest = Manifest::load(&dir)?;
        Ok(Checkpoint {
            dir,
            manifest,
            opts,
            maps: HashMap::new(),
        })
    }

    /// The checkpoint directory (`…/step-000123`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.manifest.tensors.contains_key(name)
    }

    /// The manifest entry of `name`; an unknown name is a user error.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.manifest.tensors.get(name).ok_or_else(|| {
            checkpoint_error(
                &self.dir,
                name,
                format!(
                    "not in the checkpoint (it holds {} tensors)",
                    self.manifest.tensors.len()
                ),
                "the checkpoint was saved from a different model: use the model.* settings it was saved with (`strata checkpoint inspect` lists its tensors)",
            )
        })
    }

    /// Maps and checks every file (size, sha256 when verifying, header).
    pub fn check_all_files(&mut self) -> Result<()> {
        let names: Vec<String> = self.manifest.files.keys().cloned().collect();
        for name in names {
            self.map(&name)?;
        }
        Ok(())
    }

    /// Fills `local` (in place) with the parts of tensor `name` that `spec` places in it.
    pub fn read_into(&mut self, name: &str, local: &Tensor, spec: &ShardSpec) -> Result<()> {
        let entry = self.entry(name)?.clone();
        self.check_agrees(name, &entry, local, spec)?;
        for block in spec
            .blocks
            .iter()
            .filter(|b| b.shape.iter().all(|&d| d > 0))
        {
            let mut filled = 0;
            for piece in &entry.pieces {
                let Some((off, shape)) = intersect(
                    &block.global_offset,
                    &block.shape,
                    &piece.offset,
                    &piece.shape,
                ) else {
                    continue;
                };
                self.copy_region(name, entry.dtype, piece, local, block, &off, &shape)?;
                filled += shape.iter().product::<usize>();
            }
            if filled != block.shape.iter().product::<usize>() {
                return Err(Error::Internal(format!(
                    "checkpoint {}: {name}: block {block:?} was filled with {filled} elements",
                    self.dir.display()
                )));
            }
        }
        Ok(())
    }

    /// The whole tensor `name`, as stored (CPU).
    pub fn read_full(&mut self, name: &str) -> Result<Tensor> {
        let entry = self.entry(name)?.clone();
        let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::f_zeros(&shape, (entry.dtype.kind(), tch::Device::Cpu))
            .map_err(Error::torch("checkpoint: allocating a tensor"))?;
        self.read_into(name, &t, &ShardSpec::full(&entry.shape))?;
        Ok(t)
    }

    /// Refuses a local tensor whose dtype or global shape disagrees with the checkpoint.
    fn check_agrees(
        &self,
        name: &str,
        entry: &TensorEntry,
        local: &Tensor,
        spec: &ShardSpec,
    ) -> Result<()> {
        let kind = local
            .f_kind()
            .map_err(Error::torch("checkpoint: tensor kind"))?;
        if DType::of_kind(kind) != Some(entry.dtype) {
            return Err(checkpoint_error(
                &self.dir,
                name,
                format!(
                    "stored as {:?}, but the run holds it as {kind:?}",
                    entry.dtype
                ),
                "load it into a run with the dtype it was saved with",
            ));
        }
        if entry.shape != spec.global_shape {
            return Err(checkpoint_error(
                &self.dir,
                name,
                format!(
                    "has shape {:?} in the checkpoint, but the configured model has {:?}",
                    entry.shape, spec.global_shape
                ),
                "use the model.* settings the checkpoint was saved with (`strata checkpoint inspect` shows its shapes)",
            ));
        }
        let local_shape: Vec<usize> = local.size().iter().map(|&d| d as usize).collect();
        spec.check(name, &local_shape)
    }

    /// Copies the region `(off, shape)` (global coordinates) from `piece` into `local`.
    #[allow(clippy::too_many_arguments)]
    fn copy_region(
        &mut self,
        name: &str,
        dtype: DType,
        piece: &Piece,
        local: &Tensor,
        block: &Block,
        off: &[usize],
        shape: &[usize],
    ) -> Result<()> {
        let torch = |what: &'static str| {
            let name = name.to_string();
            move |source| Error::Torch {
                context: format!("checkpoint: {what} {name}"),
                source,
            }
        };
        let map = self.map(&piece.file)?;
        let src = &map[piece.bytes[0] as usize..piece.bytes[1] as usize];
        // The region relative to the piece, and where it lands in the local tensor.
        let in_piece: Vec<usize> = off.iter().zip(&piece.offset).map(|(a, b)| a - b).collect();
        let mut dst = local.shallow_clone();
        for (d, (&o, &len)) in off.iter().zip(shape).enumerate() {
            let at = block.local_offset[d] + (o - block.global_offset[d]);
            dst = dst
                .f_narrow(d as i64, at as i64, len as i64)
                .map_err(torch("slicing"))?;
        }
        let elt = dtype.size();
        let rows = shape.first().copied().unwrap_or(1);
        let row_bytes = shape.iter().skip(1).product::<usize>() * elt;
        let per = (CHUNK_BYTES / row_bytes.max(1)).max(1);
        let mut buf = Vec::new();
        let mut start = 0;
        while start < rows {
            let n = per.min(rows - start);
            let (mut sub_off, mut sub_shape) = (in_piece.clone(), shape.to_vec());
            if !shape.is_empty() {
                sub_off[0] += start;
                sub_shape[0] = n;
            }
            buf.clear();
            gather(src, &piece.shape, &sub_off, &sub_shape, elt, &mut buf);
            let dims: Vec<i64> = sub_shape.iter().map(|&d| d as i64).collect();
            let part =
                Tensor::f_from_data_size(&buf, &dims, dtype.kind()).map_err(torch("decoding"))?;
            let mut target = if shape.is_empty() {
                dst.shallow_clone()
            } else {
                dst.f_narrow(0, start as i64, n as i64)
                    .map_err(torch("slicing"))?
            };
            tch::no_grad(|| target.f_copy_(&part)).map_err(torch("filling"))?;
            start += n;
        }
        Ok(())
    }

    /// The checked mapping of one file of the checkpoint.
    fn map(&mut self, file: &str) -> Result<&Mmap> {
        if !self.maps.contains_key(file) {
            let map = self.open_file(file)?;
            self.maps.insert(file.to_string(), map);
        }
        Ok(&self.maps[file])
    }

    /// Opens, maps and checks one file: size, sha256 (if verifying), header.
    fn open_file(&self, file: &str) -> Result<Mmap> {
        let path = self.dir.join(file);
        let Some(want) = self.manifest.files.get(file) else {
            return Err(checkpoint_error(
                &path,
                "",
                "not listed in the manifest",
                DAMAGED_FIX,
            ));
        };
        let f = std::fs::File::open(&path)
            .map_err(|e| checkpoint_error(&path, "", format!("cannot open: {e}"), DAMAGED_FIX))?;
        let len = f
            .metadata()
            .map_err(|e| checkpoint_error(&path, "", format!("cannot stat: {e}"), DAMAGED_FIX))?
            .len();
        if len != want.bytes {
            return Err(checkpoint_error(
                &path,
                "",
                format!(
                    "has {len} bytes, the manifest says {} (truncated or replaced)",
                    want.bytes
                ),
                DAMAGED_FIX,
            ));
        }
        // SAFETY: the files of a committed checkpoint are never written again (saves go to
        // a new `*.tmp` directory); the map is read-only, checked before use, and dropped
        // with this reader.
        let map = unsafe { Mmap::map(&f) }
            .map_err(|e| checkpoint_error(&path, "", format!("cannot map: {e}"), DAMAGED_FIX))?;
        if self.opts.verify {
            let got = hex(&Sha256::digest(&map[..]));
            if got != want.sha256 {
                return Err(checkpoint_error(
                    &path,
                    "",
                    format!("checksum mismatch: sha256 {got}, the manifest says {} (the file is corrupt)", want.sha256),
                    DAMAGED_FIX,
                ));
            }
        }
        self.check_header(&path, file, &map)?;
        Ok(map)
    }

    /// The file's safetensors header must describe exactly the manifest's pieces.
    fn check_header(&self, path: &Path, file: &str, map: &[u8]) -> Result<()> {
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(map).map_err(|e| {
            checkpoint_error(
                path,
                "",
                format!("bad safetensors header: {e}"),
                DAMAGED_FIX,
            )
        })?;
        let data_start = (8 + header_len) as u64;
        for (name, t) in &self.manifest.tensors {
            for p in t.pieces.iter().filter(|p| p.file == file) {
                let ok = meta.info(&p.key).is_some_and(|info| {
                    info.dtype == t.dtype.safetensors()
                        && info.shape == p.shape
                        && data_start + info.data_offsets.0 as u64 == p.bytes[0]
                        && data_start + info.data_offsets.1 as u64 == p.bytes[1]
                });
                if !ok {
                    return Err(checkpoint_error(
                        path,
                        name,
                        format!("the file's header does not hold piece `{}` as the manifest describes it", p.key),
                        DAMAGED_FIX,
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Appends to `out` the bytes of the sub-rectangle `(off, shape)` of a row-major array
/// of `full` elements of `elt` bytes stored in `src`, copying maximal contiguous runs.
fn gather(
    src: &[u8],
    full: &[usize],
    off: &[usize],
    shape: &[usize],
    elt: usize,
    out: &mut Vec<u8>,
) {
    let dims = full.len();
    if dims == 0 {
        out.extend_from_slice(&src[..elt]);
        return;
    }
    let mut strides = vec![1usize; dims];
    for d in (0..dims - 1).rev() {
        strides[d] = strides[d + 1] * full[d + 1];
    }
    // Dims after `j` are whole (offset 0), so a run spans them and `shape[j]` of dim j.
    let mut j = dims - 1;
    let mut run = shape[j];
    while j > 0 && shape[j] == full[j] {
        j -= 1;
        run *= shape[j];
    }
    let mut idx = vec![0usize; j];
    loop {
        let start: usize = (0..j)
            .map(|d| (off[d] + idx[d]) * strides[d])
            .sum::<usize>()
            + off[j] * strides[j];
        out.extend_from_slice(&src[start * elt..(start + run) * elt]);
        // Next multi-index over dims 0..j (odometer, last fastest).
        let mut d = j;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::gather;

    #[test]
    fn gather_copies_sub_rectangles() {
        // A 3 x 4 array of one-byte elements 0..12.
        let src: Vec<u8> = (0..12).collect();
        let mut out = Vec::new();
        gather(&src, &[3, 4], &[1, 1], &[2, 2], 1, &mut out);
        assert_eq!(out, vec![5, 6, 9, 10]);
        out.clear();
        gather(&src, &[3, 4], &[1, 0], &[2, 4], 1, &mut out);
        assert_eq!(out, (4..12).collect::<Vec<u8>>());
        out.clear();
        // 2 x 2 x 3, middle column of every row.
        let src: Vec<u8> = (0..12).collect();
        gather(&src, &[2, 2, 3], &[0, 0, 1], &[2, 2, 1], 1, &mut out);
        assert_eq!(out, vec![1, 4, 7, 10]);
    }
}
