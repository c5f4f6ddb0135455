// A cache of large CPU blocks for outputs that training frees and asks for again every step (weight
// gradients: `param.grad = None`, then the next backward). A fresh large allocation is a new mapping whose
// every page faults on first write (measured here: ~16 ms for 41 MB, more than the GEMM that fills it);
// a block kept from the previous step is already mapped. Blocks return to the cache when their tensor is
// freed; the cache keeps at most the cpu_cache_mb setting's MiB (default 1024; 0 turns it off) and
// xmodal.empty_cpu_cache() releases what it holds.
#pragma once
#include <ATen/ATen.h>

namespace xmodal {

// An uninitialised CPU tensor, from the cache when it holds a block of the size (>= 1 MiB requests only;
// smaller ones and other devices get at::empty).
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every cached block; returns the bytes released.
int64_t release_cpu_cache();

// Bytes held in free cached blocks.
int64_t cpu_cache_bytes();

}  // namespace xmodal
