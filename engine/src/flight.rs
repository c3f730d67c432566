//! Flight recorder: every rank keeps its last N events — schedule actions (`1F3`,
//! `0RECV_B2`) and the transport operations inside them (sends, receives, all-reduces,
//! with peer and bytes) — in a ring buffer, and dumps it as JSON
//! (`<output.dir>/flight-<rank>.json`) when the job dies: a timeout, a lost heartbeat, a
//! fatal error or a panic. Like PyTorch's NCCL flight recorder, it answers "what was each
//! rank doing, and what was it waiting for, when the job hung?".
//!
//! Invariants:
//! * recording never allocates on the hot path: an event is a fixed-size [`Entry`]; labels
//!   are formatted only when dumped or reported;
//! * an event that never finished keeps `end = None` (state `started`), so the dump shows
//!   the wait that hung; sends and started (non-blocking) all-reduces stay `started` until
//!   the transport reports them complete, and neither is ever what a rank is "doing";
//! * the recorder is shared (cheaply cloned) by one rank's communicators and trainer; it
//!   is never global.

use crate::watchdog::blackbox::BlackBox;
use partitioner::mesh::MeshCoord;
use partitioner::{Action, ActionKind, MicrobatchId, Rank, StageId};
use serde::Serialize;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Events kept by default (about 100 bytes each).
pub const DEFAULT_CAPACITY: usize = 4096;

/// A transport operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommOp {
    Send,
    Recv,
    AllReduce,
    Barrier,
    Flush,
    AllGather,
    ReduceScatter,
    /// A non-blocking all-reduce (a data-parallel gradient bucket): begins when started,
    /// ends when complete; never the "doing" of a rank, which may compute meanwhile.
    StartAllReduce,
    /// A wait for every started non-blocking all-reduce of a group.
    Wait,
}

impl CommOp {
    pub fn name(self) -> &'static str {
        match self {
            CommOp::Send => "send",
            CommOp::Recv => "recv",
            CommOp::AllReduce => "all_reduce",
            CommOp::Barrier => "barrier",
            CommOp::Flush => "flush",
            CommOp::AllGather => "all_gather",
            CommOp::ReduceScatter => "reduce_scatter",
            CommOp::StartAllReduce => "start_all_reduce",
            CommOp::Wait => "wait_all_reduces",
        }
    }

    fn code(self) -> u64 {
        self as u64
    }

    fn from_code(c: u64) -> Option<CommOp> {
        [
            CommOp::Send,
            CommOp::Recv,
            CommOp::AllReduce,
            CommOp::Barrier,
            CommOp::Flush,
            CommOp::AllGather,
            CommOp::ReduceScatter,
            CommOp::StartAllReduce,
            CommOp::Wait,
        ]
        .get(c as usize)
        .copied()
    }
}

/// The communicator an operation ran on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    World,
    Pp,
    Tp,
    Dp,
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::World => "world",
            Group::Pp => "pp",
            Group::Tp => "tp",
            Group::Dp => "dp",
        }
    }

    fn from_code(c: u64) -> Option<Group> {
        [Group::World, Group::Pp, Group::Tp, Group::Dp]
            .get(c as usize)
            .copied()
    }
}

/// What an event was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// A schedule action of a training step, or of an evaluation (forward-only) pass.
    Action { action: Action, eval: bool },
    /// A transport operation; `peer` is a world rank (None for collectives).
    Comm {
        op: CommOp,
        group: Group,
        peer: Option<Rank>,
        tag: i32,
    },
}

const ACTION_KINDS: [ActionKind; 8] = [
    ActionKind::Forward,
    ActionKind::Backward,
    ActionKind::InputGrad,
    ActionKind::WeightGrad,
    ActionKind::SendAct,
    ActionKind::RecvAct,
    ActionKind::SendGrad,
    ActionKind::RecvGrad,
];

const NO_PEER: u64 = u64::MAX;

