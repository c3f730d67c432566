//! MPI communicator over the `mpi` crate (MPICH or Open MPI).
//!
//! Collectives are MPI's own (`MPI_Iallreduce`, in place on the caller's memory with
//! `MPI_IN_PLACE`, or from one buffer straight into another; `MPI_Iallgather` and
//! `MPI_Ireduce_scatter_block` from the caller's buffer into the caller's buffer), never a
//! star through rank 0. Data-parallel gradient buckets use the non-blocking form: started
//! in place on the gradient buffer ([`Communicator::start_all_reduce_f32`]), advanced by
//! `MPI_Test` between the executor's actions (and by any other MPI call of the rank:
//! MPICH's progress engine serves every communicator), and waited for before the optimizer
//! ([`Communicator::wait_started`]).
//! Waits loop over `MPI_Test` under a [`WaitPolicy`] (see [`super::wait`]).
//!
//! Tensor messages (the executor's activations and gradients) land in a tensor allocated
//! once per (peer, tag) and reused every step ([`Communicator::recv_tensor`] says for how
//! long a received tensor stays valid). Above the folding threshold ([`super::fold`]) they
//! are zero-copy: a header and the elements go as two messages with one tag (MPI keeps
//! their order), the elements straight from the sending tensor's memory into the receive
//! tensor's. At or below it, header and elements go as one message (one MPI message costs
//! more than copying a few KiB), copied out of the sending tensor and into the receive
//! tensor; the receiver knows from what it expects which of the two it posts for.
//!
//! Other sends are `MPI_Isend`s whose buffers are kept in a pending list until `MPI_Test` says
//! they are done. Receives are either posted early (`MPI_Irecv` into an owned buffer of the
//! expected size, see [`Communicator::post_recv`]) and completed by polling `MPI_Test`, or,
//! when nothing was posted, found by polling `MPI_Iprobe` and received at the probed size.
//! Nothing ever sits in a blocking MPI call, because MPICH's blocking calls busy-poll and
//! would pin a core at 100% while a rank waits for its neighbour. The communicator's
//! error handler is `MPI_ERRORS_RETURN`, so MPI failures (a message longer than the
//! posted buffer, say) come back as [`Error::Comm`] instead of killing the process.
//!
//! Every wait carries the watchdog's deadline (`parallel.timeout_s`): one that passes it
//! returns [`Error::Stalled`] naming the rank waited on. Every operation is recorded in
//! the rank's flight recorder (peer as a world rank, bytes), sends until they complete.

use super::fold::{self, Fold};
use super::wait::{WaitPolicy, Waiter};
use super::wire::{self, Expect};
use super::{Communicator, ReduceOp, Tag};
use crate::error::{Error, Result};
use crate::flight::{CommOp, Group};
use crate::watchdog::{Deadline, Watch};
use ::mpi::ffi;
use ::mpi::raw::AsRaw;
use ::mpi::topology::{Communicator as _, SimpleCommunicator};
use ::mpi::traits::*;
use partitioner::Rank;
use std::collections::{HashMap, VecDeque};
use tch::Tensor;

/// What a send keeps alive (and unmoved) until MPI is done with it: held, never read.
#[allow(dead_code)]
enum Keep {
    Bytes(Vec<u8>),
    /// A tensor whose memory MPI reads the elements from (zero-copy).
    Tensor(Tensor),
}

struct PendingSend {
    keep: Keep,
    req: ffi::MPI_Request,
    /// Bytes of the message part (what the waits count as in flight).
    bytes: usize,
    /// The flight-recorder event of this send (on the last part of a message).
    event: Option<u64>,
}

// SAFETY: the request handle is only used from the thread that owns the communicator.
unsafe impl Send for PendingSend {}

/// A receive posted ahead of time.
struct PostedRecv {
    buf: Vec<u8>,
    req: ffi::MPI_Request,
}

// SAFETY: as for PendingSend.
unsafe impl Send for PostedRecv {}

/// The receive buffers of one (peer, tag), reused across steps: the first message (a
/// header, or a whole folded message: [`Fold::head_len`]) and the tensor.
struct Slot {
    head: Vec<u8>,
    tensor: Tensor,
}

/// A tensor receive posted ahead of time into `slot`: the first message, then (two
/// messages) the elements; `reqs[..parts]` are live.
struct PostedTensor {
    slot: Slot,
    reqs: [ffi::MPI_Request; 2],
    parts: usize,
}

impl PostedTensor {
    /// Whether MPI is done with every buffer of the slot (each request completed).
    fn idle(&self) -> bool {
        // SAFETY: reads a constant the MPI library defines.
        let null = unsafe { ffi::RSMPI_REQUEST_NULL };
        self.reqs[..self.parts].iter().all(|r| *r == null)
    }
}

