//! Executes one rank's row of a lowered, validated [`Schedule`] for one step.
//!
//! The executor interprets actions literally — it has no schedule-specific control flow —
//! so any schedule that passes validation and simulation in the partitioner runs here:
//! GPipe, 1F1B, interleaved 1F1B (several chunks per rank) and zero-bubble (I/W split).
//!
//! * Receives for the whole step are posted up front ([`Communicator::post_recv`]), in
//!   schedule order, so transfers can land while the rank computes.
//! * Activations in flight are stashed by (chunk, microbatch).
//! * A backward on a non-last chunk seeds autograd with the received gradient `g` through
//!   the surrogate `sum(y ⊙ g)`, whose gradient w.r.t. `y` is exactly `g`; on the last
//!   chunk the surrogate is `loss / microbatches`.
//! * `B` runs `surrogate.backward()` (input and weight gradients at once). `I` computes
//!   only the input gradient with `autograd.grad(surrogate, input, retain_graph=true)`;
//!   the later `W` computes the weight gradients with `autograd.grad(surrogate, params)`
//!   and adds them to `.grad`, so B and I+W leave the same gradients.
//!
//! Invariants: every stashed microbatch is consumed by its backward (training) or never
//! stashed (forward-only); received tensors are checked for dtype, shape, chunk and
//! microbatch before use.
//!
//! [`Schedule`]: partitioner::Schedule

use crate::comm::wire::{self, Expect};
use crate::comm::{Communicator, Tag};
use crate::error::{Error, Result};
use crate::model::{LinearRecord, Param, StageInput, StageModel, StageOutput};
use crate::tp::{Grad, TpForward, TpStageModel};
use partitioner::{Action, ActionKind, MicrobatchId, Rank, StageId};
use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tch::{Kind, Tensor};

/// Where chunks live: chunk `c` is on rank `c % pp`, in slot `c / pp` of that rank.
#[derive(Clone, Copy, Debug)]
pub struct PipelineLayout {
    pub pp: usize,
    pub n_chunks: usize,
}

impl PipelineLayout {
    pub fn rank_of(&self, chunk: usize) -> Rank {
        Rank(chunk % self.pp)
    }
    pub fn slot_of(&self, chunk: usize) -> usize {
        chunk / self.pp
    }
    pub fn is_first(&self, chunk: usize) -> bool {
        chunk == 0
    }
    pub fn is_last(&self, chunk: usize) -> bool {
        chunk + 1 == self.n_chunks
    }
}

/// Per-microbatch data for this rank.
pub struct StepData {
    /// Token ids `[b, s]` per microbatch (rank holding chunk 0 only).
    pub tokens: Vec<Tensor>,
    /// Target ids `[b, s]` per microbatch (rank holding the last chunk only).
    pub targets: Vec<Tensor>,
    /// Shape of the hidden state exchanged between chunks, `[b, s, d]`.
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
    /// Sum of microbatch losses (rank holding the last chunk only).
    pub loss_sum: f64,
    /// Most (chunk, microbatch) pairs stashed for backward at once.
    pub peak_stash: usize,
    /// Time in F, B, I and W.
    pub compute_s: f64,
    /// Time waiting in receives.
    pub wait_s: f64,
    /// Wall-clock time (µs since the Unix epoch) at which the step started.
    pub start_unix_us: f64,
    pub spans: Vec<Span>,
}

enum Stashed {
    /// A plain chunk: its input leaf (None on chunk 0), its output (hidden or loss), and,
    /// for schedules that split the backward, every linear layer's input and output.
    Plain {
        input: Option<Tensor>,
        output: Tensor,
        records: Vec<LinearRecord>,
    },
    /// A plain chunk after its I: the linear layers' inputs and output gradients, from
    /// which W forms the weight gradients.
    PlainW {
        records: Vec<LinearRecord>,
        output_grads: Vec<Tensor>,
    },
    /// A tensor-parallel chunk's segmented forward.
    Tp(TpForward),
    /// A tensor-parallel chunk whose backward ran in its I action.
    TpDone,
}

/// A chunk of the model as this rank holds it: whole, or a tensor-parallel shard.
pub enum ChunkModel {
    Plain(StageModel),
    Tp(TpStageModel),
}

