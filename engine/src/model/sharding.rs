//! Megatron's tensor-parallel split of each parameter, expressed as a [`ShardSpec`]: the
//! one source of truth for slicing a full tensor into a rank's shard, reassembling shards,
//! and (in checkpoints) reading a shard from pieces saved under another layout.
//!
//! Splits (tp group of size `p`, this rank `r`):
//! * [`Split::Replicated`]: every rank holds the whole tensor;
//! * [`Split::Rows`]: dim 0 cut into `p` equal parts (row-parallel weights; the vocabulary
//!   rows of the embedding, padded up to a multiple of `p`);
//! * [`Split::Cols`]: the last dim cut into `p` equal parts (column-parallel weights and
//!   biases; the vocabulary columns of the LM head, padded);
//! * [`Split::FusedCols`]: the last dim is a concatenation of parts (q | k | v, whose widths
//!   differ under grouped-query attention); each part is cut into `p` and rank `r` holds its
//!   slice of every part, concatenated in the same order.
//!
//! Invariant: padding (vocabulary rows or columns beyond the true size) is never covered by
//! a block; it is zero at initialisation and its rows of the embedding are never looked up.

use crate::error::{Error, Result};
use crate::model::Ctx;
use crate::shard::{Block, ShardSpec};
use tch::Tensor;

/// How a parameter is laid out across the tensor-parallel group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Split {
    Replicated,
    /// Split along dim 0; `padded` rounds the global extent up to a multiple of `p` first.
    Rows {
        padded: bool,
    },
    /// Split along the last dim; `padded` as for rows.
    Cols {
        padded: bool,
    },
    /// The last dim holds parts of these widths, each split along the last dim.
    FusedCols(Vec<usize>),
}

/// This rank's place in its tensor-parallel group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpRank {
    pub rank: usize,
    pub size: usize,
}

impl TpRank {
    /// The whole model on one rank.
    pub const SINGLE: TpRank = TpRank { rank: 0, size: 1 };
}

/// `n` rounded up to a multiple of `p`.
pub fn padded(n: usize, p: usize) -> usize {
    n.div_ceil(p) * p
}

/// The local shape and [`ShardSpec`] of a parameter of `global` shape split by `split`.
pub fn spec_for(global: &[usize], split: &Split, tp: TpRank) -> (Vec<usize>, ShardSpec) {
    let (r, p) = (tp.rank, tp.size);
    let last = global.len().saturating_sub(1);
    let along = |dim: usize, pad: bool| -> (Vec<usize>, ShardSpec) {
        let total = if pad {
            padded(global[dim], p)
        } else {
            global[dim]
        };
        let local_n = total / p;
        let start = r * local_n;
        let held = global[dim].saturating_sub(start).min(local_n);
        let mut local = global.to_vec();
        local[dim] = local_n;
        let mut block = Block {
            global_offset: vec![0; global.len()],
            local_offset: vec![0; global.len()],
            shape: global.to_vec(),
        };
        block.global_offset[dim] = start;
        block.shape[dim] = held;
        let blocks = if held > 0 { vec![block] } else { Vec::new() };
        (
            local,
            ShardSpec {
                global_shape: global.to_vec(),
                blocks,
            },
        )
    };
    match split {
        Split::Replicated => (global.to_vec(), ShardSpec::full(global)),
        Split::Rows { padded } => along(0, *padded),
        Split::Cols { padded } => along(last, *padded),
        Split::FusedCols(parts) => {
            let mut blocks = Vec::new();
            let (mut global_at, mut local_at) = (0, 0);
            for &w in parts {
                let n = w / p;
                let mut b = Block {
                    global_offset: vec![0; global.len()],
                    local_offset: vec![0; global.len()],
                    shape: global.to_vec(),
                };
                b.global_offset[last] = global_at + r * n;
                b.local_offset[last] = local_at;
                b.shape[last] = n;
                blocks.push(b);
                global_at += w;
                local_at += n;
            }
            let mut local = global.to_vec();
            local[last] = local_at;
            (
                local,
                ShardSpec {
                    global_shape: global.to_vec(),
                    blocks,
                },
            )
        }
    }
}

/// `t` narrowed to `offset .. offset + shape` in every dim.
pub fn narrow_box(t: &Tensor, offset: &[usize], shape: &[usize]) -> Result<Tensor> {
    let mut out = t.shallow_clone();
    for (d, (&o, &n)) in offset.iter().zip(shape).enumerate() {
        out = out
            .f_narrow(d as i64, o as i64, n as i64)
            .ctx("narrowing a block")?;
    }
    Ok(out)
}

