//! The watchdog: a job never hangs silently.
//!
//! * Every blocking wait of the transport carries a deadline ([`Deadlines::timeout`],
//!   `parallel.timeout_s`); one that passes it returns [`Error::Stalled`] naming the rank
//!   waited on, the step, the action the waiting rank was in and how long it waited.
//! * A heartbeat on its own communicator ([`heartbeat`]) lets healthy ranks notice within
//!   [`Deadlines::heartbeat`] (`parallel.heartbeat_s`) that a peer has stopped (SIGSTOP)
//!   or died, even while they compute; they then dump their flight recorders and abort
//!   the job with one line naming the silent rank.
//! * A black box ([`blackbox`]) outlives a killed rank, so its supervisor can name it.
//!
//! [`Watch`] is the state one rank's transport and heartbeat share: who is who in the
//! mesh, the flight recorder, and what each peer last said it was doing.
//!
//! Invariant: every message names ranks as `rank R (pp P, tp T, dp D)`, world ranks.

pub mod blackbox;
pub mod heartbeat;

use crate::error::Error;
use crate::flight::{Doing, FlightRecorder, What};
use partitioner::mesh::{Mesh, MeshCoord};
use partitioner::Rank;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The watchdog's limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Deadlines {
    /// Longest a blocking wait may take (`parallel.timeout_s`).
    pub timeout: Duration,
    /// Longest a peer's heartbeat may be missing (`parallel.heartbeat_s`).
    pub heartbeat: Duration,
}

impl Default for Deadlines {
    fn default() -> Deadlines {
        Deadlines {
            timeout: Duration::from_secs(300),
            heartbeat: Duration::from_secs(10),
        }
    }
}

/// `rank 1 (pp 1, tp 0, dp 0)`, or `rank 1` without a mesh.
pub fn rank_name(rank: Rank, coord: Option<MeshCoord>) -> String {
    match coord {
        Some(c) => format!("rank {rank} (pp {}, tp {}, dp {})", c.pp, c.tp, c.dp),
        None => format!("rank {rank}"),
    }
}

/// What a peer last said in a heartbeat.
#[derive(Clone, Debug)]
pub struct PeerSeen {
    pub at: Instant,
    pub step: usize,
    pub doing: Option<What>,
    /// Seconds it had been in `doing` when it said so.
    pub for_s: f64,
    /// Its progress counter (events begun).
    pub begun: u64,
}

impl PeerSeen {
    /// `1F3 at step 3, 0.4 s ago`.
    fn describe(&self) -> String {
        let doing = self.doing.map_or("between actions".into(), |w| w.label());
        format!(
            "{doing} at step {}, {:.1} s ago",
            self.step,
            self.at.elapsed().as_secs_f64()
        )
    }
}

struct Shared {
    deadlines: Deadlines,
    mesh: Option<Mesh>,
    flight: FlightRecorder,
    /// Where flight records are dumped (`output.dir`).
    run_dir: Option<PathBuf>,
    peers: Mutex<HashMap<Rank, PeerSeen>>,
}

/// The watchdog state of one rank (cheap to clone; clones share it).
#[derive(Clone)]
pub struct Watch {
    shared: Arc<Shared>,
}

/// Why a job is being stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StallKind {
    /// A wait passed `parallel.timeout_s`.
    Timeout,
    /// A peer's heartbeat has been missing for `parallel.heartbeat_s`.
    Silent,
}

/// A rank that made no progress, as reported by the rank that noticed.
#[derive(Clone, Debug)]
pub struct Stall {
    pub kind: StallKind,
    /// The rank that is stuck, if known (a collective may not say who is late).
    pub stuck: Option<Rank>,
    pub stuck_name: String,
    pub waiter: Rank,
    pub waiter_name: String,
    /// The step the waiting rank was in.
    pub step: usize,
    /// The action the waiting rank was in (`0RECV_B3`).
    pub doing: String,
    /// Seconds the waiting rank had been in `doing`.
    pub doing_for_s: f64,
    /// The transport operation that waited (`recv pp from rank 1, 8204 bytes`).
    pub op: Option<String>,
    /// Seconds waited (timeout) or without a heartbeat (silent).
    pub waited_s: f64,
    /// The limit that was passed, in seconds.
    pub limit_s: f64,
    /// What the stuck rank last said it was doing.
    pub last_seen: Option<String>,
    pub flight_dir: Option<PathBuf>,
}

