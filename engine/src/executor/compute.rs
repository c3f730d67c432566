//! The executor's compute actions: forward (`F`), backward (`B`), input gradient (`I`) and
//! weight gradient (`W`) of one (chunk, microbatch).
//!
//! Invariant: `F` stashes its [`Forward`] in training; `B` or `I` consumes it (`I` leaves
//! the [`WeightWork`] that `W` consumes); at the end of a step nothing is left.

use super::{bug, Key, Step};
use crate::error::{Error, Result};
use crate::model::tape::WeightWork;
use crate::model::{Forward, Grad, Pass};
use partitioner::{Action, ActionKind};
use std::collections::HashMap;
use tch::Tensor;

enum Stashed {
    Forward(Forward),
    Weights(WeightWork),
}

/// Tensors in flight on this rank during a step.
#[derive(Default)]
pub(crate) struct State {
    stash: HashMap<Key, Stashed>,
    pub received: HashMap<Key, Tensor>,
    pub outbox: HashMap<Key, Tensor>,
    pub grads_in: HashMap<Key, Tensor>,
    pub grads_out: HashMap<Key, Tensor>,
    /// (microbatch, logits) of the last chunk, with `StepData::keep_logits`.
    pub logits: Vec<(usize, Tensor)>,
}

impl State {
    /// (chunk, microbatch) pairs held for a backward.
    pub fn stashed(&self) -> usize {
        self.stash.len()
    }

    pub fn check_done(&self) -> Result<()> {
        if self.stash.is_empty() && self.outbox.is_empty() && self.grads_out.is_empty() {
            return Ok(());
        }
        Err(Error::Internal(format!(
            "schedule left work undone: {} stashed, {} unsent activations, {} unsent gradients",
            self.stash.len(),
            self.outbox.len(),
            self.grads_out.len()
        )))
    }
}

/// `F`: runs the chunk on its input; returns the microbatch loss on the last chunk (else 0).
pub(super) fn forward(step: &mut Step<'_>, a: &Action) -> Result<f64> {
    let (c, key, l) = (a.stage.0, (a.stage, a.mb), step.layout);
    let targets = match l.is_last(c) {
        true => Some(
            step.data
                .targets
                .get(a.mb.0)
                .ok_or_else(|| bug("targets", a))?,
        ),
        false => None,
    };
    let input = match l.is_first(c) {
        true => step
            .data
            .tokens
            .get(a.mb.0)
            .ok_or_else(|| bug("tokens", a))?
            .shallow_clone(),
        false => step
            .state
            .received
            .remove(&key)
            .ok_or_else(|| bug("received activation", a))?,
    };
    let pass = match step.training {
        true => Pass::Train {
            split: step.split_backward,
        },
        false if step.data.keep_logits => Pass::EvalLogits,
        false => Pass::Eval,
    };
    let model = step
        .chunks
        .get(l.slot_of(c))
        .ok_or_else(|| bug("model chunk", a))?;
    let mut fwd = model.forward(&input, targets, step.tp, pass)?;
    if let Some(z) = fwd.logits.take() {
        step.state.logits.push((a.mb.0, z));
    }
    let mut loss = 0.0;
    if l.is_last(c) {
        loss = fwd
            .output
            .f_double_value(&[])
            .map_err(Error::torch("loss value"))?;
    } else {
        step.state.outbox.insert(key, fwd.output.shallow_clone());
    }
    if step.training {
        step.state.stash.insert(key, Stashed::Forward(fwd));
    }
    Ok(loss)
}

/// `B` (whole backward) or `I` (input gradient; the weight gradients wait for `W`).
pub(super) fn backward(step: &mut Step<'_>, a: &Action) -> Result<()> {
    let (c, key) = (a.stage.0, (a.stage, a.mb));
    let Some(Stashed::Forward(fwd)) = step.state.stash.remove(&key) else {
        return Err(bug("stashed forward", a));
    };
    let grad = match step.layout.is_last(c) {
        true => Grad::LossScale(1.0 / step.data.microbatches as f64),
        false => Grad::Output(
            step.state
                .grads_in
                .remove(&key)
                .ok_or_else(|| bug("output gradient", a))?,
        ),
    };
    let model = step
        .chunks
        .get(step.layout.slot_of(c))
        .ok_or_else(|| bug("model chunk", a))?;
    let (input_grad, work) = model.backward(fwd, grad, step.tp)?;
    if let Some(g) = input_grad {
        step.state.grads_out.insert(key, g);
    }
    match a.kind {
        ActionKind::InputGrad => {
            step.state.stash.insert(key, Stashed::Weights(work));
            Ok(())
        }
        // A whole backward after a split forward does its weight work at once.
        _ => work.run(),
    }
}

/// `W`: the weight gradients left by this microbatch's `I`.
pub(super) fn weight_grad(step: &mut Step<'_>, a: &Action) -> Result<()> {
    match step.state.stash.remove(&(a.stage, a.mb)) {
        Some(Stashed::Weights(work)) => work.run(),
        _ => Err(bug("input-gradient pass before this W", a)),
    }
}
