//! `strata prune --method neurons`: structured pruning of the MLP hidden units. The model
//! gets smaller and faster, not just sparse: every block keeps its best hidden units and
//! its `d_ff` shrinks (the config's `model.d_ff` becomes a per-layer list).
//!
//! Score of hidden unit `j` of a block: the L2 norm of every weight attached to it,
//! * GPT: `sqrt(‖fc1.weight[:, j]‖² + fc1.bias[j]² + ‖fc2.weight[j, :]‖²)` (its input column,
//!   its bias, its output row);
//! * LLaMA: `sqrt(‖gate.weight[:, j]‖² + ‖up.weight[:, j]‖² + ‖down.weight[j, :]‖²)`.
//!
//! Each block keeps the `round(d_ff · (1 − S) / m) · m` best units (at least `m`, at most
//! its `d_ff` rounded down to a multiple of `m`), where `m` is `--multiple-of` (default
//! [`DEFAULT_MULTIPLE_OF`] = 8, so tp = 1, 2, 4 and 8 all divide every block's width).
//! Ties go to the lower index; kept units stay in their original order.
//!
//! The output is a dense checkpoint of the new shapes: `fc1`/`gate`/`up` weights lose
//! columns, `fc1.bias` entries, `fc2`/`down` rows (`fc2.bias` is kept), and the AdamW
//! moments of those tensors are sliced the same way, with the trainer state kept, so
//! `train.resume` fine-tunes from it. The manifest's config has the per-layer `d_ff`, and
//! its `extra.neuron_pruning` ([`NeuronInfo`]) records the cut.
//!
//! Invariant: the pruned model computes exactly what the dense model computes with the
//! removed hidden units zeroed (their `fc1` columns, biases and `fc2` rows).

use super::{Method, MOMENTS};
use crate::checkpoint::SavedTensor;
use crate::compress::Trained;
use crate::config::FfConfig;
use crate::error::{Error, Result};
use crate::quant::QuantInfo;
use partitioner::{Arch, FfWidth};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The manifest `extra` key of the record.
pub const MANIFEST_KEY: &str = "neuron_pruning";

/// Default of `--multiple-of`: every kept width is a multiple of 8, so tp ∈ {1, 2, 4, 8}
/// divides it (and widths stay aligned for vectorised kernels).
pub const DEFAULT_MULTIPLE_OF: usize = 8;

/// One block's cut.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerCut {
    pub layer: usize,
    pub d_ff_before: usize,
    pub d_ff_after: usize,
    /// Model parameters removed (weights and biases, not optimizer state).
    pub params_removed: usize,
}

/// What `extra.neuron_pruning` says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NeuronInfo {
    /// The requested share of each block's hidden units to remove.
    pub target: f64,
    pub multiple_of: usize,
    /// How units were ranked.
    pub score: String,
    pub layers: Vec<LayerCut>,
}

/// What a neuron pruning wrote.
#[derive(Debug)]
pub struct NeuronsPruned {
    pub dir: PathBuf,
    pub info: NeuronInfo,
    pub params_before: usize,
    pub params_after: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
    /// Whether the source's AdamW moments were sliced (false: it had none).
    pub moments: bool,
}

impl NeuronsPruned {
    /// The per-layer table: layer, d_ff before → after, parameters removed.
    pub fn table(&self) -> String {
        let mut s =
            String::from("| layer | d_ff before → after | params removed |\n|---|---|---|\n");
        for c in &self.info.layers {
            s += &format!(
                "| block.{} | {} → {} | {} |\n",
                c.layer, c.d_ff_before, c.d_ff_after, c.params_removed
            );
        }
        s
    }
}

/// The MLP tensors of one block and the dimension that indexes its hidden units.
pub fn mlp_tensors(arch: Arch, layer: usize) -> Vec<(String, i64)> {
    let p = format!("block.{layer}.mlp");
    match arch {
        Arch::Gpt => vec![
            (format!("{p}.fc1.weight"), 1),
            (format!("{p}.fc1.bias"), 0),
            (format!("{p}.fc2.weight"), 0),
        ],
        Arch::Llama => vec![
            (format!("{p}.gate.weight"), 1),
            (format!("{p}.up.weight"), 1),
            (format!("{p}.down.weight"), 0),
        ],
    }
}

