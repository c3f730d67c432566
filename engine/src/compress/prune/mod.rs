//! `strata prune CHECKPOINT --out DIR --sparsity S --method M`: unstructured and 2:4
//! pruning of the blocks' linear weights (attention qkv and projection, the MLP), with
//! the masks stored in the checkpoint.
//!
//! * [`select`]: the masks of each method (magnitude per layer or global, 2:4);
//! * [`sensitivity`]: the validation-loss scan and the per-layer allocation;
//! * [`neurons`]: structured pruning of MLP hidden units (`--method neurons`), which
//!   writes a smaller dense checkpoint with a per-layer `d_ff` instead of masks.
//!
//! The output keeps every tensor of the source: pruned weights are multiplied by their
//! mask, and each pruned weight `W` gets `W.mask` (`Uint8`, `W`'s shape, 1 = kept) with
//! `W`'s global name and layout, so every layout reads its own slice. The AdamW moments
//! and trainer state are kept (moments masked too), so `train.resume` continues training
//! from the pruned checkpoint; the trainer keeps masked weights at zero after every
//! optimizer step ([`super::mask::Masks`]). The manifest's `extra.pruning`
//! ([`PruneInfo`]) records the method, target and per-weight sparsity. Embeddings, norms,
//! biases and the LM head are never pruned.
//!
//! Invariant: a weight pruned twice keeps both masks (the new mask is AND-ed with the
//! old one).

pub mod neurons;
pub mod select;
pub mod sensitivity;

use super::Trained;
use crate::checkpoint::SavedTensor;
use crate::error::{Error, Result};
use crate::quant::QuantInfo;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The manifest `extra` key of the pruning record.
pub const MANIFEST_KEY: &str = "pruning";

/// Prefixes of optimizer-state tensors that follow a parameter.
const MOMENTS: [&str; 2] = ["optim.exp_avg.", "optim.exp_avg_sq."];

/// How weights are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Method {
    #[serde(rename = "magnitude")]
    Magnitude,
    #[serde(rename = "2:4")]
    TwoFour,
    #[serde(rename = "sensitivity")]
    Sensitivity,
    /// Structured: whole MLP hidden units ([`neurons`]); no masks.
    #[serde(rename = "neurons")]
    Neurons,
}

impl Method {
    /// Parses `--method`.
    pub fn parse(s: &str) -> Result<Method> {
        match s {
            "magnitude" => Ok(Method::Magnitude),
            "2:4" => Ok(Method::TwoFour),
            "sensitivity" => Ok(Method::Sensitivity),
            "neurons" => Ok(Method::Neurons),
            other => Err(Error::usage(
                "--method",
                format!("unknown pruning method `{other}`"),
                "use magnitude, 2:4, sensitivity or neurons",
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Magnitude => "magnitude",
            Method::TwoFour => "2:4",
            Method::Sensitivity => "sensitivity",
            Method::Neurons => "neurons",
        }
    }
}

/// Magnitude pruning's ranking: per weight, or over the whole model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Layer,
    Global,
}

impl Scope {
    /// Parses `--scope`.
    pub fn parse(s: &str) -> Result<Scope> {
        match s {
            "layer" => Ok(Scope::Layer),
            "global" => Ok(Scope::Global),
            other => Err(Error::usage(
                "--scope",
                format!("unknown scope `{other}`"),
                "use layer (each weight pruned to the sparsity) or global (one ranking over the model)",
            )),
        }
    }
}

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct PruneOptions {
    pub method: Method,
    /// Share of the pruned weights' entries set to zero; 2:4 is always 0.5.
    pub sparsity: Option<f64>,
    /// Magnitude only (default layer).
    pub scope: Option<Scope>,
    /// Sensitivity only: validation batches per loss evaluation.
    pub eval_batches: usize,
}

impl PruneOptions {
    /// The target sparsity after checking the flags against the method.
    pub fn target(&self) -> Result<f64> {
        if self.scope.is_some() && self.method != Method::Magnitude {
            return Err(Error::usage(
                "--scope",
                format!(
                    "--scope applies to magnitude pruning, not {}",
                    self.method.name()
                ),
                "leave --scope out",
            ));
        }
        if self.method == Method::TwoFour {
            return match self.sparsity {
                None => Ok(0.5),
                Some(s) if (s - 0.5).abs() < 1e-9 => Ok(0.5),
                Some(s) => Err(Error::usage(
                    "--sparsity",
                    format!("2:4 prunes exactly half of every weight, not {s}"),
                    "leave --sparsity out (or pass 0.5) with --method 2:4",
                )),
            };
        }
        match self.sparsity {
            Some(s) if s > 0.0 && s < 1.0 => Ok(s),
            Some(s) => Err(Error::usage(
                "--sparsity",
                format!("{s} is outside (0, 1)"),
                "pass the share of weights to remove, e.g. --sparsity 0.5",
            )),
            None => Err(Error::usage(
                "--sparsity",
                format!("--method {} needs a target sparsity", self.method.name()),
                "pass e.g. --sparsity 0.5",
            )),
        }
    }
}

/// One pruned weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrunedWeight {
    pub name: String,
    pub params: usize,
    pub sparsity: f64,
}

