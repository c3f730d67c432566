//! The black box: one page of shared memory (a Linux memfd) in which a rank mirrors what
//! it is doing — its identity, step and current event — with plain atomic stores, no
//! system call. `strata worker` runs each rank under a small supervisor process that maps
//! the same page, so when the rank dies without a word (SIGKILL, the OOM killer, a
//! segfault) the supervisor can still name it and say what it was doing.
//!
//! Invariants: one writer (the rank's flight recorder, under its lock); readers only read
//! after the writer is gone, and a sequence word (odd while a write is in progress) lets
//! them detect a write cut short by the kill.

use crate::flight::What;
use partitioner::mesh::MeshCoord;
use partitioner::Rank;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Environment variable that hands the memfd's descriptor to the rank process.
pub const FD_ENV: &str = "STRATA_BLACKBOX_FD";

const MAGIC: u64 = 0x5354_5241_5441_4242; // "STRATABB"
const WORDS: usize = 16;
const PAGE: usize = 4096;
const W_MAGIC: usize = 0;
const W_SEQ: usize = 1;
const W_RANK: usize = 2;
const W_COORD: usize = 3;
const W_STEP: usize = 4;
const W_WHAT: usize = 5; // 4 words
const W_SINCE: usize = 9;
const W_BEGUN: usize = 10;

/// A mapped black-box page (cheap to clone).
#[derive(Clone)]
pub struct BlackBox {
    map: Arc<memmap2::MmapMut>,
}

/// What a black box held when it was read.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub rank: Option<Rank>,
    pub coord: Option<MeshCoord>,
    pub step: usize,
    pub doing: Option<What>,
    /// Unix time (µs) at which `doing` began.
    pub since_unix_us: u64,
    /// False if the writer was killed in the middle of an update (fields may mix).
    pub consistent: bool,
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl BlackBox {
    /// Creates a black box in a new memfd that child processes inherit; returns it and
    /// the descriptor to pass in [`FD_ENV`]. Linux only.
    #[cfg(target_os = "linux")]
    pub fn create() -> std::io::Result<(BlackBox, i32)> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // No MFD_CLOEXEC: the rank process, exec'd by the supervisor, inherits it.
        // SAFETY: a valid NUL-terminated name and no flags.
        let fd = unsafe { libc::memfd_create(c"strata-blackbox".as_ptr(), 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor that we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(PAGE as u64)?;
        let bb = Self::map(&file)?;
        bb.word(W_MAGIC).store(MAGIC, Ordering::Release);
        Ok((bb, file.into_raw_fd()))
    }

    #[cfg(not(target_os = "linux"))]
    pub fn create() -> std::io::Result<(BlackBox, i32)> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the black box needs Linux memfds",
        ))
    }

    /// Maps the black box whose descriptor is in [`FD_ENV`] (None if unset or invalid).
    pub fn from_env() -> Option<BlackBox> {
        Self::open(std::env::var(FD_ENV).ok()?.parse().ok()?)
    }

    /// Maps the black box of descriptor `fd`, taking ownership of the descriptor.
    pub fn open(fd: i32) -> Option<BlackBox> {
        use std::os::fd::FromRawFd;
        if fd < 0 {
            return None;
        }
        // SAFETY: the supervisor created this descriptor for us; a wrong number fails
        // the size and magic checks below instead of being trusted.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        if file.metadata().ok()?.len() != PAGE as u64 {
            std::mem::forget(file);
            return None;
        }
        let bb = Self::map(&file).ok()?;
        (bb.word(W_MAGIC).load(Ordering::Acquire) == MAGIC).then_some(bb)
    }

    fn map(file: &std::fs::File) -> std::io::Result<BlackBox> {
        // SAFETY: the memfd is only ever accessed through this mapping's atomics.
        let map = unsafe { memmap2::MmapOptions::new().len(PAGE).map_mut(file)? };
        Ok(BlackBox { map: Arc::new(map) })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // SAFETY: the page is 4096 bytes, page-aligned, and only accessed as atomics;
        // the reference lives no longer than the mapping.
        unsafe { AtomicU64::from_ptr((self.map.as_ptr() as *mut u64).add(i)) }
    }

    fn write(&self, f: impl FnOnce()) {
        let seq = self.word(W_SEQ);
        seq.fetch_add(1, Ordering::AcqRel);
        f();
        seq.fetch_add(1, Ordering::AcqRel);
    }

    pub fn set_identity(&self, rank: Rank, coord: Option<MeshCoord>) {
        self.write(|| {
            self.word(W_RANK)
                .store(rank.0 as u64 + 1, Ordering::Relaxed);
            let c = coord.map_or(0, |c| {
                1 << 63 | (c.pp as u64) << 42 | (c.tp as u64) << 21 | c.dp as u64
            });
            self.word(W_COORD).store(c, Ordering::Relaxed);
        });
    }

    pub fn set_step(&self, step: usize) {
        self.write(|| self.word(W_STEP).store(step as u64, Ordering::Relaxed));
    }

    pub fn set_doing(&self, what: &What, begun: u64) {
        let w = what.encode();
        self.write(|| {
            for (i, v) in w.iter().enumerate() {
                self.word(W_WHAT + i).store(*v, Ordering::Relaxed);
            }
            self.word(W_SINCE).store(unix_us(), Ordering::Relaxed);
            self.word(W_BEGUN).store(begun, Ordering::Relaxed);
        });
    }

    pub fn clear_doing(&self, begun: u64) {
        self.write(|| {
            self.word(W_WHAT).store(0, Ordering::Relaxed);
            self.word(W_SINCE).store(unix_us(), Ordering::Relaxed);
            self.word(W_BEGUN).store(begun, Ordering::Relaxed);
        });
    }

    /// Reads the black box (meant for after the writer is gone).
    pub fn read(&self) -> Snapshot {
        let load = |i| self.word(i).load(Ordering::Acquire);
        let seq = load(W_SEQ);
        let rank = load(W_RANK);
        let c = load(W_COORD);
        let coord = (c >> 63 == 1).then(|| {
            let mask = (1 << 21) - 1;
            MeshCoord {
                pp: (c >> 42 & mask) as usize,
                tp: (c >> 21 & mask) as usize,
                dp: (c & mask) as usize,
            }
        });
        let what = [
            load(W_WHAT),
            load(W_WHAT + 1),
            load(W_WHAT + 2),
            load(W_WHAT + 3),
        ];
        Snapshot {
            rank: (rank > 0).then(|| Rank(rank as usize - 1)),
            coord,
            step: load(W_STEP) as usize,
            doing: What::decode(what),
            since_unix_us: load(W_SINCE),
            consistent: seq % 2 == 0 && load(W_SEQ) == seq,
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn a_second_mapping_sees_what_the_first_wrote() {
        let (bb, fd) = BlackBox::create().unwrap();
        let other = BlackBox::open(fd).expect("maps the same memfd");
        let coord = MeshCoord {
            pp: 1,
            tp: 0,
            dp: 3,
        };
        bb.set_identity(Rank(7), Some(coord));
        bb.set_step(12);
        let what = What::Action {
            action: "1B4".parse().unwrap(),
            eval: false,
        };
        bb.set_doing(&what, 99);
        let s = other.read();
        assert_eq!(s.rank, Some(Rank(7)));
        assert_eq!(s.coord, Some(coord));
        assert_eq!(s.step, 12);
        assert_eq!(s.doing, Some(what));
        assert!(s.consistent);
        bb.clear_doing(100);
        assert_eq!(other.read().doing, None);
    }
}
