//! The partitioner's parameter count must equal what the engine's model allocates: per
//! layer, per planned stage, and for the whole model.

use engine::model::sharding::TpRank;
use engine::model::{Model, ModelSpec};
use partitioner::{FfWidth, LayerGraph, ModelShape, PartitionMethod, Plan, PlanSpec};

fn shapes() -> Vec<ModelShape> {
    // Per-layer MLP widths (what `strata prune --method neurons` writes).
    let per_layer = |mut s: ModelShape, widths: &[usize]| {
        s.d_ff = FfWidth::PerLayer(widths.to_vec());
        s
    };
    vec![
        per_layer(ModelShape::gpt(65, 16, 32, 4, 4, 64), &[64, 24, 40, 8]),
        per_layer(ModelShape::llama(65, 16, 32, 4, 2, 3, 48), &[16, 48, 32]),
        ModelShape::gpt(65, 16, 32, 4, 4, 64),
        ModelShape::gpt(97, 24, 48, 6, 3, 80),
        ModelShape::gpt(64, 8, 16, 2, 2, 16),
        ModelShape::llama(65, 16, 32, 4, 2, 4, 48),
        ModelShape::llama(64, 8, 48, 6, 3, 3, 40),
    ]
}

fn build(shape: &ModelShape, layers: &[partitioner::LayerKind], seed: u64) -> Model {
    Model::new(&ModelSpec::new(shape.clone()), layers, seed, TpRank::SINGLE).unwrap()
}

#[test]
fn every_layer_allocates_what_the_cost_model_counts() {
    for shape in shapes() {
        let graph = LayerGraph::new(&shape, 2, 4).unwrap();
        for node in &graph.nodes {
            let model = build(&shape, &[node.kind], 1);
            assert_eq!(
                model.num_params() as u64,
                node.full_params,
                "{} of {shape:?}",
                node.kind
            );
            assert_eq!(
                node.cost.params, node.full_params,
                "tp = 1 holds everything"
            );
        }
        let all: Vec<_> = graph.nodes.iter().map(|n| n.kind).collect();
        let whole = build(&shape, &all, 1);
        assert_eq!(whole.num_params() as u64, graph.total_params());
    }
}

#[test]
fn every_planned_stage_allocates_its_planned_params() {
    for shape in shapes() {
        for pp in 1..=shape.n_layers {
            for method in [PartitionMethod::Uniform, PartitionMethod::Optimal] {
                let mut spec = PlanSpec::new(shape.clone(), pp, 4, 2);
                spec.method = method;
                let plan = Plan::build(&spec).unwrap();
                let mut total = 0;
                for stage in &plan.stages {
                    let model = build(&shape, &stage.layers, 3);
                    assert_eq!(model.num_params() as u64, stage.params);
                    // fp32: 4 bytes per parameter on one device.
                    assert_eq!(stage.param_bytes, 4 * stage.params);
                    total += model.num_params() as u64;
                }
                assert_eq!(total, plan.total_params);
            }
        }
    }
}

/// Under tensor parallelism every rank holds what the cost model charges one device, and
/// the shards of every parameter cover exactly the full tensor.
#[test]
fn every_tp_shard_holds_what_the_cost_model_counts() {
    for shape in shapes() {
        for tp in [2usize, shape.n_kv_heads]
            .into_iter()
            .filter(|&t| t > 1 && shape.n_kv_heads % t == 0)
        {
            let Ok(graph) = LayerGraph::with_tp(&shape, 2, 4, tp) else {
                continue; // a layout the planner refuses (e.g. d_ff not divisible)
            };
            for node in &graph.nodes {
                let mut covered = 0u64;
                for r in 0..tp {
                    let m = Model::new(
                        &ModelSpec::new(shape.clone()),
                        &[node.kind],
                        1,
                        TpRank { rank: r, size: tp },
                    )
                    .unwrap();
                    assert_eq!(
                        m.num_params() as u64,
                        node.cost.params,
                        "{} tp={tp} {shape:?}",
                        node.kind
                    );
                    covered += m
                        .params()
                        .iter()
                        .filter(|p| p.owner)
                        .map(|p| p.spec.numel() as u64)
                        .sum::<u64>();
                }
                assert_eq!(covered, node.full_params, "{} tp={tp} {shape:?}", node.kind);
            }
        }
    }
}
