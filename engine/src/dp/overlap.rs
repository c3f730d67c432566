//! The data-parallel gradient all-reduce overlapped with the backward, as in Megatron's
//! DDP (`overlap_grad_reduce`) and PyTorch DDP: the flat gradient buffers
//! ([`crate::flat`]) are cut into buckets in reverse parameter order (the order the
//! backward produces gradients), and each bucket's in-place all-reduce is started
//! ([`Communicator::start_all_reduce_f32`], `MPI_Iallreduce` with `MPI_IN_PLACE`) as soon
//! as every parameter in it has its final gradient of the step, while the rest of the
//! backward runs. [`GradSync::finish`] waits for them all (under the watchdog deadline;
//! the wait is the flight recorder's `wait_all_reduces dp`) and divides by the group size.
//!
//! When is a gradient final? A parameter's gradient is final once the last action of this
//! rank's schedule row that adds to its chunk's gradients has run: the chunk's last `B`,
//! or with zero-bubble schedules the later of its last `I` and `W` (with interleaved
//! schedules each chunk has its own last action, so a later chunk's buckets start while an
//! earlier chunk's backward runs). Inside a whole-chunk backward (`B`) at tp = 1 — one
//! autograd graph, where autograd adds each parameter's gradient exactly once (a parameter
//! used twice is summed before it is added) — a post-accumulate-grad hook ([`super::hook`])
//! marks each parameter final the moment autograd adds its gradient, so buckets start in
//! the middle of that backward. Elsewhere (tp > 1 segments, the `I`/`W` split, held
//! gradients of a recomputing chunk) gradients are added outside autograd's accumulation,
//! and the chunk's buckets start when its last action ends.
//!
//! Buckets that hold a copy of a pipeline-tied word embedding start only after the
//! pipeline sum of the tied gradients ([`super::sum_tied_embedding_grads`]), in
//! [`GradSync::finish`], so the sums are the ones the synchronous order makes.
//!
//! Progress: MPI advances a non-blocking collective only inside MPI calls, so the executor
//! calls [`Communicator::test_started`] after every action.
//!
//! Invariants: every replica starts the same buckets in the same order (same schedule
//! row, same autograd graph, ties broken by bucket index); a bucket's memory is touched by
//! nobody between its start and [`GradSync::finish`] (its gradients are final); the
//! result is bit-identical to [`super::all_reduce_mean_grads`] (same sums, then the same
//! division).

use super::hook::{self, HookSink};
use crate::comm::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::executor::{ActionObserver, PipelineLayout};
use crate::flat::FlatBuffers;
use crate::model::Param;
use partitioner::{Action, ActionKind};
use std::sync::{Arc, Mutex, MutexGuard};
use tch::{Kind, Tensor};

/// A contiguous run of whole parameters of one flat gradient buffer.
#[derive(Debug)]
pub struct Bucket {
    /// The buffer's group in [`FlatBuffers::groups`].
    pub group: usize,
    /// Elements `[start, start + len)` of the group's gradient buffer.
    pub start: usize,
    pub len: usize,
    /// The parameters in it (indices into the rank's parameter list).
    pub params: Vec<usize>,
    view: Tensor,
}

/// Cuts every gradient buffer into buckets of whole parameters of one chunk (`slot_of`:
/// parameter → chunk slot; as Megatron keeps one set of buckets per model chunk) of at
/// most `cap_bytes` (a larger parameter is a bucket of its own), last parameters first;
/// buckets of all groups are ordered by their last parameter, descending (the backward's
/// order).
pub fn buckets(flat: &FlatBuffers, slot_of: &[usize], cap_bytes: usize) -> Result<Vec<Bucket>> {
    let mut out = Vec::new();
    for (gi, g) in flat.groups.iter().enumerate() {
        if g.kind != Kind::Float || !g.grads.is_contiguous() || g.grads.device() != tch::Device::Cpu
        {
            return Err(Error::Internal(format!(
                "data-parallel all-reduce needs contiguous f32 CPU gradients, got {:?}",
                g.kind
            )));
        }
        let cap = (cap_bytes / 4).max(1);
        let mut open: Option<(usize, usize, Vec<usize>)> = None; // (start, end, params)
        let mut close = |o: (usize, usize, Vec<usize>)| -> Result<()> {
            let view = g
                .grads
                .f_narrow(0, o.0 as i64, (o.1 - o.0) as i64)
                .map_err(Error::torch("gradient bucket"))?;
            out.push(Bucket {
                group: gi,
                start: o.0,
                len: o.1 - o.0,
                params: o.2,
                view,
            });
            Ok(())
        };
        for m in g.members.iter().rev() {
            open = match open {
                Some((s, e, mut ps))
                    if (e - s + m.numel <= cap || ps.is_empty())
                        && ps.iter().all(|&p| slot_of.get(p) == slot_of.get(m.param)) =>
                {
                    ps.push(m.param);
                    Some((m.offset, e, ps))
                }
                Some(full) => {
                    close(full)?;
                    Some((m.offset, m.offset + m.numel, vec![m.param]))
                }
                None => Some((m.offset, m.offset + m.numel, vec![m.param])),
            };
        }
        if let Some(o) = open {
            close(o)?;
        }
    }
    out.sort_by_key(|b| std::cmp::Reverse(b.params.iter().max().copied()));
    Ok(out)
}

