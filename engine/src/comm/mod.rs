//! Communicators: how ranks exchange bytes. One trait, two implementations — MPI
//! ([`mpi::MpiComm`]) for real multi-process runs and crossbeam channels
//! ([`local::LocalComm`], one thread per rank) for fast in-process tests — so the engine
//! code is identical on both. Communicators are passed explicitly; there is no global.
//!
//! Invariants every implementation keeps:
//! * `send` never blocks: the communicator owns the buffer until it is delivered, so any
//!   schedule that validates in the simulator (which assumes non-blocking sends) cannot
//!   deadlock on sends;
//! * messages between one (sender, receiver, tag) triple arrive in order;
//! * waiting never takes a core from a peer for long: MPI waits poll under a
//!   [`wait::WaitPolicy`] (yield, then sleeps of at most 100 µs, by default);
//! * every wait has a deadline (`parallel.timeout_s`, see [`crate::watchdog`]): past it,
//!   the wait returns [`Error::Stalled`] naming the rank it waited on;
//! * if a peer fails, waits return [`Error::PeerFailed`] (local) or the job is aborted
//!   by the watchdog (MPI) instead of hanging.
//!
//! [`Error::Stalled`]: crate::error::Error::Stalled
//! [`Error::PeerFailed`]: crate::error::Error::PeerFailed

pub mod fold;
pub mod groups;
pub mod local;
pub mod mpi;
pub mod wait;
pub mod wire;

use crate::error::Result;
use crate::flight::FlightRecorder;
use partitioner::Rank;
use tch::Tensor;

/// Message tags. Per-microbatch traffic encodes the receiving chunk's slot on its rank
/// (0..4) and the microbatch (0..1024): `kind | slot << 3 | mb << 5`, which stays below the
/// MPI-guaranteed tag bound of 32767.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag(pub i32);

impl Tag {
    pub const ACTIVATION: i32 = 1;
    pub const GRADIENT: i32 = 2;
    pub const METRICS: i32 = 3;
    pub const REDUCE: i32 = 4;
    pub const BROADCAST: i32 = 5;
    pub const TRACE: i32 = 6;
    /// Checkpoint save protocol (piece tables to rank 0, go/outcome from rank 0).
    pub const CHECKPOINT: i32 = 7;

    /// Tag for a per-microbatch message of `kind` to the chunk in `slot` on its rank.
    pub fn microbatch(kind: i32, slot: usize, mb: usize) -> Tag {
        debug_assert!(slot < 4 && mb < 1024);
        Tag(kind | ((slot as i32) << 3) | ((mb as i32) << 5))
    }

    pub fn plain(kind: i32) -> Tag {
        Tag(kind)
    }
}

/// A reduction for [`Communicator::all_reduce_f32`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Max,
}

impl ReduceOp {
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            ReduceOp::Sum => a + b,
            ReduceOp::Max => a.max(b),
        }
    }
}

/// Point-to-point byte transport between the ranks of one group.
pub trait Communicator: Send {
    /// This process's rank in the group.
    fn rank(&self) -> Rank;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Starts sending `data` to `to`; never blocks. The buffer is owned until delivered.
    fn send(&mut self, to: Rank, tag: Tag, data: Vec<u8>) -> Result<()>;
    /// Waits (sleeping, not spinning) for the next message from `from` with `tag`.
    fn recv(&mut self, from: Rank, tag: Tag) -> Result<Vec<u8>>;
    /// Waits until every send issued so far has been delivered.
    fn flush(&mut self) -> Result<()>;

    /// Posts, ahead of time, a receive of a `len`-byte message from `from` with `tag`, so
    /// the transfer can complete before [`Communicator::recv`] asks for it. Posted
    /// receives are consumed by `recv` in posting order. Optional: the default does
    /// nothing and `recv` works either way.
    fn post_recv(&mut self, from: Rank, tag: Tag, len: usize) -> Result<()> {
        let _ = (from, tag, len);
        Ok(())
    }

    /// Starts sending a tensor message (`header`, from [`wire::header`], then the elements
    /// of `t`) to `to`; never blocks. MPI sends the elements straight from `t`'s memory
    /// (kept alive until delivered); the default copies both into one byte message.
    fn send_tensor(&mut self, to: Rank, tag: Tag, header: Vec<u8>, t: &Tensor) -> Result<()> {
        let t = wire::wire_form(t)?;
        let numel = t.numel();
        let mut bytes = header;
        let start = bytes.len();
        bytes.resize(start + numel * t.kind().elt_size_in_bytes(), 0);
        t.f_copy_data_u8(&mut bytes[start..], numel)
            .map_err(crate::error::Error::torch("wire encode"))?;
        self.send(to, tag, bytes)
    }

