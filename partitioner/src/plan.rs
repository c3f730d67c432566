//! The serializable pipeline [`Plan`]: which layers each stage owns and what they cost.
//! This is the schema the engine consumes (`plan.json` in every run directory).
//!
//! Invariant: `stages[i].layers` are contiguous in graph order, non-empty, each contains
//! at least one block, and together they cover the graph exactly once.

use crate::error::Result;
use crate::graph::{LayerCost, LayerGraph, LayerKind, ModelShape};
use crate::ids::StageId;
use crate::split;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One pipeline stage of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StagePlan {
    pub stage: StageId,
    pub layers: Vec<LayerKind>,
    pub params: u64,
    pub param_bytes: u64,
    /// Forward FLOPs per microbatch.
    pub fwd_flops: f64,
    /// Backward FLOPs per microbatch.
    pub bwd_flops: f64,
    /// Activation bytes stashed per microbatch in flight.
    pub activation_bytes_per_microbatch: u64,
    /// Bytes this stage sends downstream per microbatch.
    pub send_bytes_per_microbatch: u64,
}

/// A pipeline plan for one model and parallel layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub method: String,
    pub model: ModelShape,
    pub pp: usize,
    pub microbatches: usize,
    pub micro_batch_size: usize,
    pub dtype_bytes: usize,
    pub total_params: u64,
    /// Largest stage's training FLOPs divided by the mean (1.0 is perfect balance).
    pub imbalance: f64,
    pub stages: Vec<StagePlan>,
}

impl Plan {
    /// Plans `pp` stages balanced by training FLOPs (exact min-max split).
    pub fn balanced(
        shape: &ModelShape,
        pp: usize,
        microbatches: usize,
        micro_batch_size: usize,
        dtype_bytes: usize,
    ) -> Result<Plan> {
        let graph = LayerGraph::gpt(shape, micro_batch_size, dtype_bytes)?;
        let bounds = split::balanced_by_flops(&graph, pp)?;
        Ok(Self::from_bounds(&graph, &bounds, "flops", microbatches))
    }

    /// Builds a plan from explicit stage boundaries over `graph`'s nodes.
    pub fn from_bounds(
        graph: &LayerGraph,
        bounds: &[usize],
        method: &str,
        microbatches: usize,
    ) -> Plan {
        let stages: Vec<StagePlan> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let nodes = &graph.nodes[w[0]..w[1]];
                let total = nodes
                    .iter()
                    .map(|n| n.cost)
                    .fold(LayerCost::default(), |a, c| a + c);
                StagePlan {
                    stage: StageId(i),
                    layers: nodes.iter().map(|n| n.kind).collect(),
                    params: total.params,
                    param_bytes: total.param_bytes,
                    fwd_flops: total.fwd_flops,
                    bwd_flops: total.bwd_flops,
                    activation_bytes_per_microbatch: total.activation_bytes,
                    send_bytes_per_microbatch: total.output_bytes,
                }
            })
            .collect();
        let flops: Vec<f64> = stages.iter().map(|s| s.fwd_flops + s.bwd_flops).collect();
        let mean = flops.iter().sum::<f64>() / flops.len() as f64;
        let max = flops.iter().cloned().fold(0.0, f64::max);
        Plan {
            method: method.to_string(),
            model: graph.shape,
            pp: stages.len(),
            microbatches,
            micro_batch_size: graph.micro_batch_size,
            dtype_bytes: graph.dtype_bytes,
            total_params: graph.total_params(),
            imbalance: if mean > 0.0 { max / mean } else { 1.0 },
            stages,
        }
    }

    /// The stage that owns `layer`.
    pub fn stage_of(&self, layer: LayerKind) -> Option<StageId> {
        self.stages
            .iter()
            .find(|s| s.layers.contains(&layer))
            .map(|s| s.stage)
    }

    /// A human-readable table: stage, layers, params, FLOPs per microbatch.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "plan: {} stages ({} split), {} params, {} microbatches x {} sequences, imbalance {:.3}",
            self.pp,
            self.method,
            human(self.total_params as f64, ""),
            self.microbatches,
            self.micro_batch_size,
            self.imbalance
        );
        let _ = writeln!(
            out,
            "{:>5}  {:<24} {:>10} {:>12} {:>12} {:>12}",
            "stage", "layers", "params", "fwd FLOPs/mb", "bwd FLOPs/mb", "act/mb"
        );
        for s in &self.stages {
            let _ = writeln!(
                out,
                "{:>5}  {:<24} {:>10} {:>12} {:>12} {:>12}",
                s.stage.0,
                layer_range(&s.layers),
                human(s.params as f64, ""),
                human(s.fwd_flops, ""),
                human(s.bwd_flops, ""),
                human(s.activation_bytes_per_microbatch as f64, "B"),
            );
        }
        out
    }
}

/// `embed, block.0-3` style summary of a contiguous layer list.
pub fn layer_range(layers: &[LayerKind]) -> String {
    let mut parts = Vec::new();
    let blocks: Vec<usize> = layers
        .iter()
        .filter_map(|l| match l {
            LayerKind::Block(i) => Some(*i),
            _ => None,
        })
        .collect();
    if layers.contains(&LayerKind::Embedding) {
        parts.push("embed".to_string());
    }
    match (blocks.first(), blocks.last()) {
        (Some(a), Some(b)) if a == b => parts.push(format!("block.{a}")),
        (Some(a), Some(b)) => parts.push(format!("block.{a}-{b}")),
        _ => {}
    }
    if layers.contains(&LayerKind::Head) {
        parts.push("head".to_string());
    }
    parts.join(", ")
}

/// Formats with k/M/G/T suffixes.
pub fn human(x: f64, unit: &str) -> String {
    let (v, s) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.2}{s}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelShape {
        ModelShape {
            vocab: 65,
            seq_len: 128,
            d_model: 256,
            n_heads: 8,
            n_layers: 8,
            d_ff: 1024,
        }
    }

    #[test]
    fn gpt_tiny_splits_evenly_with_embed_first_and_head_last() {
        let plan = Plan::balanced(&tiny(), 2, 8, 8, 4).unwrap();
        assert_eq!(plan.stages.len(), 2);
        assert_eq!(plan.stages[0].layers[0], LayerKind::Embedding);
        assert_eq!(*plan.stages[1].layers.last().unwrap(), LayerKind::Head);
        assert_eq!(plan.stages[0].layers.len(), 5);
        assert_eq!(plan.stage_of(LayerKind::Block(4)), Some(StageId(1)));
        let total: u64 = plan.stages.iter().map(|s| s.params).sum();
        assert_eq!(total, plan.total_params);
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&json).unwrap(), plan);
    }

    #[test]
    fn every_stage_has_a_block_at_max_pp() {
        let plan = Plan::balanced(&tiny(), 8, 8, 8, 4).unwrap();
        for s in &plan.stages {
            assert!(s.layers.iter().any(|l| matches!(l, LayerKind::Block(_))));
        }
        assert!(Plan::balanced(&tiny(), 9, 8, 8, 4).is_err());
    }
}
