//! In-process communicator: one thread per rank, crossbeam channels between them.
//!
//! Used by the fast equivalence tests: the engine runs unchanged, without mpiexec. A rank
//! that fails calls [`LocalComm::poison`]; every other rank's wait then returns
//! [`Error::PeerFailed`] within one polling interval instead of hanging, and every wait
//! has the watchdog's deadline (a hang in a test fails it, naming the rank).

use super::{Communicator, Tag};
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

    fn flight(&self) -> Option<&FlightRecorder> {
        Some(self.watch.flight())
    }

    fn abort_peers(&self) {
        self.poison();
    }
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
