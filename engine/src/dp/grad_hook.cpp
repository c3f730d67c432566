// Post-accumulate-grad hooks on parameter tensors, which tch does not bind: libtorch calls
// the hook right after autograd has added a gradient into the parameter's `.grad`, on the
// thread running the backward. Used by the data-parallel overlap (dp/overlap.rs) to start a
// bucket's all-reduce as soon as its last gradient is in.
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <cstddef>
#include <memory>

namespace {

using Fire = void (*)(void *ctx, size_t id);
using Release = void (*)(void *ctx);

struct StrataHook : torch::autograd::PostAccumulateGradHook {
  Fire fire;
  Release release;
  void *ctx;
  size_t id;
  StrataHook(Fire f, Release r, void *c, size_t i) : fire(f), release(r), ctx(c), id(i) {}
  ~StrataHook() override { release(ctx); }
  void operator()(const torch::autograd::Variable &) override { fire(ctx, id); }
};

} // namespace

// Installs (replacing any earlier one) the hook of `t`, a tch tensor (`torch::Tensor *`):
// after each accumulation into t.grad, `fire(ctx, id)`; when the hook is dropped (replaced,
// or the tensor freed), `release(ctx)`. Returns 0, or 1 if libtorch refused (t is not a
// leaf that requires grad), in which case `release(ctx)` has been called.
extern "C" int strata_set_grad_hook(void *t, Fire fire, Release release, void *ctx, size_t id) {
  try {
    const at::Tensor &tensor = *static_cast<at::Tensor *>(t);
    if (!tensor.requires_grad() || !tensor.is_leaf()) {
      release(ctx);
      return 1;
    }
    torch::autograd::impl::set_post_acc_grad_hooks(
        tensor, std::make_unique<StrataHook>(fire, release, ctx, id));
    return 0;
  } catch (...) {
    return 1;
  }
}

// Removes the hook of `t` (its release runs).
extern "C" int strata_clear_grad_hook(void *t) {
  try {
    const at::Tensor &tensor = *static_cast<at::Tensor *>(t);
    torch::autograd::impl::post_acc_grad_hooks(tensor).reset();
    return 0;
  } catch (...) {
    return 1;
  }
}
