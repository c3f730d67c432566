//! In-process communicator: one thread per rank, crossbeam channels between them.
//!
//! Used by the fast equivalence tests: the engine runs unchanged, without mpiexec. A rank
//! that fails calls [`LocalComm::poison`]; every other rank's wait then returns
//! [`Error::PeerFailed`] within one polling interval instead of hanging, and every wait
//! has the watchdog's deadline (a hang in a test fails it, naming the rank).

use super::{Communicator, ReduceOp, Tag};
use crate::error::{Error, Result};
use crate::flight::{CommOp, FlightRecorder, Group};
use crate::watchdog::{Deadline, Deadlines, Watch};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use partitioner::Rank;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

struct Msg {
    from: Rank,
    tag: Tag,
    data: Vec<u8>,
}

const NOBODY: usize = usize::MAX;

/// Tags of the started (non-blocking) all-reduces: shares to rank 0, results back.
const SHARE: Tag = Tag(8);
const RESULT: Tag = Tag(9);

/// A started all-reduce: the caller's memory and its flight event.
struct Started {
    ptr: *mut f32,
    len: usize,
    op: ReduceOp,
    event: u64,
}

// SAFETY: the pointer is used only by the thread that owns the communicator (the caller
// of `start_all_reduce_f32` keeps the memory alive and untouched until the wait).
unsafe impl Send for Started {}

/// One rank's end of an in-process group.
pub struct LocalComm {
    rank: Rank,
    /// This rank's rank in the whole job (what a failure is reported as).
    world_rank: Rank,
    /// World rank of each member, by group rank.
    world_ranks: Vec<Rank>,
    watch: Watch,
    group: Group,
    peers: Vec<Sender<Msg>>,
    inbox: Receiver<Msg>,
    /// Messages that arrived before they were asked for, in arrival order.
    early: Vec<Msg>,
    failed: Arc<AtomicUsize>,
    /// Started all-reduces, in start order.
    started: Vec<Started>,
}

impl LocalComm {
    /// Creates the communicators of an `n`-rank group; hand one to each thread.
    pub fn group(n: usize) -> Vec<LocalComm> {
        let watches: Vec<Watch> = (0..n)
            .map(|r| {
                let flight = FlightRecorder::new(Rank(r), None, crate::flight::DEFAULT_CAPACITY);
                Watch::new(flight, None, Deadlines::default(), None)
            })
            .collect();
        let ranks: Vec<Rank> = (0..n).map(Rank).collect();
        Self::subgroup(&ranks, &Self::failure_flag(), Group::World, &watches)
    }

    /// A failure flag to share between all the groups of one job.
    pub fn failure_flag() -> Arc<AtomicUsize> {
        Arc::new(AtomicUsize::new(NOBODY))
    }

