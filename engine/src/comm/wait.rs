//! How a rank waits for a transfer to complete: what it does between two `MPI_Test`s.
//!
//! MPICH's blocking calls busy-poll, which would take a core from the peer that shares it
//! (on a 2-core machine, the other rank), so every wait is a loop of non-blocking tests.
//! Between two tests a rank can:
//!
//! * [`WaitPolicy::Spin`]: re-test at once; lowest latency, a core per waiting rank.
//! * [`WaitPolicy::Yield`]: `sched_yield`: the core goes to any runnable thread, otherwise
//!   the test comes right back; an idle machine sees a spinning rank.
//! * [`WaitPolicy::Sleep`] (the previous build's loop): a few yields, then sleeps doubling
//!   from 20 µs to 1 ms: cheap when idle, but a message that lands during a sleep waits
//!   for its end (up to 1 ms per message).
//! * [`WaitPolicy::Hybrid`] (the default): yields for the first 200 µs of a wait, or for
//!   as long as the bytes in flight take at [`IN_FLIGHT_BYTES_PER_S`] when that is longer
//!   ([`Waiter::for_bytes`]), then sleeps doubling from 10 µs to 100 µs: a transfer already
//!   in flight pays no sleep (MPICH moves a large message through shared memory only
//!   while both ranks call into MPI, so a sleeping rank stalls its own transfer); a long
//!   wait (a pipeline bubble) wakes at most every 100 µs, a few percent of a core.
//!
//! `STRATA_WAIT=hybrid|yield|spin|sleep` picks the policy of a run, to measure them
//! against each other (README, "Waiting").
//!
//! Invariant: every policy returns between tests within 1 ms, so the caller checks its
//! deadline (`parallel.timeout_s`) and progresses its other transfers at least that often.

use crate::error::{Error, Result};
use std::time::{Duration, Instant};

/// How a rank waits between two completion tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WaitPolicy {
    #[default]
    Hybrid,
    Yield,
    Spin,
    Sleep,
}

/// The environment variable that picks a run's policy; unset means the default.
pub const WAIT_ENV: &str = "STRATA_WAIT";

/// What to do before the next test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    Spin,
    Yield,
    Sleep(Duration),
}

/// How long [`WaitPolicy::Hybrid`] only yields, at least.
const YIELD_FOR: Duration = Duration::from_micros(200);

/// The slowest rate at which a transfer in flight is expected to move (bytes/s): a wait
/// with `n` bytes in flight yields for `n / IN_FLIGHT_BYTES_PER_S` before it sleeps.
pub const IN_FLIGHT_BYTES_PER_S: f64 = 1e9;

impl WaitPolicy {
    pub fn parse(s: &str) -> Option<WaitPolicy> {
        Some(match s {
            "hybrid" => WaitPolicy::Hybrid,
            "yield" => WaitPolicy::Yield,
            "spin" => WaitPolicy::Spin,
            "sleep" => WaitPolicy::Sleep,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            WaitPolicy::Hybrid => "hybrid",
            WaitPolicy::Yield => "yield",
            WaitPolicy::Spin => "spin",
            WaitPolicy::Sleep => "sleep",
        }
    }

    /// The policy named by [`WAIT_ENV`] (the default when unset), or a usage error naming
    /// the variable and the fix.
    pub fn from_env() -> Result<WaitPolicy> {
        match std::env::var(WAIT_ENV) {
            Err(_) => Ok(WaitPolicy::default()),
            Ok(v) => WaitPolicy::parse(v.trim()).ok_or_else(|| {
                Error::usage(
                    WAIT_ENV,
                    format!("unknown wait policy `{v}`"),
                    "use hybrid (the default), yield, spin or sleep, or unset it",
                )
            }),
        }
    }

    /// The pause before test number `tries + 1` of a wait that started `waited` ago.
    pub fn pause(self, waited: Duration, tries: u32) -> Pause {
        match self {
            WaitPolicy::Spin => Pause::Spin,
            WaitPolicy::Yield => Pause::Yield,
            WaitPolicy::Sleep if tries < 8 => Pause::Yield,
            WaitPolicy::Sleep => Pause::Sleep(Duration::from_micros(
                (20u64 << (tries - 8).min(6)).min(1000),
            )),
            WaitPolicy::Hybrid if waited < YIELD_FOR => Pause::Yield,
            WaitPolicy::Hybrid => {
                Pause::Sleep(Duration::from_micros((10u64 << tries.min(4)).min(100)))
            }
        }
    }
}

/// One wait in progress.
pub struct Waiter {
    policy: WaitPolicy,
    start: Instant,
    /// How long [`WaitPolicy::Hybrid`] yields before it sleeps.
    yield_for: Duration,
    /// Sleeps (Hybrid) or tests (the others) so far.
    tries: u32,
}

impl Waiter {
    pub fn new(policy: WaitPolicy) -> Waiter {
        Waiter {
            policy,
            start: Instant::now(),
            yield_for: YIELD_FOR,
            tries: 0,
        }
    }

