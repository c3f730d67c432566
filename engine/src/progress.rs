//! Training progress as the person at the terminal sees it, on rank 0: a live `indicatif`
//! bar (step, loss, val loss, tokens/s, MFU when known, ETA) when stderr is a terminal,
//! and otherwise one plain line every `train.log_every` steps (and at the first and last
//! step and every evaluation), emitted as `tracing` events (target `strata::progress`).
//!
//! Under mpiexec a rank's stderr is a pipe even when the launcher's is a terminal, so the
//! launcher passes `STRATA_PROGRESS=bar` down; `STRATA_PROGRESS=lines` forces lines.
//! The bar is drawn with plain ANSI escapes, which mpiexec forwards untouched.
//!
//! Invariant: the trainer calls [`Progress::step`] once per step with that step's record;
//! evaluations leave a permanent line above the bar.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use std::io::{IsTerminal, Write};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// Live bar on stderr.
    Bar,
    /// Plain lines at `log_every`.
    Lines,
    /// Nothing (ranks other than 0, tests).
    Quiet,
}

impl ProgressMode {
    /// Bar when `STRATA_PROGRESS=bar` or stderr is a terminal (and not
    /// `STRATA_PROGRESS=lines`), else lines.
    pub fn from_env() -> ProgressMode {
        match std::env::var("STRATA_PROGRESS").as_deref() {
            Ok("bar") => ProgressMode::Bar,
            Ok("lines") => ProgressMode::Lines,
            _ if std::io::stderr().is_terminal() => ProgressMode::Bar,
            _ => ProgressMode::Lines,
        }
    }
}

/// What the trainer knows at the end of a step.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepProgress {
    pub step: usize,
    pub loss: f64,
    pub val_loss: Option<f64>,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub step_s: f64,
    /// The largest bubble over ranks this step, 0..1.
    pub max_bubble: f64,
    /// Model FLOP/s each rank did this step (forward + backward of its chunks).
    pub flops_per_s_per_rank: f64,
    /// Model FLOPs utilisation, 0..1, when the device's peak is known.
    pub mfu: Option<f64>,
}

impl StepProgress {
    /// `step    50 | loss 2.1234 | val 2.2 | lr 3.00e-3 | 12345 tok/s | 0.123 s | …`.
    pub fn line(&self) -> String {
        let val = self
            .val_loss
            .map_or(String::new(), |v| format!(" | val {v:.4}"));
        let mfu = self
            .mfu
            .map_or(String::new(), |m| format!(" | MFU {:.1}%", 100.0 * m));
        format!(
            "step {:>5} | loss {:.4}{val} | lr {:.2e} | {:>8.0} tok/s | {:.3} s | {:.1} GFLOP/s/rank{mfu} | max bubble {:.1}%",
            self.step,
            self.loss,
            self.lr,
            self.tokens_per_s,
            self.step_s,
            self.flops_per_s_per_rank / 1e9,
            100.0 * self.max_bubble
        )
    }
}

/// Rank 0's progress display.
pub struct Progress {
    mode: ProgressMode,
    total: usize,
    log_every: usize,
    bar: Option<ProgressBar>,
    last_val: Option<f64>,
}

impl Progress {
    /// A display for steps `first..=total`, logging lines every `log_every` steps.
    pub fn new(mode: ProgressMode, first: usize, total: usize, log_every: usize) -> Progress {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let target = ProgressDrawTarget::term_like_with_hz(Box::new(AnsiStderr::new()), 4);
            let style = ProgressStyle::with_template(
                "{prefix} [{bar:24.cyan/blue}] {pos}/{len} {msg} | ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(Some(total as u64), target)
                .with_style(style)
                .with_prefix("train");
            bar.set_position(first.saturating_sub(1) as u64);
            bar.reset_eta();
            bar
        });
        Progress {
            mode,
            total,
            log_every: log_every.max(1),
            bar,
            last_val: None,
        }
    }

    /// Records one finished step.
    pub fn step(&mut self, p: &StepProgress) {
        if p.val_loss.is_some() {
            self.last_val = p.val_loss;
        }
        match self.mode {
            ProgressMode::Quiet => {}
            ProgressMode::Lines => {
                if p.step == 1
                    || p.step == self.total
                    || p.step.is_multiple_of(self.log_every)
                    || p.val_loss.is_some()
                {
                    tracing::info!(target: "strata::progress", "{}", p.line());
                }
            }
            ProgressMode::Bar => {
                let Some(bar) = &self.bar else { return };
                if p.val_loss.is_some() {
                    bar.println(p.line());
                }
                let val = self
                    .last_val
                    .map_or(String::new(), |v| format!(" | val {v:.4}"));
                let mfu = p
                    .mfu
                    .map_or(String::new(), |m| format!(" | MFU {:.1}%", 100.0 * m));
                bar.set_message(format!(
                    "| loss {:.4}{val} | {:.0} tok/s{mfu}",
                    p.loss, p.tokens_per_s
                ));
                bar.set_position(p.step as u64);
            }
        }
    }

    /// Prints a line (above the bar, if there is one).
    pub fn println(&self, line: &str) {
        match (&self.bar, self.mode) {
            (Some(bar), _) => bar.println(line),
            (None, ProgressMode::Quiet) => {}
            (None, _) => tracing::info!(target: "strata::progress", "{line}"),
        }
    }

    /// Leaves the finished bar on screen.
    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        // A run that fails mid-way leaves the bar where it stopped.
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// stderr driven with ANSI escapes whether or not it is a terminal (under mpiexec it is
/// a pipe to one); the width comes from `COLUMNS`, else 100.
#[derive(Debug)]
struct AnsiStderr {
    width: u16,
}

impl AnsiStderr {
    fn new() -> AnsiStderr {
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(100);
        AnsiStderr { width }
    }

    fn put(&self, s: &str) -> std::io::Result<()> {
        std::io::stderr().lock().write_all(s.as_bytes())
    }
}

impl TermLike for AnsiStderr {
    fn width(&self) -> u16 {
        self.width
    }
    fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}A"))?;
        }
        Ok(())
    }
    fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}B"))?;
        }
        Ok(())
    }
    fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}C"))?;
        }
        Ok(())
    }
    fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
        if n > 0 {
            self.put(&format!("\x1b[{n}D"))?;
        }
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.put(&format!("{s}\n"))
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.put(s)
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.put("\r\x1b[2K")
    }
    fn flush(&self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_shows_val_and_mfu_only_when_known() {
        let mut p = StepProgress {
            step: 50,
            loss: 2.5,
            lr: 3e-3,
            tokens_per_s: 1234.0,
            step_s: 0.5,
            max_bubble: 0.25,
            ..Default::default()
        };
        let l = p.line();
        assert!(
            l.starts_with("step    50 | loss 2.5000 | lr 3.00e-3"),
            "{l}"
        );
        assert!(!l.contains("val") && !l.contains("MFU"), "{l}");
        p.val_loss = Some(2.25);
        p.mfu = Some(0.031);
        p.flops_per_s_per_rank = 4.2e9;
        let l = p.line();
        assert!(l.contains("| 4.2 GFLOP/s/rank"), "{l}");
        assert!(l.contains("| val 2.2500") && l.contains("MFU 3.1%"), "{l}");
        assert!(l.ends_with("max bubble 25.0%"), "{l}");
    }
}