    /// Posts, ahead of time, the receive of a tensor message like `expect`. MPI lands the
    /// elements in a tensor of this (peer, tag) reused across steps.
    fn post_recv_tensor(&mut self, from: Rank, tag: Tag, expect: &wire::Expect) -> Result<()> {
        self.post_recv(from, tag, expect.message_len())
    }

    /// Waits for a tensor message from `from` with `tag`, checked against `expect`. With
    /// MPI the tensor is the reused receive buffer itself (no copy): it stays valid until
    /// the same (peer, tag) is received again, in the next step — the executor consumes
    /// every received tensor within its step.
    fn recv_tensor(&mut self, from: Rank, tag: Tag, expect: &wire::Expect) -> Result<Tensor> {
        let bytes = self.recv(from, tag)?;
        wire::decode_tensor(&bytes, from, expect)
    }

    /// This rank's flight recorder, if the transport keeps one: actions are recorded
    /// into it by the executor, operations by the transport.
    fn flight(&self) -> Option<&FlightRecorder> {
        None
    }

    /// Tells the other ranks that this one failed, where the transport can (in-process);
    /// MPI jobs are torn down by `MPI_Abort` instead.
    fn abort_peers(&self) {}

    /// Element-wise sum of `values` over all ranks, left on every rank, bit-identical on
    /// every rank and every run. The default (in-process) reduces in rank order on rank 0
    /// and broadcasts; MPI overrides it with its own collective (`MPI_Iallreduce`).
    fn all_reduce_sum(&mut self, values: &mut [f64]) -> Result<()> {
        let n = self.size();
        if n == 1 {
            return Ok(());
        }
        let root = Rank(0);
        if self.rank() == root {
            let mut acc = values.to_vec();
            for r in 1..n {
                let bytes = self.recv(Rank(r), Tag::plain(Tag::REDUCE))?;
                let theirs = wire::decode_f64s(&bytes, Rank(r), values.len())?;
                for (a, b) in acc.iter_mut().zip(theirs) {
                    *a += b;
                }
            }
            for r in 1..n {
                self.send(Rank(r), Tag::plain(Tag::BROADCAST), wire::encode_f64s(&acc))?;
            }
            values.copy_from_slice(&acc);
        } else {
            self.send(root, Tag::plain(Tag::REDUCE), wire::encode_f64s(values))?;
            let bytes = self.recv(root, Tag::plain(Tag::BROADCAST))?;
            values.copy_from_slice(&wire::decode_f64s(&bytes, root, values.len())?);
        }
        Ok(())
    }

    /// Element-wise reduction (`op`) of an f32 buffer over all ranks, in place, identical
    /// on every rank. The default reduces in rank order on rank 0 and broadcasts; MPI
    /// overrides it with a non-blocking `MPI_Iallreduce`.
    fn all_reduce_f32(&mut self, values: &mut [f32], op: ReduceOp) -> Result<()> {
        let n = self.size();
        if n == 1 {
            return Ok(());
        }
        let root = Rank(0);
        let encode = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
        if self.rank() == root {
            let mut theirs = vec![0f32; values.len()];
            for r in 1..n {
                let bytes = self.recv(Rank(r), Tag::plain(Tag::REDUCE))?;
                decode_f32s(&bytes, Rank(r), &mut theirs)?;
                for (a, b) in values.iter_mut().zip(&theirs) {
                    *a = op.apply(*a, *b);
                }
            }
            let bytes = encode(values);
            for r in 1..n {
                self.send(Rank(r), Tag::plain(Tag::BROADCAST), bytes.clone())?;
            }
        } else {
            self.send(root, Tag::plain(Tag::REDUCE), encode(values))?;
            let bytes = self.recv(root, Tag::plain(Tag::BROADCAST))?;
            decode_f32s(&bytes, root, values)?;
        }
        Ok(())
    }

    /// Element-wise reduction (`op`) of `send` over all ranks into `recv` (same length),
    /// identical on every rank; `send` is left as it was. MPI reads `send` and writes
    /// `recv` in their own memory (no copies); the default copies, then reduces in place.
    fn all_reduce_into(&mut self, send: &[f32], recv: &mut [f32], op: ReduceOp) -> Result<()> {
        if send.len() != recv.len() {
            return Err(crate::error::Error::Internal(format!(
                "all-reduce of {} values into {}",
                send.len(),
                recv.len()
            )));
        }
        recv.copy_from_slice(send);
        self.all_reduce_f32(recv, op)
    }

