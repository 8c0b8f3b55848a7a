// SPDX-License-Identifier: Apache-2.0
/// \file device_info.cu
/// \brief CUDA device discovery; the first CUDA source of tidal (the CUDA backend builds on it).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <stdexcept>
#include <string>

#include "kernels/cuda/device_info.h"
#include "kernels/cuda/ops.h"

namespace tidal::kernels::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

std::string device_description(int index) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) return "unknown CUDA device";
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s, sm_%d%d, %.1f GiB", prop.name, prop.major, prop.minor,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("CUDA bandwidth probe: ") + what + ": " +
                             cudaGetErrorString(e));
  }
}

}  // namespace

Bandwidth measure_bandwidth(int index, size_t bytes, int repeats) {
  if (repeats < 1) repeats = 1;
  bytes = std::max<size_t>(bytes / 16 * 16, 16);
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  check(cudaSetDevice(index), "cudaSetDevice");
  void* dev = nullptr;
  void* host = nullptr;
  unsigned* sink = nullptr;
  cudaStream_t st = nullptr;
  cudaEvent_t e0 = nullptr, e1 = nullptr;
  Bandwidth bw;
  auto release = [&] {
    if (e1) cudaEventDestroy(e1);
    if (e0) cudaEventDestroy(e0);
    if (st) cudaStreamDestroy(st);
    if (sink) cudaFree(sink);
    if (host) cudaFreeHost(host);
    if (dev) cudaFree(dev);
    cudaSetDevice(previous);
  };
  try {
    check(cudaMalloc(&dev, bytes), "cudaMalloc");
    check(cudaMalloc(reinterpret_cast<void**>(&sink), sizeof(unsigned)), "cudaMalloc");
    check(cudaMallocHost(&host, bytes), "cudaMallocHost");
    std::fill_n(static_cast<unsigned char*>(host), bytes, static_cast<unsigned char>(1));
    check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
    check(cudaEventCreate(&e0), "cudaEventCreate");
    check(cudaEventCreate(&e1), "cudaEventCreate");
    check(cudaMemsetAsync(dev, 1, bytes, st), "cudaMemset");
    cudaDeviceProp prop{};
    check(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties");
    // Best of `repeats` (after one warm-up) of each transfer, timed with events on one stream.
    auto best = [&](auto&& op) {
      op();
      float best_ms = 0;
      for (int r = 0; r < repeats; ++r) {
        check(cudaEventRecord(e0, st), "cudaEventRecord");
        op();
        check(cudaEventRecord(e1, st), "cudaEventRecord");
        check(cudaEventSynchronize(e1), "cudaEventSynchronize");
        float ms = 0;
        check(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
        if (r == 0 || ms < best_ms) best_ms = ms;
      }
      return static_cast<double>(bytes) / (best_ms * 1e-3);
    };
    bw.hbm_read = best([&] {
      read_probe(dev, bytes, sink, prop.multiProcessorCount * 8, st);
      check(cudaGetLastError(), "read kernel");
    });
    bw.h2d_pinned = best([&] {
      check(cudaMemcpyAsync(dev, host, bytes, cudaMemcpyHostToDevice, st), "cudaMemcpyAsync H2D");
    });
    bw.d2h_pinned = best([&] {
      check(cudaMemcpyAsync(host, dev, bytes, cudaMemcpyDeviceToHost, st), "cudaMemcpyAsync D2H");
    });
  } catch (...) {
    release();
    throw;
  }
  release();
  return bw;
}

}  // namespace tidal::kernels::cuda
