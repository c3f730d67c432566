//! `strata simulate`: prints the configured schedule as a rank × step grid, simulates it
//! with the plan's per-chunk costs, and writes an SVG of the predicted timeline.

use crate::launch::LaunchError;
use engine::Config;
use partitioner::schedule::{simulate, timeline_svg};
use partitioner::ActionKind;
use std::path::{Path, PathBuf};

/// Simulates the config's schedule; writes the picture to `svg` (default
/// `<output.dir>/schedule.svg`).
pub fn simulate_config(
    path: &Path,
    sets: &crate::Sets,
    svg: Option<PathBuf>,
) -> Result<(), LaunchError> {
    let cfg = Config::load_with(path, &sets.parse()?)?;
    let plan = cfg.plan()?;
    let plan_err = |e| engine::Error::Plan {
        path: path.display().to_string(),
        source: e,
    };
    let schedule = cfg.schedule().map_err(plan_err)?;
    let lowered = schedule.lower().map_err(plan_err)?;
    // Costs in FLOPs of each chunk; a zero-bubble I or W is half a backward.
    let sim = simulate(&lowered, |a| {
        let s = &plan.stages[a.stage.0];
        match a.kind {
            ActionKind::Forward => s.fwd_flops,
            ActionKind::Backward => s.bwd_flops,
            ActionKind::InputGrad | ActionKind::WeightGrad => s.bwd_flops / 2.0,
            _ => 0.0,
        }
    })
    .map_err(plan_err)?;
    let p = &cfg.parallel;
    println!(
        "{} schedule: pp = {}, virtual stages = {}, {} microbatches",
        p.schedule, *p.pp, *p.virtual_stages, *p.microbatches
    );
    print!("{}", schedule.grid(&[]));
    for r in 0..lowered.pp {
        println!("rank {r}: predicted bubble {:.1}%", 100.0 * sim.bubble(r));
    }
    let theory = cfg
        .schedule_kind()
        .theoretical_bubble(*p.pp, *p.microbatches, *p.virtual_stages);
    println!(
        "mean predicted bubble {:.1}% (textbook formula for equal stages: {:.1}%)",
        100.0 * sim.mean_bubble(),
        100.0 * theory
    );
    let svg_path = svg.unwrap_or_else(|| cfg.output_dir().join("schedule.svg"));
    if let Some(dir) = svg_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| engine::Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    let title = format!(
        "{} — pp={} v={} m={} (predicted from FLOPs)",
        p.schedule, *p.pp, *p.virtual_stages, *p.microbatches
    );
    std::fs::write(&svg_path, timeline_svg(&lowered, &sim, &title)).map_err(|source| {
        engine::Error::Io {
            path: svg_path.clone(),
            source,
        }
    })?;
    println!("timeline picture: {}", svg_path.display());
    Ok(())
}
