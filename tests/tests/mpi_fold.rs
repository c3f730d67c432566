//! The MPI transport's two tensor protocols, on both sides of the folding threshold
//! (engine::comm::fold): payloads just below, at and just above it, and tiny and large
//! ones, in every wire dtype and in 1-, 2- and 3-D shapes, arrive bit for bit, are echoed
//! back bit for bit, and land again in the reused receive tensors the next step. A tensor
//! of another shape than the receiver expects is a typed `Error::Wire` naming both shapes,
//! whichever protocol each side took, never a hang or a panic.
//!
//! Runs as its own `main` (harness = false): the parent starts itself under
//! `mpiexec -n 2` with `STRATA_FOLD_TEST_CHILD` set, and each child is one rank.

use engine::comm::fold::{Fold, DEFAULT_FOLD_MAX};
use engine::comm::mpi::MpiComm;
use engine::comm::wire::{self, Expect};
use engine::comm::{Communicator, Tag};
use engine::flight::{FlightRecorder, Group};
use engine::tch::{Kind, Tensor};
use engine::watchdog::{Deadlines, Watch};
use engine::Error;
use mpi::topology::Communicator as _;
use partitioner::Rank;
use std::time::Duration;
use strata_tests::run_with_limit;

const CHILD: &str = "STRATA_FOLD_TEST_CHILD";
const KINDS: [Kind; 5] = [
    Kind::Float,
    Kind::Double,
    Kind::Half,
    Kind::BFloat16,
    Kind::Int64,
];

fn main() {
    if std::env::var_os(CHILD).is_some() {
        rank_main();
        return;
    }
    let mut cmd = std::process::Command::new("mpiexec");
    cmd.args(["-n", "2"])
        .arg(std::env::current_exe().unwrap())
        .env(CHILD, "1")
        .env_remove(engine::comm::fold::FOLD_ENV)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let run = run_with_limit(cmd, Duration::from_secs(120));
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("checked"), "{}", run.stdout);
    print!("{}", run.stdout);
}

/// One message of the exchange: a tensor of `kind` and `shape`.
struct Case {
    kind: Kind,
    shape: Vec<i64>,
}

impl Case {
    fn expect(&self, mb: usize) -> Expect {
        Expect {
            kind: self.kind,
            shape: self.shape.clone(),
            chunk: 1,
            microbatch: mb,
        }
    }

    fn bytes(&self) -> usize {
        self.expect(0).payload_len()
    }
}

/// 1-, 2- and 3-D shapes of `n` elements.
fn shapes(n: i64) -> Vec<Vec<i64>> {
    let d = (2..n).find(|d| n % d == 0).unwrap_or(1);
    vec![vec![n], vec![d, n / d], vec![1, n / d, d]]
}

/// Payloads around `max` (and tiny and large ones), in every dtype and shape.
fn cases(max: usize) -> Vec<Case> {
    let mut out = Vec::new();
    for kind in KINDS {
        let elt = kind.elt_size_in_bytes();
        let mut sizes = vec![elt, 3 * elt, 256 << 10];
        if max >= elt {
            sizes.extend([max - elt, max, max + elt]);
        }
        for bytes in sizes {
            for shape in shapes((bytes / elt) as i64) {
                out.push(Case { kind, shape });
            }
        }
    }
    out
}

/// The keyed bytes of message `i` of `step` (any bit pattern: compared as bytes).
fn pattern(step: u64, i: usize, n: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (step << 32) ^ (i as u64 + 1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn tensor(case: &Case, bytes: &[u8]) -> Tensor {
    Tensor::f_from_data_size(bytes, &case.shape, case.kind).unwrap()
}

fn bytes_of(t: &Tensor) -> Vec<u8> {
    let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut out, t.numel()).unwrap();
    out
}

fn rank_main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let me = Rank(world.rank() as usize);
    let watch = Watch::new(
        FlightRecorder::new(me, None, 64),
        None,
        Deadlines::default(),
        None,
    );
    let mut comm = MpiComm::new(world.duplicate(), Group::World, watch).unwrap();
    assert_eq!(comm.fold(), Fold::default(), "unset STRATA_P2P_FOLD");
    let mut checked = 0;
    for (phase, fold) in [Fold::new(1 << 10), Fold::new(64), Fold::new(0)]
        .into_iter()
        .enumerate()
    {
        comm.set_fold(fold);
        let cases = cases(fold.max());
        assert!(cases.iter().any(|c| fold.folds(c.bytes())) || fold.max() == 0);
        assert!(cases.iter().any(|c| !fold.folds(c.bytes())));
        for step in 0..2 {
            checked += exchange(&mut comm, &cases, step);
        }
        checked += mismatches(&mut comm, fold, phase);
    }
    comm.flush().unwrap();
    if me.0 == 0 {
        println!("checked {checked} messages across folding thresholds 1 KiB, 64 B and none (default {DEFAULT_FOLD_MAX})");
    }
}

