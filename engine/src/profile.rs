//! `strata profile`: times each layer kind (`embed`, `block`, `head`) forward and backward
//! on this machine's libtorch device (whole, or one tp rank's shard with its collectives:
//! [`profile_layers_tp`]), and returns a [`partitioner::Profile`] that
//! `parallel.partition: profile` uses to weight layers by measured time (torchgpipe's
//! `balance_by_time`).
//!
//! Invariant: every timing is the median of `runs` repetitions after `warmup` untimed
//! ones, each for one microbatch of the config's shape and micro-batch size; every block
//! has the same cost, so one block stands for all of them.

pub mod activation;
pub mod calibrate;
pub mod chunk;
pub mod comm;
pub mod matmul;
pub mod memory;
pub mod p2p;
pub mod step;
mod timing;

use crate::comm::local::LocalComm;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::sharding::TpRank;
use crate::model::{tokens_tensor, Grad, Model, ModelSpec, Pass};
use crate::rng::Rng;
use partitioner::profile::{LayerTiming, Profile};
use partitioner::{Arch, LayerKind, ModelShape};
use std::time::Instant;
use tch::{Kind, Tensor};

/// How many repetitions to time.
#[derive(Clone, Copy, Debug)]
pub struct ProfileOptions {
    pub warmup: usize,
    pub runs: usize,
    /// libtorch intra-op threads.
    pub threads: usize,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        ProfileOptions {
            warmup: 2,
            runs: 5,
            threads: 1,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// A `[b, seq_len]` batch of token ids drawn from Strata's keyed generator under `key`
/// (the same ids for the same key, micro-batch size and shape).
fn random_tokens(shape: &ModelShape, b: usize, key: u64) -> Result<Tensor> {
    let s = shape.seq_len;
    let mut rng = Rng::from_key(&[key, b as u64, s as u64]);
    let ids: Vec<i64> = (0..b * s)
        .map(|_| (rng.next_u64() % shape.vocab as u64) as i64)
        .collect();
    tokens_tensor(&ids, b, s)
}

/// Times one layer kind on tp rank `tp.rank` of `tp.size`, its collectives going through
/// `comm` (the tp group's communicator; every rank of it calls this together); returns
/// (forward, backward) medians in seconds.
fn time_layer(
    shape: &ModelShape,
    layer: LayerKind,
    micro_batch_size: usize,
    opts: &ProfileOptions,
    tp_rank: TpRank,
    tp: &mut dyn Communicator,
) -> Result<(f64, f64)> {
    let model = Model::new(&ModelSpec::new(shape.clone()), &[layer], 0, tp_rank)?;
    let (b, s, d) = (micro_batch_size, shape.seq_len, shape.d_model);
    let tokens = random_tokens(shape, b, 7)?;
    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    for rep in 0..opts.warmup + opts.runs {
        let hidden = Tensor::f_randn(
            [b as i64, s as i64, d as i64],
            (Kind::Float, tch::Device::Cpu),
        )
        .map_err(Error::torch("profile input"))?;
        let input = match layer {
            LayerKind::Embedding => &tokens,
            _ => &hidden,
        };
        let targets = (layer == LayerKind::Head).then_some(&tokens);
        let t0 = Instant::now();
        let out = model.forward(input, targets, tp, Pass::Train { split: false })?;
        let t1 = Instant::now();
        let grad = match layer {
            LayerKind::Head => Grad::LossScale(1.0),
            _ => Grad::Output(
                out.output
                    .f_ones_like()
                    .map_err(Error::torch("profile seed"))?,
            ),
        };
        model.backward(out, grad, tp)?;
        let t2 = Instant::now();
        if rep >= opts.warmup {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
        }
        for p in model.params() {
            let _ = p.tensor.grad().f_zero_();
        }
    }
    Ok((median(fwd), median(bwd)))
}

/// Measures `embed`, `block` and `head` of `shape` at `micro_batch_size` on the CPU.
pub fn profile_layers(
    shape: &ModelShape,
    micro_batch_size: usize,
    opts: &ProfileOptions,
) -> Result<Profile> {
    let mut single = LocalComm::group(1)
        .pop()
        .ok_or_else(|| Error::Internal("no local group".into()))?;
    profile_layers_tp(shape, micro_batch_size, opts, TpRank::SINGLE, &mut single)
}

/// [`profile_layers`] of tp rank `tp_rank`'s shard, its collectives through `tp` (the tp
/// group's communicator; collective over it): what the engine runs at that degree.
pub fn profile_layers_tp(
    shape: &ModelShape,
    micro_batch_size: usize,
    opts: &ProfileOptions,
    tp_rank: TpRank,
    tp: &mut dyn Communicator,
) -> Result<Profile> {
    if shape.arch != Arch::Gpt {
        return Err(Error::Config {
            path: "(profile)".into(),
            field: format!("model.arch = {}", shape.arch.name()),
            problem: "only GPT-style layers can be timed: the engine does not implement this architecture yet".into(),
            fix: "profile a model.arch: gpt config, or use parallel.partition: flops".into(),
        });
    }
    tch::set_num_threads(opts.threads.max(1) as i32);
    let mut layers = Vec::new();
    for layer in [LayerKind::Embedding, LayerKind::Block(0), LayerKind::Head] {
        let (fwd_s, bwd_s) = time_layer(shape, layer, micro_batch_size, opts, tp_rank, tp)?;
        layers.push(LayerTiming {
            kind: layer.family().to_string(),
            fwd_s,
            bwd_s,
            runs: opts.runs,
        });
    }
    Ok(Profile {
        device: "cpu".into(),
        threads: opts.threads.max(1),
        model: shape.clone(),
        micro_batch_size,
        dtype_bytes: 4,
        layers,
        calibration: Default::default(),
    })
}
