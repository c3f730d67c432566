//! Wire format for tensors and small numeric messages.
//!
//! A tensor message is a fixed header followed by the raw, contiguous, little-endian
//! element bytes: `magic u32 | dtype u8 | ndim u8 | chunk u16 | microbatch u32 | dims i64 × ndim`.
//! Transports may carry the two parts as one buffer ([`encode_tensor`]) or as two
//! messages, the elements straight from and into tensor memory (MPI, zero-copy).
//! The receiver states what it expects (dtype, shape, chunk, microbatch) and every mismatch —
//! including a truncated or oversized payload — is a typed [`Error::Wire`], never a panic.

use crate::error::{Error, Result};
use partitioner::Rank;
use tch::{Device, Kind, Tensor};

const MAGIC: u32 = 0x5354_5231; // "STR1"
const FIXED: usize = 12;

/// The longest header there is (255 dimensions).
pub const MAX_HEADER: usize = FIXED + 8 * 255;

fn kind_code(kind: Kind) -> Option<u8> {
    Some(match kind {
        Kind::Float => 0,
        Kind::Double => 1,
        Kind::Half => 2,
        Kind::BFloat16 => 3,
        Kind::Int64 => 4,
        _ => return None,
    })
}

fn code_kind(code: u8) -> Option<Kind> {
    Some(match code {
        0 => Kind::Float,
        1 => Kind::Double,
        2 => Kind::Half,
        3 => Kind::BFloat16,
        4 => Kind::Int64,
        _ => return None,
    })
}

/// What a receiver expects.
#[derive(Clone, Debug, PartialEq)]
pub struct Expect {
    pub kind: Kind,
    pub shape: Vec<i64>,
    /// The model chunk the tensor belongs to (the receiving chunk).
    pub chunk: usize,
    pub microbatch: usize,
}

impl Expect {
    /// Size in bytes of the message carrying such a tensor.
    pub fn message_len(&self) -> usize {
        self.header_len() + self.payload_len()
    }

    /// Size in bytes of the header of such a message.
    pub fn header_len(&self) -> usize {
        FIXED + 8 * self.shape.len()
    }

    /// Size in bytes of the tensor's elements.
    pub fn payload_len(&self) -> usize {
        let numel: i64 = self.shape.iter().product();
        numel.max(0) as usize * self.kind.elt_size_in_bytes()
    }
}

/// `t` as it goes on the wire: a contiguous CPU tensor (`t` itself, shared, when it
/// already is one; a copy otherwise).
pub fn wire_form(t: &Tensor) -> Result<Tensor> {
    if t.device() == Device::Cpu && t.is_contiguous() {
        // A new handle on the same tensor, without two dispatcher round trips.
        return Ok(t.shallow_clone());
    }
    t.f_to_device(Device::Cpu)
        .and_then(|t| t.f_contiguous())
        .map_err(Error::torch("wire encode"))
}