/// This rank's shard of the full tensor `full`: its blocks copied into a zero tensor of
/// the local shape (padding stays zero).
pub fn take_local(full: &Tensor, spec: &ShardSpec, local_shape: &[usize]) -> Result<Tensor> {
    let dims: Vec<i64> = local_shape.iter().map(|&d| d as i64).collect();
    let mut local =
        Tensor::f_zeros(dims.as_slice(), (full.kind(), full.device())).ctx("allocating a shard")?;
    for b in &spec.blocks {
        let src = narrow_box(full, &b.global_offset, &b.shape)?;
        narrow_box(&local, &b.local_offset, &b.shape)?
            .f_copy_(&src)
            .ctx("copying a shard block")?;
    }
    local = local.f_contiguous().ctx("shard")?;
    Ok(local)
}

/// Reassembles a global tensor from every rank's (spec, local tensor); elements covered by
/// several ranks (replicas) are taken from the last. The inverse of [`take_local`].
pub fn assemble(name: &str, parts: &[(&ShardSpec, &Tensor)]) -> Result<Tensor> {
    let (first_spec, first) = parts
        .first()
        .ok_or_else(|| Error::Internal(format!("no shards of {name} to assemble")))?;
    let dims: Vec<i64> = first_spec.global_shape.iter().map(|&d| d as i64).collect();
    let full = Tensor::f_zeros(dims.as_slice(), (first.kind(), first.device()))
        .ctx("allocating a full tensor")?;
    let mut covered = 0usize;
    for (spec, local) in parts {
        if spec.global_shape != first_spec.global_shape {
            return Err(Error::Internal(format!(
                "shards of {name} disagree on the global shape: {:?} vs {:?}",
                spec.global_shape, first_spec.global_shape
            )));
        }
        for b in &spec.blocks {
            let src = narrow_box(local, &b.local_offset, &b.shape)?;
            narrow_box(&full, &b.global_offset, &b.shape)?
                .f_copy_(&src)
                .ctx("assembling a block")?;
            covered += b.shape.iter().product::<usize>();
        }
    }
    if covered < first_spec.global_shape.iter().product::<usize>() {
        return Err(Error::Internal(format!(
            "shards of {name} cover {covered} of {} elements",
            full.numel()
        )));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn arange(shape: &[i64]) -> Tensor {
        let n: i64 = shape.iter().product();
        Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).view(shape)
    }

    #[test]
    fn every_split_round_trips() {
        let full = arange(&[6, 12]);
        for split in [
            Split::Replicated,
            Split::Rows { padded: false },
            Split::Cols { padded: false },
            Split::FusedCols(vec![6, 3, 3]),
        ] {
            let mut parts = Vec::new();
            for r in 0..3 {
                let (local_shape, spec) = spec_for(&[6, 12], &split, TpRank { rank: r, size: 3 });
                let local = take_local(&full, &spec, &local_shape).unwrap();
                spec.check("w", &local_shape).unwrap();
                parts.push((spec, local));
            }
            let refs: Vec<_> = parts.iter().map(|(s, t)| (s, t)).collect();
            assert!(assemble("w", &refs).unwrap().equal(&full), "{split:?}");
        }
    }

    #[test]
    fn fused_columns_split_each_part_by_heads() {
        // q is 4 wide, k and v 2 wide (grouped-query attention), over 2 ranks.
        let full = arange(&[1, 8]);
        let tp = TpRank { rank: 1, size: 2 };
        let (shape, spec) = spec_for(&[1, 8], &Split::FusedCols(vec![4, 2, 2]), tp);
        assert_eq!(shape, vec![1, 4]);
        let local = take_local(&full, &spec, &shape).unwrap();
        let want = Tensor::from_slice(&[2.0f32, 3.0, 5.0, 7.0]).view([1, 4]);
        assert!(local.equal(&want), "{local}");
    }

    #[test]
    fn vocabulary_padding_is_not_covered() {
        // 5 rows over 2 ranks pad to 6: rank 1 holds rows 3, 4 and one padding row.
        let full = arange(&[5, 2]);
        let (shape, spec) = spec_for(
            &[5, 2],
            &Split::Rows { padded: true },
            TpRank { rank: 1, size: 2 },
        );
        assert_eq!(shape, vec![3, 2]);
        assert_eq!(spec.numel(), 4);
        let local = take_local(&full, &spec, &shape).unwrap();
        assert_eq!(local.double_value(&[2, 1]), 0.0);
        assert_eq!(local.double_value(&[0, 0]), 6.0);
    }
}
