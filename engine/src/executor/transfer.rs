//! The executor's sends and receives of activations and gradients between chunks.
//!
//! Tensors travel without copies where the transport allows (MPI: from the sending
//! tensor's memory, into a receive tensor reused every step).
//!
//! Invariants: a received tensor is checked against what this rank expects (dtype, shape,
//! chunk, microbatch) before it is used, and is used only within its step.

use super::{bug, Step};
use crate::comm::wire::{self, Expect};
use crate::comm::Tag;
use crate::error::Result;
use partitioner::{Action, ActionKind, MicrobatchId};

fn expect(step: &Step<'_>, chunk: usize, mb: MicrobatchId) -> Expect {
    Expect {
        kind: step.data.hidden_kind,
        shape: step.data.hidden_shape.clone(),
        chunk,
        microbatch: mb.0,
    }
}

/// (peer, tag) of a receive action.
fn recv_route(step: &Step<'_>, a: &Action) -> (partitioner::Rank, Tag) {
    let (c, l) = (a.stage.0, step.layout);
    let (from, kind) = match a.kind {
        ActionKind::RecvAct => (l.rank_of(c.wrapping_sub(1)), Tag::ACTIVATION),
        _ => (l.rank_of(c + 1), Tag::GRADIENT),
    };
    (from, Tag::microbatch(kind, l.slot_of(c), a.mb.0))
}

/// Posts every receive of the step, in schedule order.
pub(super) fn post_receives(step: &mut Step<'_>, actions: &[Action]) -> Result<()> {
    for a in actions {
        if matches!(a.kind, ActionKind::RecvAct | ActionKind::RecvGrad) {
            let (from, tag) = recv_route(step, a);
            let expect = expect(step, a.stage.0, a.mb);
            step.comm.post_recv_tensor(from, tag, &expect)?;
        }
    }
    Ok(())
}

/// Waits for a receive and files the tensor for the compute action that needs it.
pub(super) fn recv(step: &mut Step<'_>, a: &Action) -> Result<()> {
    let (from, tag) = recv_route(step, a);
    let t = step
        .comm
        .recv_tensor(from, tag, &expect(step, a.stage.0, a.mb))?;
    let key = (a.stage, a.mb);
    match a.kind {
        ActionKind::RecvAct => step.state.received.insert(key, t),
        _ => step.state.grads_in.insert(key, t),
    };
    Ok(())
}

/// Sends an activation to the next chunk or an input gradient to the previous one.
pub(super) fn send(step: &mut Step<'_>, a: &Action) -> Result<()> {
    let (c, l, key) = (a.stage.0, step.layout, (a.stage, a.mb));
    let (t, to_chunk, kind) = match a.kind {
        ActionKind::SendAct => {
            let t = step
                .state
                .outbox
                .remove(&key)
                .ok_or_else(|| bug("activation", a))?;
            (t, c + 1, Tag::ACTIVATION)
        }
        _ => {
            let t = step
                .state
                .grads_out
                .remove(&key)
                .ok_or_else(|| bug("input gradient", a))?;
            (t, c - 1, Tag::GRADIENT)
        }
    };
    let tag = Tag::microbatch(kind, l.slot_of(to_chunk), a.mb.0);
    let header = wire::header(&t, to_chunk, a.mb.0)?;
    step.comm.send_tensor(l.rank_of(to_chunk), tag, header, &t)
}
