//! One rank's part of pipelined generation.
//!
//! The prompts are split into microbatches that circulate through the stages: in every
//! round each stage runs microbatch 0, 1, …, m−1 in turn, the last stage samples each
//! microbatch's next tokens and sends them back to the first stage, which feeds them in
//! the next round. With `m ≥ pp` microbatches every stage has work while the others run
//! (stage `i` runs microbatch `j` while stage `i + 1` runs `j − 1`); with one prompt the
//! pipeline carries one token at a time and each stage idles while the others compute.
//! Round 0 is the prefill (the whole left-padded prompts); later rounds feed one token
//! per row with the KV cache, or, without it, the whole sequence again (the reference
//! the cache is tested against).
//!
//! Messages: hidden states go to the next stage with the activation tag, sampled tokens
//! back to the first stage with the gradient tag (generation has no gradients); both
//! carry the microbatch, and messages of one (sender, tag) arrive in order.
//!
//! Invariants: every rank of a stage's tensor-parallel group runs the same steps in the
//! same order (their collectives pair up); the last stage's tp ranks see identical
//! logits and draw identical tokens, so each can send them to its own first-stage peer.

use super::batch::Microbatch;
use super::sample::Sampling;
use super::stats::{Clock, Emissions};
use crate::comm::groups::ParallelComms;
use crate::comm::wire::{self, Expect};
use crate::comm::Tag;
use crate::error::{Error, Result};
use crate::model::kv::KvCache;
use crate::model::Model;
use partitioner::Rank;
use tch::{Kind, Tensor};

const HIDDEN: i32 = Tag::ACTIVATION;
const TOKENS: i32 = Tag::GRADIENT;

/// What every rank of a generation job agrees on.
#[derive(Clone, Debug)]
pub struct Job {
    pub microbatches: Vec<Microbatch>,
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Use the KV cache (off: recompute the whole sequence for every token).
    pub kv_cache: bool,
}

/// What one rank ends with.
pub struct RankRun {
    /// Generated ids per microbatch per row (first and last stage; empty elsewhere).
    pub generated: Vec<Vec<Vec<i64>>>,
    /// The last stage's emission times.
    pub emissions: Option<Emissions>,
    pub wall_s: f64,
    pub busy_s: f64,
    pub kv_cache_bytes: u64,
}

struct Ctx<'a> {
    stage: usize,
    pp: usize,
    d_model: i64,
    kind: Kind,
    job: &'a Job,
}

impl Ctx<'_> {
    fn first(&self) -> bool {
        self.stage == 0
    }

    fn last(&self) -> bool {
        self.stage + 1 == self.pp
    }

    /// Tokens fed in `round`: the prompt (and, without a cache, all generated so far).
    fn width(&self, mb: &Microbatch, round: usize) -> usize {
        match (round, self.job.kv_cache) {
            (0, _) => mb.longest,
            (_, true) => 1,
            (r, false) => mb.longest + r,
        }
    }

    fn expect_hidden(&self, mb: &Microbatch, m: usize, round: usize) -> Expect {
        Expect {
            kind: self.kind,
            shape: vec![mb.rows() as i64, self.width(mb, round) as i64, self.d_model],
            chunk: self.stage,
            microbatch: m,
        }
    }
}

