//! Causal self-attention of one tensor-parallel rank: its query heads and their key/value
//! heads (grouped-query attention), with rotary position embeddings for LLaMA.
//!
//! * The fused projection output is `[q | k | v]` of widths `hq·hd`, `hkv·hd`, `hkv·hd`
//!   (the rank's heads; tp splits query and key/value heads alike, so rank `i`'s query heads
//!   use exactly rank `i`'s key/value heads).
//! * Grouped-query attention repeats each key/value head for its `hq / hkv` query heads
//!   (query head `j` uses key/value head `j / (hq / hkv)`, as Hugging Face's `repeat_kv`).
//! * Rotary embeddings use the rotate-half layout (GPT-NeoX, Hugging Face): for a head
//!   vector `x = [x1 | x2]`, `rope(x) = x ⊙ cos + [−x2 | x1] ⊙ sin`, with
//!   `θ_i = theta^(−2i/hd)` and `cos`, `sin` of `pos · θ` repeated over both halves.
//!
//! * Incremental decoding ([`super::kv`]): the new tokens' keys and values (after rotary)
//!   are appended to the block's cache and the queries attend to every filled slot, under
//!   the step's causal and padding mask.
//!
//! * The attention itself is [`super::causal_kernel`] where it applies (fp32 on the CPU,
//!   causal, no padding mask) and libtorch's `scaled_dot_product_attention` otherwise.
//!
//! Invariant: heads are never mixed across ranks; the output `[b, s, hq·hd]` is the rank's
//! slice of the merged heads, ready for the row-parallel output projection.

use super::causal_kernel;
use super::kv::Cached;
use super::Ctx;
use crate::error::Result;
use tch::{Device, Kind, Tensor};

/// Cosine and sine tables of rotary embeddings for positions `0..seq_len`, `[seq_len, hd]`.
#[derive(Debug)]
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(
        seq_len: usize,
        head_dim: usize,
        theta: f64,
        kind: Kind,
        device: Device,
    ) -> Result<Rotary> {
        let opts = (Kind::Float, device);
        let half = Tensor::f_arange_start_step(0, head_dim as i64, 2, (Kind::Int64, device))
            .and_then(|t| t.f_to_kind(Kind::Float))
            .ctx("rotary frequencies")?;
        let inv_freq = half
            .f_div_scalar(head_dim as f64)
            .and_then(|e| Tensor::f_pow_scalar(theta, &e))
            .and_then(|p| p.f_reciprocal())
            .ctx("rotary frequencies")?;
        let pos = Tensor::f_arange(seq_len as i64, opts).ctx("rotary positions")?;
        let freqs = pos
            .f_unsqueeze(1)
            .and_then(|p| p.f_matmul(&inv_freq.f_unsqueeze(0)?))
            .ctx("rotary angles")?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1).ctx("rotary angles")?;
        let cast = |t: Tensor| t.f_to_kind(kind).ctx("rotary tables");
        Ok(Rotary {
            cos: cast(emb.f_cos().ctx("rotary cos")?)?,
            sin: cast(emb.f_sin().ctx("rotary sin")?)?,
        })
    }

    /// The same tables (no copies).
    pub fn shallow_clone(&self) -> Rotary {
        Rotary {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
        }
    }

    /// Rotates `x` (`[b, h, s, hd]`) whose first position is `start`.
    pub fn apply(&self, x: &Tensor, start: i64) -> Result<Tensor> {
        let s = x.size()[2];
        let cos = self.cos.f_narrow(0, start, s).ctx("rotary cos")?;
        let sin = self.sin.f_narrow(0, start, s).ctx("rotary sin")?;
        rotate(x, &cos, &sin)
    }

    /// Rotates `x` (`[b, h, s, hd]`) at per-row positions `positions` (`[b, s]`, int64).
    pub fn apply_at(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (b, s, hd) = (x.size()[0], x.size()[2], x.size()[3]);
        let flat = positions.f_reshape([-1]).ctx("rotary positions")?;
        let table = |t: &Tensor| {
            t.f_index_select(0, &flat)
                .and_then(|t| t.f_view([b, 1, s, hd]))
                .ctx("rotary tables")
        };
        rotate(x, &table(&self.cos)?, &table(&self.sin)?)
    }
}

