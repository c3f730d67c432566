//! `strata quantize CHECKPOINT --out DIR --scheme int8`: every linear weight of the model
//! becomes int8 codes and per-output-channel f32 scales ([`crate::quant`]); every other
//! model tensor is copied as it is.
//!
//! Invariant: each weight is quantised whole (so every layout slices the same codes and
//! scales), one tensor at a time: the f32 model is never held twice.

use super::Trained;
use crate::checkpoint::SavedTensor;
use crate::error::Result;
use crate::quant::{self, QuantInfo, Scheme};
use crate::shard::ShardSpec;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a quantisation wrote.
#[derive(Clone, Debug)]
pub struct Quantized {
    pub dir: PathBuf,
    pub scheme: Scheme,
    /// Linear weights quantised.
    pub weights: usize,
    /// Bytes of the source's and the output's files.
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// Quantises the checkpoint at `src` into a new checkpoint under `out`.
pub fn quantize_checkpoint(src: &Path, out: &Path, scheme: Scheme) -> Result<Quantized> {
    let mut t = Trained::open(src)?;
    if let Some(info) = QuantInfo::from_extra(&t.ckpt.manifest().extra)? {
        return Err(crate::Error::usage(
            "CHECKPOINT",
            format!(
                "{} is already quantised ({})",
                t.ckpt.dir().display(),
                info.scheme.name()
            ),
            "quantise the dense checkpoint it was made from",
        ));
    }
    let mut skeleton = t.skeleton()?;
    let linears: Vec<String> = skeleton
        .linears_mut()
        .iter()
        .map(|l| l.name.clone())
        .collect();
    let names: Vec<String> = skeleton.params().iter().map(|p| p.name.clone()).collect();
    drop(skeleton);
    let mut tensors = Vec::with_capacity(names.len() + linears.len());
    for name in &names {
        let full = t.ckpt.read_full(name)?;
        if !linears.contains(name) {
            tensors.push(whole(name.clone(), full));
            continue;
        }
        let (codes, scales) = match scheme {
            Scheme::Int8 => quant::quantize(&full)?,
        };
        tensors.push(whole(quant::codes_name(name), codes));
        tensors.push(whole(quant::scale_name(name), scales));
    }
    let info = QuantInfo::new(scheme, linears.clone());
    let extra = BTreeMap::from([(
        quant::MANIFEST_KEY.to_string(),
        serde_json::to_value(&info).map_err(|e| crate::Error::Internal(e.to_string()))?,
    )]);
    let dir = t.write(out, &tensors, extra)?;
    let after = crate::checkpoint::Checkpoint::open(&dir)?;
    let bytes_after = after.manifest().files.values().map(|f| f.bytes).sum();
    Ok(Quantized {
        dir,
        scheme,
        weights: linears.len(),
        bytes_before: t.bytes(),
        bytes_after,
    })
}

/// A whole tensor as saved by one rank.
pub fn whole(name: String, tensor: tch::Tensor) -> SavedTensor {
    let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
    SavedTensor {
        name,
        spec: ShardSpec::full(&shape),
        tensor,
    }
}
