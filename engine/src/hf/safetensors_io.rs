//! safetensors files on both sides of the interchange: a memory-mapped reader that hands
//! out borrowed, zero-copy tensor views (so a rank copies only the slices it owns), and
//! a writer that converts one tensor at a time (never a second copy of the model) and
//! replaces the file atomically.
//!
//! Invariants: a view never outlives its mapping (it is dropped before
//! [`MappedFiles::with_tensor`] returns, and callers copy out of it); the mapped bytes
//! are never written; a truncated or malformed file is refused when opened.

use super::mapping::HfSource;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// One tensor's place in a mapped file.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The name in the file (before canonicalisation).
    pub file_name: String,
    file: usize,
    pub kind: Kind,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The safetensors files of an HF directory (`model.safetensors`, or the shards listed by
/// `model.safetensors.index.json`), memory-mapped, indexed by canonical tensor name.
pub struct MappedFiles {
    files: Vec<(PathBuf, Mmap)>,
    pub index: BTreeMap<String, Entry>,
}

fn hf_err(path: &Path, field: &str, problem: String, fix: &str) -> Error {
    Error::Hf {
        path: path.display().to_string(),
        field: field.into(),
        problem,
        fix: fix.into(),
    }
}

const RESAVE: &str = "re-save the model with save_pretrained(dir, safe_serialization=True)";

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

impl MappedFiles {
    /// Maps the weights of `dir`; `canonical` maps a file's tensor name to the model's.
    pub fn open(dir: &Path, canonical: impl Fn(&str) -> String) -> Result<MappedFiles> {
        let mut out = MappedFiles {
            files: Vec::new(),
            index: BTreeMap::new(),
        };
        for path in weight_files(dir)? {
            out.add(&path, &canonical)?;
        }
        Ok(out)
    }

    fn add(&mut self, path: &Path, canonical: &impl Fn(&str) -> String) -> Result<()> {
        let file = std::fs::File::open(path)
            .map_err(|e| hf_err(path, "weights", format!("cannot open: {e}"), RESAVE))?;
        // SAFETY: the file is mapped read-only; Strata never writes to an HF directory it
        // reads, and a file changed underneath a running job is outside what it handles.
        let mmap = unsafe { Mmap::map(&file) }
            .map_err(|e| hf_err(path, "weights", format!("cannot map: {e}"), RESAVE))?;
        let (header, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            hf_err(
                path,
                "weights",
                format!("not a valid safetensors file ({e})"),
                RESAVE,
            )
        })?;
        let data_start = 8 + header;
        let file_idx = self.files.len();
        for (name, info) in meta.tensors() {
            let kind = kind_of(info.dtype).ok_or_else(|| {
                hf_err(
                    path,
                    &name,
                    format!("has dtype {:?}, which Strata does not load", info.dtype),
                    "convert the model to float32, bfloat16 or float16",
                )
            })?;
            let key = canonical(&name);
            let entry = Entry {
                file_name: name.clone(),
                file: file_idx,
                kind,
                shape: info.shape.clone(),
                start: data_start + info.data_offsets.0,
                end: data_start + info.data_offsets.1,
            };
            if self.index.insert(key.clone(), entry).is_some() {
                return Err(hf_err(
                    path,
                    &name,
                    format!("is stored twice (as {key})"),
                    "keep one copy of each tensor",
                ));
            }
        }
        self.files.push((path.to_path_buf(), mmap));
        Ok(())
    }

    /// The file that holds `name` (for messages).
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|e| self.files[e.file].0.as_path())
    }
}

/// `model.safetensors`, or every file named in `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        let problem = if dir.join("pytorch_model.bin").is_file() {
            "has only pytorch_model.bin (pickle), which Strata does not read".to_string()
        } else {
            "has neither model.safetensors nor model.safetensors.index.json".to_string()
        };
        return Err(hf_err(dir, "model.safetensors", problem, RESAVE));
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| hf_err(&index, "weight_map", format!("cannot read: {e}"), RESAVE))?;
    let map = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("weight_map")?
                .as_object()?
                .values()
                .map(|f| f.as_str().map(str::to_string))
                .collect::<Option<Vec<String>>>()
        })
        .ok_or_else(|| {
            hf_err(
                &index,
                "weight_map",
                "is missing or not an object of file names".into(),
                RESAVE,
            )
        })?;
    let mut files: Vec<String> = map;
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

impl HfSource for MappedFiles {
    fn with_tensor<R>(&self, name: &str, f: &mut dyn FnMut(&Tensor) -> Result<R>) -> Result<R> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| Error::Internal(format!("HF tensor {name} is not in the files")))?;
        let bytes = &self.files[e.file].1[e.start..e.end];
        let dims: Vec<i64> = e.shape.iter().map(|&d| d as i64).collect();
        let ctx = || format!("reading {name}");
        // Element sizes are powers of two.
        let aligned = (bytes.as_ptr() as usize) & (e.kind.elt_size_in_bytes() - 1) == 0;
        let t = if aligned && !bytes.is_empty() {
            // SAFETY: `bytes` holds exactly shape·elt_size bytes of this dtype (checked by
            // read_metadata), stays mapped while `t` lives (dropped at the end of this
            // function), and is only read: `f` copies out of `t` (HfSource contract).
            unsafe { Tensor::f_from_blob(bytes.as_ptr(), &dims, &[], e.kind, Device::Cpu) }
        } else {
            Tensor::f_from_data_size(bytes, &dims, e.kind)
        }
        .map_err(Error::torch(ctx()))?;
        f(&t)
    }
}

