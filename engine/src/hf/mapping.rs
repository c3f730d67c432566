//! How each Strata parameter is made of Hugging Face tensors, and the conversions that
//! follow from it, on whole tensors or on one rank's blocks.
//!
//! A [`Mapping`] says: Strata tensor `strata` (global shape `shape`) is the concatenation
//! along `cat_dim` of its [`Piece`]s (each an HF tensor, transposed where marked), cut to
//! `shape` from offset 0 in every dim. One piece is the common case (`c_fc` → `mlp.fc1`);
//! LLaMA's fused qkv has three (`q_proj`ᵀ | `k_proj`ᵀ | `v_proj`ᵀ); the cut keeps the
//! first `seq_len` rows of GPT-2's `wpe` when Strata uses fewer positions.
//!
//! Invariants: along `cat_dim` the pieces' extents sum to `shape[cat_dim]`; in every other
//! dim each piece reaches at least `shape`. Conversions in both directions are exact
//! (copies, transposes and slices only).

use super::{gpt2, llama};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::shard::{Block, ShardSpec};
use partitioner::Arch;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// One HF tensor in a Strata parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// The HF name (`transformer.h.0.attn.c_attn.weight`).
    pub hf: String,
    /// Its shape in the HF file.
    pub hf_shape: Vec<usize>,
    /// True when Strata stores it transposed (nn.Linear `[out, in]` → Strata `[in, out]`).
    pub transpose: bool,
}

impl Piece {
    /// Its shape as Strata sees it (after the transpose).
    pub fn strata_shape(&self) -> Vec<usize> {
        let mut s = self.hf_shape.clone();
        if self.transpose {
            s.reverse();
        }
        s
    }
}

/// One Strata parameter and the HF tensors it is made of.
#[derive(Clone, Debug, PartialEq)]
pub struct Mapping {
    /// The Strata (global, layout-free) name.
    pub strata: String,
    /// The Strata global shape.
    pub shape: Vec<usize>,
    pub pieces: Vec<Piece>,
    /// The dim along which the pieces are concatenated.
    pub cat_dim: usize,
}

impl Mapping {
    /// A Strata tensor that is one HF tensor (`shape` may cut it, e.g. positions).
    pub(super) fn same(strata: String, hf: String, hf_shape: &[usize], shape: &[usize]) -> Mapping {
        Mapping {
            strata,
            shape: shape.to_vec(),
            pieces: vec![Piece {
                hf,
                hf_shape: hf_shape.to_vec(),
                transpose: false,
            }],
            // The last dim, so that a cut (fewer positions) falls on the rows.
            cat_dim: shape.len().saturating_sub(1),
        }
    }

    /// A Strata `[in, out]` weight that is one nn.Linear `[out, in]` weight.
    pub(super) fn linear(strata: String, hf: String, d_in: usize, d_out: usize) -> Mapping {
        Self::fused(strata, vec![(hf, d_out)], d_in)
    }

    /// A Strata `[in, Σ out]` weight fused from nn.Linear weights `[out_i, in]`.
    pub(super) fn fused(strata: String, parts: Vec<(String, usize)>, d_in: usize) -> Mapping {
        let total = parts.iter().map(|p| p.1).sum();
        Mapping {
            strata,
            shape: vec![d_in, total],
            pieces: parts
                .into_iter()
                .map(|(hf, d_out)| Piece {
                    hf,
                    hf_shape: vec![d_out, d_in],
                    transpose: true,
                })
                .collect(),
            cat_dim: 1,
        }
    }

    /// Where each piece starts along `cat_dim` in the Strata tensor.
    fn offsets(&self) -> Vec<usize> {
        let mut off = 0;
        self.pieces
            .iter()
            .map(|p| {
                let start = off;
                off += p.strata_shape()[self.cat_dim];
                start
            })
            .collect()
    }

