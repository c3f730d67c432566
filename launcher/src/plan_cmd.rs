//! `strata plan`: prints the pipeline plan of a config as a table (or JSON), with the
//! bubble predicted by simulating the configured schedule on the plan's costs.

use crate::launch::LaunchError;
use engine::Config;
use partitioner::schedule::simulate;
use partitioner::{ActionKind, Schedule};
use std::path::Path;

/// Prints the plan of the config at `path`.
pub fn plan(path: &Path, json: bool) -> Result<(), LaunchError> {
    let cfg = Config::load(path)?;
    let plan = cfg.plan()?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plan).expect("plan serialises")
        );
        return Ok(());
    }
    print!("{}", plan.table());
    // Predicted bubble from simulating the configured schedule with the cost model.
    let schedule = Schedule::build(cfg.schedule_kind(), plan.pp, plan.microbatches)
        .and_then(|s| s.lower())
        .map_err(|e| engine::Error::Plan {
            path: path.display().to_string(),
            source: e,
        })?;
    let sim = simulate(&schedule, |a| {
        let s = &plan.stages[a.stage.0];
        match a.kind {
            ActionKind::Forward => s.fwd_flops,
            ActionKind::Backward => s.bwd_flops,
            _ => 0.0,
        }
    })
    .map_err(|e| engine::Error::Plan {
        path: path.display().to_string(),
        source: e,
    })?;
    let bubbles: Vec<String> = (0..plan.pp)
        .map(|r| format!("{:.1}%", 100.0 * sim.bubble(r)))
        .collect();
    println!(
        "schedule {}: predicted bubble per stage (FLOP-weighted simulation): {}",
        cfg.parallel.schedule,
        bubbles.join(", ")
    );
    Ok(())
}