impl fmt::Display for Stall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seen = self
            .last_seen
            .as_ref()
            .map_or(String::new(), |s| format!(", last seen in {s}"));
        match self.kind {
            StallKind::Timeout => {
                let op = self.op.as_ref().map_or(String::new(), |o| format!(" ({o})"));
                write!(
                    f,
                    "{} is stuck{seen}: {} waited {:.1} s in {}{op} at step {} (parallel.timeout_s = {})",
                    self.stuck_name, self.waiter_name, self.waited_s, self.doing, self.step, self.limit_s
                )?;
            }
            StallKind::Silent => write!(
                f,
                "{} stopped responding: no heartbeat for {:.1} s (parallel.heartbeat_s = {}){seen}; {} was waiting in {} at step {} for {:.1} s",
                self.stuck_name,
                self.waited_s,
                self.limit_s,
                self.waiter_name,
                self.doing,
                self.step,
                self.doing_for_s
            )?,
        }
        if let Some(dir) = &self.flight_dir {
            write!(f, "; flight records: {}/flight-<rank>.json", dir.display())?;
        }
        match self.kind {
            StallKind::Timeout => write!(
                f,
                "; fix: look for the stuck rank's last event in its flight record, or raise parallel.timeout_s if a step can take longer"
            ),
            StallKind::Silent => write!(
                f,
                "; fix: check whether that process was stopped, killed or starved (raise parallel.heartbeat_s on an overloaded machine)"
            ),
        }
    }
}

