//! Where a rank's local tensor sits inside the global (layout-free) tensor of the same name.
//!
//! A tensor-parallel shard is not always one contiguous slice of the global tensor: the
//! fused `attn.qkv` weight is split by heads inside each of its q, k and v parts, so rank
//! `i` holds three column ranges. A [`ShardSpec`] therefore lists [`Block`]s: hyper-
//! rectangles of the global tensor and where each sits in the local one (as PyTorch DCP's
//! chunk metadata does). Checkpoints store and reload blocks by global offset, so the
//! layout that wrote a tensor and the layout that reads it may differ.
//!
//! Invariants: blocks of one spec are disjoint, lie inside both the global and the local
//! shape, and have the same rank (number of dims) as the global shape. Local elements not
//! covered by any block (vocabulary padding) are not part of the global tensor.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// One hyper-rectangle of a global tensor held locally.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Offset of the block in the global tensor, per dim.
    pub global_offset: Vec<usize>,
    /// Offset of the block in the local tensor, per dim.
    pub local_offset: Vec<usize>,
    /// Extent of the block, per dim.
    pub shape: Vec<usize>,
}

/// How one local tensor maps onto its global tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Shape of the whole, layout-free tensor.
    pub global_shape: Vec<usize>,
    /// The parts of the global tensor this rank holds.
    pub blocks: Vec<Block>,
}

impl ShardSpec {
    /// The whole tensor held locally (replicated parameters, tp = 1).
    pub fn full(shape: &[usize]) -> ShardSpec {
        ShardSpec {
            global_shape: shape.to_vec(),
            blocks: vec![Block {
                global_offset: vec![0; shape.len()],
                local_offset: vec![0; shape.len()],
                shape: shape.to_vec(),
            }],
        }
    }

    /// Number of global elements this rank holds.
    pub fn numel(&self) -> usize {
        self.blocks
            .iter()
            .map(|b| b.shape.iter().product::<usize>())
            .sum()
    }

    /// True when the blocks cover the whole global tensor.
    pub fn is_full(&self) -> bool {
        self.numel() == self.global_shape.iter().product::<usize>()
    }

    /// Checks the invariants against the local tensor's shape; `name` is for the message.
    pub fn check(&self, name: &str, local_shape: &[usize]) -> Result<()> {
        let dims = self.global_shape.len();
        let bad = |what: String| Err(Error::Internal(format!("shard spec of {name}: {what}")));
        if local_shape.len() != dims {
            return bad(format!(
                "local shape {local_shape:?} and global shape {:?} differ in rank",
                self.global_shape
            ));
        }
        for b in &self.blocks {
            if b.global_offset.len() != dims
                || b.local_offset.len() != dims
                || b.shape.len() != dims
            {
                return bad(format!("block {b:?} has the wrong number of dims"));
            }
            let extents = b
                .shape
                .iter()
                .zip(b.global_offset.iter().zip(&b.local_offset));
            for (d, (&len, (&g, &l))) in extents.enumerate() {
                if g + len > self.global_shape[d] || l + len > local_shape[d] {
                    return bad(format!("block {b:?} lies outside the tensor in dim {d}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_spec_covers_the_tensor() {
        let s = ShardSpec::full(&[4, 6]);
        assert!(s.is_full());
        assert_eq!(s.numel(), 24);
        assert!(s.check("w", &[4, 6]).is_ok());
        assert!(s.check("w", &[4]).is_err());
        assert!(s.check("w", &[3, 6]).is_err());
    }
}
