//! Saving: every rank streams the blocks it owns into its own safetensors file; rank 0
//! gathers the small piece tables, writes the manifest and commits the checkpoint.
//!
//! The protocol (all ranks call [`save`] together, over the world communicator):
//! 1. rank 0 removes stale `*.tmp` entries, creates `step-N.tmp/` and says go;
//! 2. every rank writes `rank-R.safetensors` block by block (one bounded temporary at a
//!    time, hashing as it writes), fsyncs it and sends its piece table to rank 0 (this is
//!    the barrier: rank 0 hears from everyone only after every file is durable);
//! 3. rank 0 writes `manifest.json` (fsynced), renames `step-N.tmp/` to `step-N/`,
//!    fsyncs the root, points `latest` at it (temp file, fsync, rename, fsync), prunes to
//!    `keep`, and sends the outcome to every rank (the final barrier: no rank runs ahead
//!    of a complete checkpoint).
//!
//! Invariants: nothing is gathered but piece tables; no rank holds more than one
//! `CHUNK_BYTES` temporary beyond its own tensors; a failure anywhere before the rename
//! leaves only a `*.tmp` directory behind.

use super::fsutil::{fsync_dir, io_err, write_atomic};
use super::manifest::{
    DType, FileEntry, Layout, Manifest, Piece, TensorEntry, FORMAT, FORMAT_VERSION,
};
use super::prune::{clean_stale, list_checkpoints, prune, remove_checkpoint, write_latest};
use super::{rank_file_name, step_dir, step_dir_name, LATEST, MANIFEST, TMP_SUFFIX};
use crate::comm::{Communicator, Tag};
use crate::error::{Error, Result};
use crate::shard::{Block, ShardSpec};
use partitioner::Rank;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Largest temporary (bytes) used to stage a block for writing; blocks are cut into
/// runs of leading-dim rows of at most this size.
pub(super) const CHUNK_BYTES: usize = 8 << 20;

/// One tensor a rank owns: its global name, its local tensor and where that sits in the
/// global tensor.
pub struct SavedTensor {
    pub name: String,
    pub tensor: Tensor,
    pub spec: ShardSpec,
}

/// Everything in the manifest besides the tensors (the same on every rank; rank 0's is
/// written).
#[derive(Clone, Debug)]
pub struct SaveMeta {
    pub step: usize,
    /// The resolved config (YAML).
    pub config: String,
    pub vocab: Option<Vec<char>>,
    /// The plan the run uses (JSON).
    pub plan: serde_json::Value,
    pub layout: Layout,
    /// Opaque trainer state (step, lr position, data position, RNG state).
    pub train_state: serde_json::Value,
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// How a rank dies in the middle of its save, after writing part of its file (tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveFault {
    /// `std::process::abort()`: no cleanup, no message (multi-process tests).
    Abort,
    /// Return [`Error::Injected`] without cleaning up (in-process tests).
    Fail,
}

/// Knobs of one save.
#[derive(Clone, Copy, Debug, Default)]
pub struct SaveOptions {
    /// Keep the newest `keep` checkpoints (0 keeps all).
    pub keep: usize,
    /// Die in the middle of this rank's write.
    pub fault: Option<SaveFault>,
}

/// One piece as a rank reports it to rank 0.
#[derive(Serialize, Deserialize)]
struct PieceReport {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    piece: Piece,
}

/// A rank's part of the save, sent to rank 0.
#[derive(Serialize, Deserialize, Default)]
struct RankReport {
    error: Option<String>,
    file: Option<(String, FileEntry)>,
    pieces: Vec<PieceReport>,
}

/// Rank 0's go-ahead and final outcome.
#[derive(Serialize, Deserialize)]
struct Outcome {
    error: Option<String>,
}

fn tag() -> Tag {
    Tag::plain(Tag::CHECKPOINT)
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Internal(format!("checkpoint message: {e}"))
}

