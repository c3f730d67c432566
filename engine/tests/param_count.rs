//! The partitioner's parameter count must equal what the engine's model allocates: per
//! layer, per planned stage, and for the whole model.

use engine::model::StageModel;
use partitioner::{LayerGraph, ModelShape, PartitionMethod, Plan, PlanSpec};

fn shapes() -> Vec<ModelShape> {
    vec![
        ModelShape::gpt(65, 16, 32, 4, 4, 64),
        ModelShape::gpt(97, 24, 48, 6, 3, 80),
        ModelShape::gpt(64, 8, 16, 2, 2, 16),
    ]
}

#[test]
fn every_layer_allocates_what_the_cost_model_counts() {
    for shape in shapes() {
        let graph = LayerGraph::new(&shape, 2, 4).unwrap();
        for node in &graph.nodes {
            let model = StageModel::new(&shape, &[node.kind], 1).unwrap();
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
        let whole = StageModel::new(&shape, &all, 1).unwrap();
        assert_eq!(whole.num_params() as u64, graph.total_params());
    }
}

#[test]
fn every_planned_stage_allocates_its_planned_params() {
    for shape in shapes() {
        for pp in 1..=shape.n_layers {
            for method in [PartitionMethod::Uniform, PartitionMethod::Optimal] {
                let mut spec = PlanSpec::new(shape, pp, 4, 2);
                spec.method = method;
                let plan = Plan::build(&spec).unwrap();
                let mut total = 0;
                for stage in &plan.stages {
                    let model = StageModel::new(&shape, &stage.layers, 3).unwrap();
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
