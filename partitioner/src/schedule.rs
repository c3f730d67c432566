//! Pipeline schedules as data: per-rank lists of [`Action`]s that are built, validated,
//! lowered (sends and receives inserted) and simulated here, then executed by the engine.
//!
//! Notation follows torch.distributed.pipelining: `1F3` is stage 1's forward of
//! microbatch 3, `1B3` its backward, `1SEND_F3` stage 1 sending the activation of
//! microbatch 3 to stage 2, `2RECV_F3` stage 2 receiving it, `2SEND_B3` stage 2 sending the
//! input gradient back to stage 1, `1RECV_B3` stage 1 receiving it.
//!
//! Invariants of a validated schedule: on rank `r` every action belongs to stage `r`;
//! every microbatch gets exactly one forward and (for training schedules) exactly one
//! backward per stage, forward first; after lowering, every send has exactly one matching
//! receive and the schedule runs to completion in [`simulate`] (no deadlock), given that
//! sends never block (the engine's transports buffer them).

use crate::error::{Error, Result};
use crate::ids::{MicrobatchId, StageId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;

/// What an action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActionKind {
    /// Forward of one microbatch through the stage.
    Forward,
    /// Full backward (input and weight gradients) of one microbatch.
    Backward,
    /// Send the stage's output activation downstream.
    SendAct,
    /// Receive the stage's input activation from upstream.
    RecvAct,
    /// Send the gradient w.r.t. the stage's input upstream.
    SendGrad,
    /// Receive the gradient w.r.t. the stage's output from downstream.
    RecvGrad,
}

impl ActionKind {
    fn code(self) -> &'static str {
        match self {
            ActionKind::Forward => "F",
            ActionKind::Backward => "B",
            ActionKind::SendAct => "SEND_F",
            ActionKind::RecvAct => "RECV_F",
            ActionKind::SendGrad => "SEND_B",
            ActionKind::RecvGrad => "RECV_B",
        }
    }

    /// True for F and B (work on the device), false for communication.
    pub fn is_compute(self) -> bool {
        matches!(self, ActionKind::Forward | ActionKind::Backward)
    }
}

/// One step of a rank's schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Action {
    pub stage: StageId,
    pub kind: ActionKind,
    pub mb: MicrobatchId,
}

impl Action {
    pub fn new(stage: usize, kind: ActionKind, mb: usize) -> Action {
        Action {
            stage: StageId(stage),
            kind,
            mb: MicrobatchId(mb),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.stage, self.kind.code(), self.mb)
    }
}

impl FromStr for Action {
    type Err = Error;
    fn from_str(text: &str) -> Result<Action> {
        let err = |reason: &str| Error::ParseAction {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let digits = text.chars().take_while(|c| c.is_ascii_digit()).count();
        let tail_digits = text
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 || tail_digits == 0 || digits + tail_digits >= text.len() {
            return Err(err("expected <stage><kind><microbatch>, e.g. 1F3"));
        }
        let stage = text[..digits].parse().map_err(|_| err("bad stage"))?;
        let mb = text[text.len() - tail_digits..]
            .parse()
            .map_err(|_| err("bad microbatch"))?;
        let code = &text[digits..text.len() - tail_digits];
        let kind = [
            ActionKind::Forward,
            ActionKind::Backward,
            ActionKind::SendAct,
            ActionKind::RecvAct,
            ActionKind::SendGrad,
            ActionKind::RecvGrad,
        ]
        .into_iter()
        .find(|k| k.code() == code)
        .ok_or_else(|| err("kind must be one of F, B, SEND_F, RECV_F, SEND_B, RECV_B"))?;
        Ok(Action::new(stage, kind, mb))
    }
}

/// The schedule families that can be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// All forwards, then all backwards (Huang et al. 2019).
    Gpipe,
    /// One-forward-one-backward, PipeDream-flush (Narayanan et al. 2021).
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Forwards only, for evaluation.
    ForwardOnly,
}

impl ScheduleKind {
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Gpipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::ForwardOnly => "forward-only",
        }
    }
}