/// Runs this rank's stage `stage` of `pp` over every round of `job`.
pub fn run_rank(
    chunk: &Model,
    stage: usize,
    pp: usize,
    job: &Job,
    comms: &mut ParallelComms,
) -> Result<RankRun> {
    let spec = chunk.spec();
    let ctx = Ctx {
        stage,
        pp,
        d_model: spec.shape.d_model as i64,
        kind: spec.kind,
        job,
    };
    let mbs = &job.microbatches;
    let max_len = |mb: &Microbatch| mb.longest + job.max_new_tokens;
    let mut caches: Vec<KvCache> = mbs
        .iter()
        .map(|mb| KvCache::new(chunk.cache_shape(mb.rows(), max_len(mb)), mb.pad_tensor()))
        .collect::<Result<_>>()?;
    let kv_cache_bytes = caches.iter().map(KvCache::bytes).sum::<usize>() as u64;
    let mut generated: Vec<Vec<Vec<i64>>> = mbs.iter().map(|mb| vec![vec![]; mb.rows()]).collect();
    let mut emissions = ctx.last().then(|| Emissions {
        at: vec![Vec::with_capacity(job.max_new_tokens); mbs.len()],
        rows: mbs.iter().map(Microbatch::rows).collect(),
    });
    comms.world.barrier()?;
    let mut clock = Clock::start();
    for round in 0..job.max_new_tokens {
        for (m, mb) in mbs.iter().enumerate() {
            let input = input(&ctx, comms, &mut clock, &mut generated[m], mb, m, round)?;
            if !job.kv_cache {
                caches[m] =
                    KvCache::new(chunk.cache_shape(mb.rows(), max_len(mb)), mb.pad_tensor())?;
            }
            let out = clock.busy(|| chunk.infer(&input, &mut caches[m], comms.tp.as_mut()))?;
            if !ctx.last() {
                let bytes = clock.busy(|| wire::encode_tensor(&out, stage + 1, m))?;
                comms
                    .pp
                    .send(Rank(stage + 1), Tag::microbatch(HIDDEN, 0, m), bytes)?;
                continue;
            }
            let next = clock.busy(|| pick_tokens(&out, &job.sampling, mb, round))?;
            for (row, &t) in generated[m].iter_mut().zip(&next) {
                row.push(t);
            }
            if let Some(e) = emissions.as_mut() {
                e.at[m].push(clock.now());
            }
            if pp > 1 && round + 1 < job.max_new_tokens {
                let t = Tensor::from_slice(&next);
                let bytes = wire::encode_tensor(&t, 0, m)?;
                comms
                    .pp
                    .send(Rank(0), Tag::microbatch(TOKENS, 0, m), bytes)?;
            }
        }
    }
    let wall_s = clock.now();
    comms.pp.flush()?;
    Ok(RankRun {
        generated: if ctx.first() || ctx.last() {
            generated
        } else {
            Vec::new()
        },
        emissions,
        wall_s,
        busy_s: clock.busy_s(),
        kv_cache_bytes,
    })
}

/// The chunk's input for microbatch `m` in `round`: token ids on the first stage (after
/// taking the previous round's tokens from the last stage), else the previous stage's
/// hidden state.
fn input(
    ctx: &Ctx<'_>,
    comms: &mut ParallelComms,
    clock: &mut Clock,
    generated: &mut [Vec<i64>],
    mb: &Microbatch,
    m: usize,
    round: usize,
) -> Result<Tensor> {
    if !ctx.first() {
        let from = Rank(ctx.stage - 1);
        let bytes = comms.pp.recv(from, Tag::microbatch(HIDDEN, 0, m))?;
        return clock.busy(|| wire::decode_tensor(&bytes, from, &ctx.expect_hidden(mb, m, round)));
    }
    if round > 0 && !ctx.last() {
        let from = Rank(ctx.pp - 1);
        let bytes = comms.pp.recv(from, Tag::microbatch(TOKENS, 0, m))?;
        let expect = Expect {
            kind: Kind::Int64,
            shape: vec![mb.rows() as i64],
            chunk: 0,
            microbatch: m,
        };
        let t = wire::decode_tensor(&bytes, from, &expect)?;
        let ids: Vec<i64> = Vec::try_from(&t).map_err(Error::torch("received tokens"))?;
        for (row, id) in generated.iter_mut().zip(ids) {
            row.push(id);
        }
    }
    clock.busy(|| {
        if round > 0 && ctx.job.kv_cache {
            let last: Vec<i64> = generated.iter().map(|g| *g.last().unwrap_or(&0)).collect();
            Tensor::f_from_slice(&last)
                .and_then(|t| t.f_view([mb.rows() as i64, 1]))
                .map_err(Error::torch("next tokens"))
        } else {
            mb.tokens(generated)
        }
    })
}

/// Samples each row's next token from the logits `[b, V]`.
fn pick_tokens(
    logits: &Tensor,
    sampling: &Sampling,
    mb: &Microbatch,
    round: usize,
) -> Result<Vec<i64>> {
    let v = logits.size()[1] as usize;
    let flat: Vec<f32> = logits
        .f_to_kind(Kind::Float)
        .and_then(|t| t.f_contiguous())
        .and_then(|t| t.f_view([-1]))
        .and_then(|t| Vec::<f32>::try_from(&t))
        .map_err(Error::torch("logits"))?;
    Ok(flat
        .chunks_exact(v)
        .enumerate()
        .map(|(r, row)| sampling.pick(row, mb.first + r, round) as i64)
        .collect())
}