// SAFETY: as for PendingSend.
unsafe impl Send for PostedTensor {}

/// A non-blocking in-place all-reduce in flight (its memory is the caller's).
struct StartedReduce {
    req: ffi::MPI_Request,
    /// Its flight-recorder event.
    event: u64,
    bytes: usize,
}

// SAFETY: as for PendingSend.
unsafe impl Send for StartedReduce {}

/// An MPI communicator (the world, or a group cut from it).
pub struct MpiComm {
    comm: SimpleCommunicator,
    pending: Vec<PendingSend>,
    /// Started non-blocking all-reduces, in start order.
    started: Vec<StartedReduce>,
    posted: HashMap<(Rank, Tag), VecDeque<PostedRecv>>,
    posted_tensors: HashMap<(Rank, Tag), VecDeque<PostedTensor>>,
    /// Receive buffers of completed tensor receives, by (peer, tag), for the next step.
    pool: HashMap<(Rank, Tag), Vec<Slot>>,
    watch: Watch,
    group: Group,
    /// World rank of each member, by group rank.
    world_ranks: Vec<Rank>,
    /// What a wait does between two tests.
    wait: WaitPolicy,
    /// Which tensor messages travel as one MPI message.
    fold: Fold,
}

extern "C" {
    /// `MPI_IN_PLACE` of the MPI library the engine is built against (a macro in mpi.h,
    /// which the `mpi` crate does not bind; see `mpi_shim.c`).
    fn strata_mpi_in_place() -> *mut std::ffi::c_void;
}

/// `MPI_IN_PLACE`.
fn in_place() -> *const std::ffi::c_void {
    // SAFETY: returns a constant.
    unsafe { strata_mpi_in_place() }
}

/// The world ranks of the members of `comm`, in group-rank order.
fn world_ranks(comm: &SimpleCommunicator) -> Result<Vec<Rank>> {
    let n = comm.size();
    let mine: Vec<i32> = (0..n).collect();
    let mut theirs = vec![0i32; n as usize];
    // SAFETY: valid communicators; the groups are freed before returning; the arrays
    // have `n` elements.
    let rc = unsafe {
        let mut g = std::mem::MaybeUninit::<ffi::MPI_Group>::uninit();
        let mut w = std::mem::MaybeUninit::<ffi::MPI_Group>::uninit();
        ffi::MPI_Comm_group(comm.as_raw(), g.as_mut_ptr());
        ffi::MPI_Comm_group(ffi::RSMPI_COMM_WORLD, w.as_mut_ptr());
        let (mut g, mut w) = (g.assume_init(), w.assume_init());
        let rc = ffi::MPI_Group_translate_ranks(g, n, mine.as_ptr(), w, theirs.as_mut_ptr());
        ffi::MPI_Group_free(&mut g);
        ffi::MPI_Group_free(&mut w);
        rc
    };
    if rc != 0 {
        return Err(Error::Comm(format!(
            "MPI_Group_translate_ranks failed with code {rc}"
        )));
    }
    Ok(theirs.into_iter().map(|r| Rank(r as usize)).collect())
}

impl MpiComm {
    /// Wraps an MPI communicator (the `group` axis of this rank), makes its MPI errors
    /// returnable, and puts its waits under `watch`.
    pub fn new(comm: SimpleCommunicator, group: Group, watch: Watch) -> Result<MpiComm> {
        unsafe {
            ffi::MPI_Comm_set_errhandler(comm.as_raw(), ffi::RSMPI_ERRORS_RETURN);
        }
        let world_ranks = world_ranks(&comm)?;
        Ok(MpiComm {
            comm,
            pending: Vec::new(),
            started: Vec::new(),
            posted: HashMap::new(),
            posted_tensors: HashMap::new(),
            pool: HashMap::new(),
            watch,
            group,
            world_ranks,
            wait: WaitPolicy::from_env()?,
            fold: Fold::from_env()?,
        })
    }

    /// The folding threshold of this communicator's tensor messages.
    pub fn fold(&self) -> Fold {
        self.fold
    }

    /// Sets the folding threshold. Both ends of every tensor message must use the same
    /// one, and no tensor receive may be posted yet (tests and `strata p2p` set it first).
    pub fn set_fold(&mut self, fold: Fold) {
        self.fold = fold;
    }

