//! MPI communicator over the `mpi` crate (MPICH or Open MPI).
//!
//! Sends are `MPI_Isend`s whose buffers are kept in a pending list until `MPI_Test` says
//! they are done; receives poll `MPI_Iprobe` with a sleeping back-off and then receive the
//! exact probed size. Nothing ever sits in a blocking MPI call, because MPICH's blocking
//! calls busy-poll and would pin a core at 100% while a rank waits for its neighbour.

use super::{Backoff, Communicator, Tag};
use crate::error::{Error, Result};
use ::mpi::ffi;
use ::mpi::raw::AsRaw;
use ::mpi::topology::{Communicator as _, SimpleCommunicator};
use ::mpi::traits::*;
use partitioner::Rank;

struct PendingSend {
    /// Kept alive (and unmoved on the heap) until the request completes.
    _buf: Vec<u8>,
    req: ffi::MPI_Request,
}

// SAFETY: the request handle is only used from the thread that owns the communicator.
unsafe impl Send for PendingSend {}

/// An MPI communicator (the world, or a group cut from it).
pub struct MpiComm {
    comm: SimpleCommunicator,
    pending: Vec<PendingSend>,
}

impl MpiComm {
    /// Wraps an MPI communicator.
    pub fn new(comm: SimpleCommunicator) -> MpiComm {
        MpiComm {
            comm,
            pending: Vec::new(),
        }
    }

    /// Aborts the whole job (all ranks) with `code`.
    pub fn abort(&self, code: i32) -> ! {
        self.comm.abort(code)
    }
}

/// Completes whichever pending sends are done; never blocks.
fn progress(pending: &mut Vec<PendingSend>) -> Result<()> {
    let mut i = 0;
    while i < pending.len() {
        let mut flag = 0;
        let rc = unsafe {
            let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
            ffi::MPI_Test(&mut pending[i].req, &mut flag, status.as_mut_ptr())
        };
        if rc != 0 {
            return Err(Error::Comm(format!("MPI_Test failed with code {rc}")));
        }
        if flag != 0 {
            pending.swap_remove(i);
        } else {
            i += 1;
        }
    }
    Ok(())
}

impl Communicator for MpiComm {
    fn rank(&self) -> Rank {
        Rank(self.comm.rank() as usize)
    }

    fn size(&self) -> usize {
        self.comm.size() as usize
    }

    fn send(&mut self, to: Rank, tag: Tag, data: Vec<u8>) -> Result<()> {
        let count = i32::try_from(data.len())
            .map_err(|_| Error::Comm(format!("message of {} bytes exceeds 2 GiB", data.len())))?;
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let rc = unsafe {
            ffi::MPI_Isend(
                data.as_ptr() as *const std::ffi::c_void,
                count,
                u8::equivalent_datatype().as_raw(),
                to.0 as i32,
                tag.0,
                self.comm.as_raw(),
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Comm(format!(
                "MPI_Isend to rank {to} failed with code {rc}"
            )));
        }
        self.pending.push(PendingSend {
            _buf: data,
            req: unsafe { req.assume_init() },
        });
        progress(&mut self.pending)
    }

    fn recv(&mut self, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        let mut backoff = Backoff::default();
        let process = self.comm.process_at_rank(from.0 as i32);
        loop {
            if let Some(status) = process.immediate_probe_with_tag(tag.0) {
                let n = status.count(u8::equivalent_datatype()) as usize;
                let mut buf = vec![0u8; n];
                process.receive_into_with_tag(&mut buf[..], tag.0);
                return Ok(buf);
            }
            progress(&mut self.pending)?;
            backoff.wait();
        }
    }

    fn flush(&mut self) -> Result<()> {
        let mut backoff = Backoff::default();
        loop {
            progress(&mut self.pending)?;
            if self.pending.is_empty() {
                return Ok(());
            }
            backoff.wait();
        }
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}
