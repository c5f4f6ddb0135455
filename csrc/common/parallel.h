// at::parallel_for that carries the caller's thread-local state into its worker threads.
//
// OpenMP workers start with default thread-local state: grad mode on and no dispatch keys excluded. An ATen
// call made there on a tensor that requires grad goes through autograd even when the caller is in no_grad or
// below the autograd key (and out= variants such as mm_out then throw). Every parallel region that calls
// ATen ops uses this instead of at::parallel_for.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cstdint>

namespace xmodal {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(begin, end, grain_size, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(caller_state);
    f(b, e);
  });
}

}  // namespace xmodal