    /// Aborts the whole job (all ranks) with `code`.
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }

    fn world_rank(&self, r: Rank) -> Rank {
        self.world_ranks.get(r.0).copied().unwrap_or(r)
    }

    /// The watchdog error of a wait for `op` that has passed its deadline.
    fn stalled(
        &self,
        op: CommOp,
        peer: Option<Rank>,
        tag: Tag,
        bytes: usize,
        d: &Deadline,
    ) -> Error {
        let peer = peer.map(|p| self.world_rank(p));
        let what = match peer {
            Some(p) => format!(
                "{} {} rank {p}, tag {}, {bytes} bytes",
                op.name(),
                if op == CommOp::Recv { "from" } else { "to" },
                tag.0
            ),
            None => format!("{} on {}, {bytes} bytes", op.name(), self.group.name()),
        };
        self.watch
            .timeout(what, peer, &self.world_ranks, d.waited())
    }
}

/// The MPI reduction of `op`.
fn mpi_op(op: ReduceOp) -> ffi::MPI_Op {
    // SAFETY: constants the MPI library defines.
    unsafe {
        match op {
            ReduceOp::Sum => ffi::RSMPI_SUM,
            ReduceOp::Max => ffi::RSMPI_MAX,
        }
    }
}

/// Bytes received, per `status`.
fn received_bytes(status: &ffi::MPI_Status) -> usize {
    let mut count = 0;
    // SAFETY: a status filled by a completed receive.
    unsafe {
        ffi::MPI_Get_count(status, u8::equivalent_datatype().as_raw(), &mut count);
    }
    count.max(0) as usize
}

/// Completes whichever pending sends are done; never blocks. One `MPI_Testsome` over
/// all of them: one turn of MPI's progress engine, not one per pending send (an
/// `MPI_Test` per request turned it once each, so a window of `k` sends cost `k²` turns).
fn progress(pending: &mut Vec<PendingSend>, watch: &Watch) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut reqs: Vec<ffi::MPI_Request> = pending.iter().map(|p| p.req).collect();
    let mut done = vec![0i32; reqs.len()];
    let mut count = 0;
    // SAFETY: live requests of ours, one index slot per request; statuses ignored.
    let rc = unsafe {
        ffi::MPI_Testsome(
            reqs.len() as i32,
            reqs.as_mut_ptr(),
            &mut count,
            done.as_mut_ptr(),
            ffi::RSMPI_STATUSES_IGNORE,
        )
    };
    if rc != 0 {
        return Err(Error::Comm(format!("MPI_Testsome failed with code {rc}")));
    }
    // MPI_UNDEFINED (negative) when no request was live: nothing done.
    let done = &done[..usize::try_from(count).unwrap_or(0)];
    for sent in take_done(pending, done) {
        if let Some(event) = sent.event {
            watch.flight().end(event);
        }
    }
    Ok(())
}

/// Removes the entries at the indices `done` (any order, as `MPI_Testsome` lists them)
/// from `items` and returns them; the others stay, in some order.
fn take_done<T>(items: &mut Vec<T>, done: &[i32]) -> Vec<T> {
    let mut idx: Vec<usize> = done
        .iter()
        .filter_map(|&i| usize::try_from(i).ok())
        .collect();
    // Highest first: each swap_remove then moves into place an entry that stays.
    idx.sort_unstable_by(|a, b| b.cmp(a));
    idx.dedup();
    idx.retain(|&i| i < items.len());
    idx.into_iter().map(|i| items.swap_remove(i)).collect()
}