    /// Gathers every rank's `send` (the same length `n` on every rank) into `recv`
    /// (`size · n` values, rank `r`'s block at `r · n`), identical on every rank. MPI runs
    /// `MPI_Iallgather` from `send`'s memory straight into `recv`'s; the default (in
    /// process) sends the block to every peer and places theirs (`Tag::BROADCAST`: every
    /// rank runs the same collectives in the same order, so messages match by arrival).
    fn all_gather_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let (n, p, me) = (send.len(), self.size(), self.rank().0);
        check_blocks("all-gather", n, recv.len(), p)?;
        recv[me * n..(me + 1) * n].copy_from_slice(send);
        if p == 1 {
            return Ok(());
        }
        let bytes: Vec<u8> = send.iter().flat_map(|x| x.to_le_bytes()).collect();
        for r in (0..p).filter(|&r| r != me) {
            self.send(Rank(r), Tag::plain(Tag::BROADCAST), bytes.clone())?;
        }
        for r in (0..p).filter(|&r| r != me) {
            let theirs = self.recv(Rank(r), Tag::plain(Tag::BROADCAST))?;
            decode_f32s(&theirs, Rank(r), &mut recv[r * n..(r + 1) * n])?;
        }
        Ok(())
    }

    /// Sums `send` (`size · n` values) over all ranks and leaves block `r` of the sum
    /// (`n` values, at `r · n`) in rank `r`'s `recv`. The sum runs in rank order, as the
    /// default all-reduce's does. MPI runs `MPI_Ireduce_scatter_block` from `send`'s memory
    /// into `recv`'s; the default (in process) sends each peer its block
    /// (`Tag::REDUCE`, matched by arrival as in `all_gather_into`).
    fn reduce_scatter_into(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        let (n, p, me) = (recv.len(), self.size(), self.rank().0);
        check_blocks("reduce-scatter", n, send.len(), p)?;
        if p == 1 {
            recv.copy_from_slice(send);
            return Ok(());
        }
        for r in (0..p).filter(|&r| r != me) {
            let bytes: Vec<u8> = send[r * n..(r + 1) * n]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            self.send(Rank(r), Tag::plain(Tag::REDUCE), bytes)?;
        }
        let mut theirs = vec![0f32; n];
        for r in 0..p {
            let block: &[f32] = if r == me {
                &send[me * n..(me + 1) * n]
            } else {
                let bytes = self.recv(Rank(r), Tag::plain(Tag::REDUCE))?;
                decode_f32s(&bytes, Rank(r), &mut theirs)?;
                &theirs
            };
            if r == 0 {
                recv.copy_from_slice(block);
            } else {
                for (a, b) in recv.iter_mut().zip(block) {
                    *a += *b;
                }
            }
        }
        Ok(())
    }

    /// Starts a non-blocking, in-place element-wise reduction (`op`) of the `len` f32 values
    /// at `ptr` over all ranks (a data-parallel gradient bucket; see [`crate::dp`]) and
    /// returns at once. The result is the one [`Communicator::all_reduce_f32`] leaves,
    /// bit for bit; it is in place once [`Communicator::wait_started`] returns. Every rank
    /// of the group must start the same collectives in the same order. The default runs
    /// the blocking reduction at once (correct, never overlapped); MPI starts an
    /// `MPI_Iallreduce` with `MPI_IN_PLACE`, the in-process transport sends this rank's
    /// share at once.
    ///
    /// # Safety
    /// `ptr` points to `len` valid f32 values that stay alive, and that nothing else reads
    /// or writes, until `wait_started` returns `Ok` (past an error the transport may still
    /// own them: the job must end).
    unsafe fn start_all_reduce_f32(
        &mut self,
        ptr: *mut f32,
        len: usize,
        op: ReduceOp,
    ) -> Result<()> {
        self.all_reduce_f32(std::slice::from_raw_parts_mut(ptr, len), op)
    }

    /// Lets started reductions advance without blocking (MPI: `MPI_Test` on each);
    /// returns how many are still unfinished. Called between the executor's actions so
    /// that a reduction progresses while libtorch computes.
    fn test_started(&mut self) -> Result<usize> {
        Ok(0)
    }

    /// Waits for every started reduction, under the watchdog deadline
    /// (`parallel.timeout_s`; past it, [`crate::error::Error::Stalled`] names the wait).
    fn wait_started(&mut self) -> Result<()> {
        Ok(())
    }

    /// Blocks until every rank has reached the barrier.
    fn barrier(&mut self) -> Result<()> {
        self.all_reduce_sum(&mut [0.0])
    }
}

/// Checks that a gathered or scattered buffer of `whole` values is `size` blocks of `n`.
fn check_blocks(what: &str, n: usize, whole: usize, size: usize) -> Result<()> {
    if n * size == whole {
        return Ok(());
    }
    Err(crate::error::Error::Internal(format!(
        "{what} of {size} blocks of {n} values over a buffer of {whole}"
    )))
}

/// Decodes little-endian f32s from `from` into `out`, checking the length.
fn decode_f32s(bytes: &[u8], from: Rank, out: &mut [f32]) -> Result<()> {
    if bytes.len() != 4 * out.len() {
        return Err(crate::error::Error::Wire {
            from,
            expected: format!("{} f32 values", out.len()),
            got: format!("{} bytes", bytes.len()),
        });
    }
    for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(())
}