/// Saves one checkpoint of `meta.step` under `root`: every rank of `comm` calls it with
/// the tensors it owns. Returns the committed `step-N/` directory on every rank.
pub fn save(
    root: &Path,
    meta: &SaveMeta,
    tensors: &[SavedTensor],
    comm: &mut dyn Communicator,
    opts: &SaveOptions,
) -> Result<PathBuf> {
    let is_root = comm.rank() == Rank(0);
    let tmp = root.join(format!("{}{TMP_SUFFIX}", step_dir_name(meta.step)));
    if is_root {
        let prepared = prepare(root, &tmp);
        let told = broadcast(comm, prepared.as_ref().err());
        prepared?;
        told?;
    } else {
        expect_ok(comm)?;
    }
    let written = match write_rank_file(&tmp, comm.rank().0, meta.step, tensors, opts.fault) {
        // An injected crash: no cleanup, no message, as if the process had died.
        Err(e @ Error::Injected { .. }) => return Err(e),
        other => other,
    };
    if !is_root {
        let failed;
        let report = match &written {
            Ok(r) => r,
            Err(e) => {
                failed = RankReport {
                    error: Some(e.to_string()),
                    ..RankReport::default()
                };
                &failed
            }
        };
        comm.send(
            Rank(0),
            tag(),
            serde_json::to_vec(report).map_err(json_err)?,
        )?;
        let outcome = expect_ok(comm);
        written?;
        outcome?;
        return Ok(step_dir(root, meta.step));
    }
    let committed = gather(comm, written).and_then(|reports| {
        let manifest = build_manifest(meta, reports)?;
        commit(root, &tmp, &manifest, opts.keep)
    });
    // On failure the save's own error wins over one from telling the others.
    let told = broadcast(comm, committed.as_ref().err());
    let dir = committed?;
    told.map(|_| dir)
}

/// An error carried to the other ranks as text.
fn clone_err(e: &Error) -> Error {
    Error::Internal(e.to_string())
}

/// Rank 0: removes stale `*.tmp` entries and creates an empty `tmp` directory.
fn prepare(root: &Path, tmp: &Path) -> Result<()> {
    std::fs::create_dir_all(root).map_err(io_err(root))?;
    clean_stale(root)?;
    std::fs::create_dir(tmp).map_err(io_err(tmp))?;
    fsync_dir(root)
}

/// Rank 0: sends `Ok` or the error's text to every other rank.
fn broadcast(comm: &mut dyn Communicator, error: Option<&Error>) -> Result<()> {
    let outcome = Outcome {
        error: error.map(|e| e.to_string()),
    };
    let bytes = serde_json::to_vec(&outcome).map_err(json_err)?;
    for r in 1..comm.size() {
        comm.send(Rank(r), tag(), bytes.clone())?;
    }
    Ok(())
}

/// Other ranks: waits for rank 0's word; an error there stops this rank too.
fn expect_ok(comm: &mut dyn Communicator) -> Result<()> {
    let bytes = comm.recv(Rank(0), tag())?;
    let outcome: Outcome = serde_json::from_slice(&bytes).map_err(json_err)?;
    match outcome.error {
        None => Ok(()),
        Some(msg) => Err(Error::Internal(format!(
            "checkpoint save failed on rank 0: {msg}"
        ))),
    }
}

/// Rank 0: every rank's report, its own first. All are received even when one failed,
/// so that no message is left undelivered; then any rank's error fails the save.
fn gather(comm: &mut dyn Communicator, mine: Result<RankReport>) -> Result<Vec<RankReport>> {
    let mut first_error = mine.as_ref().err().map(clone_err);
    let mut reports = Vec::with_capacity(comm.size());
    reports.extend(mine.ok());
    for r in 1..comm.size() {
        let bytes = comm.recv(Rank(r), tag())?;
        let report: RankReport = serde_json::from_slice(&bytes).map_err(json_err)?;
        match &report.error {
            Some(msg) if first_error.is_none() => {
                first_error = Some(Error::Internal(format!(
                    "rank {r} could not write its checkpoint file: {msg}"
                )))
            }
            _ => reports.push(report),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(reports),
    }
}

/// Rank 0: the manifest from every rank's pieces; refuses pieces that disagree, overlap
/// or leave a hole (an ownership bug, not a user error).
fn build_manifest(meta: &SaveMeta, reports: Vec<RankReport>) -> Result<Manifest> {
    let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
    let mut files = BTreeMap::new();
    for report in reports {
        if let Some((name, entry)) = report.file {
            files.insert(name, entry);
        }
        for p in report.pieces {
            let entry = tensors
                .entry(p.name.clone())
                .or_insert_with(|| TensorEntry {
                    dtype: p.dtype,
                    shape: p.shape.clone(),
                    pieces: Vec::new(),
                    extra: BTreeMap::new(),
                });
            if entry.dtype != p.dtype || entry.shape != p.shape {
                return Err(Error::Internal(format!(
                    "checkpoint: ranks disagree on {}: {:?} {:?} vs {:?} {:?}",
                    p.name, entry.dtype, entry.shape, p.dtype, p.shape
                )));
            }
            entry.pieces.push(p.piece);
        }
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        step: meta.step,
        config: meta.config.clone(),
        vocab: meta.vocab.clone(),
        plan: meta.plan.clone(),
        layout: meta.layout.clone(),
        train_state: meta.train_state.clone(),
        tensors,
        files,
        extra: meta.extra.clone(),
    };
    manifest.validate(Path::new(MANIFEST)).map_err(|e| match e {
        Error::Checkpoint {
            tensor, problem, ..
        } => Error::Internal(format!(
            "refusing to commit the checkpoint of step {}: tensor {tensor}: {problem} (the ranks' ownership of the tensors is wrong)",
            meta.step
        )),
        other => other,
    })?;
    Ok(manifest)
}

/// Rank 0: manifest, rename, `latest`, prune — each step durable before the next.
fn commit(root: &Path, tmp: &Path, manifest: &Manifest, keep: usize) -> Result<PathBuf> {
    write_atomic(tmp, MANIFEST, manifest.to_json()?.as_bytes())?;
    let name = step_dir_name(manifest.step);
    let target = root.join(&name);
    if target.exists() {
        // Re-saving a step (a re-run into the same root): point `latest` elsewhere first so
        // that it never names a missing directory.
        let others: Vec<_> = list_checkpoints(root)?
            .into_iter()
            .filter(|(_, p)| p != &target)
            .collect();
        match others.last() {
            Some((step, _)) => write_latest(root, &step_dir_name(*step))?,
            None => remove_latest(root)?,
        }
        remove_checkpoint(&target)?;
    }
    std::fs::rename(tmp, &target).map_err(io_err(&target))?;
    fsync_dir(root)?;
    write_latest(root, &name)?;
    prune(root, keep, std::slice::from_ref(&target))?;
    Ok(target)
}

fn remove_latest(root: &Path) -> Result<()> {
    let p = root.join(LATEST);
    match std::fs::remove_file(&p) {
        Ok(()) => fsync_dir(root),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(&p)(e)),
    }
}

