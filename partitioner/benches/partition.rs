//! Criterion benches of the partitioner's two hot paths: the exact memory-capped `optimal`
//! split of a 1,000-layer graph into 64 stages (target: under 50 ms), and the auto-planner
//! for a world of 1,024 ranks (target: under 2 s).

use criterion::{criterion_group, criterion_main, Criterion};
use partitioner::auto::{search, AutoSpec};
use partitioner::{ModelShape, PartitionMethod, PipeSchedule, Plan, PlanSpec};
use std::hint::black_box;
use std::time::Duration;

fn optimal_1000_layers_64_stages(c: &mut Criterion) {
    let shape = ModelShape::llama(32000, 2048, 4096, 32, 8, 1000, 11008);
    let mut spec = PlanSpec::new(shape, 64, 128, 1);
    spec.method = PartitionMethod::Optimal;
    spec.schedule = PipeSchedule::OneFOneB;
    spec.dtype_bytes = 2;
    // A binding cap: a little above the uncapped optimum's peak on its busiest stage.
    let free = Plan::build(&spec).expect("plans");
    let peak = free.stages.iter().map(|s| s.memory_bytes).max().unwrap();
    spec.memory_cap_bytes = Some(peak - peak / 50);
    let capped = Plan::build(&spec).is_ok();
    eprintln!("optimal 1000x64: capped plan fits = {capped}");
    c.bench_function("optimal_split_1000_layers_64_stages", |b| {
        b.iter(|| black_box(Plan::build(black_box(&spec))))
    });
}

fn auto_plan_world_1024(c: &mut Criterion) {
    let shape = ModelShape::llama(32000, 2048, 4096, 32, 8, 48, 11008);
    let mut spec = AutoSpec::new(shape, 1024, 1024);
    spec.dtype_bytes = 2;
    spec.memory_cap_bytes = Some(80 << 30);
    c.bench_function("auto_plan_world_1024", |b| {
        b.iter(|| black_box(search(black_box(&spec)).expect("finds layouts")))
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(5));
    targets = optimal_1000_layers_64_stages, auto_plan_world_1024
}
criterion_main!(benches);
