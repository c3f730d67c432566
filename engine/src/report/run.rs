//! Reading a run directory back: `metrics.jsonl` (one record per step), `trace.json`
//! (Chrome trace events) and the layout from `config.yaml`.
//!
//! Invariants: fields added to the records later are ignored, fields added by this
//! version are optional (older runs still report); when a step appears twice (a resumed
//! run appends to metrics.jsonl), the later record wins, and records come back in step
//! order.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One rank's numbers in one step.
#[derive(Clone, Debug, Deserialize)]
pub struct RankRecord {
    pub rank: usize,
    pub compute_s: f64,
    pub wait_s: f64,
    pub step_s: f64,
    pub bubble: f64,
    #[serde(default)]
    pub peak_rss_mib: f64,
    /// Current resident memory (VmRSS), when the run recorded it.
    #[serde(default)]
    pub rss_mib: Option<f64>,
    /// Seconds in the optimizer step, when the run recorded it.
    #[serde(default)]
    pub optim_s: Option<f64>,
}

/// One line of metrics.jsonl.
#[derive(Clone, Debug, Deserialize)]
pub struct StepRecord {
    pub step: usize,
    pub loss: f64,
    #[serde(default)]
    pub val_loss: Option<f64>,
    pub tokens_per_s: f64,
    pub step_s: f64,
    /// The whole step on rank 0 (evaluation and metrics included); `step_s` if absent.
    #[serde(default)]
    pub wall_s: Option<f64>,
    #[serde(default)]
    pub ranks: Vec<RankRecord>,
}

/// One complete ("X") span of trace.json.
#[derive(Clone, Debug, Deserialize)]
pub struct Span {
    pub name: String,
    #[serde(default)]
    pub cat: String,
    pub ph: String,
    /// Start and duration, µs.
    #[serde(default)]
    pub ts: f64,
    #[serde(default)]
    pub dur: f64,
    #[serde(default)]
    pub tid: usize,
}

/// What a run directory holds.
#[derive(Clone, Debug)]
pub struct Run {
    pub dir: PathBuf,
    /// One record per step, in step order.
    pub steps: Vec<StepRecord>,
    /// The complete spans of trace.json (empty without one).
    pub spans: Vec<Span>,
    /// `pp × tp × dp, schedule` from config.yaml, if readable.
    pub layout: Option<String>,
}

fn bad(path: &Path, field: &str, problem: String, fix: &str) -> Error {
    Error::Config {
        path: path.display().to_string(),
        field: field.into(),
        problem,
        fix: fix.into(),
    }
}

impl Run {
    /// Reads `dir`; a missing or malformed metrics.jsonl is a user error.
    pub fn read(dir: &Path) -> Result<Run> {
        let metrics = dir.join("metrics.jsonl");
        if !dir.is_dir() {
            return Err(bad(
                dir,
                "RUN_DIR",
                "is not a directory".into(),
                "pass a run directory (the output.dir of a config that has run)",
            ));
        }
        let text = std::fs::read_to_string(&metrics).map_err(|e| {
            bad(
                &metrics,
                "metrics.jsonl",
                format!("cannot read it: {e}"),
                "pass a run directory written by `strata launch` (its output.dir)",
            )
        })?;
        let mut by_step = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let rec: StepRecord = serde_json::from_str(line).map_err(|e| {
                bad(
                    &metrics,
                    &format!("line {}", i + 1),
                    format!("not a step record: {e}"),
                    "remove the damaged line (a run killed mid-write can leave one)",
                )
            })?;
            by_step.insert(rec.step, rec);
        }
        if by_step.is_empty() {
            return Err(bad(
                &metrics,
                "metrics.jsonl",
                "holds no steps".into(),
                "report a run that completed at least one step",
            ));
        }
        Ok(Run {
            dir: dir.to_path_buf(),
            steps: by_step.into_values().collect(),
            spans: read_trace(&dir.join("trace.json"))?,
            layout: read_layout(&dir.join("config.yaml")),
        })
    }

    /// Ranks in the run (from the records).
    pub fn world(&self) -> usize {
        self.steps
            .iter()
            .flat_map(|s| s.ranks.iter().map(|r| r.rank + 1))
            .max()
            .unwrap_or(0)
    }

    /// The records that describe steady state: steps after the first (which carries
    /// one-off warm-up) when there are any, else all.
    pub fn steady(&self) -> &[StepRecord] {
        if self.steps.len() > 1 {
            &self.steps[1..]
        } else {
            &self.steps
        }
    }
}

fn read_trace(path: &Path) -> Result<Vec<Span>> {
    #[derive(Deserialize)]
    struct Doc {
        #[serde(rename = "traceEvents")]
        events: Vec<serde_json::Value>,
    }
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    let doc: Doc = serde_json::from_str(&text).map_err(|e| {
        bad(
            path,
            "trace.json",
            format!("not a Chrome trace: {e}"),
            "remove it (the report then draws no timeline), or rerun",
        )
    })?;
    Ok(doc
        .events
        .into_iter()
        .filter_map(|v| serde_json::from_value::<Span>(v).ok())
        .filter(|s| s.ph == "X")
        .collect())
}

/// `pp 2 × tp 1 × dp 1, 1f1b` from the resolved config, read loosely (a report never
/// fails on it).
fn read_layout(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let p = v.get("parallel")?;
    let n = |k: &str| p.get(k).and_then(|x| x.as_u64()).unwrap_or(1);
    let schedule = p.get("schedule").and_then(|s| s.as_str()).unwrap_or("?");
    Some(format!(
        "pp {} × tp {} × dp {}, {schedule}",
        n("pp"),
        n("tp"),
        n("dp")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_keeps_the_later_record_of_a_step() {
        let dir = std::env::temp_dir().join(format!("strata-report-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let line = |step: usize, loss: f64| {
            format!(
                "{{\"step\":{step},\"loss\":{loss},\"tokens_per_s\":10.0,\"step_s\":1.0,\"ranks\":[{{\"rank\":0,\"compute_s\":0.5,\"wait_s\":0.25,\"step_s\":1.0,\"bubble\":0.25,\"future_field\":1}}]}}\n"
            )
        };
        let text = [
            line(1, 4.0),
            line(2, 3.0),
            line(3, 2.5),
            line(2, 2.9),
            line(3, 2.4),
        ]
        .concat();
        std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
        let run = Run::read(&dir).unwrap();
        let losses: Vec<f64> = run.steps.iter().map(|s| s.loss).collect();
        assert_eq!(losses, [4.0, 2.9, 2.4]);
        assert_eq!(run.world(), 1);
        assert!(run.spans.is_empty() && run.layout.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
