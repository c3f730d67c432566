//! Validation loss of a whole checkpoint model on one rank (pruning's sensitivity scan and
//! `strata compress-report`): the checkpoint config's text file, its last 10% split into
//! batches exactly as training's evaluation draws them (keyed by the config's seed).
//!
//! Invariant: the same checkpoint config gives the same batches, so losses of a dense
//! model and of its compressed variants are comparable.

use super::Trained;
use crate::checkpoint::Checkpoint;
use crate::comm::local::LocalComm;
use crate::data::{DataSource, Dataset, Split};
use crate::error::{Error, Result};
use crate::generate::load::CheckpointWeights;
use crate::generate::{ModelSetup, Source};
use crate::model::{tokens_tensor, Model, Pass};
use partitioner::mesh::MeshCoord;
use tch::Tensor;

/// Validation batches: `(inputs, targets)`, each `[rows, seq_len]`.
pub struct ValSet {
    pub batches: Vec<(Tensor, Tensor)>,
}

impl ValSet {
    /// `batches` batches of the training run's micro-batch size from `t`'s data file; the
    /// flag named in errors is `flag` (the command's reason to need the data).
    pub fn load(t: &Trained, batches: usize, flag: &str) -> Result<ValSet> {
        let path = t.config.data_path();
        let source = t.config.data_source().map_err(|e| {
            Error::usage(
                flag,
                format!("needs the validation split of the checkpoint's train.data: {e}"),
                "keep the training text at the path the checkpoint's config names",
            )
        })?;
        if matches!(source, DataSource::Random { .. }) || path.is_none() {
            return Err(Error::usage(
                flag,
                "the checkpoint was trained on random tokens: it has no validation text",
                "use a checkpoint trained on a text file",
            ));
        }
        let data = Dataset::load(&source, t.config.train.seed)?;
        let rows = *t.config.parallel.micro_batch_size;
        let seq = t.spec.shape.seq_len;
        let batches = (0..batches.max(1))
            .map(|b| {
                let (x, y) = data.batch(Split::Val, 0, b * rows, rows, seq);
                Ok((tokens_tensor(&x, rows, seq)?, tokens_tensor(&y, rows, seq)?))
            })
            .collect::<Result<_>>()?;
        Ok(ValSet { batches })
    }

    /// Mean cross-entropy of `model` (a whole model on one rank) over the batches.
    pub fn loss(&self, model: &Model) -> Result<f64> {
        let mut tp = LocalComm::group(1)
            .pop()
            .ok_or_else(|| Error::Internal("no local communicator".into()))?;
        let mut sum = 0.0;
        for (x, y) in &self.batches {
            let f = tch::no_grad(|| model.forward(x, Some(y), &mut tp, Pass::Eval))?;
            sum += f.output.double_value(&[]);
        }
        Ok(sum / self.batches.len() as f64)
    }
}

/// The whole model of the checkpoint at `dir` on one rank (int8 linears stay int8).
pub fn whole_model(t: &Trained) -> Result<Model> {
    let setup = ModelSetup::new(t.spec.clone(), 1, 1)?;
    let mut w = CheckpointWeights::new(Checkpoint::open(t.ckpt.dir())?)?;
    let coord = MeshCoord {
        pp: 0,
        dp: 0,
        tp: 0,
    };
    setup.build_chunk(coord, &mut Source::Trained(&mut w))
}
