//! Pipeline schedules as data: per-rank lists of [`Action`]s that are built, validated,
//! lowered (sends and receives inserted) and simulated here, then executed by the engine.
//!
//! Notation follows torch.distributed.pipelining. The number in front is the *stage*
//! (with virtual stages: the model chunk; chunk `c` lives on rank `c % pp`), the number at
//! the end the microbatch: `1F3` forward, `1B3` full backward, `1I3` input-gradient-only
//! backward and `1W3` weight-gradient backward (zero-bubble), `1SEND_F3` chunk 1 sending
//! its output activation to chunk 2, `2RECV_F3` chunk 2 receiving it, `2SEND_B3` chunk 2
//! sending its input gradient back to chunk 1, `1RECV_B3` chunk 1 receiving it.
//!
//! Invariants of a validated schedule: on rank `r` every action belongs to a chunk `c`
//! with `c % pp == r`; every (chunk, microbatch) gets exactly one forward and, for training
//! schedules, either one `B` or one `I` followed later by one `W`, all after the forward;
//! after lowering, every send has exactly one matching receive and the schedule runs to
//! completion in [`simulate`] (no deadlock), given that sends never block (the engine's
//! communicators buffer them).

use crate::error::{Error, Result};
use crate::ids::{MicrobatchId, StageId};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::str::FromStr;

/// What an action does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ActionKind {
    /// Forward of one microbatch through the chunk.
    Forward,
    /// Full backward (input and weight gradients) of one microbatch.
    Backward,
    /// Backward for the input gradient only (zero-bubble `B`); keeps the graph for `W`.
    InputGrad,
    /// Backward for the weight gradients only (zero-bubble `W`), after the `I`.
    WeightGrad,
    /// Send the chunk's output activation downstream.
    SendAct,
    /// Receive the chunk's input activation from upstream.
    RecvAct,
    /// Send the gradient w.r.t. the chunk's input upstream.
    SendGrad,
    /// Receive the gradient w.r.t. the chunk's output from downstream.
    RecvGrad,
}

const ALL_KINDS: [ActionKind; 8] = [
    ActionKind::Forward,
    ActionKind::Backward,
    ActionKind::InputGrad,
    ActionKind::WeightGrad,
    ActionKind::SendAct,
    ActionKind::RecvAct,
    ActionKind::SendGrad,
    ActionKind::RecvGrad,
];

impl ActionKind {
    /// Short code used in the printed form.
    pub fn code(self) -> &'static str {
        match self {
            ActionKind::Forward => "F",
            ActionKind::Backward => "B",
            ActionKind::InputGrad => "I",
            ActionKind::WeightGrad => "W",
            ActionKind::SendAct => "SEND_F",
            ActionKind::RecvAct => "RECV_F",
            ActionKind::SendGrad => "SEND_B",
            ActionKind::RecvGrad => "RECV_B",
        }
    }

    /// True for F, B, I and W (work on the device), false for communication.
    pub fn is_compute(self) -> bool {
        matches!(
            self,
            ActionKind::Forward
                | ActionKind::Backward
                | ActionKind::InputGrad
                | ActionKind::WeightGrad
        )
    }

    /// True for the actions that produce the input gradient (B and I).
    pub fn makes_input_grad(self) -> bool {
        matches!(self, ActionKind::Backward | ActionKind::InputGrad)
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
        let kind = ALL_KINDS
            .into_iter()
            .find(|k| k.code() == code)
            .ok_or_else(|| err("kind must be one of F, B, I, W, SEND_F, RECV_F, SEND_B, RECV_B"))?;
        Ok(Action::new(stage, kind, mb))
    }
}

/// The schedule families that can be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// All forwards, then all backwards (Huang et al. 2019).
    #[serde(rename = "gpipe")]
    Gpipe,
    /// One-forward-one-backward, PipeDream-flush (Narayanan et al. 2021).
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// Interleaved 1F1B over `v` model chunks per rank (Narayanan et al. 2021, Megatron).
    #[serde(rename = "interleaved-1f1b")]
    Interleaved,
    /// Zero-bubble ZB-H1: backward split into I and W, with W filling the bubbles
    /// (Qi et al. 2023).
    #[serde(rename = "zb-h1")]
    ZbH1,
    /// Forwards only, for evaluation.
    #[serde(rename = "forward-only")]
    ForwardOnly,
}

