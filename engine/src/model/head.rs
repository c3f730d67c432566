//! The last layer: final norm, LM head and the mean cross-entropy.
//!
//! * tp = 1: logits and `cross_entropy` are part of the chunk's autograd graph.
//! * tp > 1 (vocabulary-parallel, Megatron): the LM head is column-parallel over the
//!   (padded) vocabulary, padded columns are masked to −∞, and the loss
//!   `log Σ exp(z) − z_target` is formed from all-reduced row maxima, sums of
//!   exponentials and target logits, so the full logits are never gathered. Its gradient
//!   is the analytic `(softmax − onehot) / tokens` on the local slice, seeded into the
//!   tape at the logits.
//! * Sequence parallelism: the final norm (row-wise) runs on this rank's block of token
//!   rows, which is all-gathered back into `[b, s, d]` before the LM head (the
//!   vocabulary-parallel loss sees every token, in order, against `[b, s]` targets).
//! * Tied embeddings: the head multiplies by this rank's rows of the word embedding,
//!   `logits = h Eᵀ` (`E` stored `[V, d]`, used transposed).

use super::layers::{vocab_slice, Linear, Norm};
use super::params::{Init, ParamBuilder};
use super::sharding::Split;
use super::tape::{all_reduce, Mode, Tape, V};
use super::{Ctx, ModelSpec, INIT_STD};
use crate::comm::{Communicator, ReduceOp};
use crate::error::Result;
use partitioner::{Arch, LayerKind};
use tch::{Kind, Reduction, Tensor};

/// Where a chunk's backward is seeded.
pub enum Seed {
    /// A hidden output `[b, s, d]` seeded with the next chunk's gradient.
    Hidden(V),
    /// The mean loss (tp = 1), seeded with the loss scale.
    Loss(V),
    /// Vocabulary-sharded logits and `d(mean loss)/d(logits)` on the slice (tp > 1).
    Logits(V, Tensor),
}

/// Final norm, LM head and loss (see the module docs).
#[derive(Debug)]
pub struct Head {
    norm: Norm,
    lm_head: Linear,
    vocab: usize,
    lo: i64,
    n_local: i64,
    tp_size: usize,
}

impl Head {
    /// `word_embedding`: the tied embedding's local rows when the head is tied and the
    /// embedding is on the same chunk.
    pub fn new(
        b: &mut ParamBuilder,
        spec: &ModelSpec,
        word_embedding: Option<&Tensor>,
    ) -> Result<Head> {
        let s = &spec.shape;
        let (d, v) = (s.d_model, s.vocab);
        let norm = Norm::new(
            b,
            LayerKind::Head,
            "ln_f",
            d,
            s.arch == Arch::Llama,
            spec.norm_eps,
        )?;
        let lm_head = match (spec.tie_embeddings, word_embedding) {
            (true, Some(wte)) => Linear::dense("embed.wte".into(), wte.shallow_clone(), None, true),
            (true, None) => {
                let split = Split::Rows { padded: true };
                let wte = b.param(
                    LayerKind::Embedding,
                    "wte",
                    &[v, d],
                    Init::Normal(INIT_STD),
                    split,
                )?;
                if let Some(p) = b.params.last_mut() {
                    p.tied_copy = true;
                    p.owner = false;
                }
                Linear::dense("embed.wte".into(), wte, None, true)
            }
            (false, _) => {
                let split = Split::Cols { padded: true };
                let w = b.param(
                    LayerKind::Head,
                    "lm_head.weight",
                    &[d, v],
                    Init::Normal(INIT_STD),
                    split,
                )?;
                Linear::dense("head.lm_head.weight".into(), w, None, false)
            }
        };
        let (lo, n_local) = vocab_slice(v, b.tp.rank, b.tp.size);
        Ok(Head {
            norm,
            lm_head,
            vocab: v,
            lo,
            n_local,
            tp_size: b.tp.size,
        })
    }

    /// Runs the head on `x` against `targets` (`[b, s]`); returns the loss value and where
    /// the backward is seeded.
    pub fn forward(
        &self,
        tape: &mut Tape,
        x: V,
        targets: &Tensor,
        tp: &mut dyn Communicator,
    ) -> Result<(V, Seed)> {
        let h = tape.seg1(&[x], |t, _| self.norm.forward(&t[0]))?;
        let h = match tape.sequence_parallel() {
            true => h,
            false => tape.copy_to_tp_region(h),
        };
        if self.tp_size == 1 {
            let v = self.vocab as i64;
            let loss = tape.seg1(&[h], |t, rec| {
                let logits = self.lm_head.forward(&t[0], rec)?;
                logits
                    .f_view([-1, v])
                    .ctx("logits view")?
                    .f_cross_entropy_loss::<Tensor>(
                        &targets.f_view([-1]).ctx("targets view")?,
                        None,
                        Reduction::Mean,
                        -100,
                        0.0,
                    )
                    .ctx("cross entropy")
            })?;
            return Ok((loss, Seed::Loss(loss)));
        }
        let logits = if tape.sequence_parallel() {
            let z = tape.column_linears(h, vec![self.lm_head.tensors()], tp)?[0];
            tape.seg1(&[z], |t, _| self.mask_padding(t[0].shallow_clone()))?
        } else {
            tape.seg1(&[h], |t, rec| {
                let z = self.lm_head.forward(&t[0], rec)?;
                self.mask_padding(z)
            })?
        };
        let (loss, dlogits) =
            vocab_parallel_cross_entropy(tape.value(logits), targets, self.lo, self.n_local, tp)?;
        let loss = tape.push(loss);
        Ok((loss, Seed::Logits(logits, dlogits)))
    }

