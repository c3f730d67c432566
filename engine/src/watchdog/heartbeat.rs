//! The heartbeat: one background thread per rank, on its own duplicate of the world
//! communicator (so it never matches the training traffic), needing
//! `MPI_THREAD_MULTIPLE`.
//!
//! * Every `heartbeat_s / 5` (clamped to 50 ms – 1 s) it sends each rank it watches — the
//!   members of its pipeline, tensor- and data-parallel groups, the ranks it waits on —
//!   a 64-byte beat saying what this rank is doing (step, current event, progress count).
//! * A watched peer that has sent nothing for `heartbeat_s` is declared stuck: this rank
//!   dumps its flight record, asks every live rank to dump theirs (and waits up to 3 s
//!   for their answers), prints one line naming the silent rank, and calls `MPI_Abort`.
//! * The same abort path serves fatal errors and panics of the main thread
//!   ([`Aborter`]). When several ranks abort at once, each learns of the others from
//!   their dump requests and only the lowest prints, so the job ends with one line; a
//!   rank already asked to dump by another declares no silent peer of its own (the
//!   asker, which may have printed already, names it).
//! * [`Heartbeat::finish`] ends it: a non-blocking barrier on the heartbeat communicator
//!   completes once every rank has finished, and until then every rank keeps beating, so
//!   a rank that finishes early is never mistaken for a dead one.
//!
//! Invariant: the thread never blocks in MPI (only `MPI_Isend`, `MPI_Iprobe` followed by
//! the receive of the probed message, `MPI_Test` and `MPI_Ibarrier`), so it always gets
//! to report.

use super::{PeerSeen, Watch};
use crate::error::{Error, Result};
use crate::flight::What;
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use mpi::ffi;
use partitioner::Rank;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::mem::MaybeUninit;
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

const TAG: i32 = 7001;
const WORDS: usize = 8;
const BEAT: u64 = 1;
const DUMP: u64 = 2;
const ACK: u64 = 3;
/// Beats in flight to one peer beyond which we stop adding more (a stopped peer).
const MAX_IN_FLIGHT: usize = 4;
/// How long an aborting rank waits for the others to dump their flight records.
const ACK_WAIT: Duration = Duration::from_secs(3);
/// How long a rank asked to dump waits for the job to be aborted before doing it itself.
const ABORT_WAIT: Duration = Duration::from_secs(15);
const TICK: Duration = Duration::from_millis(20);

/// An MPI communicator handle that may cross threads (the job runs
/// `MPI_THREAD_MULTIPLE`, and only the heartbeat thread uses it).
#[derive(Clone, Copy)]
struct RawComm(ffi::MPI_Comm);
// SAFETY: MPI handles are plain values; MPI_THREAD_MULTIPLE makes calls from any thread
// legal.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

enum Cmd {
    Finish,
    Fail { line: String, code: i32 },
}

/// The running heartbeat of one rank.
pub struct Heartbeat {
    tx: Sender<Cmd>,
    handle: JoinHandle<()>,
    aborter: Aborter,
}

/// Ends the job from any thread: dumps flight records everywhere, prints one line, and
/// aborts every rank.
#[derive(Clone)]
pub struct Aborter {
    tx: Sender<Cmd>,
    thread: ThreadId,
    watch: Watch,
}

fn print_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(format!("{line}\n").as_bytes());
    let _ = err.flush();
}

/// `MPI_Abort` on the world (every rank of the job).
fn mpi_abort(code: i32) -> ! {
    // Give mpiexec a moment to forward what was printed before it tears the job down.
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: MPI is initialised (the heartbeat exists) and MPI_THREAD_MULTIPLE.
    unsafe {
        ffi::MPI_Abort(ffi::RSMPI_COMM_WORLD, code);
    }
    std::process::exit(code)
}

