//! Executes one rank's row of a lowered, validated [`Schedule`] for one step.
//!
//! The executor interprets actions literally — it has no schedule-specific control flow —
//! so any schedule that passes validation and simulation in the partitioner runs here.
//! Activations in flight are stashed by microbatch; a backward on a non-last stage seeds
//! autograd with the received gradient `g` through the surrogate `sum(y ⊙ g)`, whose
//! gradient w.r.t. `y` is exactly `g`.
//!
//! Invariants: every stashed microbatch is consumed by its backward (training) or never
//! stashed (forward-only); received tensors are checked for dtype, shape and microbatch
//! before use.

use crate::comm::wire::{self, Expect};
use crate::comm::{Communicator, Tag};
use crate::error::{Error, Result};
use crate::model::{StageInput, StageModel, StageOutput};
use partitioner::{Action, ActionKind, MicrobatchId, Rank};
use std::collections::HashMap;
use std::time::Instant;
use tch::{Kind, Tensor};

/// Where a stage sits in the pipeline.
#[derive(Clone, Copy, Debug)]
pub struct StagePeers {
    /// Rank holding the previous stage (None on the first stage).
    pub prev: Option<Rank>,
    /// Rank holding the next stage (None on the last stage).
    pub next: Option<Rank>,
}

/// Per-microbatch data for this stage.
pub struct StepData {
    /// Token ids `[b, s]` per microbatch (first stage only).
    pub tokens: Vec<Tensor>,
    /// Target ids `[b, s]` per microbatch (last stage only).
    pub targets: Vec<Tensor>,
    /// Shape of the hidden state exchanged between stages, `[b, s, d]`.
    pub hidden_shape: Vec<i64>,
    /// Microbatches in the step (the loss of each is divided by this).
    pub microbatches: usize,
}

/// A timed action, seconds since the step started.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub action: Action,
    pub start: f64,
    pub end: f64,
}

/// What one step on one rank measured.
#[derive(Clone, Debug, Default)]
pub struct StepStats {
    /// Sum of microbatch losses (last stage only).
    pub loss_sum: f64,
    /// Most microbatches stashed at once.
    pub peak_stash: usize,
    /// Time in F and B.
    pub compute_s: f64,
    /// Time waiting in receives.
    pub wait_s: f64,
    pub spans: Vec<Span>,
}

struct Stashed {
    /// The stage's input leaf (None on the first stage, whose input is token ids).
    input: Option<Tensor>,
    /// Hidden output, or the microbatch loss on the last stage.
    output: Tensor,
}