impl ScheduleKind {
    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKind::Gpipe => "gpipe",
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::Interleaved => "interleaved-1f1b",
            ScheduleKind::ZbH1 => "zb-h1",
            ScheduleKind::ForwardOnly => "forward-only",
        }
    }

    /// The training schedules a config can name.
    pub const TRAINING: [ScheduleKind; 4] = [
        ScheduleKind::Gpipe,
        ScheduleKind::OneFOneB,
        ScheduleKind::Interleaved,
        ScheduleKind::ZbH1,
    ];

    /// Parses a config name.
    pub fn from_name(name: &str) -> Option<ScheduleKind> {
        Self::TRAINING
            .into_iter()
            .chain([ScheduleKind::ForwardOnly])
            .find(|k| k.name() == name)
    }

    /// Textbook bubble fraction for `p` ranks, `m` microbatches and `v` chunks per rank,
    /// with backward = 2 × forward and free communication. ZB-H1 assumes I = W = F.
    pub fn theoretical_bubble(self, p: usize, m: usize, v: usize) -> f64 {
        let (p, m, v) = (p as f64, m as f64, v.max(1) as f64);
        match self {
            ScheduleKind::Gpipe | ScheduleKind::OneFOneB => (p - 1.0) / (m + p - 1.0),
            ScheduleKind::Interleaved => (p - 1.0) / v / (m + (p - 1.0) / v),
            ScheduleKind::ZbH1 => ((p - 1.0) / 3.0) / (m + (p - 1.0) / 3.0),
            ScheduleKind::ForwardOnly => (p - 1.0) / (m + p - 1.0),
        }
    }
}

/// A per-rank list of actions for `pp` ranks, `virtual_stages` chunks per rank and
/// `microbatches` microbatches. Built schedules hold compute actions only;
/// [`Schedule::lower`] adds the communication.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Ranks in the pipeline.
    pub pp: usize,
    /// Model chunks per rank.
    pub virtual_stages: usize,
    pub microbatches: usize,
    pub lowered: bool,
    pub ranks: Vec<Vec<Action>>,
}

impl Schedule {
    /// Builds and validates a schedule with one chunk per rank.
    pub fn build(kind: ScheduleKind, pp: usize, microbatches: usize) -> Result<Schedule> {
        Self::build_virtual(kind, pp, 1, microbatches)
    }