/// Dumps this rank's flight record into the run directory, if there is one.
fn dump(watch: &Watch, reason: &str) {
    if let Some(dir) = watch.run_dir() {
        let _ = watch.flight().dump(dir, reason);
    }
}

impl Aborter {
    /// Stops the job with `line` (printed once, by this rank unless a lower rank is
    /// already aborting) and exit code `code`. Never returns.
    pub fn abort(&self, line: String, code: i32) -> ! {
        let on_heartbeat = std::thread::current().id() == self.thread;
        if !on_heartbeat
            && self
                .tx
                .send(Cmd::Fail {
                    line: line.clone(),
                    code,
                })
                .is_ok()
        {
            // The heartbeat thread collects the flight records and calls MPI_Abort.
            std::thread::sleep(ACK_WAIT + ABORT_WAIT);
        }
        dump(&self.watch, &line);
        print_line(&line);
        mpi_abort(code)
    }
}

impl Heartbeat {
    /// Starts the heartbeat of this rank on a duplicate of `world` (collective: every rank
    /// calls it). `prefix` starts every line it prints (`strata worker rank 0/2: error: `).
    pub fn start(world: ffi::MPI_Comm, watch: Watch, prefix: String) -> Result<Heartbeat> {
        let mut comm = MaybeUninit::<ffi::MPI_Comm>::uninit();
        let (mut me, mut size) = (0, 0);
        // SAFETY: `world` is a valid communicator; outputs point to locals.
        let rc = unsafe {
            let rc = ffi::MPI_Comm_dup(world, comm.as_mut_ptr());
            ffi::MPI_Comm_rank(world, &mut me);
            ffi::MPI_Comm_size(world, &mut size);
            rc
        };
        if rc != 0 {
            return Err(Error::Comm(format!("MPI_Comm_dup failed with code {rc}")));
        }
        // SAFETY: MPI_Comm_dup succeeded.
        let comm = RawComm(unsafe { comm.assume_init() });
        // SAFETY: a valid communicator and predefined error handler.
        unsafe {
            ffi::MPI_Comm_set_errhandler(comm.0, ffi::RSMPI_ERRORS_RETURN);
        }
        let me = Rank(me as usize);
        let others: Vec<Rank> = (0..size as usize).map(Rank).filter(|r| *r != me).collect();
        let watched = watched_peers(&watch, me, &others);
        let (tx, rx) = unbounded();
        let beat = Beat {
            comm,
            watch: watch.clone(),
            prefix,
            start: Instant::now(),
            last: HashMap::new(),
            others,
            watched,
            lost: HashSet::new(),
            sends: Vec::new(),
            in_flight: HashMap::new(),
            barrier: None,
            abort: None,
            asked: None,
        };
        let handle = std::thread::Builder::new()
            .name("strata-heartbeat".into())
            .spawn(move || beat.run(rx))
            .map_err(|e| Error::Comm(format!("cannot start the heartbeat thread: {e}")))?;
        let aborter = Aborter {
            tx: tx.clone(),
            thread: handle.thread().id(),
            watch,
        };
        Ok(Heartbeat {
            tx,
            handle,
            aborter,
        })
    }

    /// The handle that ends the job from any thread (fatal errors, the panic hook).
    pub fn aborter(&self) -> Aborter {
        self.aborter.clone()
    }