/// Runs `actions` (this rank's lowered row). With `training` false the schedule must be
/// forward-only and nothing is stashed or differentiated.
pub fn run_actions(
    actions: &[Action],
    model: &StageModel,
    comm: &mut dyn Communicator,
    peers: StagePeers,
    data: &StepData,
    training: bool,
) -> Result<StepStats> {
    let t0 = Instant::now();
    let mut stats = StepStats::default();
    let mut stash: HashMap<MicrobatchId, Stashed> = HashMap::new();
    let mut received: HashMap<MicrobatchId, Tensor> = HashMap::new();
    let mut outbox: HashMap<MicrobatchId, Tensor> = HashMap::new();
    let mut grads_in: HashMap<MicrobatchId, Tensor> = HashMap::new();
    let mut grads_out: HashMap<MicrobatchId, Tensor> = HashMap::new();
    let expect = |mb: MicrobatchId| Expect {
        kind: Kind::Float,
        shape: data.hidden_shape.clone(),
        microbatch: mb.0,
    };
    let missing = |what: &str, a: &Action| {
        Error::Comm(format!(
            "{a}: no {what} for microbatch {} (schedule bug)",
            a.mb
        ))
    };
    let scale = 1.0 / data.microbatches as f64;

    for a in actions {
        let start = t0.elapsed().as_secs_f64();
        let mb = a.mb;
        match a.kind {
            ActionKind::RecvAct => {
                let from = peers.prev.ok_or_else(|| missing("previous stage", a))?;
                let bytes = comm.recv(from, Tag::microbatch(Tag::ACTIVATION, mb.0))?;
                received.insert(mb, wire::decode_tensor(&bytes, from, &expect(mb))?);
            }
            ActionKind::RecvGrad => {
                let from = peers.next.ok_or_else(|| missing("next stage", a))?;
                let bytes = comm.recv(from, Tag::microbatch(Tag::GRADIENT, mb.0))?;
                grads_in.insert(mb, wire::decode_tensor(&bytes, from, &expect(mb))?);
            }
            ActionKind::SendAct => {
                let to = peers.next.ok_or_else(|| missing("next stage", a))?;
                let t = outbox.remove(&mb).ok_or_else(|| missing("activation", a))?;
                comm.send(
                    to,
                    Tag::microbatch(Tag::ACTIVATION, mb.0),
                    wire::encode_tensor(&t, mb.0)?,
                )?;
            }
            ActionKind::SendGrad => {
                let to = peers.prev.ok_or_else(|| missing("previous stage", a))?;
                let t = grads_out
                    .remove(&mb)
                    .ok_or_else(|| missing("input gradient", a))?;
                comm.send(
                    to,
                    Tag::microbatch(Tag::GRADIENT, mb.0),
                    wire::encode_tensor(&t, mb.0)?,
                )?;
            }
            ActionKind::Forward => {
                let input = match peers.prev {
                    None => None,
                    Some(_) => {
                        let h = received
                            .remove(&mb)
                            .ok_or_else(|| missing("received activation", a))?;
                        Some(if training {
                            h.set_requires_grad(true)
                        } else {
                            h
                        })
                    }
                };
                let stage_in = match &input {
                    Some(h) => StageInput::Hidden(h),
                    None => StageInput::Tokens(
                        data.tokens.get(mb.0).ok_or_else(|| missing("tokens", a))?,
                    ),
                };
                let targets = if peers.next.is_none() {
                    Some(
                        data.targets
                            .get(mb.0)
                            .ok_or_else(|| missing("targets", a))?,
                    )
                } else {
                    None
                };
                let out = if training {
                    model.forward(stage_in, targets)?
                } else {
                    tch::no_grad(|| model.forward(stage_in, targets))?
                };
                let output = match out {
                    StageOutput::Loss(loss) => {
                        stats.loss_sum += loss
                            .f_double_value(&[])
                            .map_err(Error::torch("loss value"))?;
                        loss
                    }
                    StageOutput::Hidden(h) => {
                        outbox.insert(mb, h.detach());
                        h
                    }
                };
                if training {
                    stash.insert(mb, Stashed { input, output });
                    stats.peak_stash = stats.peak_stash.max(stash.len());
                }
            }
            ActionKind::Backward => {
                let s = stash
                    .remove(&mb)
                    .ok_or_else(|| missing("stashed forward", a))?;
                let surrogate = match peers.next {
                    None => s.output.f_mul_scalar(scale),
                    Some(_) => {
                        let g = grads_in
                            .remove(&mb)
                            .ok_or_else(|| missing("output gradient", a))?;
                        s.output.f_mul(&g).and_then(|t| t.f_sum(Kind::Float))
                    }
                }
                .map_err(Error::torch(format!("backward seed of {a}")))?;
                surrogate
                    .f_backward()
                    .map_err(Error::torch(format!("backward of {a}")))?;
                if let Some(input) = s.input {
                    grads_out.insert(mb, input.grad());
                }
            }
        }
        let end = t0.elapsed().as_secs_f64();
        match a.kind {
            ActionKind::Forward | ActionKind::Backward => stats.compute_s += end - start,
            ActionKind::RecvAct | ActionKind::RecvGrad => stats.wait_s += end - start,
            _ => {}
        }
        stats.spans.push(Span {
            action: *a,
            start,
            end,
        });
    }
    if !stash.is_empty() || !outbox.is_empty() || !grads_out.is_empty() {
        return Err(Error::Comm(format!(
            "schedule left work undone: {} stashed, {} unsent activations, {} unsent gradients",
            stash.len(),
            outbox.len(),
            grads_out.len()
        )));
    }
    Ok(stats)
}