impl Communicator for MpiComm {
    fn rank(&self) -> Rank {
        Rank(self.comm.rank() as usize)
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn send(&mut self, to: Rank, tag: Tag, data: Vec<u8>) -> Result<()> {
        let event = self.watch.flight().comm(
            CommOp::Send,
            self.group,
            Some(self.world_rank(to)),
            tag.0,
            data.len(),
        );
        let (ptr, len) = (data.as_ptr(), data.len());
        self.isend(ptr, len, to, tag, Keep::Bytes(data), Some(event))?;
        progress(&mut self.pending, &self.watch)
    }

    fn send_tensor(&mut self, to: Rank, tag: Tag, header: Vec<u8>, t: &Tensor) -> Result<()> {
        let t = wire::wire_form(t)?;
        let nbytes = t.numel() * t.kind().elt_size_in_bytes();
        let event = self.watch.flight().comm(
            CommOp::Send,
            self.group,
            Some(self.world_rank(to)),
            tag.0,
            header.len() + nbytes,
        );
        if self.fold.folds(nbytes) {
            let msg = fold::pack(header, &t)?;
            let (ptr, len) = (msg.as_ptr(), msg.len());
            self.isend(ptr, len, to, tag, Keep::Bytes(msg), Some(event))?;
        } else {
            let (hp, hl) = (header.as_ptr(), header.len());
            self.isend(hp, hl, to, tag, Keep::Bytes(header), None)?;
            let ptr = t.data_ptr() as *const u8;
            self.isend(ptr, nbytes, to, tag, Keep::Tensor(t), Some(event))?;
        }
        progress(&mut self.pending, &self.watch)
    }

    fn post_recv_tensor(&mut self, from: Rank, tag: Tag, expect: &Expect) -> Result<()> {
        let mut slot = self.take_slot(from, tag, expect)?;
        let head = self.irecv(slot.head.as_mut_ptr(), slot.head.len(), from, tag)?;
        let (body, parts) = match self.fold.folds(expect.payload_len()) {
            // SAFETY: reads a constant the MPI library defines.
            true => (unsafe { ffi::RSMPI_REQUEST_NULL }, 1),
            false => {
                let ptr = slot.tensor.data_ptr() as *mut u8;
                match self.irecv(ptr, expect.payload_len(), from, tag) {
                    Ok(body) => (body, 2),
                    Err(e) => {
                        std::mem::forget(slot); // MPI owns its header buffer.
                        return Err(e);
                    }
                }
            }
        };
        self.posted_tensors
            .entry((from, tag))
            .or_default()
            .push_back(PostedTensor {
                slot,
                reqs: [head, body],
                parts,
            });
        Ok(())
    }

    fn recv_tensor(&mut self, from: Rank, tag: Tag, expect: &Expect) -> Result<Tensor> {
        if self
            .posted_tensors
            .get(&(from, tag))
            .is_none_or(|q| q.is_empty())
        {
            self.post_recv_tensor(from, tag, expect)?;
        }
        let mut posted = self
            .posted_tensors
            .get_mut(&(from, tag))
            .and_then(|q| q.pop_front())
            .ok_or_else(|| Error::Internal("a posted receive vanished".into()))?;
        let event = self.watch.flight().comm(
            CommOp::Recv,
            self.group,
            Some(self.world_rank(from)),
            tag.0,
            expect.message_len(),
        );
        let landed = self.land(&mut posted, from, tag, expect);
        if posted.idle() {
            self.pool.entry((from, tag)).or_default().push(posted.slot);
        } else {
            // A wait or a check failed while MPI may still write into the buffers: leak them.
            std::mem::forget(posted.slot);
        }
        let out = landed?;
        self.watch.flight().end(event);
        Ok(out)
    }

    fn flight(&self) -> Option<&crate::flight::FlightRecorder> {
        Some(self.watch.flight())
    }

    fn post_recv(&mut self, from: Rank, tag: Tag, len: usize) -> Result<()> {
        let count = i32::try_from(len)
            .map_err(|_| Error::Comm(format!("message of {len} bytes exceeds 2 GiB")))?;
        let mut buf = vec![0u8; len];
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let rc = unsafe {
            ffi::MPI_Irecv(
                buf.as_mut_ptr() as *mut std::ffi::c_void,
                count,
                u8::equivalent_datatype().as_raw(),
                from.0 as i32,
                tag.0,
                self.comm.as_raw(),
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Comm(format!(
                "MPI_Irecv from rank {from} failed with code {rc}"
            )));
        }
        self.posted
            .entry((from, tag))
            .or_default()
            .push_back(PostedRecv {
                buf,
                req: unsafe { req.assume_init() },
            });
        Ok(())
    }

    fn recv(&mut self, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        let posted = self
            .posted
            .get_mut(&(from, tag))
            .and_then(|q| q.pop_front());
        let bytes = posted.as_ref().map_or(0, |p| p.buf.len());
        let event = self.watch.flight().comm(
            CommOp::Recv,
            self.group,
            Some(self.world_rank(from)),
            tag.0,
            bytes,
        );
        let out = match posted {
            Some(posted) => self.complete_posted(posted, from, tag),
            None => self.probe_and_receive(from, tag),
        }?;
        self.watch.flight().end(event);
        Ok(out)
    }

    fn all_reduce_f32(&mut self, values: &mut [f32], op: ReduceOp) -> Result<()> {
        let dtype = f32::equivalent_datatype().as_raw();
        let (n, recv) = (values.len(), values.as_mut_ptr().cast());
        // SAFETY: `values` is borrowed mutably for the whole (waited-for) collective.
        unsafe { self.iallreduce(None, recv, n, 4, dtype, op) }
    }

    fn all_reduce_into(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        if send.len() != recv.len() {
            return Err(Error::Internal(format!(
                "all-reduce of {} values into {}",
                send.len(),
                recv.len()
            )));
        }
        let dtype = f32::equivalent_datatype().as_raw();
        let (n, to) = (recv.len(), recv.as_mut_ptr().cast());
        // SAFETY: both borrowed for the whole (waited-for) collective; distinct slices.
        unsafe { self.iallreduce(Some(send.as_ptr().cast()), to, n, 4, dtype, op) }
    }

    fn all_gather_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.gather_or_scatter(CommOp::AllGather, send, recv)
    }

