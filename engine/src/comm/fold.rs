//! Small tensor messages folded into one MPI message: header and elements together.
//!
//! The zero-copy protocol sends a tensor as two messages with one tag (the header, then
//! the elements straight from and into tensor memory). For a small tensor the second
//! message costs more than copying its elements: a folded message is the header and the
//! elements in one buffer (exactly [`wire::encode_tensor`]'s bytes), copied out of the
//! sending tensor and, on arrival, into the receiver's reused tensor. [`Fold`] says which
//! protocol a payload size uses; the threshold comes from `strata p2p` measurements
//! (README, "Transport and waiting") and `STRATA_P2P_FOLD` overrides it.
//!
//! Invariants:
//! * both ranks decide from sizes they know (the sender from its tensor, the receiver
//!   from its [`Expect`]) with the same threshold, so a message that is what the receiver
//!   expects always takes the protocol the receiver posted for;
//! * [`unpack`] checks the whole message (header, then the exact payload length) before
//!   it writes a byte into the tensor, and never panics on any input.
//!
//! [`wire::encode_tensor`]: super::wire::encode_tensor

use super::wire::{self, Expect};
use crate::error::{Error, Result};
use partitioner::Rank;
use tch::{Device, Tensor};

/// The environment variable that overrides the folding threshold (bytes of elements).
pub const FOLD_ENV: &str = "STRATA_P2P_FOLD";

/// Tensors of at most this many bytes of elements travel folded, by default: none.
/// Measured with `strata p2p --max-mib 1` on this machine (quiet, three rounds alternating
/// the default of 1 KiB with `STRATA_P2P_FOLD=0`): folding was slower at every small size,
/// one-way 8 B 1.14-1.43 µs against 1.04-1.21 µs and 4 KiB 1.79-2.10 against 1.66-1.88,
/// and earlier smoke runs lost from 32 KiB (two copies, and MPICH's eager limit). Shared
/// memory makes a second message cheap; where a message costs more (a network), set
/// `STRATA_P2P_FOLD` and measure.
pub const DEFAULT_FOLD_MAX: usize = 0;

/// The largest threshold `STRATA_P2P_FOLD` may set (folded messages are copied twice).
pub const FOLD_LIMIT: usize = 1 << 20;

/// Which protocol a tensor message of a given size takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fold {
    /// Largest payload (bytes) that is folded; 0 folds nothing.
    max: usize,
}

impl Default for Fold {
    fn default() -> Fold {
        Fold {
            max: DEFAULT_FOLD_MAX,
        }
    }
}

impl Fold {
    /// Folds payloads of at most `max` bytes (0: none); `max` is capped at [`FOLD_LIMIT`].
    pub fn new(max: usize) -> Fold {
        Fold {
            max: max.min(FOLD_LIMIT),
        }
    }

    /// The threshold [`FOLD_ENV`] sets (the default when unset), or a usage error naming
    /// the variable and the fix.
    pub fn from_env() -> Result<Fold> {
        match std::env::var(FOLD_ENV) {
            Err(_) => Ok(Fold::default()),
            Ok(v) => Fold::parse(&v),
        }
    }

    /// A threshold written as a number of bytes, at most [`FOLD_LIMIT`].
    pub fn parse(v: &str) -> Result<Fold> {
        match v.trim().parse::<usize>() {
            Ok(max) if max <= FOLD_LIMIT => Ok(Fold { max }),
            _ => Err(Error::usage(
                FOLD_ENV,
                format!("`{v}` is not a number of bytes from 0 to {FOLD_LIMIT}"),
                "set it to a byte count such as 1024 (0 sends every tensor as two messages), or unset it"
                    .to_string(),
            )),
        }
    }

    /// The largest folded payload, in bytes (0: folding is off).
    pub fn max(self) -> usize {
        self.max
    }

    /// Whether a tensor of `payload_len` bytes of elements travels folded.
    pub fn folds(self, payload_len: usize) -> bool {
        self.max > 0 && payload_len <= self.max
    }

    /// Bytes to receive the first message of a tensor message like `expect` into: the
    /// whole folded message, or (two messages) room for any header or folded message,
    /// so that a message of another protocol than expected is caught by the header check
    /// rather than by a truncated receive.
    pub fn head_len(self, expect: &Expect) -> usize {
        match self.folds(expect.payload_len()) {
            true => expect.message_len(),
            false => wire::MAX_HEADER + self.max,
        }
    }
}

