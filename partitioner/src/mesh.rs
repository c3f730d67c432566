//! The 3-D device mesh: which world rank is which (pipeline, data, tensor) coordinate.
//!
//! Rank order is Megatron's: tensor-parallel fastest, then data-parallel, then pipeline:
//! `rank = pp_idx · dp · tp + dp_idx · tp + tp_idx`. So the ranks of one tensor-parallel
//! group are consecutive (one node, fast links), and pipeline stage `i` owns the block of
//! ranks `i·dp·tp .. (i+1)·dp·tp`.
//!
//! Invariants: `coords` and `rank` are inverse bijections between `0..world` and the
//! coordinate box; for each axis the groups (`tp_group`, `dp_group`, `pp_group`)
//! partition the world, every group has the axis's size and is sorted by that axis's
//! index. Everything is a pure function of (pp, tp, dp, rank).

use crate::error::{Error, Result};
use crate::ids::Rank;
use serde::{Deserialize, Serialize};

/// A rank's coordinates in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MeshCoord {
    /// Pipeline stage (rank) index, `0..pp`.
    pub pp: usize,
    /// Data-parallel replica index, `0..dp`.
    pub dp: usize,
    /// Tensor-parallel index, `0..tp`.
    pub tp: usize,
}

/// The pipeline × data × tensor parallel layout of a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mesh {
    pub pp: usize,
    pub tp: usize,
    pub dp: usize,
}

impl Mesh {
    /// A mesh of `pp · tp · dp` ranks; every degree must be at least 1.
    pub fn new(pp: usize, tp: usize, dp: usize) -> Result<Mesh> {
        for (field, v) in [
            ("parallel.pp", pp),
            ("parallel.tp", tp),
            ("parallel.dp", dp),
        ] {
            if v == 0 {
                return Err(Error::NotPositive { field, value: 0 });
            }
        }
        Ok(Mesh { pp, tp, dp })
    }

    /// Number of ranks: `pp · tp · dp`.
    pub fn world_size(&self) -> usize {
        self.pp * self.tp * self.dp
    }

    /// Checks that the job has exactly `pp · tp · dp` ranks.
    pub fn validate_world(&self, world: usize) -> Result<()> {
        if world != self.world_size() {
            return Err(Error::WorldMismatch {
                world,
                pp: self.pp,
                tp: self.tp,
                dp: self.dp,
                product: self.world_size(),
            });
        }
        Ok(())
    }

    fn outside(&self, what: String) -> Error {
        Error::OutsideMesh {
            what,
            pp: self.pp,
            tp: self.tp,
            dp: self.dp,
            world: self.world_size(),
        }
    }

    /// The coordinates of `rank`.
    pub fn coords(&self, rank: Rank) -> Result<MeshCoord> {
        if rank.0 >= self.world_size() {
            return Err(self.outside(format!("rank {rank}")));
        }
        Ok(MeshCoord {
            tp: rank.0 % self.tp,
            dp: (rank.0 / self.tp) % self.dp,
            pp: rank.0 / (self.tp * self.dp),
        })
    }

    /// The rank at `coord`.
    pub fn rank(&self, coord: MeshCoord) -> Result<Rank> {
        if coord.pp >= self.pp || coord.dp >= self.dp || coord.tp >= self.tp {
            return Err(self.outside(format!(
                "coordinate (pp {}, dp {}, tp {})",
                coord.pp, coord.dp, coord.tp
            )));
        }
        Ok(Rank(
            coord.pp * self.dp * self.tp + coord.dp * self.tp + coord.tp,
        ))
    }

    fn group(
        &self,
        rank: Rank,
        vary: impl Fn(MeshCoord, usize) -> MeshCoord,
        n: usize,
    ) -> Result<Vec<Rank>> {
        let c = self.coords(rank)?;
        (0..n).map(|i| self.rank(vary(c, i))).collect()
    }

    /// The tensor-parallel group of `rank` (same pp and dp), ordered by tp index.
    pub fn tp_group(&self, rank: Rank) -> Result<Vec<Rank>> {
        self.group(rank, |c, i| MeshCoord { tp: i, ..c }, self.tp)
    }

