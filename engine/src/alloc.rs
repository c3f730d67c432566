//! The malloc policy of a rank's process (`train.allocator`): whether tensor memory that
//! libtorch frees goes back to the operating system or stays in the heap for the next
//! step. libtorch's CPU tensors come from glibc's `malloc`, so this decides both the
//! resident memory a rank shows and how many pages it faults in per step.
//!
//! * [`AllocatorPolicy::Retain`]: no block is served by `mmap` and the heap is never
//!   trimmed. A step reuses the pages the previous step freed: no page faults after the
//!   first step, and the resident set stays at the step's high-water mark. The default
//!   wherever glibc is: with the causal-attention kernel it measured 2–12% faster than
//!   `system` per step on gpt-tiny's one-process, tp = 2 and dp = 2 layouts, for 6–20%
//!   more resident memory (README, "Memory").
//! * [`AllocatorPolicy::Release`]: every block of [`RELEASE_MMAP_BYTES`] or more is its
//!   own mapping, returned to the system when freed. Resident memory follows the live
//!   tensors (what the planner's memory model counts), but each step faults its
//!   activations' pages in again (zeroed by the kernel).
//! * [`AllocatorPolicy::System`]: glibc's defaults (a dynamic mmap threshold that rises
//!   after the first large free, trimming the heap top past 128 KiB) and any `MALLOC_*`
//!   environment variables.
//!
//! Invariant: the policy is process-wide state, so only a process's owner applies it,
//! once, before the model is built: the MPI worker and `strata profile`. In-process
//! test ranks share one process and never call [`apply`].

use crate::config::AllocatorPolicy;
use crate::error::{Error, Result};

/// The mmap threshold of [`AllocatorPolicy::Release`] (glibc's own default before it
/// adapts is 128 KiB).
pub const RELEASE_MMAP_BYTES: i32 = 256 << 10;

/// Applies `policy` to this process's allocator (see the module docs).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn apply(policy: AllocatorPolicy) -> Result<()> {
    let settings: &[(i32, i32, &str)] = match policy {
        AllocatorPolicy::System => &[],
        AllocatorPolicy::Retain => &[
            (libc::M_MMAP_MAX, 0, "M_MMAP_MAX"),
            (libc::M_TRIM_THRESHOLD, i32::MAX, "M_TRIM_THRESHOLD"),
        ],
        AllocatorPolicy::Release => &[(
            libc::M_MMAP_THRESHOLD,
            RELEASE_MMAP_BYTES,
            "M_MMAP_THRESHOLD",
        )],
    };
    for &(param, value, name) in settings {
        // SAFETY: mallopt only changes the allocator's tuning parameters.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(Error::Internal(format!(
                "train.allocator {policy:?}: glibc refused mallopt({name}, {value})"
            )));
        }
    }
    Ok(())
}

/// Applies `policy`: without glibc only `system` is possible.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn apply(policy: AllocatorPolicy) -> Result<()> {
    match unsupported(policy) {
        None => Ok(()),
        Some(problem) => Err(Error::Config {
            path: String::new(),
            field: "train.allocator".into(),
            problem,
            fix: "set train.allocator: system".into(),
        }),
    }
}

/// Why this build cannot apply `policy`, or `None` when it can. Config validation asks
/// before any rank starts, so [`apply`] in a worker never meets a policy it refuses.
pub fn unsupported(policy: AllocatorPolicy) -> Option<String> {
    let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
    (!glibc && policy != AllocatorPolicy::System)
        .then(|| format!("{policy:?} tunes glibc's malloc, and this build does not use glibc"))
}

/// Bytes this process holds in `mmap`ed blocks and in the heap (glibc's `mallinfo2`):
/// `(mmapped, heap)`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn held_bytes() -> (usize, usize) {
    // SAFETY: mallinfo2 reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.hblkhd, info.arena)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [AllocatorPolicy; 3] = [
        AllocatorPolicy::System,
        AllocatorPolicy::Retain,
        AllocatorPolicy::Release,
    ];

    /// The default is always possible on this build.
    #[test]
    fn the_default_policy_is_supported() {
        assert_eq!(unsupported(AllocatorPolicy::default()), None);
    }

    /// `system` is always possible; the tuned policies exactly where glibc is.
    #[test]
    fn only_glibc_builds_take_the_tuned_policies() {
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        for policy in ALL {
            let ok = policy == AllocatorPolicy::System || glibc;
            assert_eq!(unsupported(policy).is_none(), ok, "{policy:?}");
        }
    }
}