impl What {
    /// The event's name: the action (`1RECV_B3`, `eval 0F2`) or the operation
    /// (`recv pp from rank 1`, `all_reduce tp`).
    pub fn label(&self) -> String {
        match *self {
            What::Action { action, eval } => {
                format!("{}{action}", if eval { "eval " } else { "" })
            }
            What::Comm {
                op, group, peer, ..
            } => match (op, peer) {
                (CommOp::Send, Some(p)) => format!("send {} to rank {p}", group.name()),
                (CommOp::Recv, Some(p)) => format!("recv {} from rank {p}", group.name()),
                _ => format!("{} {}", op.name(), group.name()),
            },
        }
    }

    /// Four words that survive the process (see [`BlackBox`]); 0 means "nothing".
    pub fn encode(&self) -> [u64; 4] {
        match *self {
            What::Action { action, eval } => {
                let kind = ACTION_KINDS
                    .iter()
                    .position(|k| *k == action.kind)
                    .unwrap_or(0) as u64;
                [
                    1 | (eval as u64) << 8 | kind << 16,
                    action.stage.0 as u64,
                    action.mb.0 as u64,
                    0,
                ]
            }
            What::Comm {
                op,
                group,
                peer,
                tag,
            } => [
                2 | op.code() << 8 | (group as u64) << 16,
                peer.map_or(NO_PEER, |p| p.0 as u64),
                tag as u32 as u64,
                0,
            ],
        }
    }

    /// Inverse of [`What::encode`].
    pub fn decode(w: [u64; 4]) -> Option<What> {
        match w[0] & 0xff {
            1 => Some(What::Action {
                action: Action {
                    stage: StageId(w[1] as usize),
                    kind: *ACTION_KINDS.get((w[0] >> 16 & 0xff) as usize)?,
                    mb: MicrobatchId(w[2] as usize),
                },
                eval: w[0] >> 8 & 1 == 1,
            }),
            2 => Some(What::Comm {
                op: CommOp::from_code(w[0] >> 8 & 0xff)?,
                group: Group::from_code(w[0] >> 16 & 0xff)?,
                peer: (w[1] != NO_PEER).then_some(Rank(w[1] as usize)),
                tag: w[2] as u32 as i32,
            }),
            _ => None,
        }
    }

    fn blocks(&self) -> bool {
        !matches!(
            self,
            What::Comm {
                op: CommOp::Send | CommOp::StartAllReduce,
                ..
            }
        )
    }
}

/// One recorded event.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    pub seq: u64,
    pub step: usize,
    pub what: What,
    /// Seconds since the recorder was created.
    pub start: f64,
    pub end: Option<f64>,
    pub bytes: usize,
}

/// What a rank is doing now, for heartbeats and error messages.
#[derive(Clone, Debug, PartialEq)]
pub struct Doing {
    pub step: usize,
    /// The innermost open action or blocking operation (None between them).
    pub what: Option<What>,
    /// The open operation inside an action (an all-reduce inside a forward, say).
    pub inner: Option<What>,
    /// Seconds spent in `what` so far.
    pub for_s: f64,
    /// Events started so far: a progress counter.
    pub begun: u64,
}

impl Doing {
    /// `0RECV_B3`, `1F3 (all_reduce tp)`, `recv world from rank 1`, or `between actions`.
    pub fn label(&self) -> String {
        match (&self.what, &self.inner) {
            (Some(w), Some(i)) => format!("{} ({})", w.label(), i.label()),
            (Some(w), None) => w.label(),
            (None, _) => "between actions".into(),
        }
    }
}

/// A mid-step fault injected on purpose (`STRATA_FAIL_AT=RANK:STEP:MODE`) to test the
/// watchdog; it fires when the rank begins its first backward (B or I) of `step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub step: usize,
    pub mode: FaultMode,
}

/// How an injected fault fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultMode {
    /// `SIGSTOP` to itself: the process freezes (heartbeats stop).
    Stop,
    /// `SIGKILL` to itself: the process vanishes.
    Kill,
    /// A Rust panic.
    Panic,
    /// Sleeps forever while its heartbeat continues: peers hit `parallel.timeout_s`.
    Hang,
}

