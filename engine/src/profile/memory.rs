//! What this process holds in memory, from `/proc` (Linux; zero elsewhere): the resident
//! set now (`VmRSS`), its peak (`VmHWM`) and the machine's installed memory (`MemTotal`).
//!
//! Invariant: every reader returns bytes, and 0 when the figure is unavailable.

fn status_kib(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

/// Resident bytes of this process now.
pub fn rss_bytes() -> u64 {
    status_kib("/proc/self/status", "VmRSS:") * 1024
}

/// Peak resident bytes of this process so far.
pub fn peak_rss_bytes() -> u64 {
    status_kib("/proc/self/status", "VmHWM:") * 1024
}

/// Installed memory of the machine.
pub fn machine_bytes() -> u64 {
    status_kib("/proc/meminfo", "MemTotal:") * 1024
}