    /// Builds and validates a schedule with `virtual_stages` chunks per rank (only
    /// `interleaved-1f1b` accepts more than one).
    pub fn build_virtual(
        kind: ScheduleKind,
        pp: usize,
        virtual_stages: usize,
        microbatches: usize,
    ) -> Result<Schedule> {
        let positive = [
            ("parallel.pp", pp),
            ("parallel.virtual_stages", virtual_stages),
            ("parallel.microbatches", microbatches),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(Error::NotPositive { field, value: 0 });
            }
        }
        if virtual_stages > 1
            && !matches!(kind, ScheduleKind::Interleaved | ScheduleKind::ForwardOnly)
        {
            return Err(Error::InvalidSchedule {
                schedule: kind.name().into(),
                reason: format!(
                    "parallel.virtual_stages = {virtual_stages} needs the interleaved-1f1b schedule; \
                     fix: set parallel.schedule: interleaved-1f1b or parallel.virtual_stages: 1"
                ),
                grid: String::new(),
            });
        }
        let (p, v, m) = (pp, virtual_stages, microbatches);
        if kind == ScheduleKind::Interleaved && v > 1 && m % p != 0 {
            return Err(Error::InvalidSchedule {
                schedule: kind.name().into(),
                reason: format!(
                    "parallel.microbatches = {m} is not a multiple of parallel.pp = {p}, which \
                     interleaving over {v} virtual stages needs; fix: use {} microbatches",
                    m.div_ceil(p) * p
                ),
                grid: String::new(),
            });
        }
        let per_rank = |r: usize| -> Vec<Action> {
            match kind {
                ScheduleKind::Gpipe => (0..m)
                    .map(|mb| Action::new(r, ActionKind::Forward, mb))
                    .chain((0..m).map(|mb| Action::new(r, ActionKind::Backward, mb)))
                    .collect(),
                // Chunk by chunk, microbatch by microbatch: every dependency is on a smaller
                // chunk, so no order of ranks can deadlock.
                ScheduleKind::ForwardOnly => (0..v)
                    .flat_map(|k| {
                        (0..m).map(move |mb| Action::new(k * p + r, ActionKind::Forward, mb))
                    })
                    .collect(),
                ScheduleKind::OneFOneB => interleaved_rank(r, p, 1, m),
                ScheduleKind::Interleaved => interleaved_rank(r, p, v, m),
                ScheduleKind::ZbH1 => unreachable!("ZB-H1 is built for all ranks at once"),
            }
        };
        let ranks = match kind {
            ScheduleKind::ZbH1 => zb_h1_ranks(p, m),
            _ => (0..p).map(per_rank).collect(),
        };
        let s = Schedule {
            kind,
            pp,
            virtual_stages,
            microbatches,
            lowered: false,
            ranks,
        };
        s.validate()?;
        // Every builder must also be deadlock-free once lowered; refuse (rather than hang
        // at run time) any layout where it is not.
        s.lower()?;
        Ok(s)
    }

    /// Number of model chunks (`pp · virtual_stages`).
    pub fn n_chunks(&self) -> usize {
        self.pp * self.virtual_stages
    }

    /// The rank that holds `chunk`.
    pub fn rank_of(&self, chunk: StageId) -> usize {
        chunk.0 % self.pp
    }

    /// Whether every microbatch needs a backward.
    pub fn is_training(&self) -> bool {
        self.kind != ScheduleKind::ForwardOnly
    }

    /// Checks the compute invariants (and, once lowered, send/receive matching and
    /// deadlock freedom). Errors include the rank × step grid with the bad cell marked.
    pub fn validate(&self) -> Result<()> {
        if self.ranks.len() != self.pp {
            return Err(self.invalid(
                format!("{} ranks for pp = {}", self.ranks.len(), self.pp),
                None,
            ));
        }
        let chunks_per_rank = self.virtual_stages;
        for (r, actions) in self.ranks.iter().enumerate() {
            let mut fwd = HashSet::new();
            let mut input_grad = HashSet::new();
            let mut full = HashSet::new();
            let mut weight = HashSet::new();
            for (step, a) in actions.iter().enumerate() {
                let at = Some((r, step));
                if a.stage.0 >= self.n_chunks() || a.stage.0 % self.pp != r {
                    return Err(self.invalid(
                        format!("rank {r} step {step}: {a} belongs to another rank"),
                        at,
                    ));
                }
                if a.mb.0 >= self.microbatches {
                    return Err(self.invalid(
                        format!(
                            "rank {r} step {step}: {a} names microbatch {} of {}",
                            a.mb, self.microbatches
                        ),
                        at,
                    ));
                }
                let key = (a.stage, a.mb);
                let problem = match a.kind {
                    ActionKind::Forward if !fwd.insert(key) => Some("second forward"),
                    ActionKind::Backward | ActionKind::InputGrad | ActionKind::WeightGrad
                        if !self.is_training() =>
                    {
                        Some("backward in a forward-only schedule")
                    }
                    ActionKind::Backward | ActionKind::InputGrad if !fwd.contains(&key) => {
                        Some("backward before its forward")
                    }
                    ActionKind::Backward | ActionKind::InputGrad if !input_grad.insert(key) => {
                        Some("second backward")
                    }
                    ActionKind::Backward => {
                        full.insert(key);
                        None
                    }
                    ActionKind::WeightGrad if !input_grad.contains(&key) || full.contains(&key) => {
                        Some("W without a preceding I")
                    }
                    ActionKind::WeightGrad if !weight.insert(key) => Some("second W"),
                    ActionKind::Forward | ActionKind::InputGrad | ActionKind::WeightGrad => None,
                    _ if !self.lowered => Some("communication in an unlowered schedule"),
                    _ => None,
                };
                if let Some(problem) = problem {
                    return Err(self.invalid(format!("rank {r} step {step}: {a}: {problem}"), at));
                }
            }
            let expected = self.microbatches * chunks_per_rank;
            let end = Some((r, actions.len()));
            if fwd.len() != expected {
                return Err(self.invalid(
                    format!("rank {r}: {} of {expected} forwards", fwd.len()),
                    end,
                ));
            }
            if self.is_training() {
                if input_grad.len() != expected {
                    return Err(self.invalid(
                        format!("rank {r}: {} of {expected} backwards", input_grad.len()),
                        end,
                    ));
                }
                if full.len() + weight.len() != expected {
                    return Err(self.invalid(
                        format!(
                            "rank {r}: {} I without a W",
                            expected - full.len() - weight.len()
                        ),
                        end,
                    ));
                }
            }
        }
        if self.lowered {
            self.check_matching()?;
            simulate(self, |_| 1.0)?;
        }
        Ok(())
    }

    /// Inserts sends and receives around compute actions: a chunk receives its input
    /// right before a forward and sends its output right after; receives the output
    /// gradient right before a backward (B or I) and sends the input gradient right after.
    pub fn lower(&self) -> Result<Schedule> {
        if self.lowered {
            return Ok(self.clone());
        }
        let last = self.n_chunks() - 1;
        let ranks = self
            .ranks
            .iter()
            .map(|actions| {
                let mut out = Vec::with_capacity(actions.len() * 3);
                for &a in actions {
                    let c = a.stage.0;
                    let with = |kind| Action { kind, ..a };
                    match a.kind {
                        ActionKind::Forward => {
                            if c > 0 {
                                out.push(with(ActionKind::RecvAct));
                            }
                            out.push(a);
                            if c < last {
                                out.push(with(ActionKind::SendAct));
                            }
                        }
                        k if k.makes_input_grad() => {
                            if c < last && self.is_training() {
                                out.push(with(ActionKind::RecvGrad));
                            }
                            out.push(a);
                            if c > 0 {
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

    /// The chunk that receives what `a` (a send) sends, and the matching receive kind.
    fn destination(&self, a: &Action) -> Option<(usize, ActionKind)> {
        match a.kind {
            ActionKind::SendAct if a.stage.0 + 1 < self.n_chunks() => {
                Some((a.stage.0 + 1, ActionKind::RecvAct))
            }
            ActionKind::SendGrad if a.stage.0 > 0 => Some((a.stage.0 - 1, ActionKind::RecvGrad)),
            _ => None,
        }
    }

    fn check_matching(&self) -> Result<()> {
        let mut sends: HashMap<(usize, ActionKind, usize), (usize, usize)> = HashMap::new();
        for (r, actions) in self.ranks.iter().enumerate() {
            for (step, a) in actions.iter().enumerate() {
                if !matches!(a.kind, ActionKind::SendAct | ActionKind::SendGrad) {
                    continue;
                }
                let Some((to, kind)) = self.destination(a) else {
                    return Err(self.invalid(
                        format!("rank {r} step {step}: {a} has no peer chunk"),
                        Some((r, step)),
                    ));
                };
                if sends.insert((to, kind, a.mb.0), (r, step)).is_some() {
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
        if let Some(&(r, step)) = sends.values().min() {
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
    /// in brackets with a `<< here` pointer at the end of the row (a step one past the
    /// end marks a missing action).
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
            let mut row = format!("rank {r:>2} |");
            let mut marked = false;
            for (step, a) in actions.iter().enumerate() {
                let cell = if marks.contains(&(r, step)) {
                    marked = true;
                    format!("[{a}]")
                } else {
                    a.to_string()
                };
                let _ = write!(row, " {cell:<width$}");
            }
            if marks.contains(&(r, actions.len())) {
                row.push_str(" [missing]");
                marked = true;
            }
            out.push_str(row.trim_end());
            if marked {
                out.push_str("   << here");
            }
            out.push('\n');
        }
        out
    }
}

/// 1F1B and interleaved 1F1B on rank `r` (Megatron's ordering). Microbatches go in groups
/// of `p`; within a group a rank runs its chunks in order for forwards and in reverse for
/// backwards. Warm-up: `p − r − 1` forwards for plain 1F1B, `2(p − r − 1) + (v − 1)p` for
/// interleaved; then one forward and one backward alternate; then the remaining backwards.
fn interleaved_rank(r: usize, p: usize, v: usize, m: usize) -> Vec<Action> {
    let mut fwd_order = Vec::with_capacity(m * v);
    let mut bwd_order = Vec::with_capacity(m * v);
    let mut start = 0;
    while start < m {
        let group = p.min(m - start);
        for k in 0..v {
            fwd_order.extend((start..start + group).map(|mb| (k, mb)));
        }
        for k in (0..v).rev() {
            bwd_order.extend((start..start + group).map(|mb| (k, mb)));
        }
        start += group;
    }
    let total = m * v;
    let warmup = if v == 1 {
        p - r - 1
    } else {
        2 * (p - r - 1) + (v - 1) * p
    }
    .min(total);
    let fwd = |i: usize| {
        let (k, mb) = fwd_order[i];
        Action::new(k * p + r, ActionKind::Forward, mb)
    };
    let bwd = |i: usize| {
        let (k, mb) = bwd_order[i];
        Action::new(k * p + r, ActionKind::Backward, mb)
    };
    let mut out: Vec<Action> = (0..warmup).map(fwd).collect();
    let (mut f, mut b) = (warmup, 0);
    while f < total {
        out.push(fwd(f));
        f += 1;
        out.push(bwd(b));
        b += 1;
    }
    out.extend((b..total).map(bwd));
    out
}

/// ZB-H1 (Qi et al. 2023): every backward is split into `I` (input gradient, on the
/// critical path between ranks) and `W` (weight gradient, local). The order is generated
/// by list scheduling in unit time (F = I = W = 1): whenever a rank is free it runs, in
/// priority order, the next `I` whose output gradient has arrived, else the next `F` whose
/// input has arrived if it holds fewer than `p − r` microbatches (1F1B's memory bound, so
/// peak activation memory equals 1F1B's), else its oldest pending `W`. W's thus fill the
/// time 1F1B spends waiting for gradients.
fn zb_h1_ranks(p: usize, m: usize) -> Vec<Vec<Action>> {
    const NOT_YET: usize = usize::MAX;
    let mut f_done = vec![vec![NOT_YET; m]; p];
    let mut i_done = vec![vec![NOT_YET; m]; p];
    let mut w_done = vec![vec![NOT_YET; m]; p];
    let mut out: Vec<Vec<Action>> = vec![Vec::with_capacity(3 * m); p];
    let ready = |round: usize, at: usize| at != NOT_YET && at < round;
    let mut round = 0;
    while out.iter().any(|o| o.len() < 3 * m) {
        for r in 0..p {
            let next_f = f_done[r].iter().take_while(|&&t| t != NOT_YET).count();
            let next_i = i_done[r].iter().take_while(|&&t| t != NOT_YET).count();
            let next_w = w_done[r].iter().take_while(|&&t| t != NOT_YET).count();
            let held = next_f - next_w;
            let can_i = next_i < m
                && ready(round, f_done[r][next_i])
                && (r + 1 == p || ready(round, i_done[r + 1][next_i]));
            let can_f =
                next_f < m && held < p - r && (r == 0 || ready(round, f_done[r - 1][next_f]));
            let can_w = next_w < next_i && ready(round, i_done[r][next_w]);
            if can_i {
                i_done[r][next_i] = round;
                out[r].push(Action::new(r, ActionKind::InputGrad, next_i));
            } else if can_f {
                f_done[r][next_f] = round;
                out[r].push(Action::new(r, ActionKind::Forward, next_f));
            } else if can_w {
                w_done[r][next_w] = round;
                out[r].push(Action::new(r, ActionKind::WeightGrad, next_w));
            }
        }
        round += 1;
        debug_assert!(
            round <= 4 * m * p + 4 * p,
            "zb-h1 list scheduling made no progress"
        );
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

    /// Mean idle fraction over ranks.
    pub fn mean_bubble(&self) -> f64 {
        (0..self.busy.len()).map(|r| self.bubble(r)).sum::<f64>() / self.busy.len().max(1) as f64
    }
}

/// Runs a lowered schedule on all ranks with per-action costs (communication actions may
/// cost time too). Sends never block; a receive waits for its matching send. Returns the
/// timeline, or [`Error::Deadlock`] with every rank's blocked cell marked.
pub fn simulate(s: &Schedule, cost: impl Fn(&Action) -> f64) -> Result<Simulation> {
    simulate_messages(s, cost, |_| Delivery::default())
}

/// How a sent message travels (see [`simulate_messages`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Delivery {
    /// Seconds from the moment the message moves until the receiver has it.
    pub transit_s: f64,
    /// The message moves only once its sender makes its next communication call (a
    /// send or receive, or the end of its step), as large messages do on transports
    /// that progress only inside the sender's calls; otherwise it moves when sent.
    pub needs_sender_progress: bool,
}

/// [`simulate`] with message delivery: a receive can complete only `transit_s` after its
/// message moved; busy time counts compute actions only.
pub fn simulate_messages(
    s: &Schedule,
    cost: impl Fn(&Action) -> f64,
    delivery: impl Fn(&Action) -> Delivery,
) -> Result<Simulation> {
    let n = s.ranks.len();
    let mut pc = vec![0usize; n];
    let mut clock = vec![0.0f64; n];
    let mut busy = vec![0.0f64; n];
    let mut spans: Vec<Vec<(f64, f64)>> = s
        .ranks
        .iter()
        .map(|a| Vec::with_capacity(a.len()))
        .collect();
    // Arrival time of each message, keyed by what the receiver will look for; and per
    // rank the messages that wait for that rank's next communication call.
    type Key = (usize, ActionKind, usize);
    let mut sent: HashMap<Key, f64> = HashMap::new();
    let mut stalled: Vec<Vec<(Key, f64)>> = vec![Vec::new(); n];
    let release = |stalled: &mut Vec<(Key, f64)>, sent: &mut HashMap<Key, f64>, at: f64| {
        for (key, transit) in stalled.drain(..) {
            sent.insert(key, at + transit);
        }
    };
    loop {
        let mut progressed = false;
        for r in 0..n {
            while let Some(a) = s.ranks[r].get(pc[r]) {
                let start = clock[r];
                if !a.kind.is_compute() {
                    release(&mut stalled[r], &mut sent, start);
                }
                let end = match a.kind {
                    ActionKind::RecvAct | ActionKind::RecvGrad => {
                        match sent.remove(&(a.stage.0, a.kind, a.mb.0)) {
                            Some(t) => start.max(t) + cost(a),
                            None => break,
                        }
                    }
                    ActionKind::SendAct | ActionKind::SendGrad => {
                        let end = start + cost(a);
                        if let Some((to, kind)) = s.destination(a) {
                            let d = delivery(a);
                            let key = (to, kind, a.mb.0);
                            if d.needs_sender_progress {
                                stalled[r].push((key, d.transit_s));
                            } else {
                                sent.insert(key, end + d.transit_s);
                            }
                        }
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
            if pc[r] == s.ranks[r].len() && !stalled[r].is_empty() {
                // The end of the step flushes every pending send.
                release(&mut stalled[r], &mut sent, clock[r]);
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

/// Colour of an action kind in timeline pictures.
pub fn kind_colour(kind: ActionKind) -> &'static str {
    match kind {
        ActionKind::Forward => "#4e79a7",
        ActionKind::Backward => "#e15759",
        ActionKind::InputGrad => "#f28e2b",
        ActionKind::WeightGrad => "#59a14f",
        _ => "#bab0ac",
    }
}

/// Renders a simulated (or measured) timeline as SVG: one row per rank, one box per
/// compute action labelled like `1F3`, coloured by kind, with a legend and the bubble.
pub fn timeline_svg(s: &Schedule, sim: &Simulation, title: &str) -> String {
    let (left, top, row_h, width) = (120.0, 50.0, 34.0, 1100.0);
    let scale = if sim.makespan > 0.0 {
        width / sim.makespan
    } else {
        1.0
    };
    let height = top + row_h * s.ranks.len() as f64 + 60.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
        left + width + 20.0
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="22" font-size="15">{}</text>"#,
        xml_escape(title)
    );
    for (r, actions) in s.ranks.iter().enumerate() {
        let y = top + row_h * r as f64;
        let _ = writeln!(
            svg,
            r#"<text x="8" y="{}">rank {r} ({:.0}% idle)</text>"#,
            y + row_h * 0.6,
            100.0 * sim.bubble(r)
        );
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{}" width="{width}" height="{}" fill="#f4f4f4"/>"##,
            y + 2.0,
            row_h - 4.0
        );
        for (a, &(start, end)) in actions.iter().zip(&sim.spans[r]) {
            if !a.kind.is_compute() {
                continue;
            }
            let (x, w) = (left + start * scale, ((end - start) * scale).max(0.5));
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.2}" y="{}" width="{w:.2}" height="{}" fill="{}" stroke="white" stroke-width="0.5"><title>{a}</title></rect>"#,
                y + 3.0,
                row_h - 6.0,
                kind_colour(a.kind)
            );
            if w > 22.0 {
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.2}" y="{}" fill="white" text-anchor="middle">{a}</text>"#,
                    x + w / 2.0,
                    y + row_h * 0.62
                );
            }
        }
    }
    let legend_y = top + row_h * s.ranks.len() as f64 + 25.0;
    let kinds = [
        ActionKind::Forward,
        ActionKind::Backward,
        ActionKind::InputGrad,
        ActionKind::WeightGrad,
    ];
    let names = ["F forward", "B backward", "I input-grad", "W weight-grad"];
    for (i, (k, name)) in kinds.iter().zip(names).enumerate() {
        let x = left + 130.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<rect x="{x}" y="{}" width="14" height="14" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
            legend_y - 11.0,
            kind_colour(*k),
            x + 19.0,
            legend_y
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{legend_y}">mean bubble {:.1}%</text>"#,
        left + 560.0,
        100.0 * sim.mean_bubble()
    );
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit_costs(a: &Action) -> f64 {
        match a.kind {
            ActionKind::Forward | ActionKind::InputGrad | ActionKind::WeightGrad => 1.0,
            ActionKind::Backward => 2.0,
            _ => 0.0,
        }
    }

    #[test]
    fn actions_print_and_parse() {
        for text in [
            "1F3", "0B12", "2SEND_F0", "3RECV_B7", "1RECV_F2", "0SEND_B1", "4I2", "5W9",
        ] {
            let a: Action = text.parse().unwrap();
            assert_eq!(a.to_string(), text);
        }
        assert!("F3".parse::<Action>().is_err());
        assert!("1X3".parse::<Action>().is_err());
    }

    /// Every builder, every p in 1..=8, m in 1..=32 and v in 1..=4 where it applies:
    /// validation passes, the simulation finishes, and each microbatch's forward and
    /// backward happen exactly once per chunk.
    #[test]
    fn builders_validate_lower_and_simulate_everywhere() {
        for kind in ScheduleKind::TRAINING
            .into_iter()
            .chain([ScheduleKind::ForwardOnly])
        {
            for p in 1..=8 {
                for m in 1..=32 {
                    let vs: &[usize] = match kind {
                        ScheduleKind::Interleaved | ScheduleKind::ForwardOnly => &[1, 2, 3, 4],
                        _ => &[1],
                    };
                    for &v in vs {
                        if kind == ScheduleKind::Interleaved && v > 1 && m % p != 0 {
                            let e = Schedule::build_virtual(kind, p, v, m)
                                .unwrap_err()
                                .to_string();
                            assert!(
                                e.contains("not a multiple of parallel.pp") && e.contains("fix:"),
                                "{e}"
                            );
                            continue;
                        }
                        let what = format!("{} p={p} m={m} v={v}", kind.name());
                        let s = Schedule::build_virtual(kind, p, v, m)
                            .unwrap_or_else(|e| panic!("{what}: {e}"));
                        let l = s.lower().unwrap();
                        let sim = simulate(&l, unit_costs).unwrap();
                        assert!(sim.makespan > 0.0);
                        let mut seen: HashMap<(usize, usize, &str), usize> = HashMap::new();
                        for a in l.ranks.iter().flatten() {
                            let class = match a.kind {
                                ActionKind::Forward => "F",
                                ActionKind::Backward | ActionKind::InputGrad => "B",
                                _ => continue,
                            };
                            *seen.entry((a.stage.0, a.mb.0, class)).or_default() += 1;
                        }
                        let backs = if kind == ScheduleKind::ForwardOnly {
                            0
                        } else {
                            1
                        };
                        for c in 0..p * v {
                            for mb in 0..m {
                                assert_eq!(
                                    seen.get(&(c, mb, "F")).copied().unwrap_or(0),
                                    1,
                                    "{what}"
                                );
                                assert_eq!(
                                    seen.get(&(c, mb, "B")).copied().unwrap_or(0),
                                    backs,
                                    "{what}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bubbles_match_theory() {
        let (p, m) = (4, 8);
        for (kind, v) in [
            (ScheduleKind::Gpipe, 1),
            (ScheduleKind::OneFOneB, 1),
            (ScheduleKind::Interleaved, 2),
        ] {
            let l = Schedule::build_virtual(kind, p, v, m)
                .unwrap()
                .lower()
                .unwrap();
            let sim = simulate(&l, unit_costs).unwrap();
            let theory = kind.theoretical_bubble(p, m, v);
            assert!(
                (sim.bubble(0) - theory).abs() < 1e-9,
                "{kind:?}: {} vs {theory}",
                sim.bubble(0)
            );
        }
        // Zero-bubble H1 is at most 1F1B's bubble and clearly below it.
        let one = simulate(
            &Schedule::build(ScheduleKind::OneFOneB, p, m)
                .unwrap()
                .lower()
                .unwrap(),
            unit_costs,
        )
        .unwrap();
        let zb = simulate(
            &Schedule::build(ScheduleKind::ZbH1, p, m)
                .unwrap()
                .lower()
                .unwrap(),
            unit_costs,
        )
        .unwrap();
        assert!(
            zb.mean_bubble() < one.mean_bubble() - 0.05,
            "{} vs {}",
            zb.mean_bubble(),
            one.mean_bubble()
        );
        assert!(
            zb.bubble(0) < one.bubble(0),
            "{} vs {}",
            zb.bubble(0),
            one.bubble(0)
        );
    }

    #[test]
    fn one_f_one_b_in_flight_bound() {
        // Rank i never holds more than p - i microbatches between F and B.
        let (p, m) = (4, 8);
        let s = Schedule::build(ScheduleKind::OneFOneB, p, m).unwrap();
        for (i, actions) in s.ranks.iter().enumerate() {
            let mut live = 0usize;
            let mut peak = 0;
            for a in actions {
                match a.kind {
                    ActionKind::Forward => live += 1,
                    ActionKind::Backward => live -= 1,
                    _ => {}
                }
                peak = peak.max(live);
            }
            assert_eq!(peak, p - i);
        }
    }

    #[test]
    fn golden_grid_1f1b_p4_m8() {
        let s = Schedule::build(ScheduleKind::OneFOneB, 4, 8).unwrap();
        let expected = "\
rank  0 | 0F0   0F1   0F2   0F3   0B0   0F4   0B1   0F5   0B2   0F6   0B3   0F7   0B4   0B5   0B6   0B7
rank  1 | 1F0   1F1   1F2   1B0   1F3   1B1   1F4   1B2   1F5   1B3   1F6   1B4   1F7   1B5   1B6   1B7
rank  2 | 2F0   2F1   2B0   2F2   2B1   2F3   2B2   2F4   2B3   2F5   2B4   2F6   2B5   2F7   2B6   2B7
rank  3 | 3F0   3B0   3F1   3B1   3F2   3B2   3F3   3B3   3F4   3B4   3F5   3B5   3F6   3B6   3F7   3B7
";
        assert_eq!(s.grid(&[]), expected);
    }

    #[test]
    fn broken_schedule_shows_marked_grid() {
        let mut s = Schedule::build(ScheduleKind::OneFOneB, 2, 2).unwrap();
        s.ranks[1].swap(0, 1); // 1B0 before 1F0
        let msg = s.validate().unwrap_err().to_string();
        assert!(msg.contains("1B0: backward before its forward"), "{msg}");
        assert!(msg.contains("[1B0]") && msg.contains("<< here"), "{msg}");
        let mut s = Schedule::build(ScheduleKind::ZbH1, 2, 2).unwrap();
        s.ranks[0].retain(|a| a.kind != ActionKind::WeightGrad || a.mb.0 != 1);
        let msg = s.validate().unwrap_err().to_string();
        assert!(
            msg.contains("I without a W") && msg.contains("[missing]"),
            "{msg}"
        );
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

    #[test]
    fn virtual_stages_need_interleaving() {
        let e = Schedule::build_virtual(ScheduleKind::OneFOneB, 2, 2, 4)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("parallel.virtual_stages = 2") && e.contains("fix:"),
            "{e}"
        );
    }

    #[test]
    fn svg_has_one_box_per_compute_action() {
        let l = Schedule::build(ScheduleKind::ZbH1, 2, 3)
            .unwrap()
            .lower()
            .unwrap();
        let sim = simulate(&l, unit_costs).unwrap();
        let svg = timeline_svg(&l, &sim, "zb-h1 p=2 m=3");
        let boxes = svg.matches("<title>").count();
        let compute = l
            .ranks
            .iter()
            .flatten()
            .filter(|a| a.kind.is_compute())
            .count();
        assert_eq!(boxes, compute);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    }
}
