//! `strata profile`'s measurements on the real ranks (run by every rank of an MPI job,
//! `strata profile-worker`): the memory of an idle rank, layer timings with every rank
//! busy at each micro-batch size (at tp = 1, and for every tp degree the world allows
//! with each tp group running its shards and their collectives through its communicator), the transport's point-to-point and all-reduce curves for
//! every tensor- and data-parallel group size the world allows, the sgemm peak and the
//! per-step optimizer costs. Returns a [`Calibration`] for `Profile::calibration`.
//!
//! Invariant: collective over the world (every rank calls it with the same arguments);
//! the result is the same on every rank, and rank 0 writes it.

use super::chunk::{self, chunk_scale, depth_curve, split_scale, stash_curve};
use super::{
    activation, comm, matmul, memory, profile_layers, profile_layers_tp, step, ProfileOptions,
};
use crate::comm::groups::ParallelComms;
use crate::comm::local::LocalComm;
use crate::comm::Communicator;
use crate::error::Result;
use crate::model::sharding::TpRank;
use partitioner::mesh::Mesh;
use partitioner::profile::{
    Calibration, ChunkScale, GroupCurve, LayerSet, LayerTiming, P2pProfile, ProcessMemory,
};
use partitioner::tp::check_divisibility;
use partitioner::ModelShape;

/// What to measure.
#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    /// Timed repetitions (more for small messages).
    pub runs: usize,
    /// libtorch intra-op threads per rank (the config's `train.threads`).
    pub threads: usize,
    /// Micro-batch sizes whose layer timings are measured.
    pub micro_batch_sizes: Vec<usize>,
    /// Micro-batch size of the activation footprint measurement (the config's).
    pub footprint_micro_batch_size: usize,
    /// Most microbatches a chunk can hold in flight (the config's microbatches).
    pub max_stash: usize,
    /// Largest message of the curves, bytes.
    pub max_message_bytes: usize,
    /// Largest gradient all-reduce, bytes (the model's gradients).
    pub max_grad_bytes: usize,
}

fn sizes(shape: &ModelShape, o: &CalibrateOptions) -> Vec<usize> {
    let mut v: Vec<usize> = (0..)
        .map(|k| 4usize << (2 * k))
        .take_while(|&n| n <= o.max_message_bytes)
        .collect();
    // The exact pipeline and tensor-parallel message sizes of the model.
    for &b in &o.micro_batch_sizes {
        v.push(4 * b * shape.seq_len * shape.d_model);
    }
    v.sort_unstable();
    v.dedup();
    v
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|k| n.is_multiple_of(*k)).collect()
}

/// Every rank's timings of the same layers, averaged over the ranks.
fn averaged(world: &mut dyn Communicator, layers: Vec<LayerTiming>) -> Result<Vec<LayerTiming>> {
    let mut v: Vec<f64> = layers.iter().flat_map(|l| [l.fwd_s, l.bwd_s]).collect();
    world.all_reduce_sum(&mut v)?;
    let n = world.size() as f64;
    Ok(layers
        .into_iter()
        .zip(v.chunks(2))
        .map(|(l, t)| LayerTiming {
            fwd_s: t[0] / n,
            bwd_s: t[1] / n,
            ..l
        })
        .collect())
}

