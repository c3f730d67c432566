//! MPI communicator over the `mpi` crate (MPICH or Open MPI).
//!
//! Collectives are MPI's own (`MPI_Iallreduce`, in place on the caller's memory with
//! `MPI_IN_PLACE`, or from one buffer straight into another), never a star through rank 0.
//! Waits loop over `MPI_Test` under a [`WaitPolicy`] (see [`super::wait`]).
//!
//! Sends are `MPI_Isend`s whose buffers are kept in a pending list until `MPI_Test` says
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

use super::wait::{WaitPolicy, Waiter};
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

struct PendingSend {
    /// Kept alive (and unmoved on the heap) until the request completes.
    _buf: Vec<u8>,
    req: ffi::MPI_Request,
    /// The flight-recorder event of this send.
    event: u64,
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

/// An MPI communicator (the world, or a group cut from it).
pub struct MpiComm {
    comm: SimpleCommunicator,
    pending: Vec<PendingSend>,
    posted: HashMap<(Rank, Tag), VecDeque<PostedRecv>>,
    watch: Watch,
    group: Group,
    /// World rank of each member, by group rank.
    world_ranks: Vec<Rank>,
    /// What a wait does between two tests.
    wait: WaitPolicy,
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
            posted: HashMap::new(),
            watch,
            group,
            world_ranks,
            wait: WaitPolicy::from_env()?,
        })
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

/// Completes whichever pending sends are done; never blocks.
fn progress(pending: &mut Vec<PendingSend>, watch: &Watch) -> Result<()> {
    let mut i = 0;
    while i < pending.len() {
        let mut flag = 0;
        let rc = unsafe {
            let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
            ffi::MPI_Test(&mut pending[i].req, &mut flag, status.as_mut_ptr())
        };
        if rc != 0 {
            return Err(Error::Comm(format!("MPI_Test failed with code {rc}")));
        }
        if flag != 0 {
            watch.flight().end(pending[i].event);
            pending.swap_remove(i);
        } else {
            i += 1;
        }
    }
    Ok(())
}

impl Communicator for MpiComm {
    fn rank(&self) -> Rank {
        Rank(self.comm.rank() as usize)
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn send(&mut self, to: Rank, tag: Tag, data: Vec<u8>) -> Result<()> {
        let count = i32::try_from(data.len())
            .map_err(|_| Error::Comm(format!("message of {} bytes exceeds 2 GiB", data.len())))?;
        let event = self.watch.flight().comm(
            CommOp::Send,
            self.group,
            Some(self.world_rank(to)),
            tag.0,
            data.len(),
        );
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let rc = unsafe {
            ffi::MPI_Isend(
                data.as_ptr() as *const std::ffi::c_void,
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
            _buf: data,
            req: unsafe { req.assume_init() },
            event,
        });
        progress(&mut self.pending, &self.watch)
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

    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        let dtype = f64::equivalent_datatype().as_raw();
        let (n, recv) = (values.len(), values.as_mut_ptr().cast());
        // SAFETY: as in all_reduce_f32.
        unsafe { self.iallreduce(None, recv, n, 8, dtype, ReduceOp::Sum) }
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
        let mut waiter = Waiter::new(self.wait);
        loop {
            progress(&mut self.pending, &self.watch)?;
            if self.pending.is_empty() {
                self.watch.flight().end(event);
                return Ok(());
            }
            if deadline.passed() {
                let stuck = self.watch.flight().entries();
                // Name the receiver of the oldest send still in flight.
                let oldest = self.pending.iter().map(|p| p.event).min();
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
            match op {
                ReduceOp::Sum => ffi::RSMPI_SUM,
                ReduceOp::Max => ffi::RSMPI_MAX,
            },
            self.comm.as_raw(),
            req.as_mut_ptr(),
        );
        if rc != 0 {
            return Err(Error::Comm(format!("MPI_Iallreduce failed with code {rc}")));
        }
        let mut req = req.assume_init();
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = Waiter::new(self.wait);
        loop {
            let mut flag = 0;
            let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
            let rc = ffi::MPI_Test(&mut req, &mut flag, status.as_mut_ptr());
            if rc != 0 {
                return Err(Error::Comm(format!("MPI_Iallreduce failed with code {rc}")));
            }
            if flag != 0 {
                self.watch.flight().end(event);
                return Ok(());
            }
            if deadline.passed() {
                return Err(self.stalled(CommOp::AllReduce, None, Tag(0), bytes, &deadline));
            }
            progress(&mut self.pending, &self.watch)?;
            waiter.pause();
        }
    }

    /// Waits for a receive posted by [`Communicator::post_recv`].
    fn complete_posted(&mut self, mut posted: PostedRecv, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        let mut waiter = Waiter::new(self.wait);
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
        let mut waiter = Waiter::new(self.wait);
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
        for mut p in self.pending.drain(..) {
            unsafe {
                ffi::MPI_Request_free(&mut p.req);
            }
            std::mem::forget(p._buf);
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
