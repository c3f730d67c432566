//! `manifest.json`: what a checkpoint holds and where each byte of it lives.
//!
//! The manifest is the checkpoint's only index. For every tensor it records the global
//! (layout-free) name, dtype and shape, and the pieces that make it up: a hyper-rectangle
//! of the global tensor (offset and shape), the file that stores it and the byte range in
//! that file. For every file it records the size and sha256. Everything else a run needs
//! to continue (config, vocabulary, plan, layout, opaque trainer state) rides along.
//!
//! Invariants checked by [`Manifest::validate`]: pieces of one tensor lie inside its
//! shape, are pairwise disjoint and together cover it exactly; every piece names a file
//! of the manifest and its byte range holds exactly `numel · dtype size` bytes inside that
//! file.

use super::{checkpoint_error, MANIFEST};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The `format` field of every manifest.
pub const FORMAT: &str = "strata-checkpoint";
/// The manifest version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Element types a checkpoint can hold (names as in safetensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    BOOL,
    U8,
    I8,
    I16,
    F16,
    BF16,
    I32,
    F32,
    I64,
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::BOOL | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// The libtorch element kind of this dtype.
    pub fn kind(self) -> tch::Kind {
        use tch::Kind;
        match self {
            DType::BOOL => Kind::Bool,
            DType::U8 => Kind::Uint8,
            DType::I8 => Kind::Int8,
            DType::I16 => Kind::Int16,
            DType::F16 => Kind::Half,
            DType::BF16 => Kind::BFloat16,
            DType::I32 => Kind::Int,
            DType::F32 => Kind::Float,
            DType::I64 => Kind::Int64,
            DType::F64 => Kind::Double,
        }
    }

    /// The dtype of a libtorch kind, if checkpoints can store it.
    pub fn of_kind(kind: tch::Kind) -> Option<DType> {
        use tch::Kind;
        Some(match kind {
            Kind::Bool => DType::BOOL,
            Kind::Uint8 => DType::U8,
            Kind::Int8 => DType::I8,
            Kind::Int16 => DType::I16,
            Kind::Half => DType::F16,
            Kind::BFloat16 => DType::BF16,
            Kind::Int => DType::I32,
            Kind::Float => DType::F32,
            Kind::Int64 => DType::I64,
            Kind::Double => DType::F64,
            _ => return None,
        })
    }

    /// The same dtype in the safetensors crate.
    pub fn safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::BOOL => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::I16 => S::I16,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I32 => S::I32,
            DType::F32 => S::F32,
            DType::I64 => S::I64,
            DType::F64 => S::F64,
        }
    }
}

/// The parallel layout a checkpoint was saved under (informational: loading works on
/// any layout).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub pp: usize,
    pub tp: usize,
    pub dp: usize,
    pub virtual_stages: usize,
    pub schedule: String,
}

/// One stored hyper-rectangle of a tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// File name inside the checkpoint directory.
    pub file: String,
    /// The piece's key in that safetensors file.
    pub key: String,
    /// Offset of the piece in the global tensor, per dim.
    pub offset: Vec<usize>,
    /// Extent of the piece, per dim (stored row-major).
    pub shape: Vec<usize>,
    /// Absolute byte range `[begin, end)` of the piece in the file.
    pub bytes: [u64; 2],
}

impl Piece {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One global tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub dtype: DType,
    /// The global, layout-free shape.
    pub shape: Vec<usize>,
    pub pieces: Vec<Piece>,
    /// Room for later per-tensor fields (quantization scheme, pruning mask, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl TensorEntry {
    /// Bytes of the whole tensor.
    pub fn bytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// One safetensors file of the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
    pub bytes: u64,
    /// World rank that wrote it.
    pub rank: usize,
}

/// The whole `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written by this build.
    pub version: u32,
    /// Optimizer steps completed when the checkpoint was taken.
    pub step: usize,
    /// The resolved experiment config (YAML text).
    pub config: String,
    /// Token id → character, when the data is a text file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab: Option<Vec<char>>,
    /// The pipeline plan the checkpoint was saved under (JSON).
    pub plan: serde_json::Value,
    pub layout: Layout,
    /// What the trainer needs to continue (step, lr position, data position, RNG state);
    /// opaque to the store.
    pub train_state: serde_json::Value,
    pub tensors: BTreeMap<String, TensorEntry>,
    pub files: BTreeMap<String, FileEntry>,
    /// Room for later checkpoint-wide fields.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Hyper-rectangle intersection of (offset, shape) pairs; None when empty.
pub fn intersect(
    a_off: &[usize],
    a_shape: &[usize],
    b_off: &[usize],
    b_shape: &[usize],
) -> Option<(Vec<usize>, Vec<usize>)> {
    let mut off = Vec::with_capacity(a_off.len());
    let mut shape = Vec::with_capacity(a_off.len());
    for d in 0..a_off.len() {
        let lo = a_off[d].max(b_off[d]);
        let hi = (a_off[d] + a_shape[d]).min(b_off[d] + b_shape[d]);
        if hi <= lo {
            return None;
        }
        off.push(lo);
        shape.push(hi - lo);
    }
    Some((off, shape))
}

