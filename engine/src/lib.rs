//! Strata's engine: pipeline stages of GPT- and LLaMA-style models on libtorch, exchanging activations and
//! gradients over a [`comm::Communicator`] (MPI, or in-process channels for tests), driven
//! by schedules validated in the partitioner.
//!
//! Invariant: no global state. The communicator, config and model are passed explicitly;
//! the only process-wide settings touched are libtorch's intra-op thread count and, by
//! the process's owner, the malloc policy ([`alloc`]).

pub mod alloc;
pub mod checkpoint;
pub mod comm;
pub mod compress;
pub mod config;
pub mod data;
pub mod dp;
pub mod error;
pub mod eval;
pub mod executor;
pub mod flat;
pub mod flight;
pub mod generate;
pub mod hf;
pub mod model;
pub mod optim;
pub mod preempt;
pub mod profile;
pub mod progress;
pub mod quant;
pub mod report;
pub mod rng;
pub mod shard;
pub mod trace;
pub mod trainer;
pub mod watchdog;

pub use config::Config;
pub use error::{Error, Result};
/// The libtorch bindings the engine is built on (for tests and tools).
pub use tch;
pub use trainer::{train, CapturedGrad, FlopsModel, PeakSource, RunOptions, RunSummary};