    /// The logits of the last position of `x` (`[b, s, d]`) over the whole vocabulary,
    /// `[b, V]` in f32, the same on every tensor-parallel rank (each rank's vocabulary
    /// slice is gathered by a sum of zero-padded slices: `b·V` values, not `b·s·V`).
    pub fn next_token_logits(
        &self,
        tape: &mut Tape,
        x: V,
        tp: &mut dyn Communicator,
    ) -> Result<Tensor> {
        let seq = tape.value(x).size()[1];
        let last = tape.seg1(&[x], |t, _| {
            t[0].f_narrow(1, seq - 1, 1).ctx("last position")
        })?;
        let h = tape.seg1(&[last], |t, _| self.norm.forward(&t[0]))?;
        let z = tape.seg1(&[h], |t, rec| {
            let z = self.lm_head.forward(&t[0], rec)?;
            z.f_squeeze_dim(1)
                .and_then(|z| z.f_to_kind(Kind::Float))
                .ctx("logits")
        })?;
        let z = tape.value(z);
        if self.tp_size == 1 {
            return Ok(z.shallow_clone());
        }
        let real = (self.vocab as i64 - self.lo).clamp(0, self.n_local);
        let b = z.size()[0];
        let c = "gathering logits";
        let full = Tensor::f_zeros([b, self.vocab as i64], (Kind::Float, z.device())).ctx(c)?;
        if real > 0 {
            full.f_narrow(1, self.lo, real)
                .and_then(|mut dst| dst.f_copy_(&z.f_narrow(1, 0, real)?))
                .ctx(c)?;
        }
        all_reduce(&full, tp, ReduceOp::Sum)
    }

    /// This rank's logits of the hidden state `x` (`[b, s, n_local]`, padded columns −∞),
    /// outside any autograd graph: what the loss is computed from, for inspection.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let mut tape = Tape::new(Mode::Eval, false, x);
        let z = tape.seg1(&[0], |t, rec| {
            let h = self.norm.forward(&t[0])?;
            self.lm_head.forward(&h, rec)
        })?;
        self.mask_padding(tape.value(z).detach())
    }

    /// The LM head when it is a linear layer of its own (untied).
    pub fn lm_head_mut(&mut self) -> Option<&mut Linear> {
        (!self.lm_head.transposed).then_some(&mut self.lm_head)
    }

    /// Adds −∞ to the padded vocabulary columns of this rank's logits.
    fn mask_padding(&self, z: Tensor) -> Result<Tensor> {
        let real = (self.vocab as i64 - self.lo).clamp(0, self.n_local);
        if real == self.n_local {
            return Ok(z);
        }
        let opts = (z.kind(), z.device());
        let mask = Tensor::f_zeros([real], opts)
            .and_then(|zeros| {
                let pad = Tensor::f_full([self.n_local - real], f64::NEG_INFINITY, opts)?;
                Tensor::f_cat(&[zeros, pad], 0)
            })
            .ctx("vocab padding mask")?;
        z.f_add(&mask).ctx("vocab padding mask")
    }
}

/// Mean cross-entropy over all tokens from vocabulary-sharded logits `[b, s, n_local]`
/// (this rank's columns start at id `lo`); returns the loss and the gradient of the mean
/// loss w.r.t. the local logits, `(softmax − onehot) / tokens`.
fn vocab_parallel_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    lo: i64,
    n_local: i64,
    tp: &mut dyn Communicator,
) -> Result<(Tensor, Tensor)> {
    let c = "vocab-parallel cross-entropy";
    let z = logits.f_view([-1, n_local]).ctx(c)?;
    let tokens = z.size()[0];
    let max = all_reduce(&z.f_amax([-1], false).ctx(c)?, tp, ReduceOp::Max)?;
    let exp = z
        .f_sub(&max.f_unsqueeze(-1).ctx(c)?)
        .and_then(|t| t.f_exp())
        .ctx(c)?;
    let sum_exp = all_reduce(
        &exp.f_sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
            .ctx(c)?,
        tp,
        ReduceOp::Sum,
    )?;
    let local = targets
        .f_view([-1])
        .and_then(|t| t.f_sub_scalar(lo))
        .ctx(c)?;
    let inside = local
        .f_ge(0)
        .and_then(|a| local.f_lt(n_local).and_then(|b| a.f_logical_and(&b)))
        .ctx(c)?;
    let ids = local.f_mul(&inside).and_then(|t| t.f_unsqueeze(1)).ctx(c)?;
    let inside_f = inside
        .f_to_kind(z.kind())
        .and_then(|t| t.f_unsqueeze(1))
        .ctx(c)?;
    let picked = z
        .f_gather(1, &ids, false)
        .and_then(|t| t.f_mul(&inside_f))
        .and_then(|t| t.f_squeeze_dim(1))
        .ctx(c)?;
    let target_logit = all_reduce(&picked, tp, ReduceOp::Sum)?;
    let per_token = sum_exp
        .f_log()
        .and_then(|l| l.f_add(&max))
        .and_then(|l| l.f_sub(&target_logit))
        .ctx(c)?;
    let loss = per_token.f_mean(Kind::Float).ctx(c)?;
    // softmax − onehot, without materialising the one-hot: subtract 1 at each target.
    let mut dlogits = exp.f_div(&sum_exp.f_unsqueeze(-1).ctx(c)?).ctx(c)?;
    let _ = dlogits
        .f_scatter_add_(1, &ids, &inside_f.f_neg().ctx(c)?)
        .ctx(c)?;
    let dlogits = dlogits
        .f_div_scalar(tokens as f64)
        .and_then(|g| g.f_view(logits.size().as_slice()))
        .ctx(c)?;
    Ok((loss, dlogits))
}
