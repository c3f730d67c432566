//! Post-accumulate-grad hooks on parameter tensors (libtorch's
//! `torch::autograd::impl::set_post_acc_grad_hooks`, reached through the C++ shim
//! `grad_hook.cpp`, since tch does not bind hooks). libtorch calls a hook right after its
//! autograd engine has added a gradient into the parameter's `.grad`, on the thread that
//! runs the backward (CPU graphs run on the calling thread), so a data-parallel bucket's
//! all-reduce can start in the middle of a backward.
//!
//! Invariants: a hook owns one strong reference to its [`HookSink`] (released when libtorch
//! drops the hook: replaced, cleared, or the tensor freed), so a hook never outlives its
//! sink; a sink's `fire` never unwinds into C++ (panics are caught and reported).

use crate::error::{Error, Result};
use std::ffi::c_void;
use std::sync::Arc;
use tch::Tensor;

extern "C" {
    fn strata_set_grad_hook(
        t: *mut c_void,
        fire: extern "C" fn(*mut c_void, usize),
        release: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
        id: usize,
    ) -> i32;
    fn strata_clear_grad_hook(t: *mut c_void) -> i32;
}

/// What a hook calls: `fire(id)` after each accumulation into the hooked `.grad`.
pub trait HookSink: Send + Sync {
    fn fire(&self, id: usize);
}

/// The hooks' context: a leaked `Arc` of the sink, boxed to make the fat pointer thin.
type Ctx = Arc<dyn HookSink>;

extern "C" fn fire(ctx: *mut c_void, id: usize) {
    // SAFETY: `ctx` is a `Box<Ctx>` leaked by `install`, alive until `release`.
    let sink = unsafe { &*(ctx as *const Ctx) };
    // Never unwind into libtorch; the sink records its own errors.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink.fire(id)));
}

extern "C" fn release(ctx: *mut c_void) {
    // SAFETY: the one release of the box leaked by `install`.
    drop(unsafe { Box::from_raw(ctx as *mut Ctx) });
}

/// Installs on `t` (a leaf that requires grad) a hook that calls `sink.fire(id)` after
/// each gradient accumulation, replacing any earlier hook of `t`.
pub fn install(t: &Tensor, sink: Arc<dyn HookSink>, id: usize) -> Result<()> {
    let ctx = Box::into_raw(Box::new(sink)) as *mut c_void;
    // SAFETY: `t.as_ptr()` is tch's `torch::Tensor *`; the shim calls `release(ctx)`
    // exactly once, whether it installs the hook or not.
    let rc = unsafe { strata_set_grad_hook(t.as_ptr() as *mut c_void, fire, release, ctx, id) };
    match rc {
        0 => Ok(()),
        _ => Err(Error::Internal(format!(
            "libtorch refused a gradient hook on a tensor of shape {:?} (not a leaf that requires grad?)",
            t.size()
        ))),
    }
}

/// Removes `t`'s hook, if any.
pub fn clear(t: &Tensor) {
    // SAFETY: as in `install`.
    unsafe {
        strata_clear_grad_hook(t.as_ptr() as *mut c_void);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tch::Kind;

    struct Log(Mutex<Vec<usize>>);
    impl HookSink for Log {
        fn fire(&self, id: usize) {
            self.0.lock().unwrap().push(id);
        }
    }

    /// The hooks fire once per accumulation, after it, in the order autograd reaches the
    /// leaves (the last-used parameter first), and stop once cleared or dropped.
    #[test]
    fn hooks_fire_after_each_accumulation_in_backward_order() {
        let a = Tensor::from_slice(&[1f32, 2.0]).set_requires_grad(true);
        let b = Tensor::from_slice(&[3f32, 4.0]).set_requires_grad(true);
        let log = Arc::new(Log(Mutex::new(Vec::new())));
        install(&a, log.clone(), 0).unwrap();
        install(&b, log.clone(), 1).unwrap();
        let y = (&a * 2.0).exp().sum(Kind::Float) * b.sum(Kind::Float);
        y.backward();
        assert_eq!(*log.0.lock().unwrap(), vec![1, 0]);
        // Used twice in one graph: autograd sums first, accumulates (and fires) once.
        let z = (&a * &a).sum(Kind::Float) + a.sum(Kind::Float);
        z.backward();
        assert_eq!(*log.0.lock().unwrap(), vec![1, 0, 0]);
        clear(&a);
        (&a * 3.0).sum(Kind::Float).backward();
        assert_eq!(log.0.lock().unwrap().len(), 3);
        assert_eq!(Arc::strong_count(&log), 2, "b's hook still holds the sink");
        drop((y, z, b));
        assert_eq!(
            Arc::strong_count(&log),
            1,
            "freeing the tensor released its hook"
        );
        let c = Tensor::from_slice(&[1f32]);
        assert!(install(&c, log.clone(), 2).is_err());
        assert_eq!(Arc::strong_count(&log), 1);
    }
}
