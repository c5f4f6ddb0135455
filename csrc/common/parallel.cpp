// xmodal's own thread pool for parallel_take (parallel.h, run_on_pool): threads that sleep on a condition
// variable between calls, and a caller that waits only for the threads that joined its call.
#include "common/parallel.h"

#include <dlfcn.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>

namespace xmodal {
namespace {

thread_local bool t_in_call = false;  // this thread runs a call's body (nested calls run inline)
thread_local int64_t t_held_threads = 0;  // while an AtenOnThisThread lives: xmodal's thread count from before

// MKL's thread count for the calling thread alone: the C entry point (mkl_set_num_threads_local, without
// capitals, is the Fortran one and takes a pointer), in libtorch_cpu, which links MKL; nullptr where absent.
using SetLocalThreads = int (*)(int);
SetLocalThreads mkl_local_threads() {
  static const SetLocalThreads fn = [] {
    void* handle = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
    return handle ? reinterpret_cast<SetLocalThreads>(dlsym(handle, "MKL_Set_Num_Threads_Local")) : nullptr;
  }();
  return fn;
}

// While it lives, the OpenMP regions and MKL calls this thread starts run on this thread alone, as they do
// inside an OpenMP region: a body that calls BLAS on the pool must not start threads of its own.
class OnThisThread {
 public:
  OnThisThread() {
#ifdef _OPENMP
    omp_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
    if (const auto set = mkl_local_threads()) mkl_ = set(1);
  }
  int threads_before() const {
#ifdef _OPENMP
    return omp_;
#else
    return int(at::get_num_threads());
#endif
  }
  ~OnThisThread() {
#ifdef _OPENMP
    omp_set_num_threads(omp_);
#endif
    if (const auto set = mkl_local_threads()) set(mkl_);
  }

 private:
  int omp_ = 1, mkl_ = 0;
};

struct Pool {
  std::mutex mutex;
  std::condition_variable wake, left;
  const std::function<void()>* body = nullptr;  // the call in progress, if any
  uint64_t call = 0;                             // numbers the calls, so a thread joins each at most once
  int64_t seats = 0;                             // helpers the call still takes
  int64_t inside = 0;                            // helpers running its body
  std::exception_ptr error;
  int64_t started = 0;

  void grow(int64_t helpers) {  // (under mutex)
    for (; started < helpers; ++started) std::thread([this] { serve(); }).detach();
  }

  void serve() {
    t_in_call = true;
    const OnThisThread alone;  // for the life of the thread
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex);
    for (;;) {
      wake.wait(lock, [&] { return body != nullptr && call != seen && seats > 0; });
      seen = call;
      --seats;
      ++inside;
      const std::function<void()>* job = body;
      lock.unlock();
      std::exception_ptr failed;
      try {
        (*job)();
      } catch (...) {
        failed = std::current_exception();
      }
      lock.lock();
      if (failed && !error) error = failed;
      if (--inside == 0) left.notify_all();
    }
  }
};

Pool* g_pool = new Pool();  // never destroyed: its threads are detached and may outlive static destructors

}  // namespace

bool pool_runs_blas() { return mkl_local_threads() != nullptr; }

int64_t xmodal_threads() { return t_held_threads > 0 ? t_held_threads : int64_t(at::get_num_threads()); }

struct AtenOnThisThread::Held {
  int64_t outer_threads;
  OnThisThread alone;
};

AtenOnThisThread::AtenOnThisThread() : held_(new Held{t_held_threads, {}}) {
  // (read before OnThisThread set OpenMP's count to 1, so nested guards keep the outermost count)
  t_held_threads = held_->outer_threads > 0 ? held_->outer_threads : int64_t(held_->alone.threads_before());
}

AtenOnThisThread::~AtenOnThisThread() { t_held_threads = held_->outer_threads; }

void run_on_pool(int64_t helpers, const std::function<void()>& body) {
  static const bool fork_handler = [] {
    // a forked child has none of the parent's threads, and perhaps a mutex locked at the fork: a new pool
    return pthread_atfork(nullptr, nullptr, [] { g_pool = new Pool(); }) == 0;
  }();
  (void)fork_handler;
  Pool& pool = *g_pool;
  if (t_in_call || helpers <= 0) return body();
  {
    std::unique_lock<std::mutex> lock(pool.mutex);
    if (pool.body != nullptr) {  // another thread's call has the pool
      lock.unlock();
      return body();
    }
    pool.grow(helpers);
    pool.body = &body;
    ++pool.call;
    pool.seats = helpers;
    pool.error = nullptr;
  }
  pool.wake.notify_all();
  std::exception_ptr failed;
  t_in_call = true;
  try {
    const OnThisThread alone;
    body();
  } catch (...) {
    failed = std::current_exception();
  }
  t_in_call = false;
  std::unique_lock<std::mutex> lock(pool.mutex);
  pool.seats = 0;  // helpers that have not woken yet stay asleep
  pool.left.wait(lock, [&] { return pool.inside == 0; });
  pool.body = nullptr;
  if (!failed) failed = pool.error;
  pool.error = nullptr;
  lock.unlock();
  if (failed) std::rethrow_exception(failed);
}

}  // namespace xmodal
