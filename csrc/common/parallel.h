// at::parallel_for that carries the caller's thread-local state into its worker threads.
//
// OpenMP workers start with default thread-local state: grad mode on and no dispatch keys excluded. An ATen
// call made there on a tensor that requires grad goes through autograd even when the caller is in no_grad or
// below the autograd key (and out= variants such as mm_out then throw). Every parallel region that calls
// ATen ops uses this instead of at::parallel_for.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/ParallelGuard.h>

#include "common/settings.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>

namespace xmodal {

template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain_size, const F& f) {
  const at::ThreadLocalState caller_state;
  at::parallel_for(begin, end, grain_size, [&](int64_t b, int64_t e) {
    at::ThreadLocalStateGuard guard(caller_state);
    f(b, e);
  });
}

// Runs body() on the calling thread and on up to `helpers` threads of xmodal's own pool (parallel.cpp) that
// wake while it runs, and returns once every thread that started body() has finished it: a helper whose core
// another process holds, and which wakes after the others have taken all the work, is not waited for. The
// pool's threads sleep between calls; OpenMP's spin on the free core for milliseconds after each region
// (libgomp's default), which is what slowed the caller most when the other core was busy. Nested calls, and
// calls while another thread's call holds the pool, run body() on the calling thread alone. Rethrows the
// first exception.
void run_on_pool(int64_t helpers, const std::function<void()>& body);

// Whether bodies that call BLAS may run on the pool: its threads, and the caller during a call, hold MKL and
// OpenMP to one thread for themselves, as inside an OpenMP region (parallel.cpp, OnThisThread).
bool pool_runs_blas();

// The threads xmodal's parallel work may use: ATen's count, or while the calling thread holds an
// AtenOnThisThread, the count from before it.
int64_t xmodal_threads();

// While it lives, ATen's and MKL's parallel work started by this thread runs on this thread alone (OpenMP and
// MKL held to one thread for it), while xmodal's ops keep using xmodal_threads() on xmodal's pool. The
// indexes hold their searches' small tensor work around the ops this way: an ATen op big enough to start
// OpenMP's threads leaves them spinning on the other cores for milliseconds, where the pool's threads of the
// next op then wait for a core (measured: a 0.03 ms GEMM before a 6.7 ms Hamming scan made it 11.8 ms on 2
// cores). One per thread at a time, created and destroyed on the same thread.
class AtenOnThisThread {
 public:
  AtenOnThisThread();
  ~AtenOnThisThread();
  AtenOnThisThread(const AtenOnThisThread&) = delete;
  AtenOnThisThread& operator=(const AtenOnThisThread&) = delete;

 private:
  struct Held;
  std::unique_ptr<Held> held_;
};

// Calls worker(i) for every i in [0, n), on up to `threads` threads that each make a worker (make_worker())
// and take items from a shared counter. A static split waits for the thread whose core another process holds
// (a busy core made two threads 12x slower than one on small scans); here that thread just does fewer items.
// Callers write each item's results to its own place, so they do not depend on which thread took it.
// Items run on xmodal's pool (run_on_pool), with ATen's nested parallelism off; `blas`: they call BLAS (or
// ATen ops that may), so where the pool cannot hold MKL to one thread per thread (pool_runs_blas), they run
// inside an OpenMP region instead, where MKL stays single-threaded.
template <typename MakeWorker>
void parallel_take(int64_t n, int64_t threads, const MakeWorker& make_worker, bool blas = true) {
  if (n <= 0) return;
  threads = std::max<int64_t>(1, std::min<int64_t>({threads, n, xmodal_threads()}));
  std::atomic<int64_t> next{0};
  const auto take = [&] {
    if (next.load(std::memory_order_relaxed) >= n) return;  // (a thread that came after the work was taken)
    auto worker = make_worker();
    try {
      for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) worker(i);
    } catch (...) {
      next.store(n);  // the others stop taking items
      throw;
    }
  };
  if (threads == 1) {
    take();
  } else if (blas && !pool_runs_blas()) {
    parallel_for(0, threads, 1, [&](int64_t, int64_t) { take(); });
  } else {
    const at::ThreadLocalState caller_state;
    run_on_pool(threads - 1, [&] {
      at::ThreadLocalStateGuard state(caller_state);
      c10::ParallelGuard nested(true);  // ATen ops inside run inline
      take();
    });
  }
}

// How many threads a parallel region of `ns` estimated one-thread nanoseconds should use: one per
// cpu_min_thread_us (settings.h; default 1 ms) of work. A thread whose core another process holds can hold
// the call back by a scheduler time slice (milliseconds) whatever the split; only a long call amortises it.
inline int64_t threads_for_ns(double ns) {
  const int64_t us = cpu_min_thread_us();
  const double t = us > 0 ? std::min(ns / (1e3 * double(us)), 1e6) : 1e6;
  return std::max<int64_t>(1, std::min<int64_t>(xmodal_threads(), int64_t(t)));
}

}  // namespace xmodal