/// Rank 0 sends every case, rank 1 checks and echoes it, rank 0 checks the echo; every
/// receive of a step is posted before its first send (as the executor does).
fn exchange(comm: &mut MpiComm, cases: &[Case], step: u64) -> usize {
    let me = comm.rank().0;
    let peer = Rank(1 - me);
    let tag = |i: usize| Tag(100 + i as i32);
    for (i, c) in cases.iter().enumerate() {
        comm.post_recv_tensor(peer, tag(i), &c.expect(i)).unwrap();
    }
    comm.barrier().unwrap();
    if me == 0 {
        for (i, c) in cases.iter().enumerate() {
            let t = tensor(c, &pattern(step, i, c.bytes()));
            let header = wire::header(&t, 1, i).unwrap();
            comm.send_tensor(peer, tag(i), header, &t).unwrap();
        }
    }
    let mut echoes = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let got = comm.recv_tensor(peer, tag(i), &c.expect(i)).unwrap();
        let what = format!("rank {me}, step {step}, {:?} {:?}", c.kind, c.shape);
        assert_eq!(got.kind(), c.kind, "{what}");
        assert_eq!(got.size(), c.shape, "{what}");
        assert!(
            bytes_of(&got) == pattern(step, i, c.bytes()),
            "{what}: payload differs"
        );
        if me == 1 {
            let header = wire::header(&got, 1, i).unwrap();
            comm.send_tensor(peer, tag(i), header, &got).unwrap();
            echoes.push(got); // valid until (peer, tag) is received again
        }
    }
    comm.flush().unwrap();
    comm.barrier().unwrap();
    cases.len()
}

/// A tensor of another shape than expected, within and across protocols: a typed error
/// naming both shapes on the receiver. Tags are new each `phase`: a failed two-message
/// receive leaves its elements' receive posted.
fn mismatches(comm: &mut MpiComm, fold: Fold, phase: usize) -> usize {
    let me = comm.rank().0;
    let peer = Rank(1 - me);
    let small = (fold.max() / 4).max(2) as i64;
    let large = (fold.max() / 4 + 4096) as i64;
    // (sent shape, expected shape): folded/folded, two/two, folded sent/two expected,
    // two sent/folded expected.
    let pairs = [
        (vec![2, small / 2], vec![small / 2, 2]),
        (vec![2, large / 2], vec![large / 2, 2]),
        (vec![small], vec![large]),
        (vec![large], vec![small]),
    ];
    for (i, (sent, expected)) in pairs.iter().enumerate() {
        let tag = Tag(900 + 10 * phase as i32 + i as i32);
        if me == 0 {
            let t =
                Tensor::f_zeros(sent.as_slice(), (Kind::Float, engine::tch::Device::Cpu)).unwrap();
            let header = wire::header(&t, 1, 0).unwrap();
            comm.send_tensor(peer, tag, header, &t).unwrap();
        } else {
            let case = Case {
                kind: Kind::Float,
                shape: expected.clone(),
            };
            let err = comm.recv_tensor(peer, tag, &case.expect(0)).unwrap_err();
            let text = err.to_string();
            assert!(
                matches!(err, Error::Wire { .. })
                    && text.contains(&format!("{sent:?}"))
                    && text.contains(&format!("{expected:?}")),
                "fold {fold:?}, sent {sent:?}, expected {expected:?}: {text}"
            );
            // The elements of a two-message tensor that a folded receive got the header
            // of are still queued: take them so that the sender's flush completes.
            if !fold.folds(4 * large as usize) && fold.folds(4 * small as usize) && i == 3 {
                comm.recv(peer, tag).unwrap();
            }
        }
        comm.flush().unwrap();
        comm.barrier().unwrap();
    }
    pairs.len()
}