/// One rank's overlapped data-parallel gradient reduction; see the module docs.
pub struct GradSync {
    shared: Arc<Shared>,
    /// The hooked parameters (hooks removed on drop).
    hooked: Vec<Tensor>,
}

struct Shared {
    state: Mutex<State>,
}

/// Per-rank bookkeeping; the per-step part is reset by [`GradSync::arm`].
struct State {
    buckets: Vec<Bucket>,
    /// Parameter → its bucket.
    bucket_of: Vec<usize>,
    /// Parameter → its chunk slot.
    slot_of: Vec<usize>,
    /// Per slot: the row index of the last action adding to the chunk's gradients.
    last_action: Vec<Option<usize>>,
    /// Per slot: that action, if it is a whole backward whose accumulations hooks see.
    hooked_action: Vec<Option<usize>>,
    /// Buckets started only in `finish` (tied embedding copies).
    deferred: Vec<bool>,
    /// Per step: parameters with their final gradient, parameters left per bucket,
    /// started buckets, the slot whose hooks count now.
    done: Vec<bool>,
    left: Vec<usize>,
    started: Vec<bool>,
    hot: Option<usize>,
    /// The data-parallel communicator while armed (see [`Armed`]).
    comm: Option<*mut Box<dyn Communicator>>,
    /// The first error met inside a hook (reported after the action).
    error: Option<Error>,
}

// SAFETY: `comm` is set only while an `Armed` guard holds the communicator's `&mut`
// borrow, and used only under the mutex by the thread that armed it (hooks run on the
// thread running the backward, the one that armed).
unsafe impl Send for State {}

impl State {
    /// Starts bucket `b` on the armed communicator.
    fn start(&mut self, b: usize) -> Result<()> {
        let comm = self.comm.ok_or_else(|| {
            Error::Internal("a gradient bucket became ready outside a training step".into())
        })?;
        self.started[b] = true;
        let bucket = &self.buckets[b];
        // SAFETY: the armed communicator is alive and exclusively ours (see `Armed`); the
        // bucket is a contiguous f32 CPU view of the flat gradients, which live as long
        // as the rank and which nothing touches until `finish` has waited.
        unsafe {
            (**comm).start_all_reduce_f32(
                bucket.view.data_ptr() as *mut f32,
                bucket.len,
                ReduceOp::Sum,
            )
        }
    }

    /// Marks `param` final; starts its bucket when that completes it.
    fn final_grad(&mut self, param: usize) -> Result<()> {
        if self.done[param] {
            return Ok(());
        }
        self.done[param] = true;
        let b = self.bucket_of[param];
        self.left[b] -= 1;
        if self.left[b] == 0 && !self.deferred[b] {
            self.start(b)?;
        }
        Ok(())
    }
}

impl HookSink for Shared {
    fn fire(&self, param: usize) {
        let mut s = lock(&self.state);
        let Some(slot) = s.hot else { return };
        if s.slot_of.get(param) != Some(&slot) {
            return;
        }
        if s.done[param] && s.error.is_none() {
            s.error = Some(Error::Internal(format!(
                "parameter {param} got a second gradient in its chunk's last backward, after its bucket's all-reduce could start"
            )));
        }
        if let Err(e) = s.final_grad(param) {
            s.error.get_or_insert(e);
        }
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a rank's parameters come from, for [`GradSync::new`].
pub struct Setup<'a> {
    pub flat: &'a FlatBuffers,
    pub params: &'a [Param],
    /// Parameters of each chunk slot, in order (`params` is their concatenation).
    pub per_slot: &'a [usize],
    /// This rank's lowered training row.
    pub row: &'a [Action],
    pub layout: PipelineLayout,
    /// Hooks see every accumulation of a whole backward (tp = 1: one autograd graph).
    pub hooks: bool,
    /// Names of parameters whose buckets wait for the pipeline's tied-embedding sum.
    pub deferred: &'a [&'a str],
    pub bucket_bytes: usize,
}