impl ChunkModel {
    /// The chunk's parameters (shards, for tensor parallelism).
    pub fn params(&self) -> &[Param] {
        match self {
            ChunkModel::Plain(m) => m.params(),
            ChunkModel::Tp(m) => m.params(),
        }
    }
}

type Key = (StageId, MicrobatchId);

/// Runs `actions` (this rank's lowered row) with `chunks[slot]` the model of each local
/// chunk; `tp` is the tensor-parallel group (of one rank without tensor parallelism). With `training` false the schedule must be forward-only and nothing is stashed
/// or differentiated.
pub fn run_actions(
    actions: &[Action],
    chunks: &[ChunkModel],
    comm: &mut dyn Communicator,
    tp: &mut dyn Communicator,
    layout: PipelineLayout,
    data: &StepData,
    training: bool,
) -> Result<StepStats> {
    let t0 = Instant::now();
    let mut stats = StepStats {
        start_unix_us: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1e6),
        ..StepStats::default()
    };
    let mut stash: HashMap<Key, Stashed> = HashMap::new();
    let mut received: HashMap<Key, Tensor> = HashMap::new();
    let mut outbox: HashMap<Key, Tensor> = HashMap::new();
    let mut grads_in: HashMap<Key, Tensor> = HashMap::new();
    let mut grads_out: HashMap<Key, Tensor> = HashMap::new();
    let expect = |chunk: usize, mb: MicrobatchId| Expect {
        kind: Kind::Float,
        shape: data.hidden_shape.clone(),
        chunk,
        microbatch: mb.0,
    };
    let bug = |what: &str, a: &Action| Error::Internal(format!("{a}: no {what} (schedule bug)"));
    let scale = 1.0 / data.microbatches as f64;
    // Zero-bubble schedules split the backward: keep what W needs from each forward.
    let split_backward = actions.iter().any(|a| a.kind == ActionKind::InputGrad);
    let model_of = |a: &Action| {
        chunks
            .get(layout.slot_of(a.stage.0))
            .ok_or_else(|| bug("model chunk", a))
    };

    // Post every receive of the step now, in schedule order.
    for a in actions {
        let c = a.stage.0;
        let (from, kind) = match a.kind {
            ActionKind::RecvAct => (layout.rank_of(c.wrapping_sub(1)), Tag::ACTIVATION),
            ActionKind::RecvGrad => (layout.rank_of(c + 1), Tag::GRADIENT),
            _ => continue,
        };
        let tag = Tag::microbatch(kind, layout.slot_of(c), a.mb.0);
        comm.post_recv(from, tag, expect(c, a.mb).message_len())?;
    }

    for a in actions {
        let start = t0.elapsed().as_secs_f64();
        let (c, mb) = (a.stage.0, a.mb);
        let key = (a.stage, mb);
        match a.kind {
            ActionKind::RecvAct => {
                let from = layout.rank_of(c - 1);
                let bytes = comm.recv(
                    from,
                    Tag::microbatch(Tag::ACTIVATION, layout.slot_of(c), mb.0),
                )?;
                received.insert(key, wire::decode_tensor(&bytes, from, &expect(c, mb))?);
            }
            ActionKind::RecvGrad => {
                let from = layout.rank_of(c + 1);
                let bytes = comm.recv(
                    from,
                    Tag::microbatch(Tag::GRADIENT, layout.slot_of(c), mb.0),
                )?;
                grads_in.insert(key, wire::decode_tensor(&bytes, from, &expect(c, mb))?);
            }
            ActionKind::SendAct => {
                let t = outbox.remove(&key).ok_or_else(|| bug("activation", a))?;
                let tag = Tag::microbatch(Tag::ACTIVATION, layout.slot_of(c + 1), mb.0);
                comm.send(
                    layout.rank_of(c + 1),
                    tag,
                    wire::encode_tensor(&t, c + 1, mb.0)?,
                )?;
            }
            ActionKind::SendGrad => {
                let t = grads_out
                    .remove(&key)
                    .ok_or_else(|| bug("input gradient", a))?;
                let tag = Tag::microbatch(Tag::GRADIENT, layout.slot_of(c - 1), mb.0);
                comm.send(
                    layout.rank_of(c - 1),
                    tag,
                    wire::encode_tensor(&t, c - 1, mb.0)?,
                )?;
            }
            ActionKind::Forward => {
                let targets = if layout.is_last(c) {
                    Some(data.targets.get(mb.0).ok_or_else(|| bug("targets", a))?)
                } else {
                    None
                };
                let received_input = if layout.is_first(c) {
                    None
                } else {
                    Some(
                        received
                            .remove(&key)
                            .ok_or_else(|| bug("received activation", a))?,
                    )
                };
                let tokens = || data.tokens.get(mb.0).ok_or_else(|| bug("tokens", a));
                let (output, stashed) = match model_of(a)? {
                    ChunkModel::Plain(model) => {
                        let input = received_input.map(|h| {
                            if training {
                                h.set_requires_grad(true)
                            } else {
                                h
                            }
                        });
                        let stage_in = match &input {
                            Some(h) => StageInput::Hidden(h),
                            None => StageInput::Tokens(tokens()?),
                        };
                        let mut records = Vec::new();
                        let out = if training {
                            model.forward_recorded(stage_in, targets, &mut records)?
                        } else {
                            tch::no_grad(|| model.forward(stage_in, targets))?
                        };
                        if !split_backward {
                            records.clear();
                        }
                        let output = match out {
                            StageOutput::Loss(loss) | StageOutput::Hidden(loss) => loss,
                        };
                        let visible = output.detach();
                        (
                            visible,
                            Stashed::Plain {
                                input,
                                output,
                                records,
                            },
                        )
                    }
                    ChunkModel::Tp(model) => {
                        let input = match received_input {
                            Some(h) => h,
                            None => tokens()?.shallow_clone(),
                        };
                        let fwd = model.forward(&input, targets, tp, training)?;
                        (fwd.output.shallow_clone(), Stashed::Tp(fwd))
                    }
                };
                if layout.is_last(c) {
                    stats.loss_sum += output
                        .f_double_value(&[])
                        .map_err(Error::torch("loss value"))?;
                } else {
                    outbox.insert(key, output);
                }
                if training {
                    stash.insert(key, stashed);
                    stats.peak_stash = stats.peak_stash.max(stash.len());
                }
            }
            ActionKind::Backward | ActionKind::InputGrad => {
                let entry = stash
                    .remove(&key)
                    .ok_or_else(|| bug("stashed forward", a))?;
                let grad_out = if layout.is_last(c) {
                    None
                } else {
                    Some(
                        grads_in
                            .remove(&key)
                            .ok_or_else(|| bug("output gradient", a))?,
                    )
                };
                match entry {
                    Stashed::Plain {
                        input,
                        output,
                        records,
                    } => {
                        let surrogate = match &grad_out {
                            None => output.f_mul_scalar(scale),
                            Some(g) => output.f_mul(g).and_then(|t| t.f_sum(Kind::Float)),
                        }
                        .map_err(Error::torch(format!("backward seed of {a}")))?;
                        if a.kind == ActionKind::Backward {
                            surrogate
                                .f_backward()
                                .map_err(Error::torch(format!("backward of {a}")))?;
                            if let Some(input) = input {
                                grads_out.insert(key, input.grad());
                            }
                        } else {
                            let params = model_of(a)?.params();
                            let (input_grad, output_grads) =
                                input_grad_pass(&surrogate, input.as_ref(), params, &records)
                                    .map_err(Error::torch(format!("input gradient of {a}")))?;
                            if let Some(g) = input_grad {
                                grads_out.insert(key, g);
                            }
                            stash.insert(
                                key,
                                Stashed::PlainW {
                                    records,
                                    output_grads,
                                },
                            );
                        }
                    }
                    Stashed::Tp(fwd) => {
                        // The segmented tape has no separate weight pass: I does the whole
                        // backward and the W that follows has nothing left to do.
                        let seed = match grad_out {
                            None => Grad::LossScale(scale),
                            Some(g) => Grad::Output(g),
                        };
                        if let Some(g) = TpStageModel::backward(fwd, seed, tp)? {
                            grads_out.insert(key, g);
                        }
                        if a.kind == ActionKind::InputGrad {
                            stash.insert(key, Stashed::TpDone);
                        }
                    }
                    Stashed::TpDone | Stashed::PlainW { .. } => {
                        return Err(bug("forward before this backward", a))
                    }
                }
            }
            ActionKind::WeightGrad => {
                match stash
                    .remove(&key)
                    .ok_or_else(|| bug("stashed forward", a))?
                {
                    Stashed::PlainW {
                        records,
                        output_grads,
                    } => weight_grad_pass(&records, &output_grads)
                        .map_err(Error::torch(format!("weight gradients of {a}")))?,
                    Stashed::TpDone => {}
                    Stashed::Tp(_) | Stashed::Plain { .. } => {
                        return Err(bug("input-gradient pass before W", a))
                    }
                }
            }
        }
        let end = t0.elapsed().as_secs_f64();
        if a.kind.is_compute() {
            stats.compute_s += end - start;
        } else if matches!(a.kind, ActionKind::RecvAct | ActionKind::RecvGrad) {
            stats.wait_s += end - start;
        }
        stats.spans.push(Span {
            action: *a,
            start,
            end,
        });
    }
    if !stash.is_empty() || !outbox.is_empty() || !grads_out.is_empty() {
        return Err(Error::Internal(format!(
            "schedule left work undone: {} stashed, {} unsent activations, {} unsent gradients",
            stash.len(),
            outbox.len(),
            grads_out.len()
        )));
    }
    Ok(stats)
}

