//! Loading `model.init_from` into a rank's parameters: each rank opens the HF directory
//! (memory-mapped) and copies, for every parameter it holds, exactly the blocks its
//! [`ShardSpec`](crate::shard::ShardSpec) covers, so no rank reads or holds more than its
//! share (tensor-parallel shards, pipeline chunks).

use super::HfCheckpoint;
use crate::config::Config;
use crate::error::Result;
use crate::model::Param;

/// Overwrites `params` (this rank's) with the weights of `model.init_from`; nothing
/// without it. The config was validated against the directory when loaded.
pub fn load_init_from(cfg: &Config, params: &[Param]) -> Result<()> {
    let Some(dir) = cfg.init_from_dir() else {
        return Ok(());
    };
    let ckpt = HfCheckpoint::open(&dir)?;
    let import = ckpt.import(&cfg.model_spec()?)?;
    for p in params {
        import.load_shard(&p.name, &p.spec, &p.tensor)?;
    }
    Ok(())
}
