//! Masks of a pruned checkpoint in a training run: loaded with `train.resume` (each rank
//! reads the slice of `W.mask` its parameter's shard spec names), applied after every
//! optimizer step so pruned weights stay exactly zero while the rest is fine-tuned, and
//! saved again with every checkpoint the run writes (with the pruning record), so the
//! fine-tuned checkpoint is still a pruned one.
//!
//! Invariant: a parameter with a mask is zero wherever its mask is zero after
//! [`Masks::apply`]; parameters without masks are untouched.

use super::prune::{mask_name, PruneInfo, MANIFEST_KEY};
use crate::checkpoint::{Checkpoint, SavedTensor};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::Param;
use tch::{Kind, Tensor};

/// This rank's masks, by parameter index.
#[derive(Default)]
pub struct Masks {
    entries: Vec<(usize, Tensor)>,
    info: Option<PruneInfo>,
}

impl Masks {
    /// The masks of `train.resume`'s checkpoint for `params` (none if it is not pruned).
    pub fn for_resume(cfg: &Config, params: &[Param]) -> Result<Masks> {
        let Some(dir) = cfg.resume_from()? else {
            return Ok(Masks::default());
        };
        let mut ck = Checkpoint::open(&dir)?;
        let Some(info) = PruneInfo::from_extra(&ck.manifest().extra)? else {
            return Ok(Masks::default());
        };
        let mut entries = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let name = mask_name(&p.name);
            if !ck.contains(&name) {
                continue;
            }
            let mask = Tensor::f_zeros(p.tensor.size(), (Kind::Uint8, p.tensor.device()))
                .map_err(Error::torch("allocating a mask"))?;
            ck.read_into(&name, &mask, &p.spec)?;
            entries.push((i, mask));
        }
        Ok(Masks {
            entries,
            info: Some(info),
        })
    }

    /// Zeroes every masked entry of `params`.
    pub fn apply(&self, params: &[Param]) -> Result<()> {
        tch::no_grad(|| {
            for (i, m) in &self.entries {
                let _ = params[*i].tensor.shallow_clone().f_mul_(m)?;
            }
            Ok(())
        })
        .map_err(Error::torch("applying pruning masks"))
    }

    /// The masks of `params` this rank owns, named for a checkpoint.
    pub fn saved(&self, params: &[Param]) -> Vec<SavedTensor> {
        self.entries
            .iter()
            .filter(|(i, _)| params[*i].owner)
            .map(|(i, m)| SavedTensor {
                name: mask_name(&params[*i].name),
                tensor: m.shallow_clone(),
                spec: params[*i].spec.clone(),
            })
            .collect()
    }

    /// The manifest `extra` entry to save with them.
    pub fn extra(&self) -> Option<(String, serde_json::Value)> {
        let info = self.info.as_ref()?;
        Some((MANIFEST_KEY.to_string(), serde_json::to_value(info).ok()?))
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