struct Ring {
    entries: VecDeque<Entry>,
    capacity: usize,
    next_seq: u64,
    step: usize,
    /// Open blocking events, outermost first (an action, then an operation inside it).
    open: Vec<u64>,
    fault: Option<Fault>,
    blackbox: Option<BlackBox>,
}

impl Ring {
    fn find(&mut self, seq: u64) -> Option<&mut Entry> {
        // Events end in roughly the order they began: search from the newest.
        self.entries.iter_mut().rev().find(|e| e.seq == seq)
    }

    fn entry(&self, seq: u64) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.seq == seq)
    }
}

/// One rank's flight recorder (a cheap handle; clones share the ring).
#[derive(Clone)]
pub struct FlightRecorder {
    ring: Arc<Mutex<Ring>>,
    rank: Rank,
    coord: Option<MeshCoord>,
    t0: Instant,
    t0_unix_s: f64,
}

/// The JSON of one event.
#[derive(Serialize)]
struct EventJson {
    seq: u64,
    step: usize,
    name: String,
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<i32>,
    bytes: usize,
    state: &'static str,
    start_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_s: Option<f64>,
    duration_s: f64,
}

/// The JSON document of a dump.
#[derive(Serialize)]
struct DumpJson<'a> {
    rank: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pp: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tp: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dp: Option<usize>,
    reason: &'a str,
    /// Unix time (s) of `start_s = 0`.
    t0_unix_s: f64,
    dumped_at_s: f64,
    step: usize,
    doing: String,
    capacity: usize,
    events: Vec<EventJson>,
}

fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Ends an event when told to; dropping it without [`Span::end`] leaves the event open
/// (an action that failed stays `started` in the dump).
#[must_use = "call end() when the event finishes"]
pub struct Span {
    recorder: FlightRecorder,
    seq: u64,
}

impl Span {
    pub fn end(self) {
        self.recorder.end(self.seq);
    }
}

impl FlightRecorder {
    /// A recorder for `rank` (with its mesh coordinates) keeping `capacity` events.
    pub fn new(rank: Rank, coord: Option<MeshCoord>, capacity: usize) -> FlightRecorder {
        FlightRecorder {
            ring: Arc::new(Mutex::new(Ring {
                entries: VecDeque::with_capacity(capacity.min(1 << 16)),
                capacity: capacity.max(1),
                next_seq: 0,
                step: 0,
                open: Vec::with_capacity(4),
                fault: None,
                blackbox: None,
            })),
            rank,
            coord,
            t0: Instant::now(),
            t0_unix_s: unix_now_s(),
        }
    }

    pub fn rank(&self) -> Rank {
        self.rank
    }

    pub fn coord(&self) -> Option<MeshCoord> {
        self.coord
    }

    /// The ring, even if a panicking thread poisoned the lock (the data is still the
    /// best record there is).
    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mirrors the current event into `blackbox`, which outlives a killed process.
    pub fn attach_blackbox(&self, blackbox: BlackBox) {
        blackbox.set_identity(self.rank, self.coord);
        self.lock().blackbox = Some(blackbox);
    }

    /// Arms a fault to inject (tests of the watchdog).
    pub fn arm(&self, fault: Fault) {
        self.lock().fault = Some(fault);
    }