    /// The data-parallel group of `rank` (same pp and tp), ordered by dp index.
    pub fn dp_group(&self, rank: Rank) -> Result<Vec<Rank>> {
        self.group(rank, |c, i| MeshCoord { dp: i, ..c }, self.dp)
    }

    /// The pipeline group of `rank` (same dp and tp), ordered by stage.
    pub fn pp_group(&self, rank: Rank) -> Result<Vec<Rank>> {
        self.group(rank, |c, i| MeshCoord { pp: i, ..c }, self.pp)
    }

    /// Every rank in order.
    pub fn ranks(&self) -> impl Iterator<Item = Rank> {
        (0..self.world_size()).map(Rank)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn check_partition(mesh: &Mesh, group: impl Fn(Rank) -> Vec<Rank>, size: usize) {
        let world = mesh.world_size();
        let mut groups = BTreeSet::new();
        for r in mesh.ranks() {
            let g = group(r);
            assert_eq!(g.len(), size);
            assert!(g.contains(&r), "{r} not in its own group {g:?}");
            for &m in &g {
                assert_eq!(group(m), g, "groups of {r} and {m} differ");
            }
            groups.insert(g);
        }
        // Disjoint and covering: sizes add up to the world and the union is everything.
        let all: BTreeSet<Rank> = groups.iter().flatten().copied().collect();
        assert_eq!(all.len(), world);
        assert_eq!(groups.len() * size, world);
    }

    #[test]
    fn exhaustive_small_worlds() {
        for pp in 1..=4 {
            for tp in 1..=4 {
                for dp in 1..=4 {
                    let mesh = Mesh::new(pp, tp, dp).unwrap();
                    let world = mesh.world_size();
                    mesh.validate_world(world).unwrap();
                    let mut seen = BTreeSet::new();
                    for r in mesh.ranks() {
                        let c = mesh.coords(r).unwrap();
                        assert_eq!(r.0, c.pp * dp * tp + c.dp * tp + c.tp);
                        assert_eq!(mesh.rank(c).unwrap(), r);
                        seen.insert(c);
                        let tg = mesh.tp_group(r).unwrap();
                        // tp fastest: consecutive ranks
                        assert!(tg.windows(2).all(|w| w[1].0 == w[0].0 + 1));
                        let pg = mesh.pp_group(r).unwrap();
                        for (i, &m) in pg.iter().enumerate() {
                            assert_eq!(mesh.coords(m).unwrap().pp, i);
                        }
                    }
                    assert_eq!(seen.len(), world);
                    check_partition(&mesh, |r| mesh.tp_group(r).unwrap(), tp);
                    check_partition(&mesh, |r| mesh.dp_group(r).unwrap(), dp);
                    check_partition(&mesh, |r| mesh.pp_group(r).unwrap(), pp);
                    assert!(mesh.coords(Rank(world)).is_err());
                }
            }
        }
    }

    #[test]
    fn megatron_order_example() {
        // pp 2, dp 2, tp 2: rank 5 = pp 1, dp 0, tp 1.
        let m = Mesh::new(2, 2, 2).unwrap();
        assert_eq!(
            m.coords(Rank(5)).unwrap(),
            MeshCoord {
                pp: 1,
                dp: 0,
                tp: 1
            }
        );
        assert_eq!(m.tp_group(Rank(5)).unwrap(), vec![Rank(4), Rank(5)]);
        assert_eq!(m.dp_group(Rank(5)).unwrap(), vec![Rank(5), Rank(7)]);
        assert_eq!(m.pp_group(Rank(5)).unwrap(), vec![Rank(1), Rank(5)]);
    }

    #[test]
    fn world_mismatch_names_world_and_product() {
        let e = Mesh::new(2, 2, 3)
            .unwrap()
            .validate_world(8)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("world size 8") && e.contains("2 · 2 · 3 = 12"),
            "{e}"
        );
        assert!(Mesh::new(0, 1, 1)
            .unwrap_err()
            .to_string()
            .contains("parallel.pp"));
    }
}