/// Measures the [`Calibration`]; `groups` cuts the communicators of a mesh out of the
/// world (collective). Call it first thing in the process: the idle rank's memory is
/// read on entry.
pub fn calibrate(
    shape: &ModelShape,
    world: &mut dyn Communicator,
    groups: &mut dyn FnMut(Mesh) -> Result<ParallelComms>,
    o: &CalibrateOptions,
) -> Result<Calibration> {
    tch::set_num_threads(o.threads.max(1) as i32);
    activation::warm_up()?;
    world.barrier()?;
    let memory = ProcessMemory {
        baseline_bytes: memory::rss_bytes(),
        machine_bytes: memory::machine_bytes(),
    };
    // First, while the heap is fresh (see `activation`).
    let cal_footprint = activation::block_footprint(shape, o.footprint_micro_batch_size)?;
    let w = world.size();
    let msg = sizes(shape, o);
    let mut cal = Calibration {
        world: w,
        memory: Some(memory),
        activation_footprint: vec![cal_footprint],
        ..Calibration::default()
    };
    cal.matmul = Some(matmul::sgemm_peak(
        world,
        &[256, 512, 1024],
        o.threads,
        o.runs,
    )?);
    for &mbs in &o.micro_batch_sizes {
        cal.layer_sets.push(tp1_layer_set(shape, world, mbs, o)?);
    }
    cal.step = Some(step::step_costs(world, o.runs)?);
    let (send_overhead, recv_overhead) = comm::wire_overheads(world, &msg, o.runs)?;
    if w > 1 {
        let stall_sizes: Vec<usize> = msg.iter().copied().filter(|&n| n >= 1024).collect();
        cal.p2p = Some(P2pProfile {
            one_way: comm::p2p_one_way(world, &msg, o.runs)?,
            send_overhead,
            recv_overhead,
            stalls_above_bytes: comm::stall_threshold(world, &stall_sizes)?,
            memcpy_bytes_s: comm::memcpy_bandwidth()?,
        });
    }
    let mut grad_sizes: Vec<usize> = [1 << 10, 1 << 16, 1 << 20, 4 << 20, 16 << 20]
        .into_iter()
        .filter(|&n| n < o.max_grad_bytes)
        .chain([o.max_grad_bytes / 2, o.max_grad_bytes])
        .filter(|&n| n > 0)
        .collect();
    grad_sizes.sort_unstable();
    grad_sizes.dedup();
    for g in divisors(w).into_iter().filter(|&g| g > 1) {
        // tp groups are consecutive ranks; dp groups are strided by the tp degree.
        let mut tp = groups(Mesh::new(w / g, g, 1).map_err(plan_err)?)?;
        if check_divisibility(shape, g).is_ok() {
            let sets = tp_layer_sets(shape, world, tp.tp.as_mut(), o)?;
            cal.layer_sets.extend(sets);
        }
        let mut curve = GroupCurve {
            group: "tp".into(),
            size: g,
            all_reduce: comm::all_reduce_curve(tp.tp.as_mut(), &msg, o.runs)?,
            tensor_all_reduce: Some(comm::tensor_all_reduce_curve(tp.tp.as_mut(), &msg, o.runs)?),
            grad_all_reduce: None,
        };
        if g == w {
            // One group of every rank: it is also the dp group.
            curve.grad_all_reduce = Some(comm::grad_all_reduce_curve(
                tp.tp.as_mut(),
                &grad_sizes,
                o.runs,
            )?);
            cal.all_reduce.push(curve);
            continue;
        }
        cal.all_reduce.push(curve);
        let mut dp = groups(Mesh::new(1, w / g, g).map_err(plan_err)?)?;
        cal.all_reduce.push(GroupCurve {
            group: "dp".into(),
            size: g,
            all_reduce: comm::all_reduce_curve(dp.dp.as_mut(), &msg, o.runs)?,
            tensor_all_reduce: None,
            grad_all_reduce: Some(comm::grad_all_reduce_curve(
                dp.dp.as_mut(),
                &grad_sizes,
                o.runs,
            )?),
        });
    }
    world.barrier()?;
    Ok(cal)
}

fn layer_options(o: &CalibrateOptions) -> ProfileOptions {
    ProfileOptions {
        runs: o.runs,
        threads: o.threads,
        ..ProfileOptions::default()
    }
}

/// Layer timings of every tp group running its shards at once, each through its own
/// communicator (the collectives included, as the engine runs them), at each micro-batch
/// size; averaged over the world (collective).
fn tp_layer_sets(
    shape: &ModelShape,
    world: &mut dyn Communicator,
    tp: &mut dyn Communicator,
    o: &CalibrateOptions,
) -> Result<Vec<LayerSet>> {
    let tp_rank = TpRank {
        rank: tp.rank().0,
        size: tp.size(),
    };
    let mut sets = Vec::new();
    for &mbs in &o.micro_batch_sizes {
        world.barrier()?;
        let prof = profile_layers_tp(shape, mbs, &layer_options(o), tp_rank, tp)?;
        let curve = if mbs == o.footprint_micro_batch_size {
            let depths = chunk::depths(shape.n_layers);
            let opts = curve_options(o);
            depth_curve(shape, mbs, &opts, &prof.layers, &depths, tp_rank, tp)?
        } else {
            Vec::new()
        };
        sets.push(LayerSet {
            micro_batch_size: mbs,
            tp: tp_rank.size,
            concurrent: world.size(),
            layers: averaged(world, prof.layers)?,
            block_split: None,
            collectives: true,
            chunk_scale: None,
            chunk_depths: averaged_curve(world, curve)?,
            split_scale: None,
            stash_scale: Vec::new(),
        });
    }
    Ok(sets)
}

