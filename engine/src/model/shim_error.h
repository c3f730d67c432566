// The error convention of Strata's C++ shims (seeded_backward.cpp, causal_attention.cpp):
// an entry point returns 0, or 1 with a NUL-terminated message in the caller's buffer
// `err` of `err_len` bytes; `engine::model::shim::check` reads it on the Rust side.
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>

namespace strata_shim {

// Copies `what` into `err` (truncated, always NUL-terminated).
inline void write_error(char *err, size_t err_len, const char *what) {
  if (err == nullptr || err_len == 0) {
    return;
  }
  std::strncpy(err, what, err_len - 1);
  err[err_len - 1] = '\0';
}

// Runs `body` (which returns the entry point's code), turning a libtorch exception into
// code 1 with its message.
template <typename F> int guarded(char *err, size_t err_len, F &&body) {
  try {
    return body();
  } catch (const std::exception &e) {
    write_error(err, err_len, e.what());
    return 1;
  } catch (...) {
    write_error(err, err_len, "unknown libtorch exception");
    return 1;
  }
}

} // namespace strata_shim
