//! The text summary of a run: steps, first/final/best losses, throughput, and per rank
//! the bubble, peak memory and where the step time went (compute, wait, optimizer).
//!
//! Invariant: steady-state figures (tokens/s, bubble, time split) leave out step 1, whose
//! time includes one-off warm-up, whenever the run has more than one step.

use super::run::{Run, StepRecord};
use std::fmt::Write;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// `1h 02m 03s`, `4m 05s` or `6.7 s`.
pub fn duration(s: f64) -> String {
    let whole = s.round() as u64;
    match whole {
        0..60 => format!("{s:.1} s"),
        60..3600 => format!("{}m {:02}s", whole / 60, whole % 60),
        _ => format!(
            "{}h {:02}m {:02}s",
            whole / 3600,
            whole / 60 % 60,
            whole % 60
        ),
    }
}

/// Per-rank totals over the steady steps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankTotals {
    pub compute_s: f64,
    pub wait_s: f64,
    /// The optimizer step (exact when the run recorded it).
    pub optim_s: f64,
    /// The rest of the step: gradient reductions, clipping, batch assembly.
    pub other_s: f64,
    pub bubble: f64,
    pub peak_rss_mib: f64,
}

/// Sums each rank's time over `steps`; the bubble is the mean, the memory the peak.
pub fn rank_totals(steps: &[StepRecord], world: usize) -> Vec<RankTotals> {
    let mut t = vec![RankTotals::default(); world];
    for s in steps {
        for r in &s.ranks {
            let x = &mut t[r.rank];
            x.compute_s += r.compute_s;
            x.wait_s += r.wait_s;
            let rest = (r.step_s - r.compute_s - r.wait_s).max(0.0);
            let optim = r.optim_s.unwrap_or(rest).min(rest);
            x.optim_s += optim;
            x.other_s += rest - optim;
            x.bubble += r.bubble / steps.len() as f64;
            x.peak_rss_mib = x.peak_rss_mib.max(r.peak_rss_mib);
        }
    }
    t
}

/// The summary, several lines ending with a newline.
pub fn summary(run: &Run) -> String {
    let mut out = String::new();
    let first = &run.steps[0];
    let last = run.steps.last().expect("a run has steps");
    let wall: f64 = run.steps.iter().map(|s| s.wall_s.unwrap_or(s.step_s)).sum();
    let layout = run
        .layout
        .as_ref()
        .map_or(String::new(), |l| format!(" ({l})"));
    let _ = writeln!(
        out,
        "run {}{layout}: {} steps ({} .. {}), wall time {}",
        run.dir.display(),
        run.steps.len(),
        first.step,
        last.step,
        duration(wall)
    );
    let _ = writeln!(
        out,
        "train loss: first {:.4}, final {:.4} (step {})",
        first.loss, last.loss, last.step
    );
    let vals: Vec<(usize, f64)> = run
        .steps
        .iter()
        .filter_map(|s| Some((s.step, s.val_loss?)))
        .collect();
    match (vals.last(), vals.iter().min_by(|a, b| a.1.total_cmp(&b.1))) {
        (Some(&(fs, fv)), Some(&(bs, bv))) => {
            let _ = writeln!(
                out,
                "val loss: final {fv:.4} (step {fs}), best {bv:.4} (step {bs}), {} evaluation{}",
                vals.len(),
                if vals.len() == 1 { "" } else { "s" }
            );
        }
        _ => {
            let _ = writeln!(out, "val loss: not evaluated (train.eval_every: 0)");
        }
    }
    let steady = run.steady();
    let _ = writeln!(
        out,
        "throughput: {:.0} tokens/s, {:.3} s per step (medians{})",
        median(steady.iter().map(|s| s.tokens_per_s).collect()),
        median(steady.iter().map(|s| s.step_s).collect()),
        if run.steps.len() > 1 {
            " of steps after the first"
        } else {
            ""
        }
    );
    rank_table(&mut out, steady, run.world());
    out
}

fn rank_table(out: &mut String, steady: &[StepRecord], world: usize) {
    let totals = rank_totals(steady, world);
    let _ = writeln!(
        out,
        "{:>4}  {:>7}  {:>10}  {:>17}  {:>17}  {:>17}  {:>17}",
        "rank", "bubble", "peak mem", "compute", "wait", "optimizer", "other"
    );
    let n = steady.len().max(1) as f64;
    for (r, t) in totals.iter().enumerate() {
        let total = (t.compute_s + t.wait_s + t.optim_s + t.other_s).max(f64::MIN_POSITIVE);
        let cell = |x: f64| format!("{:.4} s {:>5.1}%", x / n, 100.0 * x / total);
        let _ = writeln!(
            out,
            "{r:>4}  {:>6.1}%  {:>6.0} MiB  {:>17}  {:>17}  {:>17}  {:>17}",
            100.0 * t.bubble,
            t.peak_rss_mib,
            cell(t.compute_s),
            cell(t.wait_s),
            cell(t.optim_s),
            cell(t.other_s)
        );
    }
    let _ = writeln!(
        out,
        "(per step and share of the rank's step; wait = idle on peers; other = gradient reductions, clipping, batches)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(6.74), "6.7 s");
        assert_eq!(duration(245.0), "4m 05s");
        assert_eq!(duration(3723.0), "1h 02m 03s");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