    /// Stops the heartbeat once every rank has called `finish` (collective), within
    /// `parallel.timeout_s`.
    pub fn finish(self) -> Result<()> {
        let watch = self.aborter.watch.clone();
        let limit = watch.deadlines().timeout;
        let start = Instant::now();
        let _ = self.tx.send(Cmd::Finish);
        while !self.handle.is_finished() {
            if start.elapsed() > limit {
                let all: Vec<Rank> = (0..watch.mesh().map_or(1, |m| m.world_size()))
                    .map(Rank)
                    .collect();
                return Err(watch.timeout(
                    "the end-of-job barrier (a rank has not finished)".into(),
                    None,
                    &all,
                    start.elapsed(),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.handle
            .join()
            .map_err(|_| Error::Internal("the heartbeat thread panicked".into()))
    }
}

/// The ranks whose heartbeats this one checks: its group peers (pipeline, tensor- and
/// data-parallel), which are the ranks it waits on; every rank of a job of two or more
/// has at least one watcher. Without a mesh, everyone.
fn watched_peers(watch: &Watch, me: Rank, others: &[Rank]) -> Vec<Rank> {
    let Some(mesh) = watch.mesh() else {
        return others.to_vec();
    };
    let mut peers: Vec<Rank> = [mesh.pp_group(me), mesh.tp_group(me), mesh.dp_group(me)]
        .into_iter()
        .flat_map(|g| g.unwrap_or_default())
        .filter(|r| *r != me)
        .collect();
    peers.sort();
    peers.dedup();
    peers
}

struct Aborting {
    line: String,
    code: i32,
    waiting_for: HashSet<Rank>,
    until: Instant,
    /// A lower rank is aborting too: its line is the one printed.
    yield_to: Option<Rank>,
}

struct Beat {
    comm: RawComm,
    watch: Watch,
    prefix: String,
    start: Instant,
    /// When each peer was last heard from.
    last: HashMap<Rank, Instant>,
    others: Vec<Rank>,
    watched: Vec<Rank>,
    lost: HashSet<Rank>,
    sends: Vec<(ffi::MPI_Request, Rank, Box<[u64; WORDS]>)>,
    in_flight: HashMap<Rank, usize>,
    barrier: Option<ffi::MPI_Request>,
    abort: Option<Aborting>,
    /// The lowest rank that asked this one to dump its flight record, and when the first
    /// asked.
    asked: Option<(Rank, Instant)>,
}

impl Beat {
    fn run(mut self, rx: Receiver<Cmd>) {
        let beat_every = (self.watch.deadlines().heartbeat / 5)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut next_beat = Instant::now();
        loop {
            self.receive();
            if Instant::now() >= next_beat {
                self.beat();
                next_beat = Instant::now() + beat_every;
            }
            self.complete_sends();
            if self.barrier_done() {
                self.wind_down();
                return;
            }
            self.check_silent();
            self.check_abort();
            match rx.recv_timeout(TICK) {
                Ok(Cmd::Finish) | Err(RecvTimeoutError::Disconnected) => self.post_barrier(),
                Ok(Cmd::Fail { line, code }) => self.begin_abort(line, code),
                Err(RecvTimeoutError::Timeout) => {}
            }
        }
    }

    /// Sends `msg` to `to` without blocking.
    fn send(&mut self, to: Rank, msg: [u64; WORDS]) {
        let msg = Box::new(msg);
        let mut req = MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: the boxed buffer stays alive (in `sends`) until the request completes.
        let rc = unsafe {
            ffi::MPI_Isend(
                msg.as_ptr() as *const std::ffi::c_void,
                (WORDS * 8) as i32,
                ffi::RSMPI_UINT8_T,
                to.0 as i32,
                TAG,
                self.comm.0,
                req.as_mut_ptr(),
            )
        };
        if rc == 0 {
            // SAFETY: MPI_Isend succeeded.
            self.sends.push((unsafe { req.assume_init() }, to, msg));
            *self.in_flight.entry(to).or_default() += 1;
        }
    }

    fn complete_sends(&mut self) {
        let mut i = 0;
        while i < self.sends.len() {
            let mut flag = 0;
            let mut status = MaybeUninit::<ffi::MPI_Status>::uninit();
            // SAFETY: a live request from MPI_Isend.
            let rc = unsafe { ffi::MPI_Test(&mut self.sends[i].0, &mut flag, status.as_mut_ptr()) };
            if rc != 0 || flag != 0 {
                let (_, to, _) = self.sends.swap_remove(i);
                if let Some(n) = self.in_flight.get_mut(&to) {
                    *n = n.saturating_sub(1);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Receives every pending heartbeat message.
    fn receive(&mut self) {
        loop {
            let mut flag = 0;
            let mut status = MaybeUninit::<ffi::MPI_Status>::uninit();
            // SAFETY: valid communicator and outputs.
            let rc = unsafe {
                ffi::MPI_Iprobe(
                    ffi::RSMPI_ANY_SOURCE,
                    TAG,
                    self.comm.0,
                    &mut flag,
                    status.as_mut_ptr(),
                )
            };
            if rc != 0 || flag == 0 {
                return;
            }
            // SAFETY: MPI_Iprobe found a message and filled the status.
            let from = unsafe { status.assume_init() }.MPI_SOURCE;
            let mut msg = [0u64; WORDS];
            let mut st = MaybeUninit::<ffi::MPI_Status>::uninit();
            // SAFETY: the probed message is at most WORDS·8 bytes (longer is an error
            // that MPI returns, not a write past the buffer).
            let rc = unsafe {
                ffi::MPI_Recv(
                    msg.as_mut_ptr() as *mut std::ffi::c_void,
                    (WORDS * 8) as i32,
                    ffi::RSMPI_UINT8_T,
                    from,
                    TAG,
                    self.comm.0,
                    st.as_mut_ptr(),
                )
            };
            if rc == 0 {
                self.handle(Rank(from as usize), msg);
            }
        }
    }

    fn handle(&mut self, from: Rank, msg: [u64; WORDS]) {
        self.last.insert(from, Instant::now());
        match msg[0] {
            BEAT => self.watch.saw(
                from,
                PeerSeen {
                    at: Instant::now(),
                    step: msg[1] as usize,
                    begun: msg[2],
                    for_s: msg[3] as f64 * 1e-6,
                    doing: What::decode([msg[4], msg[5], msg[6], msg[7]]),
                },
            ),
            DUMP => {
                match &mut self.abort {
                    Some(a) if from < self.watch.rank() => {
                        a.yield_to = Some(a.yield_to.map_or(from, |r| r.min(from)));
                    }
                    Some(_) => {}
                    None => match &mut self.asked {
                        Some((lowest, _)) => *lowest = (*lowest).min(from),
                        None => {
                            self.asked = Some((from, Instant::now()));
                            dump(&self.watch, &format!("rank {from} is stopping the job"));
                        }
                    },
                }
                let mut ack = [0u64; WORDS];
                ack[0] = ACK;
                self.send(from, ack);
            }
            ACK => {
                if let Some(a) = &mut self.abort {
                    a.waiting_for.remove(&from);
                }
            }
            _ => {}
        }
    }

    fn beat(&mut self) {
        let doing = self.watch.flight().doing();
        let what = doing.what.map_or([0; 4], |w| w.encode());
        let msg = [
            BEAT,
            doing.step as u64,
            doing.begun,
            (doing.for_s * 1e6) as u64,
            what[0],
            what[1],
            what[2],
            what[3],
        ];
        for p in self.watched.clone() {
            if !self.lost.contains(&p)
                && self.in_flight.get(&p).copied().unwrap_or(0) < MAX_IN_FLIGHT
            {
                self.send(p, msg);
            }
        }
    }

    fn check_silent(&mut self) {
        // Another rank is already stopping the job (it asked us to dump, and prints its
        // own line): a silence noticed now is the same failure, seen a moment later, and a
        // second abort would print a second line. Two watchers of one stopped rank notice
        // within a tick of each other; the "lowest rank prints" rule cannot help when the
        // higher one has already printed. If the asker never aborts, `check_abort` stops
        // the job after ABORT_WAIT.
        if self.abort.is_some() || self.asked.is_some() {
            return;
        }
        let limit = self.watch.deadlines().heartbeat;
        let silent = self.watched.iter().copied().find_map(|p| {
            let heard = self.last.get(&p).copied().unwrap_or(self.start);
            (heard.elapsed() > limit).then_some((p, heard.elapsed()))
        });
        if let Some((p, quiet)) = silent {
            self.lost.insert(p);
            let stall = self.watch.silent(p, quiet);
            self.begin_abort(format!("{}{stall}", self.prefix), 1);
        }
    }

    /// Starts stopping the job: dump, ask every live rank to dump, then abort.
    fn begin_abort(&mut self, line: String, code: i32) {
        if self.abort.is_some() {
            return;
        }
        dump(&self.watch, &line);
        let mut ask = [0u64; WORDS];
        ask[0] = DUMP;
        let live: Vec<Rank> = self
            .others
            .iter()
            .copied()
            .filter(|r| !self.lost.contains(r))
            .collect();
        for r in &live {
            self.send(*r, ask);
        }
        // Of the ranks stopping the job, the lowest prints: yield to a lower one that
        // already asked us to dump (a higher one yields to us when our request arrives).
        let me = self.watch.rank();
        let yield_to = self.asked.map(|(r, _)| r).filter(|r| *r < me);
        self.abort = Some(Aborting {
            line,
            code,
            waiting_for: live.into_iter().collect(),
            until: Instant::now() + ACK_WAIT,
            yield_to,
        });
    }

    /// Aborts once every live rank has dumped (or the wait is over).
    fn check_abort(&mut self) {
        if let Some(a) = &self.abort {
            let done = a.waiting_for.is_empty() || Instant::now() >= a.until;
            if done && a.yield_to.is_none() {
                print_line(&a.line);
                mpi_abort(a.code);
            }
            if Instant::now() >= a.until + ABORT_WAIT {
                // The rank we yielded to did not abort the job: do it ourselves.
                print_line(&a.line);
                mpi_abort(a.code);
            }
        } else if self.asked.is_some_and(|(_, t)| t.elapsed() > ABORT_WAIT) {
            let line = format!(
                "{}another rank asked to stop the job {} s ago, but the job is still running",
                self.prefix,
                ABORT_WAIT.as_secs()
            );
            self.begin_abort(line, 1);
        }
    }

    fn post_barrier(&mut self) {
        if self.barrier.is_some() {
            return;
        }
        let mut req = MaybeUninit::<ffi::MPI_Request>::uninit();
        // SAFETY: valid communicator and output.
        let rc = unsafe { ffi::MPI_Ibarrier(self.comm.0, req.as_mut_ptr()) };
        if rc == 0 {
            // SAFETY: MPI_Ibarrier succeeded.
            self.barrier = Some(unsafe { req.assume_init() });
        }
    }

    fn barrier_done(&mut self) -> bool {
        let Some(req) = self.barrier.as_mut() else {
            return false;
        };
        let mut flag = 0;
        let mut status = MaybeUninit::<ffi::MPI_Status>::uninit();
        // SAFETY: a live request from MPI_Ibarrier.
        let rc = unsafe { ffi::MPI_Test(req, &mut flag, status.as_mut_ptr()) };
        rc != 0 || flag != 0
    }

    /// Every rank has finished: take in what is still arriving and complete our sends.
    fn wind_down(&mut self) {
        let until = Instant::now() + Duration::from_secs(1);
        while !self.sends.is_empty() && Instant::now() < until {
            self.receive();
            self.complete_sends();
            std::thread::sleep(Duration::from_millis(1));
        }
        self.receive();
        for (mut req, _, buf) in self.sends.drain(..) {
            // SAFETY: a live request; its buffer is leaked, as MPI may still read it.
            unsafe {
                ffi::MPI_Request_free(&mut req);
            }
            std::mem::forget(buf);
        }
        // SAFETY: the communicator is no longer used.
        unsafe {
            ffi::MPI_Comm_free(&mut self.comm.0);
        }
    }
}
