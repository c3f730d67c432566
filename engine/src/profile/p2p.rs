//! `strata p2p`: an `osu_latency` / `osu_bw`-style microbenchmark of the pipeline's
//! transport, run on two ranks under `mpiexec -n 2 strata p2p`. For each message size it
//! measures, interleaved round by round so that load on a shared machine hits every column
//! alike:
//!
//! * **raw MPI**: `MPI_Isend`/`MPI_Irecv` of a byte buffer, waited with `MPI_Waitall`
//!   (what `osu_latency`/`osu_bw` time);
//! * **Strata**: the executor's path, [`Communicator::send_tensor`] from a tensor's memory
//!   and [`Communicator::recv_tensor`] into a posted, reused receive tensor (header
//!   folded into the message up to the folding threshold, its own message above it;
//!   checks, flight recorder and wait policy included; `STRATA_P2P_FOLD` applies);
//! * **memcpy**: one rank copying the same bytes: a window of copies from one buffer
//!   into as many destinations (the memory work of a window of receives), and, as a
//!   cache-hot ceiling, the same bytes copied again and again into one destination.
//!
//! Latency is half a ping-pong's round trip; bandwidth is a window of messages sent back
//! to back, then a one-byte acknowledgement (as `osu_bw`). Every bandwidth column lands a
//! window in as many distinct receive buffers as it has messages: Strata must (each
//! received tensor stays valid until its (peer, tag) is received again, as the executor
//! needs), so raw MPI and memcpy do too; `osu_bw`'s one reused receive buffer stays in
//! the core's cache, which no transport that hands out received tensors can do. Each
//! figure is the median over rounds. The load average is printed before and after: numbers taken on a busy machine
//! are not comparable.
//!
//! Invariant: collective over the world (both ranks call [`run`] with the same options).

use crate::comm::mpi::MpiComm;
use crate::comm::wire::{self, Expect};
use crate::comm::{Communicator, Tag};
use crate::error::{Error, Result};
use crate::flight::{FlightRecorder, Group};
use crate::watchdog::{Deadlines, Watch};
use ::mpi::ffi;
use ::mpi::raw::AsRaw;
use ::mpi::topology::{Communicator as _, SimpleCommunicator};
use ::mpi::traits::Equivalence;
use partitioner::Rank;
use std::time::Instant;
use tch::{Kind, Tensor};

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    pub sizes: Vec<usize>,
    /// Rounds per size (each round times every column once).
    pub rounds: usize,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            sizes: default_sizes(),
            rounds: 7,
        }
    }
}

/// 8 B to 64 MiB, ×8 steps, plus 1, 4 and 64 MiB.
pub fn default_sizes() -> Vec<usize> {
    let mut v: Vec<usize> = (0..9).map(|k| 8usize << (3 * k)).collect();
    v.extend([1 << 20, 4 << 20, 64 << 20]);
    v.sort_unstable();
    v.dedup();
    v.retain(|&n| n <= 64 << 20);
    v
}

/// One size's medians: one-way latency (s) and bandwidth (bytes/s).
#[derive(Clone, Debug)]
pub struct Row {
    pub bytes: usize,
    pub mpi_lat: f64,
    pub strata_lat: f64,
    pub mpi_bw: f64,
    pub strata_bw: f64,
    /// memcpy of a window into distinct destinations (what the transports are held to).
    pub memcpy_bw: f64,
    /// memcpy into one cache-hot destination (a ceiling no window of receives reaches).
    pub memcpy_hot_bw: f64,
}

