//! Strata's partitioner: pure-Rust planning for pipeline-parallel transformers.
//!
//! It owns everything that can be decided without libtorch or MPI: the layer graph of a
//! model with per-layer costs ([`graph`]), the contiguous split of that graph into
//! pipeline stages ([`split`], producing a serializable [`plan::Plan`]), and microbatch
//! schedules as data ([`schedule`]): built, validated, lowered with sends and receives,
//! and simulated. The engine executes exactly the schedules validated here.
//!
//! Invariant: this crate never depends on `tch` or `mpi`, so every decision it makes is
//! testable in milliseconds.

pub mod error;
pub mod graph;
pub mod ids;
pub mod plan;
pub mod schedule;
pub mod split;

pub use error::{Error, Result};
pub use graph::{LayerCost, LayerGraph, LayerKind, LayerNode, ModelShape};
pub use ids::{MicrobatchId, Rank, StageId};
pub use plan::{Plan, StagePlan};
pub use schedule::{Action, ActionKind, Schedule, ScheduleKind};
