//! Communication measurements for `strata profile`, through the engine's own transport
//! (the [`Communicator`] the executor uses, with its polling and back-off), so the planner
//! prices what a run really pays:
//!
//! * point-to-point: one-way time of a message (half a ping-pong between ranks 0 and 1,
//!   receives posted ahead as the executor posts them), the sender's and receiver's own
//!   costs of a pipeline message (tensor serialisation and deserialisation), and whether a
//!   message moves while its sender computes (or only inside the sender's later
//!   communicator calls);
//! * all-reduce: an f32 buffer, a tensor the way the tensor-parallel layers reduce one, and
//!   the data-parallel gradient average, each against size, for a group.
//!
//! Invariant: every function here is collective over the communicators it is given (all
//! ranks call it with the same arguments); results are meaningful on every rank.

use super::timing::{collective_median, median, seconds};
use crate::comm::wire::{self, Expect};
use crate::comm::{Communicator, ReduceOp, Tag};
use crate::error::{Error, Result};
use partitioner::profile::{Curve, CurvePoint};
use partitioner::Rank;
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Tag of profiling messages (distinct from the executor's).
const PROBE: i32 = 7;

fn curve(points: Vec<(usize, f64)>) -> Result<Curve> {
    Curve::new(
        points
            .into_iter()
            .map(|(bytes, seconds)| CurvePoint {
                bytes: bytes as u64,
                seconds,
            })
            .collect(),
    )
    .map_err(|e| Error::Internal(format!("measured curve: {e}")))
}

/// Repetitions for a message of `bytes`: more for small (noisy) messages.
fn reps(bytes: usize, runs: usize) -> usize {
    if bytes <= 64 << 10 {
        runs * 8
    } else {
        runs
    }
}

/// One-way seconds per message size between world ranks 0 and 1 (other ranks idle).
pub fn p2p_one_way(world: &mut dyn Communicator, sizes: &[usize], runs: usize) -> Result<Curve> {
    let me = world.rank().0;
    let mut points = Vec::new();
    for &n in sizes {
        world.barrier()?;
        let mut times = Vec::new();
        if me <= 1 {
            let peer = Rank(1 - me);
            let tag = Tag::plain(PROBE);
            for rep in 0..2 + reps(n, runs) {
                world.post_recv(peer, tag, n)?;
                let t0 = Instant::now();
                if me == 0 {
                    world.send(peer, tag, vec![1u8; n])?;
                    world.recv(peer, tag)?;
                } else {
                    world.recv(peer, tag)?;
                    world.send(peer, tag, vec![1u8; n])?;
                }
                world.flush()?;
                if rep >= 2 {
                    times.push(t0.elapsed().as_secs_f64() / 2.0);
                }
            }
        }
        let mut t = [median(times)];
        world.all_reduce_sum(&mut t)?; // rank 0's and rank 1's halves agree; average them
        points.push((n, t[0] / 2.0));
    }
    curve(points)
}

fn hidden(bytes: usize) -> Result<Tensor> {
    let n = (bytes / 4).max(1) as i64;
    Tensor::f_ones([n], (Kind::Float, tch::Device::Cpu)).map_err(Error::torch("profile tensor"))
}

/// The sender's and the receiver's own seconds for a pipeline message of each size:
/// serialising a tensor into a message, and a message back into a tensor (local work,
/// timed on every rank at once).
pub fn wire_overheads(
    comm: &mut dyn Communicator,
    sizes: &[usize],
    runs: usize,
) -> Result<(Curve, Curve)> {
    let (mut send, mut recv) = (Vec::new(), Vec::new());
    for &n in sizes {
        let t = hidden(n)?;
        let expect = Expect {
            kind: Kind::Float,
            shape: t.size(),
            chunk: 0,
            microbatch: 0,
        };
        let bytes = wire::encode_tensor(&t, 0, 0)?;
        let enc = collective_median(comm, 1, reps(n, runs), |_| {
            wire::encode_tensor(&t, 0, 0).map(drop)
        })?;
        let dec = collective_median(comm, 1, reps(n, runs), |_| {
            wire::decode_tensor(&bytes, Rank(0), &expect).map(drop)
        })?;
        send.push((n, enc));
        recv.push((n, dec));
    }
    Ok((curve(send)?, curve(recv)?))
}

/// Busy work without communicator calls for about `d`.
fn compute_for(d: Duration) -> Result<()> {
    let a = Tensor::f_ones([128, 128], (Kind::Float, tch::Device::Cpu))
        .map_err(Error::torch("profile compute"))?;
    let t0 = Instant::now();
    while t0.elapsed() < d {
        let _ = a.f_matmul(&a).map_err(Error::torch("profile compute"))?;
    }
    Ok(())
}

/// The smallest of `sizes` whose message does not arrive while its sender computes
/// (no communicator calls) for a while, or None. Rank 0 sends, rank 1 receives.
pub fn stall_threshold(world: &mut dyn Communicator, sizes: &[usize]) -> Result<Option<u64>> {
    let me = world.rank().0;
    let busy = Duration::from_millis(30);
    for &n in sizes {
        world.barrier()?;
        let tag = Tag::plain(PROBE + 1);
        let mut late = [0.0f64];
        if me == 1 {
            world.post_recv(Rank(0), tag, n)?;
        }
        world.barrier()?;
        match me {
            0 => {
                world.send(Rank(1), tag, vec![1u8; n])?;
                compute_for(busy)?;
                world.flush()?;
            }
            1 => {
                let t0 = Instant::now();
                world.recv(Rank(0), tag)?;
                // Arrival well into the sender's busy period means it waited for it.
                late[0] = f64::from(u8::from(t0.elapsed() > busy.mul_f64(0.7)));
            }
            _ => {}
        }
        world.all_reduce_sum(&mut late)?;
        if late[0] > 0.0 {
            return Ok(Some(n as u64));
        }
    }
    Ok(None)
}

/// Seconds of an f32 all-reduce of each size over `group` (slowest rank, median).
pub fn all_reduce_curve(
    group: &mut dyn Communicator,
    sizes: &[usize],
    runs: usize,
) -> Result<Curve> {
    let mut points = Vec::new();
    for &n in sizes {
        let mut buf = vec![1f32; (n / 4).max(1)];
        let t = collective_median(group, 1, reps(n, runs), |g| {
            g.all_reduce_f32(&mut buf, ReduceOp::Sum)
        })?;
        points.push((n, t));
    }
    curve(points)
}

/// An all-reduce of a tensor the way the tensor-parallel layers run one: the tensor's
/// values copied into a buffer, reduced, and copied into a new tensor.
fn tensor_all_reduce(t: &Tensor, group: &mut dyn Communicator) -> Result<Tensor> {
    let c = Error::torch("profile tensor all-reduce");
    let t = t.f_contiguous().map_err(c)?;
    let n = t.numel();
    let mut buf = vec![0f32; n];
    t.f_view([-1])
        .and_then(|v| v.f_copy_data(&mut buf, n))
        .map_err(Error::torch("profile tensor all-reduce"))?;
    group.all_reduce_f32(&mut buf, ReduceOp::Sum)?;
    Tensor::f_from_slice(&buf)
        .and_then(|r| r.f_view(t.size().as_slice()))
        .map_err(Error::torch("profile tensor all-reduce"))
}

/// Seconds of a tensor all-reduce of each size over `group` (slowest rank, median).
pub fn tensor_all_reduce_curve(
    group: &mut dyn Communicator,
    sizes: &[usize],
    runs: usize,
) -> Result<Curve> {
    let mut points = Vec::new();
    for &n in sizes {
        let t = hidden(n)?;
        let s = collective_median(group, 1, reps(n, runs), |g| {
            tensor_all_reduce(&t, g).map(drop)
        })?;
        points.push((n, s));
    }
    curve(points)
}

/// Seconds of the data-parallel gradient average ([`crate::dp::all_reduce_mean_grads`])
/// of each size of gradients over `group` (slowest rank, median).
pub fn grad_all_reduce_curve(
    group: &mut dyn Communicator,
    sizes: &[usize],
    runs: usize,
) -> Result<Curve> {
    let mut points = Vec::new();
    for &n in sizes {
        let params = [super::step::synthetic_param("grad", (n / 4).max(1))?];
        let flat = crate::flat::FlatBuffers::adopt(&params)?;
        let s = collective_median(group, 1, runs, |g| {
            crate::dp::all_reduce_mean_grads(&flat, g)
        })?;
        points.push((n, s));
    }
    curve(points)
}

/// memcpy bandwidth of one rank, bytes/s (best of a few 64 MiB copies).
pub fn memcpy_bandwidth() -> Result<f64> {
    let n = 64 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let (dt, ()) = seconds(|| {
            dst.copy_from_slice(&src);
            Ok(())
        })?;
        best = best.min(dt);
    }
    std::hint::black_box(&dst);
    Ok(n as f64 / best.max(1e-9))
}