    /// The training step now running (0 before the first).
    pub fn set_step(&self, step: usize) {
        let mut ring = self.lock();
        ring.step = step;
        if let Some(b) = &ring.blackbox {
            b.set_step(step);
        }
    }

    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    /// Records the start of an event; returns its sequence number.
    fn begin(&self, what: What, bytes: usize) -> u64 {
        let start = self.now();
        let fire = {
            let mut ring = self.lock();
            let seq = ring.next_seq;
            ring.next_seq += 1;
            if ring.entries.len() == ring.capacity {
                ring.entries.pop_front();
            }
            let step = ring.step;
            ring.entries.push_back(Entry {
                seq,
                step,
                what,
                start,
                end: None,
                bytes,
            });
            if what.blocks() {
                ring.open.push(seq);
                if let Some(b) = &ring.blackbox {
                    b.set_doing(&what, ring.next_seq);
                }
            }
            let fire = match (ring.fault, what) {
                (
                    Some(f),
                    What::Action {
                        action,
                        eval: false,
                    },
                ) if f.step == step && action.kind.makes_input_grad() => {
                    ring.fault = None;
                    Some(f.mode)
                }
                _ => None,
            };
            (seq, fire)
        };
        if let Some(mode) = fire.1 {
            inject(mode, self.rank, fire.0);
        }
        fire.0
    }

    /// Begins a schedule action (`eval`: of a forward-only evaluation pass).
    pub fn action(&self, action: Action, eval: bool) -> Span {
        Span {
            seq: self.begin(What::Action { action, eval }, 0),
            recorder: self.clone(),
        }
    }

    /// Begins a transport operation of `bytes` bytes; `peer` is a world rank.
    pub fn comm(
        &self,
        op: CommOp,
        group: Group,
        peer: Option<Rank>,
        tag: i32,
        bytes: usize,
    ) -> u64 {
        self.begin(
            What::Comm {
                op,
                group,
                peer,
                tag,
            },
            bytes,
        )
    }

    /// Ends event `seq` (a no-op if it already left the ring).
    pub fn end(&self, seq: u64) {
        let t = self.now();
        let mut ring = self.lock();
        if let Some(e) = ring.find(seq) {
            e.end = Some(t);
        }
        if let Some(i) = ring.open.iter().rposition(|s| *s == seq) {
            ring.open.truncate(i);
            let begun = ring.next_seq;
            let outer = ring
                .open
                .last()
                .and_then(|s| ring.entry(*s))
                .map(|e| e.what);
            if let Some(b) = &ring.blackbox {
                match outer {
                    Some(w) => b.set_doing(&w, begun),
                    None => b.clear_doing(begun),
                }
            }
        }
    }

    /// What this rank is doing now.
    pub fn doing(&self) -> Doing {
        let t = self.now();
        let ring = self.lock();
        let outer = ring.open.first().and_then(|s| ring.entry(*s));
        let inner = (ring.open.len() > 1)
            .then(|| ring.open.last().and_then(|s| ring.entry(*s)))
            .flatten();
        // A receive action's own receive is not worth naming twice.
        let inner = inner.filter(|i| {
            !matches!(
                (outer.map(|o| o.what), i.what),
                (
                    Some(What::Action { .. }),
                    What::Comm {
                        op: CommOp::Recv | CommOp::Send,
                        ..
                    }
                )
            )
        });
        Doing {
            step: ring.step,
            what: outer.map(|e| e.what),
            inner: inner.map(|e| e.what),
            for_s: outer.map_or(0.0, |e| t - e.start),
            begun: ring.next_seq,
        }
    }

    /// A copy of the recorded events, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.iter().copied().collect()
    }

    /// The dump as JSON text, with `reason` (why the job is dying).
    pub fn to_json(&self, reason: &str) -> String {
        let now = self.now();
        let doing = self.doing();
        let (entries, capacity) = {
            let ring = self.lock();
            (
                ring.entries.iter().copied().collect::<Vec<_>>(),
                ring.capacity,
            )
        };
        let events = entries.iter().map(|e| event_json(e, now)).collect();
        let doc = DumpJson {
            rank: self.rank.0,
            pp: self.coord.map(|c| c.pp),
            tp: self.coord.map(|c| c.tp),
            dp: self.coord.map(|c| c.dp),
            reason,
            t0_unix_s: self.t0_unix_s,
            dumped_at_s: now,
            step: doing.step,
            doing: doing.label(),
            capacity,
            events,
        };
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// Writes `<dir>/flight-<rank>.json` (creating `dir`); returns the path.
    pub fn dump(&self, dir: &Path, reason: &str) -> std::io::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("flight-{}.json", self.rank.0));
        // Write then rename, so a reader never sees half a file.
        let tmp = dir.join(format!(".flight-{}.json.tmp", self.rank.0));
        std::fs::write(&tmp, self.to_json(reason) + "\n")?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}