/// What `extra.pruning` of a pruned checkpoint's manifest says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PruneInfo {
    pub method: Method,
    pub scope: Scope,
    /// The requested sparsity over the pruned weights.
    pub target: f64,
    /// The sparsity reached over the pruned weights.
    pub sparsity: f64,
    pub weights: Vec<PrunedWeight>,
}

impl PruneInfo {
    /// Reads the record from a manifest's `extra`, if any.
    pub fn from_extra(extra: &BTreeMap<String, serde_json::Value>) -> Result<Option<PruneInfo>> {
        extra
            .get(MANIFEST_KEY)
            .map(|v| {
                serde_json::from_value(v.clone()).map_err(|e| {
                    Error::Internal(format!("manifest extra.{MANIFEST_KEY} is malformed: {e}"))
                })
            })
            .transpose()
    }
}

/// Name of the mask of weight `w`.
pub fn mask_name(w: &str) -> String {
    format!("{w}.mask")
}

/// What a pruning wrote.
#[derive(Debug)]
pub struct Pruned {
    pub dir: PathBuf,
    pub info: PruneInfo,
    /// Sensitivity only: the scan (per weight) and the dense validation loss.
    pub scan: Option<sensitivity::Scan>,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// The weights pruning applies to: every block's linear weights, in model order.
pub fn prunable(t: &Trained) -> Result<Vec<String>> {
    let mut skeleton = t.skeleton()?;
    Ok(skeleton
        .linears_mut()
        .iter()
        .map(|l| l.name.clone())
        .filter(|n| n.starts_with("block."))
        .collect())
}

/// Prunes the checkpoint at `src` into a new checkpoint under `out`.
pub fn prune_checkpoint(src: &Path, out: &Path, opts: &PruneOptions) -> Result<Pruned> {
    let target = opts.target()?;
    if opts.method == Method::Neurons {
        return Err(Error::Internal(
            "neuron pruning is structural: call neurons::prune_neurons".into(),
        ));
    }
    let mut t = Trained::open(src)?;
    if QuantInfo::from_extra(&t.ckpt.manifest().extra)?.is_some() {
        return Err(Error::usage(
            "CHECKPOINT",
            format!(
                "{} is quantised; pruning needs the dense weights",
                t.ckpt.dir().display()
            ),
            "prune the dense checkpoint, then quantise the pruned one",
        ));
    }
    let names = prunable(&t)?;
    let weights: Vec<Tensor> = names
        .iter()
        .map(|n| t.ckpt.read_full(n))
        .collect::<Result<_>>()?;
    let old = PruneInfo::from_extra(&t.ckpt.manifest().extra)?;
    let (masks, scan) = masks(&t, &names, &weights, opts, target)?;
    let masks: Vec<Tensor> = match &old {
        None => masks,
        Some(_) => names
            .iter()
            .zip(masks)
            .map(|(n, m)| {
                let before = t.ckpt.read_full(&mask_name(n))?;
                m.f_logical_and(&before)
                    .and_then(|x| x.f_to_kind(Kind::Uint8))
                    .map_err(Error::torch("combining masks"))
            })
            .collect::<Result<_>>()?,
    };
    let info = info(opts, target, &names, &masks);
    let tensors = output_tensors(&mut t, &names, &weights, &masks)?;
    let extra = BTreeMap::from([(
        MANIFEST_KEY.to_string(),
        serde_json::to_value(&info).map_err(|e| Error::Internal(e.to_string()))?,
    )]);
    let state = t.ckpt.manifest().train_state.clone();
    let dir = t.write_with_state(out, &tensors, extra, state)?;
    let after = crate::checkpoint::Checkpoint::open(&dir)?;
    Ok(Pruned {
        dir,
        info,
        scan,
        bytes_before: t.bytes(),
        bytes_after: after.manifest().files.values().map(|f| f.bytes).sum(),
    })
}

/// The keep-mask of every weight in `names` by the method.
fn masks(
    t: &Trained,
    names: &[String],
    weights: &[Tensor],
    opts: &PruneOptions,
    target: f64,
) -> Result<(Vec<Tensor>, Option<sensitivity::Scan>)> {
    match (opts.method, opts.scope.unwrap_or(Scope::Layer)) {
        (Method::Magnitude, Scope::Layer) => Ok((
            weights
                .iter()
                .map(|w| select::magnitude(w, target))
                .collect::<Result<_>>()?,
            None,
        )),
        (Method::Magnitude, Scope::Global) => {
            let refs: Vec<&Tensor> = weights.iter().collect();
            Ok((select::global_magnitude(&refs, target)?, None))
        }
        (Method::TwoFour, _) => {
            if let Some((n, w)) = names
                .iter()
                .zip(weights)
                .find(|(_, w)| w.size()[0] % 4 != 0)
            {
                return Err(Error::usage(
                    "--method",
                    format!(
                        "2:4 needs every pruned weight's input size divisible by 4, but {n} has {}",
                        w.size()[0]
                    ),
                    "use --method magnitude for this model",
                ));
            }
            Ok((
                weights
                    .iter()
                    .map(select::two_four)
                    .collect::<Result<_>>()?,
                None,
            ))
        }
        (Method::Sensitivity, _) => {
            let scan = sensitivity::scan(t, names, weights, opts.eval_batches)?;
            let chosen = scan.allocate(target);
            let masks = weights
                .iter()
                .zip(&chosen)
                .map(|(w, &s)| select::magnitude(w, s))
                .collect::<Result<_>>()?;
            let scan = sensitivity::Scan { chosen, ..scan };
            Ok((masks, Some(scan)))
        }
        (Method::Neurons, _) => Err(Error::Internal("neuron pruning has no masks".into())),
    }
}

fn info(opts: &PruneOptions, target: f64, names: &[String], masks: &[Tensor]) -> PruneInfo {
    let weights: Vec<PrunedWeight> = names
        .iter()
        .zip(masks)
        .map(|(n, m)| PrunedWeight {
            name: n.clone(),
            params: m.numel(),
            sparsity: select::sparsity_of(m),
        })
        .collect();
    let total: usize = weights.iter().map(|w| w.params).sum();
    let zeros: f64 = weights.iter().map(|w| w.sparsity * w.params as f64).sum();
    PruneInfo {
        method: opts.method,
        scope: match opts.method {
            Method::Magnitude => opts.scope.unwrap_or(Scope::Layer),
            Method::TwoFour => Scope::Layer,
            Method::Sensitivity | Method::Neurons => Scope::Global,
        },
        target,
        sparsity: zeros / total.max(1) as f64,
        weights,
    }
}

/// Every tensor of the source, pruned weights and their moments masked, plus the masks.
fn output_tensors(
    t: &mut Trained,
    names: &[String],
    weights: &[Tensor],
    masks: &[Tensor],
) -> Result<Vec<SavedTensor>> {
    let mask_of = |name: &str| names.iter().position(|n| n == name).map(|i| &masks[i]);
    let all: Vec<String> = t.ckpt.manifest().tensors.keys().cloned().collect();
    let mut out = Vec::with_capacity(all.len() + names.len());
    for name in all.iter().filter(|n| !n.ends_with(".mask")) {
        let base = MOMENTS
            .iter()
            .find_map(|p| name.strip_prefix(p))
            .unwrap_or(name);
        let tensor = match (names.iter().position(|n| n == name), mask_of(base)) {
            (Some(i), Some(m)) => weights[i].f_mul(m),
            (None, Some(m)) => t.ckpt.read_full(name)?.f_mul(m),
            _ => Ok(t.ckpt.read_full(name)?),
        }
        .map_err(Error::torch("masking"))?;
        out.push(super::quantize::whole(name.clone(), tensor));
    }
    for (n, m) in names.iter().zip(masks) {
        out.push(super::quantize::whole(mask_name(n), m.shallow_clone()));
    }
    Ok(out)
}
