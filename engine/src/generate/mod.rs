//! Text generation over the training layouts (`strata generate`): pipelined decoding
//! with a per-layer KV cache on the rank that holds the layer, each tensor-parallel rank
//! caching its own heads.
//!
//! * [`sample`]: greedy, temperature, top-k and top-p choice from Strata's seeded RNG;
//! * [`job`]: what `strata generate` runs, with every user error checked up front;
//! * [`batch`]: prompts to ids (character vocabulary) and left-padded microbatches;
//! * [`load`]: a rank's chunk of the model, loaded from a checkpoint or an HF directory;
//! * [`pipeline`]: one rank's rounds (prefill, then one token per row per round);
//! * [`stats`]: throughput, time per token, idle share and peak memory per rank.
//!
//! [`run`] is what every rank calls; world rank 0 returns the [`Report`].
//!
//! Invariant: the tokens generated depend only on the weights, the prompts and the
//! sampling settings (seed included), not on the layout or the microbatching, up to the
//! floating-point differences between layouts' reductions.

pub mod batch;
pub mod job;
pub mod load;
pub mod pipeline;
pub mod sample;
pub mod stats;

pub use batch::Microbatch;
pub use job::{GenerateJob, Request};
pub use load::{ModelSetup, Source, Weights};
pub use pipeline::Job;
pub use sample::Sampling;
pub use stats::Report;

use crate::comm::groups::ParallelComms;
use crate::comm::Tag;
use crate::error::{Error, Result};
use partitioner::mesh::MeshCoord;
use partitioner::Rank;
use stats::{Emissions, RankStats};

/// What the last stage sends to rank 0.
#[derive(serde::Serialize, serde::Deserialize)]
struct Outcome {
    tokens: Vec<Vec<i64>>,
    emissions: Emissions,
}

fn tag() -> Tag {
    Tag::plain(Tag::METRICS)
}

fn json_err(e: serde_json::Error) -> Error {
    Error::Internal(format!("generation message: {e}"))
}

/// Builds this rank's chunk from `source`, runs `job`, and gathers the measurements and
/// tokens on world rank 0, which returns the report (other ranks return None).
pub fn run(
    setup: &ModelSetup,
    mut source: Source<'_>,
    job: &Job,
    comms: &mut ParallelComms,
) -> Result<Option<Report>> {
    let coord = comms.coord;
    let chunk = setup.build_chunk(coord, &mut source)?;
    let pp = setup.pp();
    let run = pipeline::run_rank(&chunk, coord.pp, pp, job, comms)?;
    drop(chunk);
    let stats = RankStats {
        rank: comms.rank().0,
        stage: coord.pp,
        tp_rank: coord.tp,
        wall_s: run.wall_s,
        busy_s: run.busy_s,
        peak_rss_bytes: stats::peak_rss_bytes(),
        kv_cache_bytes: run.kv_cache_bytes,
        threads: usize::try_from(tch::get_num_threads()).unwrap_or(0),
    };
    let reporter = comms
        .mesh
        .rank(MeshCoord {
            pp: pp - 1,
            dp: 0,
            tp: 0,
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
    let me = comms.rank();
    let outcome = run.emissions.map(|emissions| Outcome {
        tokens: run.generated.into_iter().flatten().collect(),
        emissions,
    });
    if me != Rank(0) {
        let bytes = serde_json::to_vec(&stats).map_err(json_err)?;
        comms.world.send(Rank(0), tag(), bytes)?;
        if me == reporter {
            let o =
                outcome.ok_or_else(|| Error::Internal("the last stage has no tokens".into()))?;
            comms
                .world
                .send(Rank(0), tag(), serde_json::to_vec(&o).map_err(json_err)?)?;
        }
        comms.world.flush()?;
        return Ok(None);
    }
    let mut ranks = vec![stats];
    for r in 1..comms.world.size() {
        let bytes = comms.world.recv(Rank(r), tag())?;
        ranks.push(serde_json::from_slice(&bytes).map_err(json_err)?);
    }
    let outcome = match outcome {
        Some(o) => o,
        None => {
            let bytes = comms.world.recv(reporter, tag())?;
            serde_json::from_slice(&bytes).map_err(json_err)?
        }
    };
    let prompt_tokens = job
        .microbatches
        .iter()
        .flat_map(|mb| mb.prompts.iter().map(Vec::len))
        .sum();
    let mut report = Report {
        tokens: outcome.tokens,
        ranks,
        ..Report::default()
    };
    report.timing(&outcome.emissions, prompt_tokens);
    Ok(Some(report))
}
