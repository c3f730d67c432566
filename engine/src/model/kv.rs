//! The key/value cache of incremental decoding, and where the new tokens of a decode
//! step sit.
//!
//! A [`KvCache`] belongs to one pipeline chunk on one tensor-parallel rank and one batch
//! of sequences: one [`LayerKv`] per block of the chunk, each holding the rank's own
//! key/value heads (`[b, hkv/tp, max_len, hd]`, keys after rotary for LLaMA), allocated
//! once at the longest length the batch will reach.
//!
//! Sequences of different lengths share a batch by *left padding* (as Hugging Face's
//! batched generation): row `r` starts with `pad[r]` padding slots, which no query
//! attends to (each padding query attends to itself only, so no row of the attention is
//! empty), and the token in slot `j` of row `r` has position `j − pad[r]`.
//!
//! Invariants: slots `0..len` of every layer hold the keys and values of the tokens fed so
//! far; a step feeding `s` tokens writes slots `len..len + s` of every layer of the chunk,
//! then [`KvCache::advance`] moves `len` on by `s` (the chunk does this once per step).

use super::Ctx;
use crate::error::{Error, Result};
use tch::{Device, Kind, Tensor};

/// The cached keys and values of one block, `[b, heads, max_len, head_dim]` each.
#[derive(Debug)]
pub struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// One chunk's cache for one batch of sequences (see the module docs).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    /// Slots filled so far.
    len: i64,
    max_len: i64,
    /// Left padding of each row `[b]` (int64), None when no row is padded.
    pad: Option<Tensor>,
}

/// Where the new tokens of one step sit, and the attention mask they need.
pub struct Step<'a> {
    /// Slot of the first new token (the cache length before the step).
    pub start: i64,
    /// Number of new tokens.
    pub len: i64,
    pub pad: Option<&'a Tensor>,
}

/// What one block reads and writes in a cached forward.
pub struct Cached<'a> {
    pub layer: &'a mut LayerKv,
    pub step: &'a Step<'a>,
}

/// The shape of a chunk's cache.
#[derive(Clone, Copy, Debug)]
pub struct CacheShape {
    /// Blocks in the chunk.
    pub layers: usize,
    pub batch: i64,
    /// Key/value heads on this rank.
    pub heads: i64,
    pub head_dim: i64,
    /// Longest sequence (padding included) the batch will reach.
    pub max_len: i64,
    pub kind: Kind,
    pub device: Device,
}