/// The folded message of `header` and the elements of `t` (a contiguous CPU tensor, as
/// [`wire::wire_form`] makes it; anything else is an error): `header` with the element
/// bytes appended.
pub fn pack(header: Vec<u8>, t: &Tensor) -> Result<Vec<u8>> {
    if t.device() != Device::Cpu || !t.is_contiguous() {
        return Err(Error::Internal(
            "folded send of a tensor not in wire form".into(),
        ));
    }
    let n = t.numel() * t.kind().elt_size_in_bytes();
    let mut bytes = header;
    bytes.reserve_exact(n);
    if n > 0 {
        // SAFETY: `t` is a contiguous CPU tensor (checked above), so its `n` element bytes
        // start at `data_ptr`; `t` is borrowed for the copy.
        let elements = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) };
        bytes.extend_from_slice(elements);
    }
    Ok(bytes)
}

/// Checks the folded message `bytes` from `from` against `expect` (header, then exactly
/// `expect.payload_len()` element bytes) and copies the elements into `into`.
pub fn unpack(bytes: &[u8], from: Rank, expect: &Expect, into: &Tensor) -> Result<()> {
    let start = wire::check_header(bytes, from, expect)?;
    let payload = &bytes[start..];
    if payload.len() != expect.payload_len() {
        return Err(wire::payload_error(from, expect, payload.len()));
    }
    let room = into.numel() * into.kind().elt_size_in_bytes();
    if room != payload.len() || into.device() != Device::Cpu || !into.is_contiguous() {
        return Err(Error::Internal(format!(
            "receive tensor of {room} bytes for a payload of {}",
            payload.len()
        )));
    }
    if !payload.is_empty() {
        // SAFETY: `into` is a contiguous CPU tensor of exactly `payload.len()` bytes (checked
        // above), distinct from `bytes` (a Rust buffer); nothing else uses it meanwhile
        // (receive tensors are handed out only after this copy).
        unsafe {
            std::ptr::copy_nonoverlapping(
                payload.as_ptr(),
                into.data_ptr() as *mut u8,
                payload.len(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn expect(kind: Kind, shape: &[i64]) -> Expect {
        Expect {
            kind,
            shape: shape.to_vec(),
            chunk: 1,
            microbatch: 3,
        }
    }

    #[test]
    fn threshold_is_inclusive_and_zero_folds_nothing() {
        assert_eq!(Fold::default(), Fold::new(DEFAULT_FOLD_MAX));
        let f = Fold::new(4096);
        assert!(f.folds(0) && f.folds(4096) && !f.folds(4097));
        assert!(!Fold::new(0).folds(0) && !Fold::new(0).folds(8));
        assert_eq!(Fold::new(usize::MAX).max(), FOLD_LIMIT);
        assert_eq!(Fold::parse(" 1024 ").unwrap(), Fold::new(1024));
        for bad in ["", "-1", "4k", "2097152"] {
            let e = Fold::parse(bad).unwrap_err();
            assert!(e.is_user_error() && e.to_string().contains(FOLD_ENV), "{e}");
        }
    }

    #[test]
    fn pack_then_unpack_is_bit_exact_and_checks_every_byte_count() {
        let t = Tensor::from_slice(&[1.5f64, -0.0, f64::MIN_POSITIVE, 7.0, 8.0, 9.0]).view([3, 2]);
        let e = expect(Kind::Double, &[3, 2]);
        let msg = pack(wire::header(&t, 1, 3).unwrap(), &t).unwrap();
        assert_eq!(msg, wire::encode_tensor(&t, 1, 3).unwrap());
        assert_eq!(msg.len(), e.message_len());
        let into = Tensor::empty([3, 2], (Kind::Double, Device::Cpu));
        unpack(&msg, Rank(1), &e, &into).unwrap();
        assert_eq!(
            Vec::<f64>::try_from(into.view([-1])).unwrap(),
            [1.5, -0.0, f64::MIN_POSITIVE, 7.0, 8.0, 9.0]
        );
        assert!(unpack(&msg[..msg.len() - 1], Rank(1), &e, &into).is_err());
        let mut long = msg.clone();
        long.push(0);
        assert!(unpack(&long, Rank(1), &e, &into).is_err());
        let swapped = expect(Kind::Double, &[2, 3]);
        let err = unpack(&msg, Rank(1), &swapped, &into)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3]") && err.contains("[3, 2]"), "{err}");
        let small = Tensor::empty([5], (Kind::Double, Device::Cpu));
        assert!(unpack(&msg, Rank(1), &e, &small).is_err());
    }

    #[test]
    fn head_room_holds_any_folded_message_when_two_messages_are_expected() {
        let f = Fold::new(64);
        let folded = expect(Kind::Float, &[16]);
        assert_eq!(f.head_len(&folded), folded.message_len());
        let split = expect(Kind::Float, &[17]);
        assert!(f.head_len(&split) >= folded.message_len() + 8 * 254);
    }
}