    /// Pauses before the next completion test.
    /// A wait with `bytes` in flight (its own and the rank's pending sends): Hybrid yields
    /// until they could have moved at [`IN_FLIGHT_BYTES_PER_S`], 200 µs at least.
    pub fn for_bytes(policy: WaitPolicy, bytes: usize) -> Waiter {
        let mut w = Waiter::new(policy);
        w.yield_for = YIELD_FOR.max(Duration::from_secs_f64(
            bytes as f64 / IN_FLIGHT_BYTES_PER_S,
        ));
        w
    }

    /// The pause after `waited` of this wait.
    fn next(&self, waited: Duration) -> Pause {
        match self.policy {
            WaitPolicy::Hybrid if waited < self.yield_for => Pause::Yield,
            // Sleeps double from the end of the yield window, as after 200 µs.
            WaitPolicy::Hybrid => self.policy.pause(waited.max(YIELD_FOR), self.tries),
            _ => self.policy.pause(waited, self.tries),
        }
    }

    pub fn pause(&mut self) {
        match self.next(self.start.elapsed()) {
            Pause::Spin => std::hint::spin_loop(),
            Pause::Yield => {
                std::thread::yield_now();
                if self.policy == WaitPolicy::Hybrid {
                    return; // Hybrid counts its sleeps only.
                }
            }
            Pause::Sleep(d) => std::thread::sleep(d),
        }
        self.tries = self.tries.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for p in [
            WaitPolicy::Hybrid,
            WaitPolicy::Yield,
            WaitPolicy::Spin,
            WaitPolicy::Sleep,
        ] {
            assert_eq!(WaitPolicy::parse(p.name()), Some(p));
        }
        assert_eq!(WaitPolicy::parse("nap"), None);
    }

    #[test]
    fn hybrid_yields_first_then_never_sleeps_past_100_us() {
        let h = WaitPolicy::Hybrid;
        let us = Duration::from_micros;
        assert_eq!(h.pause(us(0), 0), Pause::Yield);
        assert_eq!(h.pause(us(199), 0), Pause::Yield);
        assert_eq!(h.pause(us(200), 0), Pause::Sleep(us(10)));
        assert_eq!(h.pause(us(300), 1), Pause::Sleep(us(20)));
        for tries in 0..100 {
            match h.pause(Duration::from_secs(5), tries) {
                Pause::Sleep(d) => assert!(d <= us(100), "{d:?}"),
                p => panic!("{p:?}"),
            }
        }
        // The previous loop slept up to 1 ms: a message could wait that long for nothing.
        assert_eq!(WaitPolicy::Sleep.pause(us(0), 20), Pause::Sleep(us(1000)));
    }

    #[test]
    fn hybrid_yields_while_the_bytes_in_flight_can_still_be_moving() {
        let ms = Duration::from_millis;
        let big = Waiter::for_bytes(WaitPolicy::Hybrid, 64 << 20); // ~67 ms at 1 GB/s
        assert_eq!(big.next(ms(10)), Pause::Yield);
        assert_eq!(big.next(ms(60)), Pause::Yield);
        assert_eq!(big.next(ms(70)), Pause::Sleep(Duration::from_micros(10)));
        let small = Waiter::for_bytes(WaitPolicy::Hybrid, 1024);
        assert_eq!(small.next(Duration::from_micros(199)), Pause::Yield);
        assert_eq!(
            small.next(Duration::from_micros(200)),
            Pause::Sleep(Duration::from_micros(10))
        );
        let sleep = Waiter::for_bytes(WaitPolicy::Sleep, 64 << 20);
        assert_eq!(sleep.next(ms(10)), WaitPolicy::Sleep.pause(ms(10), 0));
    }
}