impl KvCache {
    /// An empty cache; `pad` (`[b]`, int64) is each row's left padding, if any.
    pub fn new(shape: CacheShape, pad: Option<Tensor>) -> Result<KvCache> {
        let dims = [shape.batch, shape.heads, shape.max_len, shape.head_dim];
        let zeros = || Tensor::f_zeros(dims, (shape.kind, shape.device)).ctx("kv cache");
        let layers = (0..shape.layers)
            .map(|_| {
                Ok(LayerKv {
                    k: zeros()?,
                    v: zeros()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache {
            layers,
            len: 0,
            max_len: shape.max_len,
            pad,
        })
    }

    /// Slots filled so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| 2 * l.k.numel() * l.k.kind().elt_size_in_bytes())
            .sum()
    }

    /// The step that feeds `len` new tokens, and the per-block caches it updates.
    pub fn step(&mut self, len: i64) -> Result<(Step<'_>, &mut [LayerKv])> {
        if self.len + len > self.max_len {
            return Err(Error::Internal(format!(
                "kv cache overflow: {} + {len} slots of {}",
                self.len, self.max_len
            )));
        }
        let step = Step {
            start: self.len,
            len,
            pad: self.pad.as_ref(),
        };
        Ok((step, &mut self.layers))
    }

    /// Marks `len` more slots as filled (after every block of the chunk wrote them).
    pub fn advance(&mut self, len: i64) {
        self.len += len;
    }
}

impl Step<'_> {
    /// Positions of the new tokens, `[b, s]` (int64): slot minus the row's padding,
    /// clamped at 0 for padding slots.
    pub fn positions(&self, batch: i64, device: Device) -> Result<Tensor> {
        let slots =
            Tensor::f_arange_start(self.start, self.start + self.len, (Kind::Int64, device))
                .and_then(|t| t.f_unsqueeze(0))
                .and_then(|t| t.f_expand([batch, self.len], false))
                .ctx("positions")?;
        match self.pad {
            None => Ok(slots),
            Some(pad) => slots
                .f_sub(&pad.f_unsqueeze(1).ctx("positions")?)
                .and_then(|t| t.f_clamp_min(0))
                .ctx("positions"),
        }
    }

    /// The boolean mask `[b or 1, 1, s, start + s]` (true = attend) of the new queries
    /// over every filled slot, or None when plain causal attention is exact (no cache
    /// before the step and no padding) or no mask is needed (one token, no padding).
    pub fn mask(&self, device: Device) -> Result<Option<Tensor>> {
        if self.pad.is_none() && (self.start == 0 || self.len == 1) {
            return Ok(None);
        }
        let total = self.start + self.len;
        let opts = (Kind::Int64, device);
        let c = "attention mask";
        let q = Tensor::f_arange_start(self.start, total, opts)
            .and_then(|t| t.f_view([self.len, 1]))
            .ctx(c)?;
        let k = Tensor::f_arange(total, opts)
            .and_then(|t| t.f_view([1, total]))
            .ctx(c)?;
        let causal = k.f_le_tensor(&q).ctx(c)?;
        let mask = match self.pad {
            None => causal,
            Some(pad) => {
                let real = k
                    .f_unsqueeze(0)
                    .and_then(|k| k.f_ge_tensor(&pad.f_view([-1, 1, 1])?))
                    .ctx(c)?;
                let own = k.f_eq_tensor(&q).ctx(c)?;
                real.f_logical_or(&own)
                    .and_then(|m| m.f_logical_and(&causal))
                    .ctx(c)?
            }
        };
        // [s, T] or [b, s, T] -> [b or 1, 1, s, T]
        let mask = if mask.dim() == 2 {
            mask.f_view([1, 1, self.len, total])
        } else {
            mask.f_unsqueeze(1)
        };
        mask.map(Some).ctx(c)
    }
}

impl LayerKv {
    /// Writes the new keys and values (`[b, h, s, hd]`) at slots `start..start + s` and
    /// returns every filled slot's keys and values (`[b, h, start + s, hd]`, views).
    pub fn append(&mut self, step: &Step<'_>, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = "kv cache write";
        self.k
            .f_narrow(2, step.start, step.len)
            .and_then(|mut dst| dst.f_copy_(k))
            .ctx(c)?;
        self.v
            .f_narrow(2, step.start, step.len)
            .and_then(|mut dst| dst.f_copy_(v))
            .ctx(c)?;
        let total = step.start + step.len;
        Ok((
            self.k.f_narrow(2, 0, total).ctx(c)?,
            self.v.f_narrow(2, 0, total).ctx(c)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bools(t: &Tensor) -> Vec<i64> {
        let flat = t.to_kind(Kind::Int64).view([-1]);
        Vec::<i64>::try_from(&flat).unwrap()
    }

    #[test]
    fn masks_are_causal_and_skip_padding() {
        let s = Step {
            start: 0,
            len: 3,
            pad: None,
        };
        assert!(s.mask(Device::Cpu).unwrap().is_none());
        let s = Step {
            start: 2,
            len: 2,
            pad: None,
        };
        let m = s.mask(Device::Cpu).unwrap().unwrap();
        assert_eq!(m.size(), [1, 1, 2, 4]);
        assert_eq!(bools(&m), [1, 1, 1, 0, 1, 1, 1, 1]);
        // Row 0 unpadded, row 1 with one padding slot.
        let pad = Tensor::from_slice(&[0i64, 1]);
        let s = Step {
            start: 0,
            len: 3,
            pad: Some(&pad),
        };
        let m = s.mask(Device::Cpu).unwrap().unwrap();
        assert_eq!(m.size(), [2, 1, 3, 3]);
        assert_eq!(
            bools(&m),
            [1, 0, 0, 1, 1, 0, 1, 1, 1, /* row 1 */ 1, 0, 0, 0, 1, 0, 0, 1, 1]
        );
        let p = s.positions(2, Device::Cpu).unwrap();
        assert_eq!(bools(&p), [0, 1, 2, 0, 0, 1]);
    }
}