/// Ping-pong iterations for latency and messages per bandwidth window, by size.
fn counts(n: usize) -> (usize, usize) {
    let lat = if n <= 4096 {
        200
    } else if n <= 1 << 20 {
        30
    } else {
        4
    };
    let window = ((256usize << 20) / n.max(1)).clamp(1, 64);
    (lat, window)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn mpi_check(rc: i32, what: &str) -> Result<()> {
    match rc {
        0 => Ok(()),
        _ => Err(Error::Comm(format!("{what} failed with MPI code {rc}"))),
    }
}

/// Raw MPI: `MPI_Isend` or `MPI_Irecv` of `buf`, not yet waited for.
fn raw_start(
    comm: &SimpleCommunicator,
    buf: *mut u8,
    n: usize,
    peer: i32,
    send: bool,
) -> Result<ffi::MPI_Request> {
    let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
    let dt = u8::equivalent_datatype().as_raw();
    // SAFETY: `buf` holds `n` bytes, alive until the request is waited for by the caller.
    let rc = unsafe {
        match send {
            true => ffi::MPI_Isend(
                buf.cast(),
                n as i32,
                dt,
                peer,
                0,
                comm.as_raw(),
                req.as_mut_ptr(),
            ),
            false => ffi::MPI_Irecv(
                buf.cast(),
                n as i32,
                dt,
                peer,
                0,
                comm.as_raw(),
                req.as_mut_ptr(),
            ),
        }
    };
    mpi_check(rc, "raw MPI transfer")?;
    // SAFETY: initialised by the successful call.
    Ok(unsafe { req.assume_init() })
}

fn raw_wait(reqs: &mut [ffi::MPI_Request]) -> Result<()> {
    // SAFETY: live requests of ours; statuses ignored.
    let rc = unsafe {
        ffi::MPI_Waitall(
            reqs.len() as i32,
            reqs.as_mut_ptr(),
            ffi::RSMPI_STATUSES_IGNORE,
        )
    };
    mpi_check(rc, "MPI_Waitall")
}

/// Raw MPI one-way latency of an `n`-byte message (seconds).
fn raw_latency(comm: &SimpleCommunicator, buf: &mut [u8], iters: usize) -> Result<f64> {
    let (me, n) = (comm.rank(), buf.len());
    let peer = 1 - me;
    let t0 = Instant::now();
    for _ in 0..iters {
        if me == 0 {
            raw_wait(&mut [raw_start(comm, buf.as_mut_ptr(), n, peer, true)?])?;
            raw_wait(&mut [raw_start(comm, buf.as_mut_ptr(), n, peer, false)?])?;
        } else {
            raw_wait(&mut [raw_start(comm, buf.as_mut_ptr(), n, peer, false)?])?;
            raw_wait(&mut [raw_start(comm, buf.as_mut_ptr(), n, peer, true)?])?;
        }
    }
    Ok(t0.elapsed().as_secs_f64() / iters as f64 / 2.0)
}

/// Raw MPI bandwidth: a window of `n`-byte messages from rank 0's `buf`, each into its
/// own buffer of rank 1's `window` (as Strata's receive tensors), then an ack (bytes/s).
fn raw_bandwidth(comm: &SimpleCommunicator, buf: &mut [u8], window: &mut [Vec<u8>]) -> Result<f64> {
    let (me, n) = (comm.rank(), buf.len());
    let mut ack = [0u8; 1];
    let t0 = Instant::now();
    let mut reqs = Vec::with_capacity(window.len());
    for dst in window.iter_mut() {
        let ptr = match me {
            0 => buf.as_mut_ptr(),
            _ => dst.as_mut_ptr(),
        };
        reqs.push(raw_start(comm, ptr, n, 1 - me, me == 0)?);
    }
    raw_wait(&mut reqs)?;
    raw_wait(&mut [raw_start(comm, ack.as_mut_ptr(), 1, 1 - me, me == 1)?])?;
    Ok((n * window.len()) as f64 / t0.elapsed().as_secs_f64())
}

/// The tensor Strata sends for an `n`-byte message (f32 elements, at least one).
fn message(n: usize) -> Result<(Tensor, Expect, Vec<u8>)> {
    let numel = (n / 4).max(1) as i64;
    let t = Tensor::f_ones([numel], (Kind::Float, tch::Device::Cpu))
        .map_err(Error::torch("p2p message"))?;
    let expect = Expect {
        kind: Kind::Float,
        shape: vec![numel],
        chunk: 0,
        microbatch: 0,
    };
    let header = wire::header(&t, 0, 0)?;
    Ok((t, expect, header))
}

/// Strata one-way latency: ping-pong of tensor messages, receives posted ahead.
fn strata_latency(comm: &mut MpiComm, n: usize, iters: usize) -> Result<f64> {
    let me = comm.rank().0;
    let peer = Rank(1 - me);
    let tag = Tag(Tag::ACTIVATION);
    let (t, expect, header) = message(n)?;
    let t0 = Instant::now();
    for _ in 0..iters {
        comm.post_recv_tensor(peer, tag, &expect)?;
        if me == 0 {
            comm.send_tensor(peer, tag, header.clone(), &t)?;
            drop(comm.recv_tensor(peer, tag, &expect)?);
        } else {
            drop(comm.recv_tensor(peer, tag, &expect)?);
            comm.send_tensor(peer, tag, header.clone(), &t)?;
        }
    }
    comm.flush()?;
    Ok(t0.elapsed().as_secs_f64() / iters as f64 / 2.0)
}

/// Strata bandwidth: a window of tensor messages, then a one-byte ack.
fn strata_bandwidth(comm: &mut MpiComm, n: usize, window: usize) -> Result<f64> {
    let me = comm.rank().0;
    let peer = Rank(1 - me);
    let (tag, ack) = (Tag(Tag::ACTIVATION), Tag(Tag::GRADIENT));
    let (t, expect, header) = message(n)?;
    let (a, ack_expect, ack_header) = message(4)?;
    if me == 1 {
        for _ in 0..window {
            comm.post_recv_tensor(peer, tag, &expect)?;
        }
    } else {
        comm.post_recv_tensor(peer, ack, &ack_expect)?;
    }
    comm.barrier()?;
    let t0 = Instant::now();
    if me == 0 {
        for _ in 0..window {
            comm.send_tensor(peer, tag, header.clone(), &t)?;
        }
        drop(comm.recv_tensor(peer, ack, &ack_expect)?);
        comm.flush()?;
    } else {
        for _ in 0..window {
            drop(comm.recv_tensor(peer, tag, &expect)?);
        }
        comm.send_tensor(peer, ack, ack_header, &a)?;
        comm.flush()?;
    }
    Ok((n * window) as f64 / t0.elapsed().as_secs_f64())
}

/// memcpy bandwidth of a window: `src` copied into each of `window` (bytes/s), into
/// pages touched before (as the transports' reused receive buffers), repeated to move
/// at least 16 MiB.
fn memcpy_window(src: &[u8], window: &mut [Vec<u8>]) -> f64 {
    let bytes = (src.len() * window.len()).max(1);
    let reps = ((1 << 24) / bytes).clamp(1, 100_000);
    let t0 = Instant::now();
    for _ in 0..reps {
        for dst in window.iter_mut() {
            dst.copy_from_slice(std::hint::black_box(src));
            std::hint::black_box(&mut *dst);
        }
    }
    (bytes * reps) as f64 / t0.elapsed().as_secs_f64()
}

/// memcpy bandwidth of `n` bytes (bytes/s) into warm pages, repeated to move at least 16 MiB.
fn memcpy_bandwidth(src: &[u8], dst: &mut [u8]) -> f64 {
    let reps = ((1 << 24) / src.len().max(1)).clamp(1, 100_000);
    // One untimed copy first: the first touch of fresh pages is a page fault, not memcpy.
    dst.copy_from_slice(src);
    let t0 = Instant::now();
    for _ in 0..reps {
        dst.copy_from_slice(std::hint::black_box(src));
        std::hint::black_box(&mut *dst);
    }
    (src.len() * reps) as f64 / t0.elapsed().as_secs_f64()
}

/// The 1-, 5- and 15-minute load averages, as `/proc/loadavg` gives them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Runs the benchmark on ranks 0 and 1 of `world` (exactly two ranks); every rank
/// returns the rows (rank 0's timings).
pub fn run(world: SimpleCommunicator, opts: &Options) -> Result<Vec<Row>> {
    if world.size() != 2 {
        return Err(Error::usage(
            "mpiexec -n",
            format!("strata p2p needs exactly 2 ranks, got {}", world.size()),
            "run it as `mpiexec -n 2 strata p2p`",
        ));
    }
    let me = world.rank() as usize;
    let flight = FlightRecorder::new(Rank(me), None, 64);
    let raw = world.duplicate();
    let mut strata = MpiComm::new(
        world,
        Group::World,
        Watch::new(flight, None, Deadlines::default(), None),
    )?;
    let mut rows = Vec::new();
    for &n in &opts.sizes {
        let (iters, window) = counts(n);
        let mut buf = vec![1u8; n];
        let mut dst = vec![0u8; n];
        // Touched now: the timed rounds see warm pages, as Strata's reused tensors are.
        let mut recv_window = vec![vec![1u8; n]; window];
        let mut copy_window = vec![vec![1u8; n]; window];
        let mut cols: [Vec<f64>; 6] = Default::default();
        // One warm-up round, then the timed ones; every column in every round.
        for round in 0..=opts.rounds {
            strata.barrier()?;
            let r = [
                raw_latency(&raw, &mut buf, iters)?,
                strata_latency(&mut strata, n, iters)?,
                raw_bandwidth(&raw, &mut buf, &mut recv_window)?,
                strata_bandwidth(&mut strata, n, window)?,
                memcpy_window(&buf, &mut copy_window),
                memcpy_bandwidth(&buf, &mut dst),
            ];
            if round > 0 {
                cols.iter_mut().zip(r).for_each(|(c, x)| c.push(x));
            }
        }
        let mut v = cols.map(median);
        strata.barrier()?;
        // Rank 0's figures on every rank (they time the same exchanges).
        let mut mine = if me == 0 { v.to_vec() } else { vec![0.0; 6] };
        strata.all_reduce_sum(&mut mine)?;
        v.copy_from_slice(&mine);
        rows.push(Row {
            bytes: n,
            mpi_lat: v[0],
            strata_lat: v[1],
            mpi_bw: v[2],
            strata_bw: v[3],
            memcpy_bw: v[4],
            memcpy_hot_bw: v[5],
        });
    }
    strata.flush()?;
    Ok(rows)
}

fn human(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// The table `strata p2p` prints: `memcpy` copies a window into distinct buffers (what
/// S/memcpy compares with), `hot` into one cache-resident buffer.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:>8} | {:>11} {:>11} | {:>10} {:>10} {:>10} {:>10} | {:>7} {:>8} {:>6}\n",
        "size",
        "MPI lat us",
        "Strata us",
        "MPI GB/s",
        "Strata",
        "memcpy",
        "hot",
        "S/MPI",
        "S/memcpy",
        "S/hot"
    );
    for r in rows {
        s += &format!(
            "{:>8} | {:>11.2} {:>11.2} | {:>10.3} {:>10.3} {:>10.3} {:>10.3} | {:>6.0}% {:>7.0}% {:>5.0}%\n",
            human(r.bytes),
            r.mpi_lat * 1e6,
            r.strata_lat * 1e6,
            r.mpi_bw / 1e9,
            r.strata_bw / 1e9,
            r.memcpy_bw / 1e9,
            r.memcpy_hot_bw / 1e9,
            100.0 * r.strata_bw / r.mpi_bw,
            100.0 * r.strata_bw / r.memcpy_bw,
            100.0 * r.strata_bw / r.memcpy_hot_bw,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_run_from_8_bytes_to_64_mib_with_1_mib() {
        let s = default_sizes();
        assert_eq!(s.first(), Some(&8));
        assert_eq!(s.last(), Some(&(64 << 20)));
        assert!(s.contains(&(1 << 20)));
        assert!(s.windows(2).all(|w| w[0] < w[1]));
    }
}
