//! The communicators of one rank in a `pp × tp × dp` mesh: the world plus its pipeline,
//! tensor-parallel and data-parallel groups, cut from the world by the mesh's pure
//! coordinate functions (tp fastest, then dp, then pp, as in Megatron). Passed explicitly
//! to the engine; nothing is global.
//!
//! Invariant: in every group, the group rank of a member equals its index along that
//! mesh axis (its pipeline stage in `pp`, its shard in `tp`, its replica in `dp`).

use super::local::LocalComm;
use super::mpi::MpiComm;
use super::Communicator;
use crate::error::{Error, Result};
use crate::flight::{FlightRecorder, Group, DEFAULT_CAPACITY};
use crate::watchdog::{Deadlines, Watch};
use ::mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use partitioner::mesh::{Mesh, MeshCoord};
use partitioner::Rank;

/// One rank's communicators.
pub struct ParallelComms {
    pub mesh: Mesh,
    pub coord: MeshCoord,
    pub world: Box<dyn Communicator>,
    /// Ranks with this rank's (dp, tp): the pipeline, indexed by stage.
    pub pp: Box<dyn Communicator>,
    /// Ranks with this rank's (pp, dp): the tensor-parallel shards.
    pub tp: Box<dyn Communicator>,
    /// Ranks with this rank's (pp, tp): the data-parallel replicas.
    pub dp: Box<dyn Communicator>,
}

fn mesh_err(e: partitioner::Error) -> Error {
    Error::Comm(format!("mesh: {e}"))
}

impl ParallelComms {
    /// This rank's world rank.
    pub fn rank(&self) -> Rank {
        self.world.rank()
    }

    /// This rank's flight recorder (the transports record into it).
    pub fn flight(&self) -> Option<&FlightRecorder> {
        self.world.flight()
    }

    /// Cuts the groups of `mesh` out of an MPI world (collective: every rank calls it);
    /// every wait is under `watch` (its deadlines, its flight recorder).
    pub fn from_mpi(world: SimpleCommunicator, mesh: Mesh, watch: &Watch) -> Result<ParallelComms> {
        mesh.validate_world(world.size() as usize)
            .map_err(mesh_err)?;
        let rank = Rank(world.rank() as usize);
        let c = mesh.coords(rank).map_err(mesh_err)?;
        // Colour = the coordinates that stay fixed in the group; key = the varying one.
        let split = |colour: usize, key: usize, group| -> Result<Box<dyn Communicator>> {
            let sub = world
                .split_by_color_with_key(Color::with_value(colour as i32), key as i32)
                .ok_or_else(|| Error::Comm("MPI_Comm_split returned no communicator".into()))?;
            Ok(Box::new(MpiComm::new(sub, group, watch.clone())?))
        };
        let pp = split(c.dp * mesh.tp + c.tp, c.pp, Group::Pp)?;
        let tp = split(c.pp * mesh.dp + c.dp, c.tp, Group::Tp)?;
        let dp = split(c.pp * mesh.tp + c.tp, c.dp, Group::Dp)?;
        Ok(ParallelComms {
            mesh,
            coord: c,
            world: Box::new(MpiComm::new(world, Group::World, watch.clone())?),
            pp,
            tp,
            dp,
        })
    }

    /// In-process communicators for every rank of `mesh` (hand one to each thread), with
    /// the default deadlines.
    pub fn local(mesh: Mesh) -> Result<Vec<ParallelComms>> {
        Self::local_with(mesh, Deadlines::default())
    }

    /// In-process communicators for every rank of `mesh`, whose waits have `deadlines`.
    pub fn local_with(mesh: Mesh, deadlines: Deadlines) -> Result<Vec<ParallelComms>> {
        let n = mesh.world_size();
        let failed = LocalComm::failure_flag();
        let watches: Vec<Watch> = (0..n)
            .map(|r| {
                let flight =
                    FlightRecorder::new(Rank(r), mesh.coords(Rank(r)).ok(), DEFAULT_CAPACITY);
                Watch::new(flight, Some(mesh), deadlines, None)
            })
            .collect();
        let everyone: Vec<Rank> = (0..n).map(Rank).collect();
        let mut world: Vec<Option<LocalComm>> =
            LocalComm::subgroup(&everyone, &failed, Group::World, &watches)
                .into_iter()
                .map(Some)
                .collect();
        let mut pp: Vec<Option<LocalComm>> = (0..n).map(|_| None).collect();
        let mut tp: Vec<Option<LocalComm>> = (0..n).map(|_| None).collect();
        let mut dp: Vec<Option<LocalComm>> = (0..n).map(|_| None).collect();
        for r in 0..n {
            let r = Rank(r);
            for (slots, group, axis) in [
                (&mut pp, mesh.pp_group(r).map_err(mesh_err)?, Group::Pp),
                (&mut tp, mesh.tp_group(r).map_err(mesh_err)?, Group::Tp),
                (&mut dp, mesh.dp_group(r).map_err(mesh_err)?, Group::Dp),
            ] {
                // Each group is created once, by its lowest member.
                if group[0] != r {
                    continue;
                }
                let comms = LocalComm::subgroup(&group, &failed, axis, &watches);
                for (member, comm) in group.iter().zip(comms) {
                    slots[member.0] = Some(comm);
                }
            }
        }
        (0..n)
            .map(|r| {
                let take = |v: &mut Vec<Option<LocalComm>>| -> Box<dyn Communicator> {
                    Box::new(v[r].take().expect("every rank is in one group per axis"))
                };
                Ok(ParallelComms {
                    mesh,
                    coord: mesh.coords(Rank(r)).map_err(mesh_err)?,
                    world: take(&mut world),
                    pp: take(&mut pp),
                    tp: take(&mut tp),
                    dp: take(&mut dp),
                })
            })
            .collect()
    }
}
