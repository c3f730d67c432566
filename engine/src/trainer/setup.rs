//! What one rank builds before its first step: the plan, its model chunks and parameters,
//! the data, the training and evaluation schedules, the optimizer, and the ranks whose
//! losses make each step's loss.
//!
//! Invariant: every rank derives all of it from the config alone, so nothing but
//! activations, gradients and metrics crosses ranks.

use crate::comm::groups::ParallelComms;
use crate::config::Config;
use crate::data::{Dataset, Split};
use crate::error::{Error, Result};
use crate::executor::{PipelineLayout, StepData};
use crate::flat::FlatBuffers;
use crate::model::sharding::{padded, TpRank};
use crate::model::{tokens_tensor, Model, Param};
use crate::optim::{AdamW, AdamWConfig};
use partitioner::mesh::MeshCoord;
use partitioner::{Plan, Rank, Schedule, ScheduleKind};

/// One rank's training state.
pub struct RankState {
    pub plan: Plan,
    pub coord: MeshCoord,
    pub layout: PipelineLayout,
    /// This rank's model chunks, by slot (chunk `slot · pp + coord.pp`).
    pub chunks: Vec<Model>,
    /// Every parameter of every local chunk.
    pub params: Vec<Param>,
    /// The parameters and gradients as flat buffers (the optimizer's and collectives'
    /// view of `params`).
    pub flat: FlatBuffers,
    /// Elements of this rank's share of a tied embedding split over the pipeline (every
    /// pipeline rank joins the gradient sum), or None.
    pub tied_numel: Option<usize>,
    pub dataset: Dataset,
    pub schedule: Schedule,
    pub eval_schedule: Schedule,
    pub optim: AdamW,
    pub has_first: bool,
    pub has_last: bool,
    /// The ranks whose last-stage losses make the step's loss (one per replica); the first
    /// also reports the validation loss.
    pub loss_ranks: Vec<Rank>,
    pub param_bytes: usize,
    pub microbatches: usize,
    pub eval_microbatches: usize,
    /// The overlapped data-parallel gradient reduction (dp > 1 only).
    pub grad_sync: Option<crate::dp::GradSync>,
    /// Pruning masks from `train.resume` (empty unless it names a pruned checkpoint).
    pub masks: crate::compress::mask::Masks,
    hidden_shape: Vec<i64>,
    /// The blocks a microbatch's token rows are split into between chunks: tp under
    /// sequence parallelism, else 1.
    seq_blocks: i64,
}

fn plan_error(cfg: &Config) -> impl Fn(partitioner::Error) -> Error + '_ {
    move |source| Error::Plan {
        path: cfg.source.display().to_string(),
        source,
    }
}

/// Checks that the job has pp · tp · dp ranks.
fn check_world(cfg: &Config, world: usize) -> Result<()> {
    if world == cfg.world_size() {
        return Ok(());
    }
    Err(Error::Config {
        path: cfg.source.display().to_string(),
        field: "parallel".into(),
        problem: format!(
            "the job has {world} ranks but pp·tp·dp = {}",
            cfg.world_size()
        ),
        fix: format!(
            "launch with {} ranks (strata launch does this)",
            cfg.world_size()
        ),
    })
}

