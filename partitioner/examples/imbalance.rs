//! Prints the max/mean stage-time imbalance (and the peak per-device memory) of each
//! partition method on the 48-layer LLaMA-style model of `configs/llama-48.yaml` at
//! pp = 4, 6 and 8 (1F1B, 16 microbatches of one sequence, fp32, no memory cap), and the
//! same model with a LLaMA-3 sized vocabulary (128,256), where the head outweighs a block.
//!
//! Run: `cargo run --release -p partitioner --example imbalance`

use partitioner::plan::bytes;
use partitioner::{ModelShape, PartitionMethod, Plan, PlanSpec};

fn main() -> partitioner::Result<()> {
    let methods = [
        PartitionMethod::Uniform,
        PartitionMethod::Parameters,
        PartitionMethod::Flops,
        PartitionMethod::Optimal,
    ];
    for vocab in [32000, 128256] {
        let shape = ModelShape::llama(vocab, 2048, 4096, 32, 8, 48, 11008);
        println!("\nvocab {vocab}: max/mean stage time (peak memory per device)");
        print!("| pp |");
        for m in methods {
            print!(" {} |", m.name());
        }
        println!("\n|----|{}", "---|".repeat(methods.len()));
        for pp in [4, 6, 8] {
            print!("| {pp} |");
            for method in methods {
                let mut spec = PlanSpec::new(shape.clone(), pp, 16, 1);
                spec.method = method;
                let plan = Plan::build(&spec)?;
                let peak = plan.rank_memory_bytes().into_iter().max().unwrap_or(0);
                print!(" {:.3} ({}) |", plan.imbalance, bytes(peak));
            }
            println!();
        }
    }
    Ok(())
}