    /// Creates a group (the `group` axis) whose members have the given world ranks,
    /// sharing `failed` with the job's other groups so that a failure anywhere unblocks
    /// waits everywhere; `watches[w]` is the watchdog state of world rank `w`.
    pub fn subgroup(
        world_ranks: &[Rank],
        failed: &Arc<AtomicUsize>,
        group: Group,
        watches: &[Watch],
    ) -> Vec<LocalComm> {
        let n = world_ranks.len();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| unbounded()).unzip();
        rxs.into_iter()
            .enumerate()
            .map(|(r, inbox)| LocalComm {
                rank: Rank(r),
                world_rank: world_ranks[r],
                world_ranks: world_ranks.to_vec(),
                watch: watches[world_ranks[r].0].clone(),
                group,
                peers: txs.clone(),
                inbox,
                early: Vec::new(),
                failed: failed.clone(),
                started: Vec::new(),
            })
            .collect()
    }

    /// Marks this rank as failed so that peers stop waiting for it.
    pub fn poison(&self) {
        let _ = self.failed.compare_exchange(
            NOBODY,
            self.world_rank.0,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Waits for the next message from `from` with `tag`, within the deadline.
    fn wait_for(&mut self, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        if let Some(i) = self
            .early
            .iter()
            .position(|m| m.from == from && m.tag == tag)
        {
            return Ok(self.early.remove(i).data);
        }
        let deadline = Deadline::start(self.watch.deadlines().timeout);
        loop {
            match self.inbox.recv_timeout(Duration::from_millis(20)) {
                Ok(m) if m.from == from && m.tag == tag => return Ok(m.data),
                Ok(m) => self.early.push(m),
                Err(RecvTimeoutError::Timeout) => self.check_peers()?,
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Error::Comm("all peers have exited".into()))
                }
            }
            if deadline.passed() {
                let peer = self.world_ranks.get(from.0).copied();
                let what = format!("recv {} from rank {from}, tag {}", self.group.name(), tag.0);
                return Err(self
                    .watch
                    .timeout(what, peer, &self.world_ranks, deadline.waited()));
            }
        }
    }

    fn check_peers(&self) -> Result<()> {
        match self.failed.load(Ordering::SeqCst) {
            NOBODY => Ok(()),
            r => Err(Error::PeerFailed(Rank(r))),
        }
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> Rank {
        self.rank
    }

    fn size(&self) -> usize {
        self.peers.len()
    }

    fn send(&mut self, to: Rank, tag: Tag, data: Vec<u8>) -> Result<()> {
        let peer = self.peers.get(to.0).ok_or_else(|| {
            Error::Comm(format!("no rank {to} in a group of {}", self.peers.len()))
        })?;
        peer.send(Msg {
            from: self.rank,
            tag,
            data,
        })
        .map_err(|_| Error::Comm(format!("rank {to} has exited")))
    }

    fn recv(&mut self, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        let peer = self.world_ranks.get(from.0).copied();
        let event = self
            .watch
            .flight()
            .comm(CommOp::Recv, self.group, peer, tag.0, 0);
        let data = self.wait_for(from, tag)?;
        self.watch.flight().end(event);
        Ok(data)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    /// Rank 0 keeps its share; every other rank sends a copy of its share to rank 0 at
    /// once. [`LocalComm::wait_started`] completes them in start order.
    unsafe fn start_all_reduce_f32(
        &mut self,
        ptr: *mut f32,
        len: usize,
        op: ReduceOp,
    ) -> Result<()> {
        if self.size() == 1 || len == 0 {
            return Ok(());
        }
        let event = self
            .watch
            .flight()
            .comm(CommOp::StartAllReduce, self.group, None, 0, 4 * len);
        if self.rank.0 != 0 {
            let share = std::slice::from_raw_parts(ptr, len);
            self.send(
                Rank(0),
                SHARE,
                share.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )?;
        }
        self.started.push(Started {
            ptr,
            len,
            op,
            event,
        });
        Ok(())
    }

    fn test_started(&mut self) -> Result<usize> {
        Ok(self.started.len())
    }

    /// Rank 0 reduces each started buffer with the other ranks' shares in rank order (as
    /// the blocking all-reduce does) and sends the result back; the others receive it.
    fn wait_started(&mut self) -> Result<()> {
        if self.started.is_empty() {
            return Ok(());
        }
        let bytes = self.started.iter().map(|s| 4 * s.len).sum();
        let wait = self
            .watch
            .flight()
            .comm(CommOp::Wait, self.group, None, 0, bytes);
        for s in std::mem::take(&mut self.started) {
            // SAFETY: the caller of start_all_reduce_f32 keeps the memory alive and
            // untouched until this returns.
            let values = unsafe { std::slice::from_raw_parts_mut(s.ptr, s.len) };
            if self.rank.0 == 0 {
                for r in 1..self.size() {
                    let share = self.wait_for(Rank(r), SHARE)?;
                    let share = f32s(&share, Rank(r), s.len)?;
                    for (a, b) in values.iter_mut().zip(share) {
                        *a = s.op.apply(*a, b);
                    }
                }
                let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
                for r in 1..self.size() {
                    self.send(Rank(r), RESULT, bytes.clone())?;
                }
            } else {
                let result = self.wait_for(Rank(0), RESULT)?;
                for (a, b) in values.iter_mut().zip(f32s(&result, Rank(0), s.len)?) {
                    *a = b;
                }
            }
            self.watch.flight().end(s.event);
        }
        self.watch.flight().end(wait);
        Ok(())
    }

    fn flight(&self) -> Option<&FlightRecorder> {
        Some(self.watch.flight())
    }

    fn abort_peers(&self) {
        self.poison();
    }
}

/// The `len` little-endian f32 values of a message from `from`.
fn f32s(bytes: &[u8], from: Rank, len: usize) -> Result<impl Iterator<Item = f32> + '_> {
    if bytes.len() != 4 * len {
        return Err(Error::Wire {
            from,
            expected: format!("{len} f32 values"),
            got: format!("{} bytes", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
}

/// Runs `f(rank, comm)` on `n` in-process ranks, one thread each, and returns every
/// rank's result in rank order; a rank that fails poisons the group, so its peers stop
/// waiting for it instead of hanging. For tests.
#[cfg(test)]
pub(crate) fn on_ranks<T: Send + 'static>(
    n: usize,
    f: impl Fn(usize, &mut LocalComm) -> Result<T> + Send + Sync + Clone + 'static,
) -> Vec<Result<T>> {
    let handles: Vec<_> = LocalComm::group(n)
        .into_iter()
        .enumerate()
        .map(|(r, mut comm)| {
            let f = f.clone();
            std::thread::spawn(move || {
                let out = f(r, &mut comm);
                if out.is_err() {
                    comm.poison();
                }
                out
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_tags_and_all_reduce() {
        let comms = LocalComm::group(3);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let r = c.rank().0;
                    if r == 0 {
                        c.send(Rank(1), Tag(7), vec![7]).unwrap();
                        c.send(Rank(1), Tag(9), vec![9]).unwrap();
                    }
                    if r == 1 {
                        assert_eq!(c.recv(Rank(0), Tag(9)).unwrap(), vec![9]);
                        assert_eq!(c.recv(Rank(0), Tag(7)).unwrap(), vec![7]);
                    }
                    let mut v = [r as f64, 1.0];
                    c.all_reduce_sum(&mut v).unwrap();
                    assert_eq!(v, [3.0, 3.0]);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    /// Started all-reduces leave what the blocking one leaves, bit for bit, in place.
    #[test]
    fn started_all_reduces_match_the_blocking_one() {
        let comms = LocalComm::group(3);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                std::thread::spawn(move || {
                    let r = c.rank().0 as f32;
                    let mut a: Vec<f32> = (0..5).map(|i| 0.1 * i as f32 + r / 3.0).collect();
                    let mut b: Vec<f32> = vec![r * 1e-3, 7.0 - r];
                    let (mut a2, mut b2) = (a.clone(), b.clone());
                    unsafe {
                        c.start_all_reduce_f32(a.as_mut_ptr(), a.len(), ReduceOp::Sum)
                            .unwrap();
                        c.start_all_reduce_f32(b.as_mut_ptr(), b.len(), ReduceOp::Max)
                            .unwrap();
                    }
                    c.wait_started().unwrap();
                    c.all_reduce_f32(&mut a2, ReduceOp::Sum).unwrap();
                    c.all_reduce_f32(&mut b2, ReduceOp::Max).unwrap();
                    assert_eq!(a, a2);
                    assert_eq!(b, b2);
                    assert_eq!(b, vec![2e-3, 7.0]);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn a_failed_peer_unblocks_waiters() {
        let mut comms = LocalComm::group(2);
        let c1 = comms.pop().unwrap();
        let mut c0 = comms.pop().unwrap();
        c1.poison();
        let err = c0.recv(Rank(1), Tag(1)).unwrap_err();
        assert!(matches!(err, Error::PeerFailed(Rank(1))), "{err}");
    }

    #[test]
    fn a_wait_past_its_deadline_names_the_silent_peer() {
        let mesh = partitioner::mesh::Mesh::new(2, 1, 1).unwrap();
        let deadlines = Deadlines {
            timeout: Duration::from_millis(100),
            ..Deadlines::default()
        };
        let watches: Vec<Watch> = (0..2)
            .map(|r| {
                let f = FlightRecorder::new(Rank(r), mesh.coords(Rank(r)).ok(), 8);
                Watch::new(f, Some(mesh), deadlines, None)
            })
            .collect();
        let ranks = [Rank(0), Rank(1)];
        let mut comms =
            LocalComm::subgroup(&ranks, &LocalComm::failure_flag(), Group::Pp, &watches);
        let _c1 = comms.pop().unwrap();
        let mut c0 = comms.pop().unwrap();
        let span = watches[0]
            .flight()
            .action("0RECV_B1".parse().unwrap(), false);
        let start = std::time::Instant::now();
        let e = c0.recv(Rank(1), Tag(34)).unwrap_err().to_string();
        // The deadline is 100 ms; a loaded machine may wake the waiter later, so the
        // reported wait is not pinned to 0.1 s, only bounded.
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(
            e.contains("rank 1 (pp 1, tp 0, dp 0) is stuck")
                && e.contains("rank 0 (pp 0, tp 0, dp 0) waited ")
                && e.contains(" s in 0RECV_B1")
                && e.contains("recv pp from rank 1, tag 34"),
            "{e}"
        );
        drop(span);
    }
}