    fn reduce_scatter_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        self.gather_or_scatter(CommOp::ReduceScatter, send, recv)
    }

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        let dtype = f64::equivalent_datatype().as_raw();
        let (n, recv) = (values.len(), values.as_mut_ptr().cast());
        // SAFETY: as in all_reduce_f32.
        unsafe { self.iallreduce(None, recv, n, 8, dtype, ReduceOp::Sum) }
    }

    unsafe fn start_all_reduce_f32(
        &mut self,
        ptr: *mut f32,
        len: usize,
        op: ReduceOp,
    ) -> Result<()> {
        if self.size() == 1 || len == 0 {
            return Ok(());
        }
        let n = i32::try_from(len)
            .map_err(|_| Error::Comm(format!("all-reduce of {len} values exceeds 2^31")))?;
        let bytes = 4 * len;
        let event = self
            .watch
            .flight()
            .comm(CommOp::StartAllReduce, self.group, None, 0, bytes);
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let rc = ffi::MPI_Iallreduce(
            in_place(),
            ptr.cast(),
            n,
            f32::equivalent_datatype().as_raw(),
            mpi_op(op),
            self.comm.as_raw(),
            req.as_mut_ptr(),
        );
        if rc != 0 {
            return Err(Error::Comm(format!("MPI_Iallreduce failed with code {rc}")));
        }
        self.started.push(StartedReduce {
            req: req.assume_init(),
            event,
            bytes,
        });
        Ok(())
    }

    fn test_started(&mut self) -> Result<usize> {
        let mut i = 0;
        while i < self.started.len() {
            let mut flag = 0;
            // SAFETY: a live request of ours.
            let rc = unsafe {
                let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
                ffi::MPI_Test(&mut self.started[i].req, &mut flag, status.as_mut_ptr())
            };
            if rc != 0 {
                return Err(Error::Comm(format!("MPI_Iallreduce failed with code {rc}")));
            }
            if flag != 0 {
                self.watch.flight().end(self.started.remove(i).event);
            } else {
                i += 1;
            }
        }
        progress(&mut self.pending, &self.watch)?;
        Ok(self.started.len())
    }

    fn wait_started(&mut self) -> Result<()> {
        if self.test_started()? == 0 {
            return Ok(());
        }
        let bytes = self.started.iter().map(|s| s.bytes).sum();
        let event = self
            .watch
            .flight()
            .comm(CommOp::Wait, self.group, None, 0, bytes);
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = self.waiter(bytes);
        loop {
            let left = self.test_started()?;
            if left == 0 {
                self.watch.flight().end(event);
                return Ok(());
            }
            if deadline.passed() {
                let left_bytes = self.started.iter().map(|s| s.bytes).sum();
                return Err(self.stalled(CommOp::Wait, None, Tag(0), left_bytes, &deadline));
            }
            waiter.pause();
        }
    }

    fn flush(&mut self) -> Result<()> {
        progress(&mut self.pending, &self.watch)?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let event = self
            .watch
            .flight()
            .comm(CommOp::Flush, self.group, None, 0, 0);
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = self.waiter(0);
        loop {
            progress(&mut self.pending, &self.watch)?;
            if self.pending.is_empty() {
                self.watch.flight().end(event);
                return Ok(());
            }
            if deadline.passed() {
                let stuck = self.watch.flight().entries();
                // Name the receiver of the oldest send still in flight.
                let oldest = self.pending.iter().filter_map(|p| p.event).min();
                let peer = oldest
                    .and_then(|seq| stuck.iter().find(|e| e.seq == seq))
                    .and_then(|e| match e.what {
                        crate::flight::What::Comm { peer, .. } => peer,
                        _ => None,
                    });
                let what = format!(
                    "completion of {} send(s) on {}",
                    self.pending.len(),
                    self.group.name()
                );
                return Err(self
                    .watch
                    .timeout(what, peer, &self.world_ranks, deadline.waited()));
            }
            waiter.pause();
        }
    }
}

