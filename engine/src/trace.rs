//! `trace.json`: a Chrome trace (loads in Perfetto and chrome://tracing) of a few steps,
//! one track per rank, one span per action named like `F mb=3 chunk=1`, the waits inside
//! receives as `wait RECV_F mb=3 chunk=1`, plus the optimizer step and evaluation.
//!
//! Invariant: only rank 0 writes the file; other ranks send their spans to it. Times are
//! wall-clock microseconds, so ranks on one machine share a time base.

use crate::comm::{Communicator, Tag};
use crate::error::{Error, Result};
use crate::executor::{Span, StepStats};
use partitioner::{ActionKind, Rank};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One complete ("X") event of the Chrome trace format.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceEvent {
    pub name: String,
    pub cat: String,
    pub ph: String,
    /// Start, µs since the Unix epoch.
    pub ts: f64,
    /// Duration, µs.
    pub dur: f64,
    pub pid: u32,
    pub tid: usize,
}

impl TraceEvent {
    fn span(
        rank: Rank,
        name: String,
        cat: &str,
        base_us: f64,
        start_s: f64,
        end_s: f64,
    ) -> TraceEvent {
        TraceEvent {
            name,
            cat: cat.into(),
            ph: "X".into(),
            ts: base_us + start_s * 1e6,
            dur: ((end_s - start_s) * 1e6).max(0.0),
            pid: 0,
            tid: rank.0,
        }
    }

    /// The event of one executed action.
    pub fn from_span(rank: Rank, base_us: f64, s: &Span) -> TraceEvent {
        let a = s.action;
        let what = format!("mb={} chunk={}", a.mb, a.stage);
        let (name, cat) = match a.kind {
            ActionKind::RecvAct | ActionKind::RecvGrad => {
                (format!("wait {} {what}", code(a.kind)), "comm")
            }
            ActionKind::SendAct | ActionKind::SendGrad => {
                (format!("{} {what}", code(a.kind)), "comm")
            }
            k => (format!("{} {what}", code(k)), "compute"),
        };
        Self::span(rank, name, cat, base_us, s.start, s.end)
    }
}

fn code(kind: ActionKind) -> &'static str {
    kind.code()
}

/// Spans collected on this rank, waiting to be gathered on rank 0.
#[derive(Default)]
pub struct Trace {
    events: Vec<TraceEvent>,
}

impl Trace {
    /// Records one step: its actions, then the optimizer (`opt_s`..`train_s`) and
    /// evaluation (`train_s`..`end_s`), all in seconds since the step started.
    pub fn add_step(
        &mut self,
        rank: Rank,
        step: usize,
        stats: &StepStats,
        opt_s: f64,
        train_s: f64,
        end_s: f64,
    ) {
        let base = stats.start_unix_us;
        self.events.push(TraceEvent::span(
            rank,
            format!("step {step}"),
            "step",
            base,
            0.0,
            end_s,
        ));
        self.events.extend(
            stats
                .spans
                .iter()
                .map(|s| TraceEvent::from_span(rank, base, s)),
        );
        self.events.push(TraceEvent::span(
            rank,
            "optimizer".into(),
            "compute",
            base,
            opt_s,
            train_s,
        ));
        if end_s > train_s + 1e-6 {
            self.events.push(TraceEvent::span(
                rank,
                "eval".into(),
                "eval",
                base,
                train_s,
                end_s,
            ));
        }
    }

    /// Sends this rank's spans to rank 0; rank 0 gathers everyone's and, if `write`,
    /// writes the trace to `path`.
    pub fn gather_and_write(
        &mut self,
        comm: &mut dyn Communicator,
        write: bool,
        path: &Path,
    ) -> Result<()> {
        let mine = std::mem::take(&mut self.events);
        let encode =
            |e: &[TraceEvent]| serde_json::to_vec(e).map_err(|e| Error::Internal(e.to_string()));
        if comm.rank().0 != 0 {
            return comm.send(Rank(0), Tag::plain(Tag::TRACE), encode(&mine)?);
        }
        let mut all = mine;
        for r in 1..comm.size() {
            let bytes = comm.recv(Rank(r), Tag::plain(Tag::TRACE))?;
            let theirs: Vec<TraceEvent> =
                serde_json::from_slice(&bytes).map_err(|e| Error::Wire {
                    from: Rank(r),
                    expected: "trace events as JSON".into(),
                    got: e.to_string(),
                })?;
            all.extend(theirs);
        }
        if !write {
            return Ok(());
        }
        let names: Vec<serde_json::Value> = (0..comm.size())
            .map(|r| serde_json::json!({"ph": "M", "name": "thread_name", "pid": 0, "tid": r, "args": {"name": format!("rank {r}")}}))
            .collect();
        let mut events: Vec<serde_json::Value> = names;
        events.extend(
            all.iter()
                .map(|e| serde_json::to_value(e).expect("serialisable")),
        );
        let doc = serde_json::json!({"traceEvents": events, "displayTimeUnit": "ms"});
        std::fs::write(path, doc.to_string()).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
