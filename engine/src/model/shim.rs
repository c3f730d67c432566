//! Calling Strata's C++ shims (`shim_error.h`): each entry point takes an error buffer
//! and returns 0, or 1 with a NUL-terminated message there; [`call`] owns the buffer and
//! turns a failure into a typed error naming the shim.

use crate::error::{Error, Result};
use std::ffi::{c_char, CStr};

/// Runs `entry` with a zeroed error buffer (its pointer and length) and returns its
/// message as [`Error::Internal`], prefixed by `what`, when it returns non-zero.
pub fn call(what: &str, entry: impl FnOnce(*mut c_char, usize) -> i32) -> Result<()> {
    let mut err = [0 as c_char; 512];
    if entry(err.as_mut_ptr(), err.len()) == 0 {
        return Ok(());
    }
    // SAFETY: the shim NUL-terminates what it writes; the buffer starts zeroed and its
    // last byte is never written by `write_error`'s truncation.
    let why = unsafe { CStr::from_ptr(err.as_ptr()) };
    Err(Error::Internal(format!(
        "{what}: {}",
        why.to_string_lossy()
    )))
}