impl Manifest {
    /// Reads and validates `dir/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            checkpoint_error(
                &path,
                "",
                format!("cannot read the manifest: {e}"),
                "point at a complete checkpoint directory (step-NNNNNN/ holding manifest.json) or a checkpoint root with `latest`",
            )
        })?;
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| {
            checkpoint_error(
                &path,
                "",
                format!("does not parse: {e}"),
                "the checkpoint is damaged; resume from an older step-* directory",
            )
        })?;
        manifest.validate(&path)?;
        Ok(manifest)
    }

    /// Checks the format, version and the piece/file invariants; `path` names the
    /// manifest in errors.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let damaged = "the checkpoint is damaged; resume from an older step-* directory";
        if self.format != FORMAT {
            return Err(checkpoint_error(
                path,
                "",
                format!("format is `{}`, not `{FORMAT}`", self.format),
                "point at a Strata checkpoint's manifest.json",
            ));
        }
        if self.version != FORMAT_VERSION {
            return Err(checkpoint_error(
                path,
                "",
                format!(
                    "format version {} is not the supported {FORMAT_VERSION}",
                    self.version
                ),
                "load it with the Strata version that wrote it",
            ));
        }
        for (name, t) in &self.tensors {
            self.validate_tensor(t)
                .map_err(|problem| checkpoint_error(path, name, problem, damaged))?;
        }
        Ok(())
    }

    fn validate_tensor(&self, t: &TensorEntry) -> std::result::Result<(), String> {
        let dims = t.shape.len();
        let mut covered = 0usize;
        for (i, p) in t.pieces.iter().enumerate() {
            if p.offset.len() != dims || p.shape.len() != dims {
                return Err(format!("piece {i} has the wrong number of dims"));
            }
            if (0..dims).any(|d| p.offset[d] + p.shape[d] > t.shape[d]) {
                return Err(format!(
                    "piece {i} (offset {:?}, shape {:?}) lies outside the shape {:?}",
                    p.offset, p.shape, t.shape
                ));
            }
            let file = self
                .files
                .get(&p.file)
                .ok_or_else(|| format!("piece {i} names {}, which is not in files", p.file))?;
            let want = (p.numel() * t.dtype.size()) as u64;
            if p.bytes[1] < p.bytes[0] || p.bytes[1] - p.bytes[0] != want || p.bytes[1] > file.bytes
            {
                return Err(format!(
                    "piece {i} has byte range {:?}, expected {want} bytes inside {} ({} bytes)",
                    p.bytes, p.file, file.bytes
                ));
            }
            for (j, q) in t.pieces[..i].iter().enumerate() {
                if intersect(&p.offset, &p.shape, &q.offset, &q.shape).is_some() {
                    return Err(format!("pieces {j} and {i} overlap"));
                }
            }
            covered += p.numel();
        }
        let total: usize = t.shape.iter().product();
        if covered != total {
            return Err(format!(
                "the pieces cover {covered} of its {total} elements"
            ));
        }
        Ok(())
    }

    /// The manifest as pretty JSON (what is written to disk).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map(|s| s + "\n")
            .map_err(|e| Error::Internal(format!("serialising the manifest: {e}")))
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(file: &str, offset: Vec<usize>, shape: Vec<usize>, begin: u64) -> Piece {
        let n = shape.iter().product::<usize>() as u64 * 4;
        Piece {
            file: file.into(),
            key: "k".into(),
            offset,
            shape,
            bytes: [begin, begin + n],
        }
    }

    fn manifest(pieces: Vec<Piece>) -> Manifest {
        let mut files = BTreeMap::new();
        files.insert(
            "a".to_string(),
            FileEntry {
                sha256: String::new(),
                bytes: 1000,
                rank: 0,
            },
        );
        let mut tensors = BTreeMap::new();
        tensors.insert(
            "w".to_string(),
            TensorEntry {
                dtype: DType::F32,
                shape: vec![4, 6],
                pieces,
                extra: BTreeMap::new(),
            },
        );
        Manifest {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            step: 1,
            config: String::new(),
            vocab: None,
            plan: serde_json::Value::Null,
            layout: Layout {
                pp: 1,
                tp: 1,
                dp: 1,
                virtual_stages: 1,
                schedule: "gpipe".into(),
            },
            train_state: serde_json::Value::Null,
            tensors,
            files,
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn validation_requires_exact_disjoint_cover() {
        let p = Path::new("m.json");
        let halves = vec![
            piece("a", vec![0, 0], vec![2, 6], 0),
            piece("a", vec![2, 0], vec![2, 6], 48),
        ];
        manifest(halves.clone()).validate(p).unwrap();
        let e = manifest(halves[..1].to_vec()).validate(p).unwrap_err();
        assert!(e.to_string().contains("cover 12 of its 24"), "{e}");
        let overlap = vec![halves[0].clone(), piece("a", vec![1, 0], vec![3, 6], 48)];
        let e = manifest(overlap).validate(p).unwrap_err().to_string();
        assert!(e.contains("overlap") && e.contains("tensor w"), "{e}");
        let mut bad = halves.clone();
        bad[1].bytes = [48, 95];
        assert!(manifest(bad).validate(p).is_err());
        let mut bad = halves;
        bad[1].file = "b".into();
        assert!(manifest(bad).validate(p).is_err());
    }

    #[test]
    fn intersection_of_rectangles() {
        assert_eq!(
            intersect(&[0, 0], &[4, 4], &[2, 3], &[4, 4]),
            Some((vec![2, 3], vec![2, 1]))
        );
        assert_eq!(intersect(&[0, 0], &[2, 4], &[2, 0], &[2, 4]), None);
    }
}