/// Reads a whole safetensors file: its tensors (copied out of the mapping) and its
/// `__metadata__`. For small files (test references, exported models in tests).
pub fn read_all(path: &Path) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let mut files = MappedFiles {
        files: Vec::new(),
        index: BTreeMap::new(),
    };
    files.add(path, &|n: &str| n.to_string())?;
    let (_, meta) = SafeTensors::read_metadata(&files.files[0].1).map_err(|e| {
        hf_err(
            path,
            "weights",
            format!("not a valid safetensors file ({e})"),
            RESAVE,
        )
    })?;
    let names: Vec<String> = files.index.keys().cloned().collect();
    let mut out = BTreeMap::new();
    for name in names {
        let t = files.with_tensor(&name, &mut |t| {
            let mut owned = t.f_empty_like().map_err(Error::torch("copy"))?;
            owned.f_copy_(t).map_err(Error::torch("copy"))?;
            Ok(owned)
        })?;
        out.insert(name, t);
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

/// A tensor to write, produced when the writer reaches it.
pub struct LazyTensor<'a> {
    pub shape: Vec<usize>,
    pub kind: Kind,
    pub load: Box<dyn Fn() -> Result<Tensor> + 'a>,
}

struct WriteView<'a> {
    name: String,
    t: &'a LazyTensor<'a>,
    dtype: Dtype,
    failure: &'a RefCell<Option<Error>>,
}

impl WriteView<'_> {
    fn bytes(&self) -> Result<Vec<u8>> {
        let t = (self.t.load)()?;
        let have: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        if have != self.t.shape {
            return Err(Error::Internal(format!(
                "{} has shape {have:?}, expected {:?}",
                self.name, self.t.shape
            )));
        }
        let n = t.numel();
        let mut out = vec![0u8; self.data_len()];
        t.f_to_kind(self.t.kind)
            .and_then(|t| t.f_contiguous())
            .and_then(|t| t.f_copy_data_u8(&mut out, n))
            .map_err(Error::torch(format!("writing {}", self.name)))?;
        Ok(out)
    }
}

impl View for WriteView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        // View::data cannot fail: keep the first error, write zeros, and let `write`
        // delete the file and return the error.
        match self.bytes() {
            Ok(b) => Cow::Owned(b),
            Err(e) => {
                self.failure.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.t.shape.iter().product::<usize>() * self.t.kind.elt_size_in_bytes()
    }
}

/// Writes `tensors` to the safetensors file `path` with `__metadata__ {"format": "pt"}`
/// (what transformers expects), through a temporary file renamed into place after fsync.
pub fn write(path: &Path, tensors: &[(String, LazyTensor<'_>)]) -> Result<()> {
    let failure = RefCell::new(None);
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = dtype_of(t.kind)
            .ok_or_else(|| Error::Internal(format!("{name}: cannot write dtype {:?}", t.kind)))?;
        views.push((
            name.clone(),
            WriteView {
                name: name.clone(),
                t,
                dtype,
                failure: &failure,
            },
        ));
    }
    let tmp = path.with_extension("safetensors.tmp");
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| Error::Io { path: p, source }
    };
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let written = safetensors::tensor::serialize_to_file(views, Some(meta), &tmp);
    if let Some(e) = failure.into_inner() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Io {
            path: tmp.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_tensors_read_back_exactly() {
        let dir = std::env::temp_dir().join(format!("strata-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = Tensor::arange(12, (Kind::Float, Device::Cpu)).view([3, 4]);
        let at = a.t_copy();
        let lazy = |t: &Tensor| {
            let t = t.shallow_clone();
            LazyTensor {
                shape: t.size().iter().map(|&d| d as usize).collect(),
                kind: Kind::Float,
                load: Box::new(move || Ok(t.shallow_clone())),
            }
        };
        // A non-contiguous view is written as its values.
        let items = vec![
            ("a".to_string(), lazy(&a)),
            ("b".to_string(), lazy(&a.tr())),
        ];
        write(&dir.join("model.safetensors"), &items).unwrap();
        let files = MappedFiles::open(&dir, |n| format!("x.{n}")).unwrap();
        assert_eq!(files.index.keys().collect::<Vec<_>>(), ["x.a", "x.b"]);
        let got = files.with_tensor("x.b", &mut |t| Ok(t.copy())).unwrap();
        assert!(got.equal(&at));
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
        // A truncated file is refused by name.
        std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 4]).unwrap();
        let e = MappedFiles::open(&dir, |n| n.to_string()).err().unwrap();
        assert!(
            e.is_user_error() && e.to_string().contains("not a valid safetensors file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
