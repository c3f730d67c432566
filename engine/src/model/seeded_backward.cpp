// A backward seeded with given output gradients, which tch does not bind (its
// `backward`/`run_backward` seed every output with ones): `outputs[i]` receives
// `grads[i]`, exactly as `torch::autograd::backward(outputs, grads)` in C++ or
// `torch.autograd.backward(outputs, grads)` in Python.
//
// Without `inputs` the gradients are accumulated into the leaves' `.grad` (like
// `Tensor::backward`); with `inputs`, nothing is accumulated and `results[j]` receives a
// new tensor holding d(outputs)/d(inputs[j]) (undefined when `inputs[j]` is not reached),
// which the caller owns (a tch `torch::Tensor *`).
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/variable.h>

#include <cstddef>
#include <vector>

#include "shim_error.h"

using strata_shim::write_error;

// Returns 0 on success; 1 with a message in `err` when libtorch throws (shapes that do
// not match their outputs, an input that does not require grad, a graph already freed).
extern "C" int strata_seeded_backward(void **outputs, void **grads, size_t n, void **inputs,
                                      size_t m, void **results, char *err, size_t err_len) {
  return strata_shim::guarded(err, err_len, [&]() -> int {
    torch::autograd::edge_list roots;
    torch::autograd::variable_list seeds;
    roots.reserve(n);
    seeds.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor &out = *static_cast<at::Tensor *>(outputs[i]);
      const at::Tensor &grad = *static_cast<at::Tensor *>(grads[i]);
      if (!out.requires_grad()) {
        write_error(err, err_len, "a seeded output does not require grad");
        return 1;
      }
      if (out.sizes() != grad.sizes()) {
        write_error(err, err_len, "a seed's shape differs from its output's");
        return 1;
      }
      roots.push_back(torch::autograd::impl::gradient_edge(out));
      seeds.push_back(grad);
    }
    torch::autograd::edge_list wanted;
    wanted.reserve(m);
    for (size_t j = 0; j < m; ++j) {
      const at::Tensor &input = *static_cast<at::Tensor *>(inputs[j]);
      if (!input.requires_grad()) {
        write_error(err, err_len, "an input of a seeded backward does not require grad");
        return 1;
      }
      wanted.push_back(torch::autograd::impl::gradient_edge(input));
    }
    const bool accumulate = m == 0;
    auto got = torch::autograd::Engine::get_default_engine().execute(
        roots, seeds, /*keep_graph=*/false, /*create_graph=*/false, accumulate, wanted);
    for (size_t j = 0; j < m; ++j) {
      results[j] = new torch::autograd::Variable(got[j]);
    }
    return 0;
  });
}