/// A per-rank list of actions for `n_stages` stages (one per rank) and `microbatches`
/// microbatches. Built schedules hold compute actions only; [`Schedule::lower`] adds the
/// communication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub n_stages: usize,
    pub microbatches: usize,
    pub lowered: bool,
    pub ranks: Vec<Vec<Action>>,
}

impl Schedule {
    /// Builds and validates a schedule of `kind`.
    pub fn build(kind: ScheduleKind, n_stages: usize, microbatches: usize) -> Result<Schedule> {
        if n_stages == 0 {
            return Err(Error::NotPositive {
                field: "parallel.pp",
                value: 0,
            });
        }
        if microbatches == 0 {
            return Err(Error::NotPositive {
                field: "parallel.microbatches",
                value: 0,
            });
        }
        let ranks = (0..n_stages)
            .map(|r| match kind {
                ScheduleKind::Gpipe => (0..microbatches)
                    .map(|mb| Action::new(r, ActionKind::Forward, mb))
                    .chain((0..microbatches).map(|mb| Action::new(r, ActionKind::Backward, mb)))
                    .collect(),
                ScheduleKind::ForwardOnly => (0..microbatches)
                    .map(|mb| Action::new(r, ActionKind::Forward, mb))
                    .collect(),
                ScheduleKind::OneFOneB => one_f_one_b_rank(r, n_stages, microbatches),
            })
            .collect();
        let s = Schedule {
            kind,
            n_stages,
            microbatches,
            lowered: false,
            ranks,
        };
        s.validate()?;
        Ok(s)
    }

    /// Whether every microbatch needs a backward.
    pub fn is_training(&self) -> bool {
        self.kind != ScheduleKind::ForwardOnly
    }

    /// Checks the compute invariants (and, once lowered, send/receive matching and
    /// deadlock freedom). Errors include the rank × step grid with the bad cell marked.
    pub fn validate(&self) -> Result<()> {
        if self.ranks.len() != self.n_stages {
            return Err(self.invalid(
                format!("{} ranks for {} stages", self.ranks.len(), self.n_stages),
                None,
            ));
        }
        for (r, actions) in self.ranks.iter().enumerate() {
            let mut fwd = HashSet::new();
            let mut bwd = HashSet::new();
            for (step, a) in actions.iter().enumerate() {
                if a.stage.0 != r {
                    return Err(self.invalid(
                        format!("rank {r} step {step}: {a} belongs to stage {}", a.stage),
                        Some((r, step)),
                    ));
                }
                if a.mb.0 >= self.microbatches {
                    return Err(self.invalid(
                        format!(
                            "rank {r} step {step}: {a} names microbatch {} of {}",
                            a.mb, self.microbatches
                        ),
                        Some((r, step)),
                    ));
                }
                let problem = match a.kind {
                    ActionKind::Forward if !fwd.insert(a.mb) => Some("second forward"),
                    ActionKind::Backward if !self.is_training() => {
                        Some("backward in a forward-only schedule")
                    }
                    ActionKind::Backward if !fwd.contains(&a.mb) => {
                        Some("backward before its forward")
                    }
                    ActionKind::Backward if !bwd.insert(a.mb) => Some("second backward"),
                    ActionKind::Forward | ActionKind::Backward => None,
                    _ if !self.lowered => Some("communication in an unlowered schedule"),
                    _ => None,
                };
                if let Some(problem) = problem {
                    return Err(self.invalid(
                        format!("rank {r} step {step}: {a}: {problem}"),
                        Some((r, step)),
                    ));
                }
            }
            if fwd.len() != self.microbatches {
                return Err(self.invalid(
                    format!("rank {r}: {} of {} forwards", fwd.len(), self.microbatches),
                    Some((r, actions.len())),
                ));
            }
            if self.is_training() && bwd.len() != self.microbatches {
                return Err(self.invalid(
                    format!("rank {r}: {} of {} backwards", bwd.len(), self.microbatches),
                    Some((r, actions.len())),
                ));
            }
        }
        if self.lowered {
            self.check_matching()?;
            simulate(self, |_| 1.0)?;
        }
        Ok(())
    }