impl RankState {
    pub fn new(cfg: &Config, comms: &ParallelComms) -> Result<RankState> {
        check_world(cfg, comms.world.size())?;
        let plan = cfg.plan()?;
        let coord = comms.coord;
        let (pp, v) = (*cfg.parallel.pp, *cfg.parallel.virtual_stages);
        let layout = PipelineLayout {
            pp,
            n_chunks: pp * v,
        };
        if plan.stages.len() != layout.n_chunks {
            return Err(Error::Internal(format!(
                "the plan has {} chunks, expected pp · virtual_stages = {}",
                plan.stages.len(),
                layout.n_chunks
            )));
        }
        let spec = cfg.model_spec()?;
        let tp = TpRank {
            rank: coord.tp,
            size: *cfg.parallel.tp,
        };
        let chunks: Vec<Model> = (0..v)
            .map(|slot| {
                Model::new(
                    &spec,
                    &plan.stages[slot * pp + coord.pp].layers,
                    cfg.train.seed,
                    tp,
                )
                .map(|m| {
                    m.with_recompute(cfg.parallel.recompute)
                        .with_sequence_parallel(cfg.parallel.sequence_parallel)
                })
            })
            .collect::<Result<_>>()?;
        let params: Vec<Param> = chunks
            .iter()
            .flat_map(|c| c.params().iter().map(Param::alias))
            .collect();
        crate::hf::load_init_from(cfg, &params)?;
        let flat = FlatBuffers::adopt(&params)?;
        let shape = plan.model.clone();
        let tied_numel = (spec.tie_embeddings && layout.n_chunks > 1)
            .then(|| padded(shape.vocab, tp.size) / tp.size * shape.d_model);
        let m = *cfg.parallel.microbatches;
        let eval_m = cfg.train.eval_microbatches.map_or(m, |c| *c);
        let schedule = cfg
            .schedule()
            .and_then(|s| s.lower())
            .map_err(plan_error(cfg))?;
        let eval_schedule = Schedule::build_virtual(ScheduleKind::ForwardOnly, pp, v, eval_m)
            .and_then(|s| s.lower())
            .map_err(plan_error(cfg))?;
        let t = &cfg.train;
        let optim = AdamW::new(
            &flat,
            AdamWConfig {
                beta1: t.beta1,
                beta2: t.beta2,
                eps: 1e-8,
                weight_decay: t.weight_decay,
            },
        )?;
        let grad_sync = match *cfg.parallel.dp > 1 {
            true => Some(crate::dp::GradSync::new(crate::dp::overlap::Setup {
                flat: &flat,
                params: &params,
                per_slot: &chunks.iter().map(|c| c.params().len()).collect::<Vec<_>>(),
                row: &schedule.ranks[coord.pp],
                layout,
                hooks: tp.size == 1,
                deferred: if tied_numel.is_some() {
                    &["embed.wte"]
                } else {
                    &[]
                },
                bucket_bytes: cfg.dp_bucket_bytes(),
            })?),
            false => None,
        };
        let last_stage = layout.rank_of(layout.n_chunks - 1).0;
        let mesh_rank = |dp: usize| {
            comms
                .mesh
                .rank(MeshCoord {
                    pp: last_stage,
                    dp,
                    tp: 0,
                })
                .map_err(|e| Error::Internal(e.to_string()))
        };
        Ok(RankState {
            coord,
            layout,
            param_bytes: params
                .iter()
                .map(|p| p.tensor.numel() * p.tensor.kind().elt_size_in_bytes())
                .sum(),
            flat,
            tied_numel,
            dataset: Dataset::load(&cfg.data_source()?, cfg.train.seed)?,
            schedule,
            eval_schedule,
            optim,
            has_first: layout.rank_of(0).0 == coord.pp,
            has_last: coord.pp == last_stage,
            loss_ranks: (0..*cfg.parallel.dp)
                .map(mesh_rank)
                .collect::<Result<_>>()?,
            microbatches: m,
            eval_microbatches: eval_m,
            masks: Default::default(),
            grad_sync,
            hidden_shape: vec![
                *cfg.parallel.micro_batch_size as i64,
                shape.seq_len as i64,
                shape.d_model as i64,
            ],
            seq_blocks: match chunks.first().is_some_and(Model::sequence_parallel) {
                true => tp.size as i64,
                false => 1,
            },
            chunks,
            params,
            plan,
        })
    }

    /// The shape of the hidden state between chunks: `[b, s, d]`, or under sequence
    /// parallelism this tp rank's block, rows `[r·b·s/tp, (r+1)·b·s/tp)` of the `[b·s, d]`
    /// view stored as `[b, s/tp, d]` (the same bytes as the whole's share; see
    /// [`crate::model::sequence`]).
    fn wire_shape(&self) -> Vec<i64> {
        let mut shape = self.hidden_shape.clone();
        shape[1] /= self.seq_blocks;
        shape
    }

    /// This rank's inputs and targets for `step` of `split`. Replica d trains on global
    /// microbatches d·m .. (d+1)·m of each step; every replica evaluates the same batches.
    pub fn step_data(&self, split: Split, step: u64) -> Result<StepData> {
        let (microbatches, first_mb) = match split {
            Split::Train => (self.microbatches, self.coord.dp * self.microbatches),
            Split::Val => (self.eval_microbatches, 0),
        };
        let (mbs, seq) = (self.hidden_shape[0] as usize, self.hidden_shape[1] as usize);
        let (mut tokens, mut targets) = (Vec::new(), Vec::new());
        if self.has_first || self.has_last {
            for mb in 0..microbatches {
                let (x, y) = self
                    .dataset
                    .batch(split, step, (first_mb + mb) * mbs, mbs, seq);
                if self.has_first {
                    tokens.push(tokens_tensor(&x, mbs, seq)?);
                }
                if self.has_last {
                    targets.push(tokens_tensor(&y, mbs, seq)?);
                }
            }
        }
        Ok(StepData {
            tokens,
            targets,
            hidden_shape: self.wire_shape(),
            hidden_kind: self.chunks[0].spec().kind,
            microbatches,
            keep_logits: false,
        })
    }
}
