//! Measured costs of this machine (`strata profile` writes them; `parallel.profile`,
//! `strata plan` and `strata plan --auto` read them).
//!
//! * Layer timings of one process, so that the split can weight layers by measured time
//!   instead of FLOPs, as torchgpipe's `balance_by_time` does (`layers`).
//! * The [`Calibration`] measured on the real ranks under MPI: layer timings with every
//!   rank busy, the transport's point-to-point and all-reduce [`Curve`]s, the sgemm peak,
//!   the optimizer's cost and the memory of an idle rank. Profiles written before it
//!   existed still load (every part defaults to absent).
//!
//! Invariant: a [`Profile`] accepted by [`Profile::check`] was measured on a model of the
//! same shape and micro-batch size as the one being planned, and has a finite,
//! non-negative forward and backward time for each of `embed`, `block` and `head`.

mod calibration;
mod curve;

pub use calibration::{
    interpolate_depth, ActivationFootprint, Calibration, ChunkScale, GroupCurve, LayerSet,
    MatmulPeak, P2pProfile, ProcessMemory, StepCosts,
};
pub use curve::{Curve, CurvePoint};

use crate::error::{Error, Result};
use crate::graph::{LayerKind, ModelShape};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Median time of one layer kind for one microbatch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerTiming {
    /// `embed`, `block` or `head`.
    pub kind: String,
    pub fwd_s: f64,
    pub bwd_s: f64,
    /// Timed repetitions behind the medians.
    pub runs: usize,
}

/// A profile file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Where it was measured (`cpu`, `cuda:0`), and the libtorch threads used.
    pub device: String,
    pub threads: usize,
    pub model: ModelShape,
    pub micro_batch_size: usize,
    pub dtype_bytes: usize,
    pub layers: Vec<LayerTiming>,
    /// Measurements on the real ranks (absent in profiles from before it existed).
    #[serde(default, skip_serializing_if = "Calibration::is_empty")]
    pub calibration: Calibration,
}

impl Profile {
    /// Reads a profile JSON file.
    pub fn load(path: &Path) -> Result<Profile> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::BadProfile {
            path: shown.clone(),
            reason: format!("cannot read it: {e}"),
            fix: "run `strata profile CONFIG --out PATH` and set parallel.profile to PATH".into(),
        })?;
        serde_json::from_str(&text).map_err(|e| Error::BadProfile {
            path: shown,
            reason: format!("not a profile: {e}"),
            fix: "regenerate it with `strata profile CONFIG`".into(),
        })
    }

    /// Checks the profile was measured on a model of `shape` (any micro-batch size);
    /// `path` is for messages.
    pub fn check_model(&self, path: &str, shape: &ModelShape) -> Result<()> {
        if self.model != *shape {
            return Err(Error::BadProfile {
                path: path.to_string(),
                reason: format!(
                    "measured on model {:?}, but the config's model is {:?}",
                    self.model, shape
                ),
                fix: "rerun `strata profile` on this config".into(),
            });
        }
        Ok(())
    }

    /// Checks the profile matches `shape` and `micro_batch_size`; `path` is for messages.
    pub fn check(&self, path: &str, shape: &ModelShape, micro_batch_size: usize) -> Result<()> {
        let bad = |reason: String| Error::BadProfile {
            path: path.to_string(),
            reason,
            fix: "rerun `strata profile` on this config".into(),
        };
        self.check_model(path, shape)?;
        if self.micro_batch_size != micro_batch_size {
            return Err(bad(format!(
                "measured at micro_batch_size {}, but parallel.micro_batch_size = {}",
                self.micro_batch_size, micro_batch_size
            )));
        }
        for kind in ["embed", "block", "head"] {
            match self.layers.iter().find(|l| l.kind == kind) {
                None => return Err(bad(format!("no timing for `{kind}`"))),
                Some(l)
                    if !(l.fwd_s.is_finite() && l.bwd_s.is_finite())
                        || l.fwd_s < 0.0
                        || l.bwd_s < 0.0 =>
                {
                    return Err(bad(format!("bad timing for `{kind}`")))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Forward and backward seconds of `layer` (by its family).
    pub fn time_of(&self, layer: LayerKind) -> (f64, f64) {
        self.layers
            .iter()
            .find(|l| l.kind == layer.family())
            .map_or((0.0, 0.0), |l| (l.fwd_s, l.bwd_s))
    }
}