    /// Inserts sends and receives around compute actions: a stage receives its input
    /// right before a forward and sends its output right after; receives the output
    /// gradient right before a backward and sends the input gradient right after.
    pub fn lower(&self) -> Result<Schedule> {
        if self.lowered {
            return Ok(self.clone());
        }
        let last = self.n_stages - 1;
        let ranks = self
            .ranks
            .iter()
            .map(|actions| {
                let mut out = Vec::with_capacity(actions.len() * 3);
                for &a in actions {
                    let s = a.stage.0;
                    let with = |kind| Action { kind, ..a };
                    match a.kind {
                        ActionKind::Forward => {
                            if s > 0 {
                                out.push(with(ActionKind::RecvAct));
                            }
                            out.push(a);
                            if s < last {
                                out.push(with(ActionKind::SendAct));
                            }
                        }
                        ActionKind::Backward => {
                            if s < last {
                                out.push(with(ActionKind::RecvGrad));
                            }
                            out.push(a);
                            if s > 0 {
                                out.push(with(ActionKind::SendGrad));
                            }
                        }
                        _ => out.push(a),
                    }
                }
                out
            })
            .collect();
        let lowered = Schedule {
            ranks,
            lowered: true,
            ..self.clone()
        };
        lowered.validate()?;
        Ok(lowered)
    }

    fn check_matching(&self) -> Result<()> {
        let mut sends: HashMap<(usize, ActionKind, usize), (usize, usize)> = HashMap::new();
        for (r, actions) in self.ranks.iter().enumerate() {
            for (step, a) in actions.iter().enumerate() {
                let key = match a.kind {
                    ActionKind::SendAct if a.stage.0 + 1 < self.n_stages => {
                        (a.stage.0 + 1, ActionKind::RecvAct, a.mb.0)
                    }
                    ActionKind::SendGrad if a.stage.0 > 0 => {
                        (a.stage.0 - 1, ActionKind::RecvGrad, a.mb.0)
                    }
                    ActionKind::SendAct | ActionKind::SendGrad => {
                        return Err(self.invalid(
                            format!("rank {r} step {step}: {a} has no peer stage"),
                            Some((r, step)),
                        ))
                    }
                    _ => continue,
                };
                if sends.insert(key, (r, step)).is_some() {
                    return Err(self.invalid(
                        format!("rank {r} step {step}: duplicate send {a}"),
                        Some((r, step)),
                    ));
                }
            }
        }
        for (r, actions) in self.ranks.iter().enumerate() {
            for (step, a) in actions.iter().enumerate() {
                if matches!(a.kind, ActionKind::RecvAct | ActionKind::RecvGrad)
                    && sends.remove(&(a.stage.0, a.kind, a.mb.0)).is_none()
                {
                    return Err(self.invalid(
                        format!("rank {r} step {step}: {a} has no matching send"),
                        Some((r, step)),
                    ));
                }
            }
        }
        if let Some((_, &(r, step))) = sends.iter().next() {
            let a = self.ranks[r][step];
            return Err(self.invalid(
                format!("rank {r} step {step}: {a} is never received"),
                Some((r, step)),
            ));
        }
        Ok(())
    }

    fn invalid(&self, reason: String, mark: Option<(usize, usize)>) -> Error {
        Error::InvalidSchedule {
            schedule: self.kind.name().to_string(),
            reason,
            grid: self.grid(mark.into_iter().collect::<Vec<_>>().as_slice()),
        }
    }

