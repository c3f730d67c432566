//! The resident memory of stashed activations, measured: one transformer block's forward
//! is run several times at a micro-batch size, keeping every graph for a later backward
//! (as a pipeline keeps its microbatches in flight), and the growth of the process's
//! resident set per stashed forward is compared with what [`partitioner::activation`]
//! counts. The ratio is the allocator's overhead (glibc keeps freed temporaries as holes
//! between the stashed tensors), which the memory model applies.
//!
//! Invariant: measured on a chain of two blocks (so one block's allocations can fill the
//! holes of the one before, as in a chunk), after two full forward and backward passes
//! (so the allocator's thresholds have settled, as after a run's first step), as the
//! slope between two stash depths (so holes left by the warm-up do not count). Call it
//! before anything else allocates much: holes left by earlier work would hide growth.

use super::memory::rss_bytes;
use crate::comm::local::LocalComm;
use crate::comm::Communicator;
use crate::error::{Error, Result};
use crate::model::sharding::TpRank;
use crate::model::{Forward, Grad, Model, ModelSpec, Pass};
use partitioner::activation::{layer_activation_bytes, ActivationPolicy, ActivationShape};
use partitioner::profile::ActivationFootprint;
use partitioner::{LayerKind, ModelShape};
use tch::{Kind, Tensor};

fn single() -> Result<LocalComm> {
    LocalComm::group(1)
        .pop()
        .ok_or_else(|| Error::Internal("no local group".into()))
}

fn forward(
    model: &Model,
    shape: &ModelShape,
    b: usize,
    tp: &mut dyn Communicator,
) -> Result<Forward> {
    let x = Tensor::f_randn(
        [b as i64, shape.seq_len as i64, shape.d_model as i64],
        (Kind::Float, tch::Device::Cpu),
    )
    .map_err(Error::torch("footprint input"))?;
    model.forward(&x, None, tp, Pass::Train { split: false })
}

fn backward(model: &Model, stash: Vec<Forward>, tp: &mut dyn Communicator) -> Result<()> {
    for f in stash {
        let seed = f
            .output
            .f_ones_like()
            .map_err(Error::torch("footprint seed"))?;
        model.backward(f, Grad::Output(seed), tp)?;
    }
    Ok(())
}

/// Runs what every training rank runs once (a forward and backward of a two-layer model,
/// an AdamW step) on a tiny model, so that libtorch's lazily created state (autograd,
/// thread pools, kernels' buffers) is resident before an idle rank's memory is read.
pub fn warm_up() -> Result<()> {
    let tiny = ModelShape::gpt(8, 4, 8, 2, 1, 16);
    let layers = [LayerKind::Embedding, LayerKind::Block(0), LayerKind::Head];
    let model = Model::new(&ModelSpec::new(tiny), &layers, 0, TpRank::SINGLE)?;
    let mut tp = single()?;
    let ids = Tensor::f_zeros([1, 4], (Kind::Int64, tch::Device::Cpu))
        .map_err(Error::torch("warm-up tokens"))?;
    let fwd = model.forward(&ids, Some(&ids), &mut tp, Pass::Train { split: false })?;
    model.backward(fwd, Grad::LossScale(1.0), &mut tp)?;
    let flat = crate::flat::FlatBuffers::adopt(model.params())?;
    let mut opt = crate::optim::AdamW::new(
        &flat,
        crate::optim::AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
    )?;
    opt.step(&flat, 1e-3)
}

/// Measures the resident bytes per stashed block forward at micro-batch size `b`.
pub fn block_footprint(shape: &ModelShape, b: usize) -> Result<ActivationFootprint> {
    let blocks = 2;
    let layers = [LayerKind::Block(0), LayerKind::Block(1)];
    let model = Model::new(&ModelSpec::new(shape.clone()), &layers, 0, TpRank::SINGLE)?;
    let mut tp = single()?;
    for _ in 0..2 {
        let f = forward(&model, shape, b, &mut tp)?;
        backward(&model, vec![f], &mut tp)?;
    }
    let (shallow, deep) = (3, 9);
    let mut stash = Vec::new();
    for _ in 0..shallow {
        stash.push(forward(&model, shape, b, &mut tp)?);
    }
    let before = rss_bytes();
    for _ in shallow..deep {
        stash.push(forward(&model, shape, b, &mut tp)?);
    }
    let after = rss_bytes();
    backward(&model, stash, &mut tp)?;
    let modeled = layer_activation_bytes(
        &ActivationShape {
            shape: shape.clone(),
            micro_batch_size: b,
            dtype_bytes: 4,
            tp: 1,
            padded_vocab: shape.vocab,
        },
        LayerKind::Block(0),
        ActivationPolicy::default(),
    );
    Ok(ActivationFootprint {
        micro_batch_size: b,
        tp: 1,
        policy: ActivationPolicy::default(),
        measured_bytes: after.saturating_sub(before) / (blocks * (deep - shallow)) as u64,
        modeled_bytes: modeled,
    })
}
