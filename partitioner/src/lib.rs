//! Strata's partitioner: pure-Rust planning for pipeline- and tensor-parallel transformers.
//!
//! It owns everything that can be decided without libtorch or MPI: the layer graph of a
//! GPT- or LLaMA-style model with per-layer costs ([`graph`]), the performance model
//! ([`cost`]), the exact memory-aware contiguous split of that graph into pipeline stages
//! ([`split`], producing a serializable [`plan::Plan`]), the Megatron tensor-parallel
//! shard plan ([`tp`]), the device mesh ([`mesh`]), measured layer profiles ([`profile`]),
//! the layout search ([`auto`]), and microbatch schedules as data ([`schedule`]): built,
//! validated, lowered with sends and receives, and simulated. The engine executes exactly
//! the schedules validated here.
//!
//! Invariant: this crate never depends on `tch` or `mpi`, so every decision it makes is
//! testable in milliseconds.

pub mod activation;
pub mod auto;
pub mod cost;
pub mod error;
pub mod graph;
pub mod ids;
pub mod memory;
pub mod mesh;
pub mod plan;
pub mod predict;
pub mod profile;
pub mod schedule;
pub mod split;
pub mod tp;

pub use activation::{ActivationPolicy, Recompute};
pub use cost::{Hardware, PipeSchedule};
pub use error::{Error, Result};
pub use graph::{Arch, FfWidth, LayerCost, LayerGraph, LayerKind, LayerNode, ModelShape};
pub use ids::{MicrobatchId, Rank, StageId};
pub use mesh::{Mesh, MeshCoord};
pub use plan::{Plan, PlanSpec, StagePlan};
pub use profile::Profile;
pub use schedule::{Action, ActionKind, Schedule, ScheduleKind};
pub use split::PartitionMethod;
pub use tp::TpPlan;