    /// The rank × step grid, one row per rank; cells in `marks` (rank, step) are shown
    /// in brackets with a `<<` pointer at the end of the row.
    pub fn grid(&self, marks: &[(usize, usize)]) -> String {
        let width = self
            .ranks
            .iter()
            .flatten()
            .map(|a| a.to_string().len())
            .max()
            .unwrap_or(2)
            + 2;
        let mut out = String::new();
        for (r, actions) in self.ranks.iter().enumerate() {
            out.push_str(&format!("rank {r:>2} |"));
            let mut marked = false;
            for (step, a) in actions.iter().enumerate() {
                let cell = if marks.contains(&(r, step)) {
                    marked = true;
                    format!("[{a}]")
                } else {
                    a.to_string()
                };
                out.push_str(&format!(" {cell:<width$}"));
            }
            if marks.contains(&(r, actions.len())) {
                out.push_str(" [missing]");
                marked = true;
            }
            let line = out.trim_end().to_string();
            out = line;
            if marked {
                out.push_str("   << here");
            }
            out.push('\n');
        }
        out
    }
}

fn one_f_one_b_rank(r: usize, p: usize, m: usize) -> Vec<Action> {
    let warmup = (p - 1 - r).min(m);
    let mut out = Vec::with_capacity(2 * m);
    let (mut f, mut b) = (0, 0);
    while f < warmup {
        out.push(Action::new(r, ActionKind::Forward, f));
        f += 1;
    }
    while f < m {
        out.push(Action::new(r, ActionKind::Forward, f));
        f += 1;
        out.push(Action::new(r, ActionKind::Backward, b));
        b += 1;
    }
    while b < m {
        out.push(Action::new(r, ActionKind::Backward, b));
        b += 1;
    }
    out
}

/// Result of simulating a lowered schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Simulation {
    /// Time at which the last rank finishes.
    pub makespan: f64,
    /// Compute time per rank.
    pub busy: Vec<f64>,
    /// Start and end of every action, per rank, in schedule order.
    pub spans: Vec<Vec<(f64, f64)>>,
}

impl Simulation {
    /// Idle fraction of rank `r`: `1 - busy / makespan`.
    pub fn bubble(&self, r: usize) -> f64 {
        if self.makespan > 0.0 {
            1.0 - self.busy[r] / self.makespan
        } else {
            0.0
        }
    }
}