/// The tp = 1 [`LayerSet`] at `mbs`, every rank timing at once: layer timings, the chunk
/// ratio, and at the config's micro-batch size the depth curve and the zero-bubble split
/// (collective over `world`).
fn tp1_layer_set(
    shape: &ModelShape,
    world: &mut dyn Communicator,
    mbs: usize,
    o: &CalibrateOptions,
) -> Result<LayerSet> {
    world.barrier()?;
    let prof = profile_layers(shape, mbs, &layer_options(o))?;
    let mut single = LocalComm::group(1)
        .pop()
        .ok_or_else(|| crate::Error::Internal("no local group".into()))?;
    let (mut depths, mut split, mut stash) = (Vec::new(), None, Vec::new());
    let scale = if mbs == o.footprint_micro_batch_size {
        let blocks = chunk::depths(shape.n_layers);
        let curve_opts = curve_options(o);
        depths = depth_curve(
            shape,
            mbs,
            &curve_opts,
            &prof.layers,
            &blocks,
            TpRank::SINGLE,
            &mut single,
        )?;
        split = Some(split_scale(shape, mbs, &curve_opts, &mut single)?);
        let stashes = chunk::stash_depths(o.max_stash);
        // As many repetitions as the depth curve: with two, the median is the larger.
        stash = stash_curve(shape, mbs, &curve_opts, &stashes, &mut single)?;
        let reference = shape.n_layers.clamp(1, chunk::REFERENCE_BLOCKS);
        depths
            .iter()
            .find(|c| c.blocks == reference)
            .map_or((1.0, 1.0), |c| (c.fwd, c.bwd))
    } else {
        chunk_scale(shape, mbs, &layer_options(o), &prof.layers, &mut single)?
    };
    let mut v = vec![scale.0, scale.1];
    v.extend(split.iter().flat_map(|&(i, w)| [i, w]));
    average(world, &mut v)?;
    Ok(LayerSet {
        micro_batch_size: mbs,
        tp: 1,
        concurrent: world.size(),
        layers: averaged(world, prof.layers)?,
        block_split: None,
        collectives: false,
        chunk_scale: Some((v[0], v[1])),
        chunk_depths: averaged_curve(world, depths)?,
        split_scale: split.map(|_| (v[2], v[3])),
        stash_scale: averaged_curve(world, stash)?,
    })
}

/// Fewer repetitions for the chunk curves: a whole-model chunk takes a second a run.
fn curve_options(o: &CalibrateOptions) -> ProfileOptions {
    ProfileOptions {
        warmup: 1,
        runs: o.runs.clamp(1, 3),
        threads: o.threads,
    }
}

/// Every rank's `v`, averaged over the world (collective).
fn average(world: &mut dyn Communicator, v: &mut [f64]) -> Result<()> {
    world.all_reduce_sum(v)?;
    let n = world.size() as f64;
    v.iter_mut().for_each(|x| *x /= n);
    Ok(())
}

/// Every rank's depth curve (the same depths on every rank), averaged (collective).
fn averaged_curve(world: &mut dyn Communicator, curve: Vec<ChunkScale>) -> Result<Vec<ChunkScale>> {
    let mut v: Vec<f64> = curve.iter().flat_map(|c| [c.fwd, c.bwd]).collect();
    average(world, &mut v)?;
    Ok(curve
        .into_iter()
        .zip(v.chunks(2))
        .map(|(c, r)| ChunkScale {
            fwd: r[0],
            bwd: r[1],
            ..c
        })
        .collect())
}

fn plan_err(e: partitioner::Error) -> crate::error::Error {
    crate::error::Error::Internal(format!("profile mesh: {e}"))
}