impl GradSync {
    /// The reduction of one rank's gradients, with hooks installed if `setup.hooks`.
    pub fn new(setup: Setup<'_>) -> Result<GradSync> {
        let n = setup.params.len();
        let slot_of: Vec<usize> = setup
            .per_slot
            .iter()
            .enumerate()
            .flat_map(|(slot, &k)| std::iter::repeat_n(slot, k))
            .collect();
        if slot_of.len() != n {
            return Err(Error::Internal(
                "chunk parameter counts do not add up".into(),
            ));
        }
        let buckets = buckets(setup.flat, &slot_of, setup.bucket_bytes)?;
        let mut bucket_of = vec![usize::MAX; n];
        for (b, bucket) in buckets.iter().enumerate() {
            bucket.params.iter().for_each(|&p| bucket_of[p] = b);
        }
        if bucket_of.contains(&usize::MAX) {
            return Err(Error::Internal(
                "a parameter is in no gradient bucket".into(),
            ));
        }
        let slots = setup.per_slot.len();
        let (mut last_action, mut hooked_action) = (vec![None; slots], vec![None; slots]);
        for (i, a) in setup.row.iter().enumerate() {
            if matches!(
                a.kind,
                ActionKind::Backward | ActionKind::InputGrad | ActionKind::WeightGrad
            ) {
                let slot = setup.layout.slot_of(a.stage.0);
                last_action[slot] = Some(i);
                hooked_action[slot] = (setup.hooks && a.kind == ActionKind::Backward).then_some(i);
            }
        }
        let deferred = buckets
            .iter()
            .map(|b| {
                b.params
                    .iter()
                    .any(|&p| setup.deferred.contains(&setup.params[p].name.as_str()))
            })
            .collect();
        let nb = buckets.len();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buckets,
                bucket_of,
                slot_of,
                last_action,
                hooked_action,
                deferred,
                done: vec![false; n],
                left: vec![0; nb],
                started: vec![false; nb],
                hot: None,
                comm: None,
                error: None,
            }),
        });
        let mut hooked = Vec::new();
        if setup.hooks {
            for (i, p) in setup.params.iter().enumerate() {
                if p.tensor.requires_grad() {
                    hook::install(&p.tensor, shared.clone(), i)?;
                    hooked.push(p.tensor.shallow_clone());
                }
            }
        }
        Ok(GradSync { shared, hooked })
    }

    /// The buckets, in start order of ties (reverse parameter order).
    pub fn bucket_count(&self) -> usize {
        lock(&self.shared.state).buckets.len()
    }

    /// Starts a training step: buckets start on `dp` while the returned guard lives.
    pub fn arm<'a>(&'a self, dp: &'a mut Box<dyn Communicator>) -> Armed<'a> {
        let mut s = lock(&self.shared.state);
        s.done.iter_mut().for_each(|d| *d = false);
        s.left = s.buckets.iter().map(|b| b.params.len()).collect();
        s.started.iter_mut().for_each(|x| *x = false);
        s.hot = None;
        s.error = None;
        s.comm = Some(dp as *mut Box<dyn Communicator>);
        drop(s);
        Armed {
            sync: self,
            _dp: std::marker::PhantomData,
        }
    }

    /// After the step's backward (and the tied-embedding sum): starts the buckets not
    /// started yet, in bucket order, waits for all of them and divides by the group size.
    pub fn finish(&self, flat: &FlatBuffers, dp: &mut Box<dyn Communicator>) -> Result<()> {
        let n = dp.size();
        {
            let mut s = lock(&self.shared.state);
            if let Some(e) = s.error.take() {
                return Err(e);
            }
            s.comm = Some(dp as *mut Box<dyn Communicator>);
            let result = (0..s.buckets.len())
                .filter(|&b| !s.started[b])
                .collect::<Vec<_>>()
                .into_iter()
                .try_for_each(|b| s.start(b));
            s.comm = None;
            result?;
        }
        dp.wait_started()?;
        for g in &flat.groups {
            let _ = g
                .grads
                .shallow_clone()
                .f_mul_scalar_(1.0 / n as f64)
                .map_err(Error::torch("gradient average"))?;
        }
        Ok(())
    }
}

impl Drop for GradSync {
    fn drop(&mut self) {
        self.hooked.iter().for_each(hook::clear);
    }
}

/// A [`GradSync`] during a step's actions: holds the data-parallel communicator.
pub struct Armed<'a> {
    sync: &'a GradSync,
    _dp: std::marker::PhantomData<&'a mut Box<dyn Communicator>>,
}

impl Armed<'_> {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.sync.shared.state)
    }
}

impl ActionObserver for Armed<'_> {
    fn before(&self, index: usize) -> Result<()> {
        let mut s = self.state();
        s.hot = s.hooked_action.iter().position(|&a| a == Some(index));
        Ok(())
    }

    fn after(&self, index: usize) -> Result<()> {
        let mut s = self.state();
        s.hot = None;
        if let Some(e) = s.error.take() {
            return Err(e);
        }
        if let Some(slot) = s.last_action.iter().position(|&a| a == Some(index)) {
            let params: Vec<usize> = (0..s.slot_of.len())
                .filter(|&p| s.slot_of[p] == slot)
                .collect();
            // Whole-chunk readiness: start completed buckets in bucket order.
            for p in params {
                s.done[p] = true;
            }
            for b in 0..s.buckets.len() {
                let complete = s.buckets[b].params.iter().all(|&p| s.done[p]);
                if complete && !s.started[b] && !s.deferred[b] {
                    s.left[b] = 0;
                    s.start(b)?;
                }
            }
        }
        let comm = s
            .comm
            .ok_or_else(|| Error::Internal("gradient sync not armed".into()))?;
        drop(s);
        // SAFETY: armed: the communicator is ours for the guard's life (see `State`).
        unsafe { (**comm).test_started() }?;
        Ok(())
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let mut s = self.state();
        s.comm = None;
        s.hot = None;
    }
}