impl MpiComm {
    /// `MPI_Iallreduce` of `count` elements of `dtype` (`elt` bytes each) from `send` into
    /// `recv` (`send` None: `MPI_IN_PLACE`, in `recv`'s own memory), waited for under the
    /// deadline. MPI's own collective: the same result on every rank, no star through a
    /// root, no copy of the buffers.
    ///
    /// # Safety
    /// `send` (if any) and `recv` point to `count` valid elements, nothing else touches
    /// them until this returns, and they do not overlap. Past the deadline MPI still owns
    /// them: the caller's error path must end the job (the watchdog aborts it).
    unsafe fn iallreduce(
        &mut self,
        send: Option<*const std::ffi::c_void>,
        recv: *mut std::ffi::c_void,
        count: usize,
        elt: usize,
        dtype: ffi::MPI_Datatype,
        op: ReduceOp,
    ) -> Result<()> {
        if self.size() == 1 {
            if let Some(send) = send {
                std::ptr::copy_nonoverlapping(send.cast::<u8>(), recv.cast::<u8>(), count * elt);
            }
            return Ok(());
        }
        let n = i32::try_from(count)
            .map_err(|_| Error::Comm(format!("all-reduce of {count} values exceeds 2^31")))?;
        let bytes = elt * count;
        let event = self
            .watch
            .flight()
            .comm(CommOp::AllReduce, self.group, None, 0, bytes);
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let rc = ffi::MPI_Iallreduce(
            send.unwrap_or_else(in_place),
            recv,
            n,
            dtype,
            mpi_op(op),
            self.comm.as_raw(),
            req.as_mut_ptr(),
        );
        if rc != 0 {
            return Err(Error::Comm(format!("MPI_Iallreduce failed with code {rc}")));
        }
        self.wait_collective(req.assume_init(), CommOp::AllReduce, bytes, event)
    }

    /// Waits for the non-blocking collective `req` (`op` on `bytes`, flight event
    /// `event`) under the deadline, progressing pending sends meanwhile.
    fn wait_collective(
        &mut self,
        mut req: ffi::MPI_Request,
        op: CommOp,
        bytes: usize,
        event: u64,
    ) -> Result<()> {
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = self.waiter(bytes);
        loop {
            let mut flag = 0;
            let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
            // SAFETY: `req` is a live request of this communicator's collective.
            let rc = unsafe { ffi::MPI_Test(&mut req, &mut flag, status.as_mut_ptr()) };
            if rc != 0 {
                return Err(Error::Comm(format!(
                    "MPI {} failed with code {rc}",
                    op.name()
                )));
            }
            if flag != 0 {
                self.watch.flight().end(event);
                return Ok(());
            }
            if deadline.passed() {
                return Err(self.stalled(op, None, Tag(0), bytes, &deadline));
            }
            progress(&mut self.pending, &self.watch)?;
            waiter.pause();
        }
    }

    /// `MPI_Iallgather` of `send` (`n` f32 per rank) into `recv` (`size · n`), or
    /// `MPI_Ireduce_scatter_block` (sum) of `send` (`size · n`) into `recv` (`n`), from
    /// and into the callers' memory, waited for under the deadline.
    fn gather_or_scatter(&mut self, op: CommOp, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let p = self.size();
        let n = if op == CommOp::AllGather {
            send.len()
        } else {
            recv.len()
        };
        let whole = if op == CommOp::AllGather {
            recv.len()
        } else {
            send.len()
        };
        if n * p != whole {
            return Err(Error::Internal(format!(
                "{} of {p} blocks of {n} values over a buffer of {whole}",
                op.name()
            )));
        }
        if p == 1 {
            recv.copy_from_slice(send);
            return Ok(());
        }
        let count = i32::try_from(n)
            .map_err(|_| Error::Comm(format!("{} of {n} values exceeds 2^31", op.name())))?;
        let dtype = f32::equivalent_datatype().as_raw();
        let bytes = 4 * whole;
        let event = self.watch.flight().comm(op, self.group, None, 0, bytes);
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let (from, to) = (send.as_ptr().cast(), recv.as_mut_ptr().cast());
        // SAFETY: `send` and `recv` are distinct slices of the checked lengths, borrowed
        // until the collective has been waited for (past the deadline the job is ended).
        let rc = unsafe {
            if op == CommOp::AllGather {
                ffi::MPI_Iallgather(
                    from,
                    count,
                    dtype,
                    to,
                    count,
                    dtype,
                    self.comm.as_raw(),
                    req.as_mut_ptr(),
                )
            } else {
                ffi::MPI_Ireduce_scatter_block(
                    from,
                    to,
                    count,
                    dtype,
                    ffi::RSMPI_SUM,
                    self.comm.as_raw(),
                    req.as_mut_ptr(),
                )
            }
        };
        if rc != 0 {
            return Err(Error::Comm(format!(
                "MPI {} failed with code {rc}",
                op.name()
            )));
        }
        // SAFETY: the call succeeded, so it initialised the request.
        let req = unsafe { req.assume_init() };
        self.wait_collective(req, op, bytes, event)
    }