/// One block of one local tensor, as it will be stored.
struct Entry<'a> {
    name: &'a str,
    key: String,
    dtype: DType,
    global_shape: &'a [usize],
    tensor: &'a Tensor,
    block: &'a Block,
}

impl Entry<'_> {
    fn nbytes(&self) -> usize {
        self.block.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// The safetensors key of a block: the tensor's name when the block is the whole tensor,
/// else `name@o0,o1,…` (its global offset).
fn block_key(name: &str, spec: &ShardSpec, block: &Block) -> String {
    if block.shape == spec.global_shape {
        return name.to_string();
    }
    let offs: Vec<String> = block.global_offset.iter().map(|o| o.to_string()).collect();
    format!("{name}@{}", offs.join(","))
}

/// The blocks of every tensor, checked, in file order (descending dtype size, then key,
/// as the safetensors crate orders them, so every entry stays aligned).
fn entries(tensors: &[SavedTensor]) -> Result<Vec<Entry<'_>>> {
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for t in tensors {
        let kind = t
            .tensor
            .f_kind()
            .map_err(Error::torch("checkpoint: tensor kind"))?;
        let dtype = DType::of_kind(kind).ok_or_else(|| {
            Error::Internal(format!(
                "checkpoint: {} has unsupported kind {kind:?}",
                t.name
            ))
        })?;
        let local: Vec<usize> = t.tensor.size().iter().map(|&d| d as usize).collect();
        t.spec.check(&t.name, &local)?;
        if seen.insert(t.name.as_str(), ()).is_some() {
            return Err(Error::Internal(format!(
                "checkpoint: {} passed twice",
                t.name
            )));
        }
        for block in &t.spec.blocks {
            if block.shape.iter().product::<usize>() == 0 {
                continue;
            }
            out.push(Entry {
                name: &t.name,
                key: block_key(&t.name, &t.spec, block),
                dtype,
                global_shape: &t.spec.global_shape,
                tensor: &t.tensor,
                block,
            });
        }
    }
    out.sort_by(|a, b| b.dtype.size().cmp(&a.dtype.size()).then(a.key.cmp(&b.key)));
    Ok(out)
}

/// A file writer that hashes and counts what it writes.
struct HashingWriter {
    out: BufWriter<File>,
    hasher: Sha256,
    bytes: u64,
}

impl HashingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.hasher.update(buf);
        self.bytes += buf.len() as u64;
        self.out.write_all(buf)
    }
}