/// `x ⊙ cos + rotate_half(x) ⊙ sin`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.size()[3];
    let x1 = x.f_narrow(-1, 0, hd / 2).ctx("rotary halves")?;
    let x2 = x.f_narrow(-1, hd / 2, hd / 2).ctx("rotary halves")?;
    let rotated = Tensor::f_cat(&[&x2.f_neg().ctx("rotate half")?, &x1], -1).ctx("rotate half")?;
    x.f_mul(cos)
        .and_then(|a| a.f_add(&rotated.f_mul(sin)?))
        .ctx("rotary")
}

/// The local head counts of one rank.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub q: i64,
    pub kv: i64,
    pub dim: i64,
}

impl Heads {
    /// Widths of the fused `[q | k | v]` projection output.
    pub fn qkv_widths(&self) -> [i64; 3] {
        [self.q * self.dim, self.kv * self.dim, self.kv * self.dim]
    }
}

/// `[b, s, h·hd]` → `[b, h, s, hd]`.
fn split_heads(t: &Tensor, heads: i64, dim: i64) -> Result<Tensor> {
    let (b, s) = (t.size()[0], t.size()[1]);
    t.f_view([b, s, heads, dim])
        .and_then(|t| t.f_transpose(1, 2))
        .ctx("split heads")
}

/// Repeats each key/value head `n` times along the head dim (`[b, hkv, s, hd]` →
/// `[b, hkv·n, s, hd]`).
pub fn repeat_kv(t: &Tensor, n: i64) -> Result<Tensor> {
    if n == 1 {
        return Ok(t.shallow_clone());
    }
    let size = t.size();
    let (b, h, s, d) = (size[0], size[1], size[2], size[3]);
    t.f_unsqueeze(2)
        .and_then(|t| t.f_expand([b, h, n, s, d], false))
        .and_then(|t| t.f_reshape([b, h * n, s, d]))
        .ctx("repeat kv heads")
}

/// Causal attention of the fused projection `qkv` (`[b, s, (hq + 2·hkv)·hd]`); returns the
/// merged heads `[b, s, hq·hd]`. With a cache, the tokens are the step's new ones: their
/// keys and values join the cache and the queries attend to every filled slot.
pub fn causal_attention(
    qkv: &Tensor,
    heads: Heads,
    rotary: Option<&Rotary>,
    cached: Option<Cached<'_>>,
) -> Result<Tensor> {
    let [wq, wk, wv] = heads.qkv_widths();
    let parts = qkv.f_split_with_sizes([wq, wk, wv], -1).ctx("qkv split")?;
    let mut q = split_heads(&parts[0], heads.q, heads.dim)?;
    let mut k = split_heads(&parts[1], heads.kv, heads.dim)?;
    let mut v = split_heads(&parts[2], heads.kv, heads.dim)?;
    let (b, s) = (qkv.size()[0], qkv.size()[1]);
    let mut mask = None;
    let mut causal = true;
    if let Some(c) = cached {
        if let Some(r) = rotary {
            let pos = c.step.positions(b, qkv.device())?;
            q = r.apply_at(&q, &pos)?;
            k = r.apply_at(&k, &pos)?;
        }
        (k, v) = c.layer.append(c.step, &k, &v)?;
        mask = c.step.mask(qkv.device())?;
        causal = mask.is_none() && c.step.start == 0;
    } else if let Some(r) = rotary {
        q = r.apply(&q, 0)?;
        k = r.apply(&k, 0)?;
    }
    let group = heads.q / heads.kv;
    let (k, v) = (repeat_kv(&k, group)?, repeat_kv(&v, group)?);
    let heads_out = if mask.is_none() && causal && causal_kernel::eligible(&q, &k, &v) {
        causal_kernel::causal_attention(&q, &k, &v)?
    } else {
        Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask.as_ref(), 0.0, causal, None, false)
            .ctx("attention")?
    };
    heads_out
        .f_transpose(1, 2)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_view([b, s, heads.q * heads.dim]))
        .ctx("merge heads")
}