impl Watch {
    /// The watchdog state of the rank that owns `flight`.
    pub fn new(
        flight: FlightRecorder,
        mesh: Option<Mesh>,
        deadlines: Deadlines,
        run_dir: Option<PathBuf>,
    ) -> Watch {
        Watch {
            shared: Arc::new(Shared {
                deadlines,
                mesh,
                flight,
                run_dir,
                peers: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn deadlines(&self) -> Deadlines {
        self.shared.deadlines
    }

    pub fn flight(&self) -> &FlightRecorder {
        &self.shared.flight
    }

    pub fn rank(&self) -> Rank {
        self.shared.flight.rank()
    }

    pub fn mesh(&self) -> Option<Mesh> {
        self.shared.mesh
    }

    pub fn run_dir(&self) -> Option<&PathBuf> {
        self.shared.run_dir.as_ref()
    }

    /// `rank R (pp P, tp T, dp D)` for world rank `r`.
    pub fn name(&self, r: Rank) -> String {
        let coord = self.shared.mesh.and_then(|m| m.coords(r).ok());
        rank_name(r, coord)
    }

    /// Records a heartbeat from `peer`.
    pub fn saw(&self, peer: Rank, seen: PeerSeen) {
        self.peers().insert(peer, seen);
    }

    /// What `peer` last said, if it said anything.
    pub fn seen(&self, peer: Rank) -> Option<PeerSeen> {
        self.peers().get(&peer).cloned()
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, HashMap<Rank, PeerSeen>> {
        self.shared.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The member of `members` furthest behind by its last heartbeat (lowest step, then
    /// fewest events begun): the likeliest culprit of a stuck collective.
    fn laggard(&self, members: &[Rank]) -> Option<Rank> {
        let peers = self.peers();
        members
            .iter()
            .filter(|r| **r != self.rank())
            .filter_map(|r| peers.get(r).map(|s| (s.step, s.begun, *r)))
            .min()
            .map(|(_, _, r)| r)
    }

    fn stall(
        &self,
        kind: StallKind,
        stuck: Option<Rank>,
        op: Option<String>,
        waited: Duration,
    ) -> Stall {
        let doing: Doing = self.shared.flight.doing();
        let limit = match kind {
            StallKind::Timeout => self.shared.deadlines.timeout,
            StallKind::Silent => self.shared.deadlines.heartbeat,
        };
        Stall {
            kind,
            stuck,
            stuck_name: stuck.map_or("a peer".into(), |r| self.name(r)),
            waiter: self.rank(),
            waiter_name: self.name(self.rank()),
            step: doing.step,
            doing: doing.label(),
            doing_for_s: doing.for_s,
            op,
            waited_s: waited.as_secs_f64(),
            limit_s: limit.as_secs_f64(),
            last_seen: stuck.and_then(|r| self.seen(r)).map(|s| s.describe()),
            flight_dir: self.shared.run_dir.clone(),
        }
    }

    /// The error of a wait that passed its deadline: on `peer` (a world rank) for
    /// point-to-point operations, else on the collective over `members` (world ranks).
    pub fn timeout(
        &self,
        op: String,
        peer: Option<Rank>,
        members: &[Rank],
        waited: Duration,
    ) -> Error {
        let stuck = peer.or_else(|| self.laggard(members));
        let mut stall = self.stall(StallKind::Timeout, stuck, Some(op), waited);
        if peer.is_none() && stuck.is_some() {
            stall.stuck_name = format!("{} (the member furthest behind)", stall.stuck_name);
        }
        Error::Stalled(Box::new(stall))
    }

    /// The report of a peer whose heartbeat has been missing for `silent`.
    pub fn silent(&self, peer: Rank, silent: Duration) -> Stall {
        self.stall(StallKind::Silent, Some(peer), None, silent)
    }
}

/// A wait's deadline.
pub struct Deadline {
    start: Instant,
    limit: Duration,
}

impl Deadline {
    pub fn start(limit: Duration) -> Deadline {
        Deadline {
            start: Instant::now(),
            limit,
        }
    }

    pub fn passed(&self) -> bool {
        self.start.elapsed() > self.limit
    }

    pub fn waited(&self) -> Duration {
        self.start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flight::{CommOp, Group};

    #[test]
    fn a_timeout_names_both_ranks_the_action_the_step_and_the_wait() {
        let mesh = Mesh::new(2, 1, 1).unwrap();
        let flight = FlightRecorder::new(Rank(0), mesh.coords(Rank(0)).ok(), 16);
        let watch = Watch::new(
            flight.clone(),
            Some(mesh),
            Deadlines::default(),
            Some("/r".into()),
        );
        flight.set_step(3);
        let _span = flight.action("0RECV_B2".parse().unwrap(), false);
        let _op = flight.comm(CommOp::Recv, Group::Pp, Some(Rank(1)), 0, 10);
        watch.saw(
            Rank(1),
            PeerSeen {
                at: Instant::now(),
                step: 3,
                doing: Some(What::Action {
                    action: "1F2".parse().unwrap(),
                    eval: false,
                }),
                for_s: 1.0,
                begun: 7,
            },
        );
        let e = watch
            .timeout(
                "recv pp from rank 1".into(),
                Some(Rank(1)),
                &[],
                Duration::from_secs(300),
            )
            .to_string();
        for needle in [
            "rank 1 (pp 1, tp 0, dp 0) is stuck",
            "last seen in 1F2 at step 3",
            "rank 0 (pp 0, tp 0, dp 0) waited 300.0 s in 0RECV_B2",
            "at step 3",
            "/r/flight-<rank>.json",
            "fix:",
        ] {
            assert!(e.contains(needle), "`{needle}` missing from: {e}");
        }
        assert!(!e.contains('\n'));
        let s = watch
            .silent(Rank(1), Duration::from_secs_f64(10.5))
            .to_string();
        assert!(
            s.contains("rank 1 (pp 1, tp 0, dp 0) stopped responding: no heartbeat for 10.5 s")
                && s.contains("was waiting in 0RECV_B2 at step 3"),
            "{s}"
        );
    }

    #[test]
    fn a_stuck_collective_blames_the_member_furthest_behind() {
        let mesh = Mesh::new(1, 1, 3).unwrap();
        let watch = Watch::new(
            FlightRecorder::new(Rank(0), None, 4),
            Some(mesh),
            Deadlines::default(),
            None,
        );
        for (r, step, begun) in [(1, 5, 40), (2, 4, 90)] {
            watch.saw(
                Rank(r),
                PeerSeen {
                    at: Instant::now(),
                    step,
                    doing: None,
                    for_s: 0.0,
                    begun,
                },
            );
        }
        let members = [Rank(0), Rank(1), Rank(2)];
        let e = watch
            .timeout(
                "all_reduce dp".into(),
                None,
                &members,
                Duration::from_secs(1),
            )
            .to_string();
        assert!(
            e.starts_with("rank 2 (pp 0, tp 0, dp 2) (the member furthest behind)"),
            "{e}"
        );
    }
}