/// The score of every hidden unit (see the module docs) from the block's MLP tensors, in
/// [`mlp_tensors`] order.
pub fn scores(tensors: &[(Tensor, i64)]) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (t, unit_dim) in tensors {
        let sq = t
            .f_to_kind(Kind::Double)
            .and_then(|x| x.f_square())
            .map_err(Error::torch("neuron scores"))?;
        let per_unit = if t.dim() == 1 {
            sq
        } else {
            sq.f_sum_dim_intlist(1 - unit_dim, false, Kind::Double)
                .map_err(Error::torch("neuron scores"))?
        };
        total = Some(match total {
            None => per_unit,
            Some(acc) => acc
                .f_add(&per_unit)
                .map_err(Error::torch("neuron scores"))?,
        });
    }
    total
        .ok_or_else(|| Error::Internal("a block without MLP tensors".into()))?
        .f_sqrt()
        .map_err(Error::torch("neuron scores"))
}

/// How many of `d_ff` units a block keeps at `sparsity`, a multiple of `multiple_of`.
pub fn keep_count(layer: usize, d_ff: usize, sparsity: f64, multiple_of: usize) -> Result<usize> {
    let most = d_ff - d_ff % multiple_of;
    if most == 0 {
        return Err(Error::usage(
            "--multiple-of",
            format!("{multiple_of} exceeds block {layer}'s d_ff = {d_ff}"),
            format!("pass --multiple-of at most {d_ff} (a multiple of every tp size you will use)"),
        ));
    }
    let k = ((d_ff as f64 * (1.0 - sparsity)) / multiple_of as f64).round() as usize * multiple_of;
    Ok(k.clamp(multiple_of, most))
}

/// The indices (ascending, Int64) of the `k` best-scored units; ties go to the lower index.
pub fn kept_units(score: &Tensor, k: usize) -> Result<Tensor> {
    let order = score
        .f_argsort_stable(true, 0, true)
        .map_err(Error::torch("ranking neurons"))?;
    let (kept, _) = order
        .f_narrow(0, 0, k as i64)
        .and_then(|x| x.f_sort(0, false))
        .map_err(Error::torch("ranking neurons"))?;
    Ok(kept)
}

/// Checks `--sparsity` and `--multiple-of`.
pub fn check_flags(sparsity: Option<f64>, multiple_of: usize) -> Result<f64> {
    if multiple_of == 0 {
        return Err(Error::usage(
            "--multiple-of",
            "0 is not a width multiple",
            "pass a positive integer that every tp size you will use divides, e.g. 8",
        ));
    }
    super::PruneOptions {
        method: Method::Neurons,
        sparsity,
        scope: None,
        eval_batches: 1,
    }
    .target()
}