/// The header of a message carrying `t` to `chunk` for `microbatch`.
pub fn header(t: &Tensor, chunk: usize, microbatch: usize) -> Result<Vec<u8>> {
    let kind = t.f_kind().map_err(Error::torch("wire encode"))?;
    let code = kind_code(kind)
        .ok_or_else(|| Error::Comm(format!("cannot send tensors of kind {kind:?}")))?;
    let dims = t.size();
    let mut out = Vec::with_capacity(FIXED + 8 * dims.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(code);
    out.push(dims.len() as u8);
    out.extend_from_slice(&(chunk as u16).to_le_bytes());
    out.extend_from_slice(&(microbatch as u32).to_le_bytes());
    for d in &dims {
        out.extend_from_slice(&d.to_le_bytes());
    }
    Ok(out)
}

/// Serialises `t` (any device; copied to host) tagged with `chunk` and `microbatch`, as
/// one buffer: header then elements (transports without zero-copy sends use it).
pub fn encode_tensor(t: &Tensor, chunk: usize, microbatch: usize) -> Result<Vec<u8>> {
    let t = wire_form(t)?;
    let mut out = header(&t, chunk, microbatch)?;
    let numel = t.numel();
    let nbytes = numel * t.kind().elt_size_in_bytes();
    let start = out.len();
    out.resize(start + nbytes, 0);
    t.f_copy_data_u8(&mut out[start..], numel)
        .map_err(Error::torch("wire encode"))?;
    Ok(out)
}

/// Checks the header at the start of `bytes`, from `from`, against `expect`; returns its
/// length.
pub fn check_header(bytes: &[u8], from: Rank, expect: &Expect) -> Result<usize> {
    let bad = |got: String| Error::Wire {
        from,
        expected: format!(
            "{:?} {:?} for microbatch {}",
            expect.kind, expect.shape, expect.microbatch
        ),
        got,
    };
    if bytes.len() < FIXED || u32::from_le_bytes(bytes[0..4].try_into().unwrap()) != MAGIC {
        return Err(bad(format!(
            "{} bytes without a tensor header",
            bytes.len()
        )));
    }
    let kind = code_kind(bytes[4]).ok_or_else(|| bad(format!("dtype code {}", bytes[4])))?;
    let ndim = bytes[5] as usize;
    let chunk = u16::from_le_bytes(bytes[6..8].try_into().unwrap()) as usize;
    let mb = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
    let dims_end = FIXED + 8 * ndim;
    if bytes.len() < dims_end {
        return Err(bad(format!("truncated header ({} bytes)", bytes.len())));
    }
    let dims: Vec<i64> = (0..ndim)
        .map(|i| i64::from_le_bytes(bytes[FIXED + 8 * i..FIXED + 8 * i + 8].try_into().unwrap()))
        .collect();
    if kind != expect.kind
        || dims != expect.shape
        || mb != expect.microbatch
        || chunk != expect.chunk
    {
        return Err(bad(format!(
            "{kind:?} {dims:?} for chunk {chunk} microbatch {mb}"
        )));
    }
    Ok(dims_end)
}

/// The error of a payload of `got` bytes where `expect` says how many there must be.
pub fn payload_error(from: Rank, expect: &Expect, got: usize) -> Error {
    let numel: i64 = expect.shape.iter().product();
    Error::Wire {
        from,
        expected: format!(
            "{:?} {:?} for microbatch {}",
            expect.kind, expect.shape, expect.microbatch
        ),
        got: format!("{got} payload bytes for {numel} elements"),
    }
}

/// Parses a tensor message from `from`, checking it against `expect`.
pub fn decode_tensor(bytes: &[u8], from: Rank, expect: &Expect) -> Result<Tensor> {
    let start = check_header(bytes, from, expect)?;
    let payload = &bytes[start..];
    if payload.len() != expect.payload_len() {
        return Err(payload_error(from, expect, payload.len()));
    }
    Tensor::f_from_data_size(payload, &expect.shape, expect.kind)
        .map_err(Error::torch("wire decode"))
}

/// Little-endian f64s.
pub fn encode_f64s(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Parses exactly `n` f64s sent by `from`.
pub fn decode_f64s(bytes: &[u8], from: Rank, n: usize) -> Result<Vec<f64>> {
    if bytes.len() != 8 * n {
        return Err(Error::Wire {
            from,
            expected: format!("{n} f64 values"),
            got: format!("{} bytes", bytes.len()),
        });
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_mismatches() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
        let bytes = encode_tensor(&t, 1, 5).unwrap();
        let ok = Expect {
            kind: Kind::Float,
            shape: vec![2, 3],
            chunk: 1,
            microbatch: 5,
        };
        assert_eq!(ok.message_len(), bytes.len());
        let back = decode_tensor(&bytes, Rank(1), &ok).unwrap();
        assert!(back.equal(&t));
        let wrong_shape = Expect {
            shape: vec![3, 2],
            ..ok.clone()
        };
        let e = decode_tensor(&bytes, Rank(1), &wrong_shape)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rank 1") && e.contains("[3, 2]") && e.contains("[2, 3]"),
            "{e}"
        );
        let wrong_mb = Expect {
            microbatch: 4,
            ..ok.clone()
        };
        assert!(decode_tensor(&bytes, Rank(1), &wrong_mb).is_err());
        let wrong_chunk = Expect {
            chunk: 3,
            ..ok.clone()
        };
        assert!(decode_tensor(&bytes, Rank(1), &wrong_chunk).is_err());
        assert!(decode_tensor(&bytes[..bytes.len() - 1], Rank(1), &ok).is_err());
        assert!(decode_tensor(&[1, 2, 3], Rank(1), &ok).is_err());
        let wrong_kind = Expect {
            kind: Kind::Double,
            ..ok
        };
        assert!(decode_tensor(&bytes, Rank(1), &wrong_kind).is_err());
    }
}
