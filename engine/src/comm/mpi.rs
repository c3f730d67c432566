//! MPI communicator over the `mpi` crate (MPICH or Open MPI).
//!
//! Sends are `MPI_Isend`s whose buffers are kept in a pending list until `MPI_Test` says
//! they are done. Receives are either posted early (`MPI_Irecv` into an owned buffer of the
//! expected size, see [`Communicator::post_recv`]) and completed by polling `MPI_Test`, or,
//! when nothing was posted, found by polling `MPI_Iprobe` and received at the probed size.
//! Nothing ever sits in a blocking MPI call, because MPICH's blocking calls busy-poll and
//! would pin a core at 100% while a rank waits for its neighbour. The communicator's
//! error handler is `MPI_ERRORS_RETURN`, so MPI failures (a message longer than the
//! posted buffer, say) come back as [`Error::Comm`] instead of killing the process.

use super::{Backoff, Communicator, ReduceOp, Tag};
use crate::error::{Error, Result};
use ::mpi::ffi;
use ::mpi::raw::AsRaw;
use ::mpi::topology::{Communicator as _, SimpleCommunicator};
use ::mpi::traits::*;
use partitioner::Rank;
use std::collections::{HashMap, VecDeque};

struct PendingSend {
    /// Kept alive (and unmoved on the heap) until the request completes.
    _buf: Vec<u8>,
    req: ffi::MPI_Request,
}

// SAFETY: the request handle is only used from the thread that owns the communicator.
unsafe impl Send for PendingSend {}

/// A receive posted ahead of time.
struct PostedRecv {
    buf: Vec<u8>,
    req: ffi::MPI_Request,
}

// SAFETY: as for PendingSend.
unsafe impl Send for PostedRecv {}

/// An MPI communicator (the world, or a group cut from it).
pub struct MpiComm {
    comm: SimpleCommunicator,
    pending: Vec<PendingSend>,
    posted: HashMap<(Rank, Tag), VecDeque<PostedRecv>>,
}

impl MpiComm {
    /// Wraps an MPI communicator and makes its MPI errors returnable.
    pub fn new(comm: SimpleCommunicator) -> MpiComm {
        unsafe {
            ffi::MPI_Comm_set_errhandler(comm.as_raw(), ffi::RSMPI_ERRORS_RETURN);
        }
        MpiComm {
            comm,
            pending: Vec::new(),
            posted: HashMap::new(),
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

    fn post_recv(&mut self, from: Rank, tag: Tag, len: usize) -> Result<()> {
        let count = i32::try_from(len)
            .map_err(|_| Error::Comm(format!("message of {len} bytes exceeds 2 GiB")))?;
        let mut buf = vec![0u8; len];
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let rc = unsafe {
            ffi::MPI_Irecv(
                buf.as_mut_ptr() as *mut std::ffi::c_void,
                count,
                u8::equivalent_datatype().as_raw(),
                from.0 as i32,
                tag.0,
                self.comm.as_raw(),
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Comm(format!(
                "MPI_Irecv from rank {from} failed with code {rc}"
            )));
        }
        self.posted
            .entry((from, tag))
            .or_default()
            .push_back(PostedRecv {
                buf,
                req: unsafe { req.assume_init() },
            });
        Ok(())
    }

    fn recv(&mut self, from: Rank, tag: Tag) -> Result<Vec<u8>> {
        let mut backoff = Backoff::default();
        if let Some(mut posted) = self
            .posted
            .get_mut(&(from, tag))
            .and_then(|q| q.pop_front())
        {
            loop {
                let mut flag = 0;
                let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
                let rc = unsafe { ffi::MPI_Test(&mut posted.req, &mut flag, status.as_mut_ptr()) };
                if rc != 0 {
                    // The buffer must outlive a request MPI still owns: leak it.
                    std::mem::forget(posted.buf);
                    return Err(Error::Comm(format!(
                        "receive from rank {from} (tag {}) failed with MPI code {rc} (a message longer than expected?)",
                        tag.0
                    )));
                }
                if flag != 0 {
                    let mut count = 0;
                    unsafe {
                        ffi::MPI_Get_count(
                            status.as_ptr(),
                            u8::equivalent_datatype().as_raw(),
                            &mut count,
                        );
                    }
                    posted.buf.truncate(count.max(0) as usize);
                    return Ok(posted.buf);
                }
                progress(&mut self.pending)?;
                backoff.wait();
            }
        }
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

    fn all_reduce_f32(&mut self, values: &mut [f32], op: ReduceOp) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        let count = i32::try_from(values.len()).map_err(|_| {
            Error::Comm(format!(
                "all-reduce of {} values exceeds 2^31",
                values.len()
            ))
        })?;
        // MPI_IN_PLACE is a macro with no binding: reduce from a copy.
        let send = values.to_vec();
        let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
        let rc = unsafe {
            ffi::MPI_Iallreduce(
                send.as_ptr() as *const std::ffi::c_void,
                values.as_mut_ptr() as *mut std::ffi::c_void,
                count,
                f32::equivalent_datatype().as_raw(),
                match op {
                    ReduceOp::Sum => ffi::RSMPI_SUM,
                    ReduceOp::Max => ffi::RSMPI_MAX,
                },
                self.comm.as_raw(),
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(Error::Comm(format!("MPI_Iallreduce failed with code {rc}")));
        }
        let mut req = unsafe { req.assume_init() };
        let mut backoff = Backoff::default();
        loop {
            let mut flag = 0;
            let mut status = std::mem::MaybeUninit::<ffi::MPI_Status>::uninit();
            let rc = unsafe { ffi::MPI_Test(&mut req, &mut flag, status.as_mut_ptr()) };
            if rc != 0 {
                return Err(Error::Comm(format!("MPI_Iallreduce failed with code {rc}")));
            }
            if flag != 0 {
                return Ok(());
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