/// Runs a lowered schedule on all ranks with per-action costs (communication actions may
/// cost time too). Sends never block; a receive waits for its matching send. Returns the
/// timeline, or [`Error::Deadlock`] with every rank's blocked cell marked.
pub fn simulate(s: &Schedule, cost: impl Fn(&Action) -> f64) -> Result<Simulation> {
    let n = s.ranks.len();
    let mut pc = vec![0usize; n];
    let mut clock = vec![0.0f64; n];
    let mut busy = vec![0.0f64; n];
    let mut spans: Vec<Vec<(f64, f64)>> = s
        .ranks
        .iter()
        .map(|a| Vec::with_capacity(a.len()))
        .collect();
    // Completion time of each send, keyed by what the receiver will look for.
    let mut sent: HashMap<(usize, ActionKind, usize), f64> = HashMap::new();
    loop {
        let mut progressed = false;
        for r in 0..n {
            while let Some(a) = s.ranks[r].get(pc[r]) {
                let start = clock[r];
                let end = match a.kind {
                    ActionKind::RecvAct | ActionKind::RecvGrad => {
                        match sent.remove(&(a.stage.0, a.kind, a.mb.0)) {
                            Some(t) => start.max(t) + cost(a),
                            None => break,
                        }
                    }
                    ActionKind::SendAct | ActionKind::SendGrad => {
                        let (to, kind) = if a.kind == ActionKind::SendAct {
                            (a.stage.0 + 1, ActionKind::RecvAct)
                        } else {
                            (a.stage.0.wrapping_sub(1), ActionKind::RecvGrad)
                        };
                        let end = start + cost(a);
                        sent.insert((to, kind, a.mb.0), end);
                        end
                    }
                    _ => {
                        let c = cost(a);
                        busy[r] += c;
                        start + c
                    }
                };
                spans[r].push((start, end));
                clock[r] = end;
                pc[r] += 1;
                progressed = true;
            }
        }
        if (0..n).all(|r| pc[r] == s.ranks[r].len()) {
            break;
        }
        if !progressed {
            let marks: Vec<(usize, usize)> = (0..n)
                .filter(|&r| pc[r] < s.ranks[r].len())
                .map(|r| (r, pc[r]))
                .collect();
            let (r, step) = marks[0];
            return Err(Error::Deadlock {
                schedule: s.kind.name().to_string(),
                reason: format!("rank {r} waits forever at {}", s.ranks[r][step]),
                grid: s.grid(&marks),
            });
        }
    }
    Ok(Simulation {
        makespan: clock.iter().cloned().fold(0.0, f64::max),
        busy,
        spans,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_print_and_parse() {
        for text in [
            "1F3", "0B12", "2SEND_F0", "3RECV_B7", "1RECV_F2", "0SEND_B1",
        ] {
            let a: Action = text.parse().unwrap();
            assert_eq!(a.to_string(), text);
        }
        assert!("F3".parse::<Action>().is_err());
        assert!("1X3".parse::<Action>().is_err());
    }

    #[test]
    fn builders_validate_lower_and_simulate() {
        for kind in [
            ScheduleKind::Gpipe,
            ScheduleKind::OneFOneB,
            ScheduleKind::ForwardOnly,
        ] {
            for p in 1..=8 {
                for m in 1..=32 {
                    let s = Schedule::build(kind, p, m).unwrap();
                    let l = s.lower().unwrap();
                    let sim =
                        simulate(&l, |a| if a.kind.is_compute() { 1.0 } else { 0.0 }).unwrap();
                    assert!(sim.makespan > 0.0);
                    for (r, actions) in l.ranks.iter().enumerate() {
                        let f = actions
                            .iter()
                            .filter(|a| a.kind == ActionKind::Forward)
                            .count();
                        let b = actions
                            .iter()
                            .filter(|a| a.kind == ActionKind::Backward)
                            .count();
                        assert_eq!(f, m, "{kind:?} p={p} m={m} r={r}");
                        assert_eq!(
                            b,
                            if kind == ScheduleKind::ForwardOnly {
                                0
                            } else {
                                m
                            }
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn gpipe_bubble_matches_theory() {
        // Equal F and B costs (B = 2F), no communication cost: bubble = (p-1)/(m+p-1).
        let (p, m) = (4, 8);
        let l = Schedule::build(ScheduleKind::Gpipe, p, m)
            .unwrap()
            .lower()
            .unwrap();
        let sim = simulate(&l, |a| match a.kind {
            ActionKind::Forward => 1.0,
            ActionKind::Backward => 2.0,
            _ => 0.0,
        })
        .unwrap();
        let theory = (p - 1) as f64 / (m + p - 1) as f64;
        assert!(
            (sim.bubble(0) - theory).abs() < 1e-9,
            "{} vs {theory}",
            sim.bubble(0)
        );
    }

    #[test]
    fn broken_schedule_shows_marked_grid() {
        let mut s = Schedule::build(ScheduleKind::OneFOneB, 2, 2).unwrap();
        s.ranks[1].swap(0, 1); // 1B0 before 1F0
        let msg = s.validate().unwrap_err().to_string();
        assert!(msg.contains("1B0: backward before its forward"), "{msg}");
        assert!(msg.contains("[1B0]") && msg.contains("<< here"), "{msg}");
    }

    #[test]
    fn deadlock_is_detected() {
        let mut l = Schedule::build(ScheduleKind::Gpipe, 2, 1)
            .unwrap()
            .lower()
            .unwrap();
        // Rank 0 waits for the gradient before sending its activation: a cycle.
        l.ranks[0] = vec![
            Action::new(0, ActionKind::Forward, 0),
            Action::new(0, ActionKind::RecvGrad, 0),
            Action::new(0, ActionKind::SendAct, 0),
            Action::new(0, ActionKind::Backward, 0),
        ];
        let err = simulate(&l, |_| 1.0).unwrap_err().to_string();
        assert!(
            err.contains("deadlocks") && err.contains("[0RECV_B0]"),
            "{err}"
        );
    }
}