    /// Checks the invariants (module doc).
    fn check(&self) -> Result<()> {
        let bad = |what: String| {
            Err(Error::Internal(format!(
                "HF mapping of {}: {what}",
                self.strata
            )))
        };
        let mut along = 0;
        for p in &self.pieces {
            let s = p.strata_shape();
            if s.len() != self.shape.len() {
                return bad(format!(
                    "{} has rank {}, expected {}",
                    p.hf,
                    s.len(),
                    self.shape.len()
                ));
            }
            along += s[self.cat_dim];
            for (d, (&have, &want)) in s.iter().zip(&self.shape).enumerate() {
                if d != self.cat_dim && have < want {
                    return bad(format!("{} is too small in dim {d}", p.hf));
                }
            }
        }
        if along != self.shape[self.cat_dim] {
            return bad(format!(
                "pieces cover {along} of {} along dim {}",
                self.shape[self.cat_dim], self.cat_dim
            ));
        }
        Ok(())
    }
}

/// The mappings of every Strata parameter of a model `strata` taking the weights of an HF
/// model `hf` (the same spec when exporting). `hf` may only have more positions.
pub fn mappings(strata: &ModelSpec, hf: &ModelSpec) -> Result<Vec<Mapping>> {
    let maps = match strata.shape.arch {
        Arch::Gpt => gpt2::mappings(strata, hf),
        Arch::Llama => llama::mappings(strata, hf),
    };
    for m in &maps {
        m.check()?;
    }
    Ok(maps)
}

/// Where HF tensors are read from: a borrowed view of one HF tensor, valid inside `f`.
pub trait HfSource {
    /// Calls `f` with HF tensor `name`. The tensor may borrow memory that `f` must not
    /// keep: `f` copies what it needs.
    fn with_tensor<R>(&self, name: &str, f: &mut dyn FnMut(&Tensor) -> Result<R>) -> Result<R>;
}

impl HfSource for BTreeMap<String, Tensor> {
    fn with_tensor<R>(&self, name: &str, f: &mut dyn FnMut(&Tensor) -> Result<R>) -> Result<R> {
        let t = self
            .get(name)
            .ok_or_else(|| Error::Internal(format!("HF tensor {name} is missing")))?;
        f(t)
    }
}

fn narrow(t: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    t.f_narrow(dim as i64, start as i64, len as i64)
        .map_err(Error::torch("HF conversion: narrow"))
}

/// Copies the part of Strata tensor `m.strata` that `block` covers from the HF tensors
/// into `dst` (the rank's local tensor), under no_grad.
pub fn load_block(m: &Mapping, block: &Block, src: &impl HfSource, dst: &Tensor) -> Result<()> {
    let c = m.cat_dim;
    let (g0, n) = (block.global_offset[c], block.shape[c]);
    for (p, start) in m.pieces.iter().zip(m.offsets()) {
        let extent = p.strata_shape()[c];
        let (lo, hi) = (g0.max(start), (g0 + n).min(start + extent));
        if lo >= hi {
            continue;
        }
        src.with_tensor(&p.hf, &mut |hf_t: &Tensor| {
            let mut view = if p.transpose {
                hf_t.f_transpose(0, 1)
                    .map_err(Error::torch("HF conversion: transpose"))?
            } else {
                hf_t.shallow_clone()
            };
            let mut out = dst.shallow_clone();
            for d in 0..m.shape.len() {
                if d == c {
                    view = narrow(&view, d, lo - start, hi - lo)?;
                    out = narrow(&out, d, block.local_offset[d] + lo - g0, hi - lo)?;
                } else {
                    view = narrow(&view, d, block.global_offset[d], block.shape[d])?;
                    out = narrow(&out, d, block.local_offset[d], block.shape[d])?;
                }
            }
            tch::no_grad(|| out.f_copy_(&view))
                .map_err(Error::torch(format!("loading {}", m.strata)))
        })?;
    }
    Ok(())
}