/// Lower-case hex of a digest.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The safetensors header (length prefix included) for `entries`, and each entry's
/// offset in the data section.
fn header(entries: &[Entry<'_>], rank: usize, step: usize) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut infos = Vec::with_capacity(entries.len());
    let mut offsets = Vec::with_capacity(entries.len());
    let mut at = 0;
    for e in entries {
        offsets.push(at);
        infos.push((
            e.key.clone(),
            safetensors::tensor::TensorInfo {
                dtype: e.dtype.safetensors(),
                shape: e.block.shape.clone(),
                data_offsets: (at, at + e.nbytes()),
            },
        ));
        at += e.nbytes();
    }
    let meta: HashMap<String, String> = [
        ("format".to_string(), "pt".to_string()),
        ("writer".to_string(), "strata".to_string()),
        ("rank".to_string(), rank.to_string()),
        ("step".to_string(), step.to_string()),
    ]
    .into();
    let metadata = safetensors::tensor::Metadata::new(Some(meta), infos)
        .map_err(|e| Error::Internal(format!("checkpoint header: {e}")))?;
    let mut json = serde_json::to_vec(&metadata).map_err(json_err)?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    Ok((bytes, offsets))
}

/// Writes this rank's file into `dir` (none when it owns nothing), fsynced.
fn write_rank_file(
    dir: &Path,
    rank: usize,
    step: usize,
    tensors: &[SavedTensor],
    fault: Option<SaveFault>,
) -> Result<RankReport> {
    let entries = entries(tensors)?;
    if entries.is_empty() {
        return Ok(RankReport::default());
    }
    let file_name = rank_file_name(rank);
    let path = dir.join(&file_name);
    let (head, offsets) = header(&entries, rank, step)?;
    let file = File::create(&path).map_err(io_err(&path))?;
    let mut w = HashingWriter {
        out: BufWriter::with_capacity(1 << 20, file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    w.write(&head).map_err(io_err(&path))?;
    let mut buf = Vec::new();
    let mut pieces = Vec::with_capacity(entries.len());
    for (i, (e, off)) in entries.iter().zip(&offsets).enumerate() {
        if let Some(kind) = fault.filter(|_| i == entries.len() / 2) {
            die_mid_save(&mut w, &path, kind, step)?;
        }
        write_block(&mut w, e, &mut buf, &path)?;
        let begin = (head.len() + off) as u64;
        pieces.push(PieceReport {
            name: e.name.to_string(),
            dtype: e.dtype,
            shape: e.global_shape.to_vec(),
            piece: Piece {
                file: file_name.clone(),
                key: e.key.clone(),
                offset: e.block.global_offset.clone(),
                shape: e.block.shape.clone(),
                bytes: [begin, begin + e.nbytes() as u64],
            },
        });
    }
    let file = w
        .out
        .into_inner()
        .map_err(|e| io_err(&path)(e.into_error()))?;
    file.sync_all().map_err(io_err(&path))?;
    let entry = FileEntry {
        sha256: hex(&w.hasher.finalize()),
        bytes: w.bytes,
        rank,
    };
    Ok(RankReport {
        error: None,
        file: Some((file_name, entry)),
        pieces,
    })
}

/// The fault-injection hook: part of the file is on disk, then the rank dies.
fn die_mid_save(w: &mut HashingWriter, path: &Path, kind: SaveFault, step: usize) -> Result<()> {
    w.out.flush().map_err(io_err(path))?;
    match kind {
        SaveFault::Abort => {
            tracing::error!(
                "injected crash in the checkpoint save of step {step} (STRATA_FAIL_AT), writing {}",
                path.display()
            );
            std::process::abort()
        }
        SaveFault::Fail => Err(Error::Injected { step }),
    }
}

/// Streams one block: runs of leading-dim rows, each staged through `buf`.
fn write_block(w: &mut HashingWriter, e: &Entry<'_>, buf: &mut Vec<u8>, path: &Path) -> Result<()> {
    let mut view = e.tensor.detach();
    for (d, (&off, &len)) in e.block.local_offset.iter().zip(&e.block.shape).enumerate() {
        view = view
            .f_narrow(d as i64, off as i64, len as i64)
            .map_err(torch_err(e.name))?;
    }
    let dims = e.block.shape.len();
    let rows = if dims == 0 { 1 } else { e.block.shape[0] };
    let row_bytes = e.nbytes() / rows.max(1);
    let per = (CHUNK_BYTES / row_bytes.max(1)).max(1);
    let mut start = 0;
    while start < rows {
        let n = per.min(rows - start);
        let part = if dims == 0 {
            view.shallow_clone()
        } else {
            view.f_narrow(0, start as i64, n as i64)
                .map_err(torch_err(e.name))?
        };
        let part = part
            .f_to_device(tch::Device::Cpu)
            .and_then(|p| p.f_contiguous())
            .map_err(torch_err(e.name))?;
        let numel = part.numel();
        buf.resize(numel * e.dtype.size(), 0);
        part.f_copy_data_u8(buf, numel).map_err(torch_err(e.name))?;
        w.write(buf).map_err(io_err(path))?;
        start += n;
    }
    Ok(())
}

fn torch_err(name: &str) -> impl FnOnce(tch::TchError) -> Error + '_ {
    move |source| Error::Torch {
        context: format!("checkpoint: reading {name}"),
        source,
    }
}