    /// `MPI_Isend` of `len` bytes at `ptr`, which lives in `keep` (kept, unmoved, until
    /// the request completes).
    fn isend(
        &mut self,
        ptr: *const u8,
        len: usize,
        to: Rank,
        tag: Tag,
        keep: Keep,
        event: Option<u64>,
    ) -> Result<()> {
        let count = i32::try_from(len)
            .map_err(|_| Error::Comm(format!("message of {len} bytes exceeds 2 GiB")))?;
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: `ptr` points to `len` bytes owned by `keep`, kept in `pending` until
        // the request completes (or leaked, see Drop).
        let rc = unsafe {
            ffi::MPI_Isend(
                ptr as *const std::ffi::c_void,
                count,
                u8::equivalent_datatype().as_raw(),
                to.0 as i32,
                tag.0,
                self.comm.as_raw(),
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Comm(format!(
                "MPI_Isend to rank {to} failed with code {rc}"
            )));
        }
        self.pending.push(PendingSend {
            keep,
            // SAFETY: MPI_Isend succeeded.
            req: unsafe { req.assume_init() },
            bytes: len,
            event,
        });
        Ok(())
    }

    /// Bytes of this rank's sends still in flight.
    fn in_flight(&self) -> usize {
        self.pending.iter().map(|p| p.bytes).sum()
    }

    /// A waiter for a wait on `bytes` of its own, with the pending sends also in flight.
    fn waiter(&self, bytes: usize) -> Waiter {
        Waiter::for_bytes(self.wait, bytes + self.in_flight())
    }

    /// `MPI_Irecv` of up to `len` bytes into `ptr`.
    fn irecv(&self, ptr: *mut u8, len: usize, from: Rank, tag: Tag) -> Result<ffi::MPI_Request> {
        let count = i32::try_from(len)
            .map_err(|_| Error::Comm(format!("message of {len} bytes exceeds 2 GiB")))?;
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: the caller keeps `len` bytes at `ptr` alive until the request completes.
        let rc = unsafe {
            ffi::MPI_Irecv(
                ptr as *mut std::ffi::c_void,
                count,
                u8::equivalent_datatype().as_raw(),
                from.0 as i32,
                tag.0,
                self.comm.as_raw(),
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Comm(format!(
                "MPI_Irecv from rank {from} failed with code {rc}"
            )));
        }
        // SAFETY: MPI_Irecv succeeded.
        Ok(unsafe { req.assume_init() })
    }

    /// A receive buffer for (from, tag) shaped like `expect`: the one this key used last
    /// step (its tensor consumed by then: the executor uses every received tensor within
    /// its step), or a new one (`Tensor::empty`: never zero-filled, never copied).
    fn take_slot(&mut self, from: Rank, tag: Tag, expect: &Expect) -> Result<Slot> {
        let head_len = self.fold.head_len(expect);
        let fits = |s: &Slot| {
            s.head.len() == head_len
                && s.tensor.kind() == expect.kind
                && s.tensor.size() == expect.shape
        };
        if let Some(slot) = self
            .pool
            .get_mut(&(from, tag))
            .and_then(|v| v.pop())
            .filter(fits)
        {
            return Ok(slot);
        }
        let tensor = Tensor::f_empty(expect.shape.as_slice(), (expect.kind, tch::Device::Cpu))
            .map_err(Error::torch("receive buffer"))?;
        Ok(Slot {
            head: vec![0u8; head_len],
            tensor,
        })
    }

    /// Waits for the receive `req` (from `from`) under the deadline; returns its status.
    fn wait_one(
        &mut self,
        req: &mut ffi::MPI_Request,
        from: Rank,
        tag: Tag,
        bytes: usize,
    ) -> Result<ffi::MPI_Status> {
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = self.waiter(bytes);
        loop {
            let mut flag = 0;
            let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
            // SAFETY: a live request of ours (or MPI_REQUEST_NULL once completed).
            let rc = unsafe { ffi::MPI_Test(req, &mut flag, status.as_mut_ptr()) };
            if rc != 0 {
                return Err(Error::Comm(format!(
                    "receive from rank {from} (tag {}) failed with MPI code {rc} (a message longer than expected?)",
                    tag.0
                )));
            }
            if flag != 0 {
                // SAFETY: MPI_Test filled the status of the completed request.
                return Ok(unsafe { status.assume_init() });
            }
            if deadline.passed() {
                return Err(self.stalled(CommOp::Recv, Some(from), tag, bytes, &deadline));
            }
            progress(&mut self.pending, &self.watch)?;
            waiter.pause();
        }
    }