fn event_json(e: &Entry, now: f64) -> EventJson {
    let (kind, group, peer, tag) = match e.what {
        What::Action { action, .. } => (action.kind.code(), None, None, None),
        What::Comm {
            op,
            group,
            peer,
            tag,
        } => (op.name(), Some(group.name()), peer.map(|p| p.0), Some(tag)),
    };
    EventJson {
        seq: e.seq,
        step: e.step,
        name: e.what.label(),
        kind,
        group,
        peer,
        tag,
        bytes: e.bytes,
        state: if e.end.is_some() {
            "completed"
        } else {
            "started"
        },
        start_s: e.start,
        end_s: e.end,
        duration_s: e.end.unwrap_or(now) - e.start,
    }
}

/// Fires an injected fault on this thread.
fn inject(mode: FaultMode, rank: Rank, seq: u64) {
    match mode {
        FaultMode::Stop => {
            let _ = signal_hook::low_level::raise(signal_hook::consts::SIGSTOP);
        }
        FaultMode::Kill => {
            let _ = signal_hook::low_level::raise(signal_hook::consts::SIGKILL);
        }
        FaultMode::Panic => panic!("injected panic on rank {rank} (event {seq}, STRATA_FAIL_AT)"),
        FaultMode::Hang => loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn act(s: &str) -> Action {
        s.parse().unwrap()
    }

    #[test]
    fn ring_keeps_the_last_events_and_open_ones_stay_started() {
        let f = FlightRecorder::new(Rank(1), None, 3);
        f.set_step(2);
        for a in ["1F0", "1F1"] {
            f.action(act(a), false).end();
        }
        let span = f.action(act("1RECV_B1"), false);
        let recv = f.comm(CommOp::Recv, Group::Pp, Some(Rank(0)), 34, 100);
        let doing = f.doing();
        assert_eq!(doing.label(), "1RECV_B1");
        assert_eq!(doing.step, 2);
        let e = f.entries();
        assert_eq!(e.len(), 3, "capacity 3");
        assert_eq!(e[0].what.label(), "1F1");
        assert!(e[2].end.is_none());
        f.end(recv);
        span.end();
        assert_eq!(f.doing().label(), "between actions");
        let json: serde_json::Value = serde_json::from_str(&f.to_json("test")).unwrap();
        let events = json["events"].as_array().unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[2]["name"], "recv pp from rank 0");
        assert_eq!(events[2]["peer"], 0);
        assert_eq!(events[2]["bytes"], 100);
        assert_eq!(events[2]["state"], "completed");
    }

    #[test]
    fn a_collective_inside_an_action_is_named_with_it() {
        let f = FlightRecorder::new(Rank(0), None, 16);
        let _span = f.action(act("0F3"), false);
        let _ar = f.comm(CommOp::AllReduce, Group::Tp, None, 0, 64);
        assert_eq!(f.doing().label(), "0F3 (all_reduce tp)");
        let eval = f.action(act("0F1"), true);
        assert!(f.to_json("x").contains("eval 0F1"));
        eval.end();
    }

    #[test]
    fn labels_survive_the_blackbox_encoding() {
        let whats = [
            What::Action {
                action: act("3RECV_B17"),
                eval: false,
            },
            What::Action {
                action: act("0W2"),
                eval: true,
            },
            What::Comm {
                op: CommOp::AllReduce,
                group: Group::Dp,
                peer: None,
                tag: 0,
            },
            What::Comm {
                op: CommOp::Recv,
                group: Group::World,
                peer: Some(Rank(5)),
                tag: 3,
            },
        ];
        for w in whats {
            assert_eq!(What::decode(w.encode()), Some(w));
        }
        assert_eq!(What::decode([0; 4]), None);
    }
}