/// Prunes the checkpoint at `src` into a smaller dense checkpoint under `out`.
pub fn prune_neurons(
    src: &Path,
    out: &Path,
    sparsity: Option<f64>,
    multiple_of: usize,
) -> Result<NeuronsPruned> {
    let target = check_flags(sparsity, multiple_of)?;
    let mut t = Trained::open(src)?;
    refuse_transformed(&t)?;
    let shape = t.spec.shape.clone();
    let mut kept: BTreeMap<String, (Tensor, i64)> = BTreeMap::new();
    let mut layers = Vec::with_capacity(shape.n_layers);
    for i in 0..shape.n_layers {
        let names = mlp_tensors(shape.arch, i);
        let tensors: Vec<(Tensor, i64)> = names
            .iter()
            .map(|(n, dim)| Ok((t.ckpt.read_full(n)?, *dim)))
            .collect::<Result<_>>()?;
        let f = shape.d_ff_of(i);
        let k = keep_count(i, f, target, multiple_of)?;
        let units = kept_units(&scores(&tensors)?, k)?;
        let per_unit: usize = tensors
            .iter()
            .map(|(w, dim)| w.numel() / w.size()[*dim as usize] as usize)
            .sum();
        layers.push(LayerCut {
            layer: i,
            d_ff_before: f,
            d_ff_after: k,
            params_removed: (f - k) * per_unit,
        });
        for (n, dim) in names {
            kept.insert(n, (units.shallow_clone(), dim));
        }
    }
    let (tensors, moments) = output_tensors(&mut t, &kept)?;
    let widths: Vec<usize> = layers.iter().map(|c| c.d_ff_after).collect();
    let info = NeuronInfo {
        target,
        multiple_of,
        score: match shape.arch {
            Arch::Gpt => "L2 norm of fc1 column, fc1 bias and fc2 row".into(),
            Arch::Llama => "L2 norm of gate column, up column and down row".into(),
        },
        layers,
    };
    let (config, plan) = pruned_config(&t, &widths)?;
    let extra = BTreeMap::from([(
        MANIFEST_KEY.to_string(),
        serde_json::to_value(&info).map_err(|e| Error::Internal(e.to_string()))?,
    )]);
    let state = t.ckpt.manifest().train_state.clone();
    let dir = t.write_as(out, &tensors, extra, state, config, plan)?;
    let after = crate::checkpoint::Checkpoint::open(&dir)?;
    let removed: usize = info.layers.iter().map(|c| c.params_removed).sum();
    let params_before = t.skeleton()?.num_params();
    Ok(NeuronsPruned {
        dir,
        info,
        params_before,
        params_after: params_before - removed,
        bytes_before: t.bytes(),
        bytes_after: after.manifest().files.values().map(|f| f.bytes).sum(),
        moments,
    })
}

/// Quantised and mask-pruned checkpoints are refused (the order that works: neurons
/// first, then magnitude/2:4/sensitivity, then quantise).
fn refuse_transformed(t: &Trained) -> Result<()> {
    let extra = &t.ckpt.manifest().extra;
    let what = if QuantInfo::from_extra(extra)?.is_some() {
        "quantised"
    } else if super::PruneInfo::from_extra(extra)?.is_some() {
        "mask-pruned (its masks cover the old widths)"
    } else {
        return Ok(());
    };
    Err(Error::usage(
        "CHECKPOINT",
        format!(
            "{} is {what}; neuron pruning needs the dense weights",
            t.ckpt.dir().display()
        ),
        "prune the dense checkpoint with --method neurons first, then mask-prune or quantise the result",
    ))
}

/// Every tensor of the source, the MLP tensors and their moments cut to the kept units;
/// and whether any moment was cut.
fn output_tensors(
    t: &mut Trained,
    kept: &BTreeMap<String, (Tensor, i64)>,
) -> Result<(Vec<SavedTensor>, bool)> {
    let all: Vec<String> = t.ckpt.manifest().tensors.keys().cloned().collect();
    let mut moments = false;
    let mut out = Vec::with_capacity(all.len());
    for name in all {
        let moment = MOMENTS.iter().find_map(|p| name.strip_prefix(p));
        let base = moment.unwrap_or(&name);
        let whole = t.ckpt.read_full(&name)?;
        let tensor = match kept.get(base) {
            Some((units, dim)) => {
                moments |= moment.is_some();
                whole
                    .f_index_select(*dim, units)
                    .map_err(Error::torch("cutting hidden units"))?
            }
            None => whole,
        };
        out.push(crate::compress::quantize::whole(name, tensor));
    }
    Ok((out, moments))
}

/// The source's config with `model.d_ff` per layer (YAML) and its plan with the new model.
fn pruned_config(t: &Trained, widths: &[usize]) -> Result<(String, serde_json::Value)> {
    let mut cfg = t.config.clone();
    cfg.model.d_ff = FfConfig(FfWidth::PerLayer(widths.to_vec()));
    let mut shape = t.spec.shape.clone();
    shape.d_ff = FfWidth::PerLayer(widths.to_vec());
    shape
        .validate()
        .map_err(|e| Error::Internal(e.to_string()))?;
    let yaml = serde_yaml::to_string(&cfg)
        .map_err(|e| Error::Internal(format!("serialising config: {e}")))?;
    let mut plan = t.ckpt.manifest().plan.clone();
    if let Some(model) = plan.get_mut("model") {
        model["d_ff"] = serde_json::json!(widths);
    }
    Ok((yaml, plan))
}