    /// Waits for the tensor message `p` (from `from`, like `expect`) and checks it; the
    /// elements are then in `p.slot.tensor`, which it returns (a new handle).
    fn land(
        &mut self,
        p: &mut PostedTensor,
        from: Rank,
        tag: Tag,
        expect: &Expect,
    ) -> Result<Tensor> {
        let status = self.wait_one(&mut p.reqs[0], from, tag, expect.message_len())?;
        let got = received_bytes(&status).min(p.slot.head.len());
        let first = &p.slot.head[..got];
        if p.parts == 1 {
            fold::unpack(first, from, expect, &p.slot.tensor)?;
        } else {
            let end = wire::check_header(first, from, expect)?;
            if end != got {
                return Err(wire::payload_error(from, expect, got - end));
            }
            let status = self.wait_one(&mut p.reqs[1], from, tag, expect.payload_len())?;
            let got = received_bytes(&status);
            if got != expect.payload_len() {
                return Err(wire::payload_error(from, expect, got));
            }
        }
        p.slot
            .tensor
            .f_detach()
            .map_err(Error::torch("receive buffer"))
    }

    /// Waits for a receive posted by [`Communicator::post_recv`].
    fn complete_posted(&mut self, mut posted: PostedRecv, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = self.waiter(0);
        loop {
            let mut flag = 0;
            let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
            let rc = unsafe { ffi::MPI_Test(&mut posted.req, &mut flag, status.as_mut_ptr()) };
            if rc != 0 {
                // The buffer must outlive a request MPI still owns: leak it.
                std::mem::forget(posted.buf);
                return Err(Error::Comm(format!(
                    "receive from rank {from} (tag {}) failed with MPI code {rc} (a message longer than expected?)",
                    tag.0
                )));
            }
            if flag != 0 {
                let mut count = 0;
                unsafe {
                    ffi::MPI_Get_count(
                        status.as_ptr(),
                        u8::equivalent_datatype().as_raw(),
                        &mut count,
                    );
                }
                posted.buf.truncate(count.max(0) as usize);
                return Ok(posted.buf);
            }
            if deadline.passed() {
                let len = posted.buf.len();
                std::mem::forget(posted.buf);
                return Err(self.stalled(CommOp::Recv, Some(from), tag, len, &deadline));
            }
            progress(&mut self.pending, &self.watch)?;
            waiter.pause();
        }
    }

    /// Waits for a message nobody posted a receive for, and receives it at its size.
    fn probe_and_receive(&mut self, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = self.waiter(0);
        let process = self.comm.process_at_rank(from.0 as i32);
        loop {
            if let Some(status) = process.immediate_probe_with_tag(tag.0) {
                let n = status.count(u8::equivalent_datatype()) as usize;
                let mut buf = vec![0u8; n];
                process.receive_into_with_tag(&mut buf[..], tag.0);
                return Ok(buf);
            }
            if deadline.passed() {
                return Err(self.stalled(CommOp::Recv, Some(from), tag, 0, &deadline));
            }
            progress(&mut self.pending, &self.watch)?;
            waiter.pause();
        }
    }
}

impl Drop for MpiComm {
    /// Never waits (a failing job must reach its error report): sends that are still in
    /// flight keep their buffers, leaked, since MPI may still read them. A finished job
    /// has flushed every communicator before this.
    fn drop(&mut self) {
        let _ = progress(&mut self.pending, &self.watch);
        // Started collectives cannot be freed or cancelled (MPI forbids it); a finished
        // job has waited for all of them, a failing one is being torn down.
        self.started.clear();
        for mut p in self.pending.drain(..) {
            unsafe {
                ffi::MPI_Request_free(&mut p.req);
            }
            std::mem::forget(p.keep);
        }
        for (_, queue) in self.posted_tensors.drain() {
            for mut p in queue {
                for r in &mut p.reqs[..p.parts] {
                    // SAFETY: a live request of ours; its buffers are leaked.
                    unsafe {
                        ffi::MPI_Request_free(r);
                    }
                }
                std::mem::forget(p.slot);
            }
        }
        // Receives posted but never completed (a step cut short by an error): MPI may
        // still write into their buffers.
        for (_, queue) in self.posted.drain() {
            for mut p in queue {
                unsafe {
                    ffi::MPI_Request_free(&mut p.req);
                }
                std::mem::forget(p.buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::take_done;

    #[test]
    fn take_done_removes_exactly_the_listed_entries_in_any_order() {
        let mut items: Vec<u32> = (0..6).collect();
        let mut taken = take_done(&mut items, &[4, 0, 2]);
        taken.sort_unstable();
        items.sort_unstable();
        assert_eq!(taken, [0, 2, 4]);
        assert_eq!(items, [1, 3, 5]);
        let mut last: Vec<u32> = (0..3).collect();
        assert_eq!(take_done(&mut last, &[2, 1]).len(), 2);
        assert_eq!(last, [0]);
        assert!(take_done(&mut last, &[]).is_empty());
        assert_eq!(last, [0]);
    }
}