/// Fills a rank's local tensor of `m.strata` laid out by `spec` (elements outside its
/// blocks, e.g. vocabulary padding, are left as they are).
pub fn load_shard(m: &Mapping, spec: &ShardSpec, src: &impl HfSource, dst: &Tensor) -> Result<()> {
    let local: Vec<usize> = dst.size().iter().map(|&d| d as usize).collect();
    spec.check(&m.strata, &local)?;
    if spec.global_shape != m.shape {
        return Err(Error::Internal(format!(
            "{}: the model's global shape {:?} differs from the HF mapping's {:?}",
            m.strata, spec.global_shape, m.shape
        )));
    }
    for b in &spec.blocks {
        load_block(m, b, src, dst)?;
    }
    Ok(())
}

/// The whole Strata tensor of `m` as a new `kind` tensor.
pub fn load_full(m: &Mapping, src: &impl HfSource, kind: Kind) -> Result<Tensor> {
    let dims: Vec<i64> = m.shape.iter().map(|&d| d as i64).collect();
    let dst = Tensor::f_zeros(dims.as_slice(), (kind, tch::Device::Cpu))
        .map_err(Error::torch("HF conversion: allocate"))?;
    load_shard(m, &ShardSpec::full(&m.shape), src, &dst)?;
    Ok(dst)
}

/// The HF tensors of Strata tensor `t` (`m.strata`, global shape): views (slices and
/// transposes of `t`, not necessarily contiguous), in piece order.
pub fn split(m: &Mapping, t: &Tensor) -> Result<Vec<(String, Tensor)>> {
    let have: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
    if have != m.shape {
        return Err(Error::Internal(format!(
            "{} has shape {have:?}, expected {:?}",
            m.strata, m.shape
        )));
    }
    m.pieces
        .iter()
        .zip(m.offsets())
        .map(|(p, start)| {
            if p.strata_shape()
                .iter()
                .zip(&m.shape)
                .enumerate()
                .any(|(d, (a, b))| d != m.cat_dim && a != b)
            {
                return Err(Error::Internal(format!(
                    "{}: cannot export a cut tensor",
                    m.strata
                )));
            }
            let v = narrow(t, m.cat_dim, start, p.strata_shape()[m.cat_dim])?;
            let v = if p.transpose {
                v.f_transpose(0, 1)
                    .map_err(Error::torch("HF conversion: transpose"))?
            } else {
                v
            };
            Ok((p.hf.clone(), v))
        })
        .collect()
}

/// Checks that `names` are exactly the mappings' Strata names; `what` for the message.
fn check_names<'a>(maps: &[Mapping], names: impl Iterator<Item = &'a String>) -> Result<()> {
    let want: BTreeMap<&str, ()> = maps.iter().map(|m| (m.strata.as_str(), ())).collect();
    let have: Vec<&String> = names.collect();
    if let Some(extra) = have.iter().find(|n| !want.contains_key(n.as_str())) {
        return Err(Error::Internal(format!("unexpected Strata tensor {extra}")));
    }
    if let Some(missing) = maps.iter().find(|m| !have.iter().any(|n| **n == m.strata)) {
        return Err(Error::Internal(format!(
            "missing Strata tensor {}",
            missing.strata
        )));
    }
    Ok(())
}

/// Strata tensors (full, by global name) → HF tensors (views, by HF name).
pub fn to_hf(
    spec: &ModelSpec,
    strata: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    let maps = mappings(spec, spec)?;
    check_names(&maps, strata.keys())?;
    let mut out = BTreeMap::new();
    for m in &maps {
        out.extend(split(m, &strata[&m.strata])?);
    }
    Ok(out)
}

/// HF tensors (by HF name, already canonical) → Strata tensors (new fp32 tensors).
pub fn from_hf(
    strata: &ModelSpec,
    hf: &ModelSpec,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>> {
    mappings(strata, hf)?
        .iter()
        .map(|m| Ok((m.strata.clone(), load_full(m, tensors, Kind::Float)?)))
        .collect()
}
