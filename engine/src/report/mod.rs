//! `strata report RUN_DIR`, also written at the end of every run: a text summary of the
//! run and two pictures in the run directory, `loss.svg` (train and validation loss
//! against step and time) and `timeline.svg` (the measured per-rank timeline from
//! trace.json, coloured like `strata simulate`'s prediction).
//!
//! Invariants: the report only reads the run directory (metrics.jsonl, trace.json,
//! config.yaml) and writes the two SVGs into it; pictures are drawn by plotters' SVG
//! backend; a run without trace.json gets no timeline, and says so.

mod loss_plot;
mod run;
mod summary;
mod timeline_plot;

pub use run::{RankRecord, Run, Span, StepRecord};
pub use summary::{rank_totals, summary, RankTotals};
pub use timeline_plot::idle_shares;

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// What [`write_report`] produced.
#[derive(Clone, Debug)]
pub struct Report {
    /// The text summary (several lines, newline-terminated).
    pub summary: String,
    /// The files written.
    pub written: Vec<PathBuf>,
}

fn plot_err<E: std::fmt::Debug>(e: E) -> Error {
    Error::Internal(format!("drawing a plot: {e:?}"))
}

fn write(path: PathBuf, text: &str) -> Result<PathBuf> {
    std::fs::write(&path, text).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Reads `dir`, writes `loss.svg` and (with a trace) `timeline.svg` into it, and returns
/// the summary.
pub fn write_report(dir: &Path) -> Result<Report> {
    let run = Run::read(dir)?;
    let mut text = summary(&run);
    let mut written = vec![write(dir.join("loss.svg"), &loss_plot::loss_svg(&run)?)?];
    let steps: Vec<&str> = run
        .spans
        .iter()
        .filter(|s| s.cat == "step" && s.tid == 0)
        .filter_map(|s| s.name.strip_prefix("step "))
        .collect();
    let title = match (steps.first(), steps.last()) {
        (Some(a), Some(b)) if a != b => format!("measured timeline, steps {a}–{b} (trace.json)"),
        (Some(a), _) => format!("measured timeline, step {a} (trace.json)"),
        _ => "measured timeline (trace.json)".to_string(),
    };
    match timeline_plot::timeline_svg(&run.spans, &title)? {
        Some(svg) => written.push(write(dir.join("timeline.svg"), &svg)?),
        None => text.push_str("no trace.json in the run directory: no timeline.svg\n"),
    }
    Ok(Report {
        summary: text,
        written,
    })
}
