//! What a generation run measured: per rank, its busy and idle time and peak memory; on
//! the last stage, when each microbatch's tokens came out. Rank 0 gathers them into one
//! [`Report`].
//!
//! Definitions (all wall-clock, after a barrier that starts every rank together):
//! * prefill tokens/s: real (unpadded) prompt tokens over the time until every
//!   microbatch has its first new token;
//! * decode tokens/s: the remaining new tokens over the time from then to the last token;
//! * time per token: for each microbatch, the gap between consecutive new tokens (every
//!   row of the microbatch gets one per gap); p50 and p99 by nearest rank;
//! * idle share: the part of a rank's wall time not spent computing (waiting for its
//!   input, or done early);
//! * threads: libtorch's intra-op threads on the rank (`--threads`);
//! * peak memory: the process's peak resident set (`VmHWM`), per rank under MPI (one
//!   process per rank); in-process runs share one process and report the same number.

use serde::{Deserialize, Serialize};
use std::time::Instant;

/// One rank's measurements.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RankStats {
    pub rank: usize,
    pub stage: usize,
    pub tp_rank: usize,
    pub wall_s: f64,
    pub busy_s: f64,
    pub peak_rss_bytes: u64,
    pub kv_cache_bytes: u64,
    /// libtorch intra-op threads the rank ran with.
    #[serde(default)]
    pub threads: usize,
}

impl RankStats {
    pub fn idle_share(&self) -> f64 {
        if self.wall_s > 0.0 {
            (1.0 - self.busy_s / self.wall_s).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// Busy-time accounting of one rank.
pub struct Clock {
    start: Instant,
    busy: f64,
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
            busy: 0.0,
        }
    }

    /// Seconds since the start.
    pub fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Runs `f`, counting its time as busy.
    pub fn busy<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.busy += t.elapsed().as_secs_f64();
        out
    }

    pub fn busy_s(&self) -> f64 {
        self.busy
    }
}

/// The whole run, as rank 0 prints it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// Generated ids of every prompt, in prompt order.
    pub tokens: Vec<Vec<i64>>,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub token_ms_p50: f64,
    pub token_ms_p99: f64,
    pub microbatches: usize,
    pub ranks: Vec<RankStats>,
}

/// When the last stage produced each microbatch's tokens (seconds since the start).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Emissions {
    /// `[microbatch][round]`.
    pub at: Vec<Vec<f64>>,
    /// Rows of each microbatch.
    pub rows: Vec<usize>,
}

impl Report {
    /// Fills the throughput and latency fields from the last stage's emission times.
    pub fn timing(&mut self, e: &Emissions, prompt_tokens: usize) {
        let first_done =
            e.at.iter()
                .filter_map(|r| r.first())
                .fold(0.0f64, |a, &b| a.max(b));
        let last_done =
            e.at.iter()
                .filter_map(|r| r.last())
                .fold(0.0f64, |a, &b| a.max(b));
        let rows: usize = e.rows.iter().sum();
        let rounds = e.at.first().map_or(0, Vec::len);
        self.prompt_tokens = prompt_tokens;
        self.new_tokens = rows * rounds;
        self.microbatches = e.rows.len();
        self.prefill_s = first_done;
        self.decode_s = last_done - first_done;
        self.prefill_tokens_per_s = rate(prompt_tokens, first_done);
        self.decode_tokens_per_s = rate(rows * rounds.saturating_sub(1), self.decode_s);
        let mut gaps: Vec<f64> =
            e.at.iter()
                .flat_map(|r| r.windows(2).map(|w| (w[1] - w[0]) * 1e3))
                .collect();
        gaps.sort_by(f64::total_cmp);
        self.token_ms_p50 = percentile(&gaps, 0.50);
        self.token_ms_p99 = percentile(&gaps, 0.99);
    }

    /// The one-line summary printed after the text.
    pub fn summary_line(&self) -> String {
        let ranks: Vec<String> = self
            .ranks
            .iter()
            .map(|r| {
                format!(
                    "rank {} (stage {}, tp {}): {} thread{}, peak {:.0} MiB, idle {:.0}%",
                    r.rank,
                    r.stage,
                    r.tp_rank,
                    r.threads,
                    if r.threads == 1 { "" } else { "s" },
                    r.peak_rss_bytes as f64 / (1u64 << 20) as f64,
                    100.0 * r.idle_share()
                )
            })
            .collect();
        format!(
            "prefill {:.1} tokens/s, decode {:.1} tokens/s, time per token p50 {:.2} ms p99 {:.2} ms ({} prompts in {} microbatches, {} new tokens); {}",
            self.prefill_tokens_per_s,
            self.decode_tokens_per_s,
            self.token_ms_p50,
            self.token_ms_p99,
            self.tokens.len(),
            self.microbatches,
            self.new_tokens,
            ranks.join("; ")
        )
    }
}

fn rate(n: usize, s: f64) -> f64 {
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// This process's peak resident set in bytes (`VmHWM`; 0 where unknown).
pub fn peak_rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timing_splits_prefill_and_decode() {
        let e = Emissions {
            at: vec![vec![1.0, 1.5, 2.0], vec![1.2, 1.7, 2.4]],
            rows: vec![2, 1],
        };
        let mut r = Report::default();
        r.timing(&e, 30);
        assert_eq!(r.new_tokens, 9);
        assert!((r.prefill_tokens_per_s - 25.0).abs() < 1e-9);
        assert!((r.decode_tokens_per_s - 6.0 / 1.2).abs() < 1e-9);
        assert!((r.token_ms_p50 - 500.0).abs() < 1e-6 && (r.token_ms_p99 - 700.0).abs() < 1e-6);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert!(peak_rss_bytes() > 0);
    }
}