/// Zero-bubble `I` for a plain chunk: one autograd pass from the backward seed to the
/// chunk's input, the parameters that are not linear-layer weights (norms, embeddings),
/// and every linear layer's output. Weight-gradient GEMMs are skipped (autograd computes
/// only what the requested inputs need); the norm and embedding gradients, which are
/// cheap, are accumulated now. Returns the input gradient and the linear output gradients.
fn input_grad_pass(
    surrogate: &Tensor,
    input: Option<&Tensor>,
    params: &[Param],
    records: &[LinearRecord],
) -> std::result::Result<(Option<Tensor>, Vec<Tensor>), tch::TchError> {
    let linear: std::collections::HashSet<usize> = records
        .iter()
        .flat_map(|r| std::iter::once(&r.weight).chain(r.bias.as_ref()))
        .map(|t| t.data_ptr() as usize)
        .collect();
    let others: Vec<&Param> = params
        .iter()
        .filter(|p| !linear.contains(&(p.tensor.data_ptr() as usize)))
        .collect();
    let mut wrt: Vec<&Tensor> = input.into_iter().collect();
    wrt.extend(others.iter().map(|p| &p.tensor));
    wrt.extend(records.iter().map(|r| &r.y));
    let mut grads = Tensor::f_run_backward(&[surrogate], &wrt, false, false)?.into_iter();
    let input_grad = if input.is_some() { grads.next() } else { None };
    tch::no_grad(|| -> std::result::Result<(), tch::TchError> {
        for (p, g) in others.iter().zip(grads.by_ref()) {
            let _ = p.tensor.grad().f_add_(&g)?;
        }
        Ok(())
    })?;
    Ok((input_grad, grads.collect()))
}

/// Zero-bubble `W` for a plain chunk: `dA += Xᵀ dY` and `db += Σ dY` for every linear
/// layer, from the inputs recorded in the forward and the output gradients from `I`.
fn weight_grad_pass(
    records: &[LinearRecord],
    output_grads: &[Tensor],
) -> std::result::Result<(), tch::TchError> {
    tch::no_grad(|| {
        for (r, dy) in records.iter().zip(output_grads) {
            let width_in = *r.x.size().last().unwrap_or(&1);
            let width_out = *dy.size().last().unwrap_or(&1);
            let x = r.x.detach().f_reshape([-1, width_in])?;
            let dy = dy.f_reshape([-1, width_out])?;
            let _ = r
                .weight
                .grad()
                .f_add_(&x.f_transpose(0, 1)?.f_matmul(&dy)?)?;
            if let Some(b) = &r.bias {
                let _ = b.grad().f_add_(&dy.f_sum_dim_intlist(
                    [0i64].as_slice(),
                    false,
                    Kind::Float,
                )?)?;
            }
        }
        Ok(())
    })
}
