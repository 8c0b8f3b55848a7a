// SPDX-License-Identifier: Apache-2.0
/// \file ops_test.cpp
/// \brief Every CUDA kernel against its CPU reference (kernels/cpu) on odd shapes. Skips, saying
/// so, where no CUDA device exists (CI compiles these; the device machine runs them).
#include "kernels/cuda/ops.h"

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "gpu.h"
#include "kernels/common/dtype.h"
#include "kernels/common/executor.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/gated_delta_net.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/moe_router.h"
#include "kernels/cpu/rms_norm.h"
#include "kernels/cpu/rope.h"
#include "tolerances.h"

namespace tidal::kernels::cuda {
namespace {

using test::random_vec;

#define REQUIRE_GPU() \
  if (!test::have_gpu()) GTEST_SKIP() << test::kNoGpu

/// A device buffer of T.
template <typename T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t count) : n(count) {
    EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(1, n) * sizeof(T)),
              cudaSuccess);
    cudaMemset(p, 0, std::max<size_t>(1, n) * sizeof(T));
  }
  explicit Dev(const std::vector<T>& v) : Dev(v.size()) { put(v); }
  ~Dev() { cudaFree(p); }
  void put(const std::vector<T>& v) {
    cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> get() const {
    std::vector<T> v(n);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost);
    return v;
  }
};

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  float m = 0.f;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
  return m;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = kernels::f32_to_bf16(v[i]);
  return o;
}
std::vector<float> round_bf16(const std::vector<float>& v) {
  std::vector<float> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = bf16_to_f32(kernels::f32_to_bf16(v[i]));
  return o;
}

std::unique_ptr<Executor> cpu() { return make_tbb_executor(2); }

// ------------------------------------------------------------------------------------- GEMV

struct GemvCase {
  WFormat fmt;
  int64_t rows, cols, m;
};

class CudaGemvTest : public ::testing::TestWithParam<GemvCase> {};

TEST_P(CudaGemvTest, MatchesCpuLinear) {
  REQUIRE_GPU();
  const auto c = GetParam();
  auto w = random_vec(static_cast<size_t>(c.rows * c.cols), 1, 0.05f);
  auto x = random_vec(static_cast<size_t>(c.m * c.cols), 2);
  auto y0 = random_vec(static_cast<size_t>(c.m * c.rows), 3);
  // The CPU reference runs on exactly the weights the GPU sees (rounded / quantised).
  std::vector<float> wref(w.size());
  std::vector<float> scale(static_cast<size_t>(c.rows));
  std::vector<int8_t> q(w.size());
  for (int64_t r = 0; r < c.rows; ++r) {
    float mx = 0.f;
    for (int64_t j = 0; j < c.cols; ++j) mx = std::max(mx, std::fabs(w[r * c.cols + j]));
    scale[r] = mx / 127.f;
    for (int64_t j = 0; j < c.cols; ++j) {
      const size_t i = static_cast<size_t>(r * c.cols + j);
      q[i] = static_cast<int8_t>(std::nearbyint(w[i] / scale[r]));
      wref[i] = c.fmt == WFormat::kF32    ? w[i]
                : c.fmt == WFormat::kBF16 ? bf16_to_f32(kernels::f32_to_bf16(w[i]))
                                          : static_cast<float>(q[i]) * scale[r];
    }
  }
  Dev<float> dwf(w);
  Dev<uint16_t> dwb(to_bf16(w));
  Dev<int8_t> dwq(q);
  Dev<float> dsc(scale);
  DevMatrix dm;
  dm.format = c.fmt;
  dm.rows = c.rows;
  dm.cols = c.cols;
  dm.data = c.fmt == WFormat::kF32    ? static_cast<const void*>(dwf.p)
            : c.fmt == WFormat::kBF16 ? static_cast<const void*>(dwb.p)
                                      : static_cast<const void*>(dwq.p);
  dm.scale = dsc.p;
  Dev<float> dx(x);
  for (bool acc : {false, true}) {
    Dev<float> dy(y0);
    gemv(dm, dx.p, c.cols, dy.p, c.rows, c.m, acc, nullptr);
    std::vector<float> ref = y0;
    cpu::linear_ref({x.data(), c.cols, WeightView{wref.data(), DType::kF32, c.rows, c.cols},
                     ref.data(), c.rows, c.m, acc});
    const auto got = dy.get();
    for (size_t i = 0; i < ref.size(); ++i)
      ASSERT_NEAR(got[i], ref[i],
                  2e-5f * std::sqrt(static_cast<float>(c.cols)) + 1e-5f * std::fabs(ref[i]))
          << "i=" << i << " acc=" << acc;
  }
  // The RMSNorm folded into the GEMV (Note [norm inside the GEMV]) on x's first row: equals
  // rms_norm_row followed by the linear, plain and zero-centred, stored and accumulated.
  const auto nw = random_vec(static_cast<size_t>(c.cols), 4, 0.3f);
  Dev<float> dnw(nw);
  std::vector<float> xn(static_cast<size_t>(c.cols));
  for (bool zc : {false, true})
    for (bool acc : {false, true}) {
      cpu::rms_norm_row(x.data(), nw.data(), xn.data(), c.cols, 1e-6f,
                        zc ? cpu::NormScale::kZeroCentred : cpu::NormScale::kPlain);
      std::vector<float> ref(y0.begin(), y0.begin() + c.rows);
      cpu::linear_ref({xn.data(), c.cols, WeightView{wref.data(), DType::kF32, c.rows, c.cols},
                       ref.data(), c.rows, 1, acc});
      Dev<float> dy(y0);
      gemv_rms_norm(dm, dx.p, dnw.p, 1e-6f, zc, dy.p, acc, nullptr);
      const auto got = dy.get();
      for (int64_t i = 0; i < c.rows; ++i)
        ASSERT_NEAR(got[i], ref[i],
                    2e-5f * std::sqrt(static_cast<float>(c.cols)) + 1e-5f * std::fabs(ref[i]))
            << "normed GEMV i=" << i << " zc=" << zc << " acc=" << acc << " rows=" << c.rows
            << " cols=" << c.cols;
      for (int64_t i = c.rows; i < static_cast<int64_t>(got.size()); ++i)
        ASSERT_EQ(got[i], y0[i]) << "normed GEMV wrote past its one row";
    }
}

/// The DeltaNet output norm staged by the streaming GEMV (gemv_gated_norm): equals
/// rms_norm_gated_row per value head, then the linear; stored and accumulated; false (nothing
/// written) for a head width it does not take.
TEST(CudaOps, GemvGatedNormMatchesGatedNormThenLinear) {
  REQUIRE_GPU();
  struct Case {
    WFormat fmt;
    int64_t rows, heads, dv;
  };
  for (const Case c : {Case{WFormat::kBF16, 2048, 32, 128}, Case{WFormat::kF32, 37, 4, 16},
                       Case{WFormat::kI8, 101, 2, 64}, Case{WFormat::kBF16, 9, 64, 128}}) {
    const int64_t K = c.heads * c.dv;
    auto w = random_vec(static_cast<size_t>(c.rows * K), 80, 0.05f);
    auto o = random_vec(static_cast<size_t>(K), 81), z = random_vec(static_cast<size_t>(K), 82);
    auto nw = random_vec(static_cast<size_t>(c.dv), 83, 0.3f);
    auto y0 = random_vec(static_cast<size_t>(c.rows), 84);
    std::vector<float> wref(w.size()), scale(static_cast<size_t>(c.rows), 1.0f);
    std::vector<int8_t> q(w.size());
    for (int64_t r = 0; r < c.rows; ++r) {
      float mx = 0.f;
      for (int64_t j = 0; j < K; ++j) mx = std::max(mx, std::fabs(w[r * K + j]));
      scale[r] = mx / 127.f;
      for (int64_t j = 0; j < K; ++j) {
        const size_t i = static_cast<size_t>(r * K + j);
        q[i] = static_cast<int8_t>(std::nearbyint(w[i] / scale[r]));
        wref[i] = c.fmt == WFormat::kF32    ? w[i]
                  : c.fmt == WFormat::kBF16 ? bf16_to_f32(kernels::f32_to_bf16(w[i]))
                                            : static_cast<float>(q[i]) * scale[r];
      }
    }
    std::vector<float> xn(static_cast<size_t>(K));
    for (int64_t h = 0; h < c.heads; ++h)
      cpu::rms_norm_gated_row(o.data() + h * c.dv, z.data() + h * c.dv, nw.data(),
                              xn.data() + h * c.dv, c.dv, 1e-6f);
    Dev<float> dwf(w), dsc(scale), dob(o), dz(z), dnw(nw);
    Dev<uint16_t> dwb(to_bf16(w));
    Dev<int8_t> dwq(q);
    DevMatrix dm;
    dm.format = c.fmt;
    dm.rows = c.rows;
    dm.cols = K;
    dm.data = c.fmt == WFormat::kF32    ? static_cast<const void*>(dwf.p)
              : c.fmt == WFormat::kBF16 ? static_cast<const void*>(dwb.p)
                                        : static_cast<const void*>(dwq.p);
    dm.scale = dsc.p;
    for (bool acc : {false, true}) {
      std::vector<float> ref = y0;
      cpu::linear_ref({xn.data(), K, WeightView{wref.data(), DType::kF32, c.rows, K}, ref.data(),
                       c.rows, 1, acc});
      Dev<float> dy(y0);
      if (!gemv_gated_norm(dm, dob.p, dz.p, dnw.p, c.dv, 1e-6f, dy.p, acc, nullptr)) {
        // Only where the streaming GEMV is switched off; then nothing may be written.
        const char* off = std::getenv("TIDAL_GEMV_STREAM");
        ASSERT_TRUE(off && std::string(off) == "0") << "heads=" << c.heads << " dv=" << c.dv;
        ASSERT_EQ(dy.get(), y0);
        continue;
      }
      const auto got = dy.get();
      for (int64_t i = 0; i < c.rows; ++i)
        ASSERT_NEAR(got[i], ref[i],
                    2e-5f * std::sqrt(static_cast<float>(K)) + 1e-5f * std::fabs(ref[i]))
            << "i=" << i << " acc=" << acc << " heads=" << c.heads << " dv=" << c.dv;
    }
  }
  // More value heads than the kernel keeps norms for (65 > 64): not taken, nothing written.
  {
    const int64_t heads = 65, dv = 16, K = heads * dv;
    Dev<float> dw(random_vec(static_cast<size_t>(3 * K), 89)), dob(random_vec(K, 90)),
        dz(random_vec(K, 91)), dnw(random_vec(dv, 92)), dy(std::vector<float>(3, 7.0f));
    DevMatrix dm{dw.p, nullptr, WFormat::kF32, 3, K};
    EXPECT_FALSE(gemv_gated_norm(dm, dob.p, dz.p, dnw.p, dv, 1e-6f, dy.p, false, nullptr));
    for (float v : dy.get()) EXPECT_EQ(v, 7.0f);
  }
  // A head width that is not a multiple of 4: not taken, nothing written.
  auto w = random_vec(6 * 12, 85);
  Dev<float> dw(w), dob(random_vec(12, 86)), dz(random_vec(12, 87)), dnw(random_vec(6, 88)),
      dy(std::vector<float>(6, 7.0f));
  DevMatrix dm{dw.p, nullptr, WFormat::kF32, 6, 12};
  EXPECT_FALSE(gemv_gated_norm(dm, dob.p, dz.p, dnw.p, 6, 1e-6f, dy.p, false, nullptr));
  for (float v : dy.get()) EXPECT_EQ(v, 7.0f);
}

/// The SwiGLU product fused into the down-projection GEMV: input silu(g) ⊙ u of strided rows.
TEST(CudaOps, GemvWithGatedInputMatchesSiluMulThenLinear) {
  REQUIRE_GPU();
  for (int64_t m : {1, 3, 8}) {
    const int64_t rows = 70, I = 96, ld = 2 * I + 4;
    auto w = random_vec(static_cast<size_t>(rows * I), 40, 0.05f);
    auto gu = random_vec(static_cast<size_t>(m * ld), 41);
    std::vector<float> h(static_cast<size_t>(m * I)), ref(static_cast<size_t>(m * rows));
    for (int64_t t = 0; t < m; ++t)
      for (int64_t i = 0; i < I; ++i) h[t * I + i] = cpu::silu(gu[t * ld + i]) * gu[t * ld + I + i];
    auto wb = round_bf16(w);
    cpu::linear_ref(
        {h.data(), I, WeightView{wb.data(), DType::kF32, rows, I}, ref.data(), rows, m, false});
    Dev<uint16_t> dw(to_bf16(w));
    Dev<float> dgu(gu), dy(static_cast<size_t>(m * rows));
    DevMatrix dm{dw.p, nullptr, WFormat::kBF16, rows, I};
    gemv(dm, dgu.p, ld, dy.p, rows, m, false, nullptr, dgu.p + I);
    EXPECT_LT(max_abs_diff(dy.get(), ref), 1e-4f) << "m=" << m;
    // The shared expert's epilogue: y += sigmoid(gate[t · ld]) · down(...), gate in gu's last
    // column.
    auto y0 = random_vec(static_cast<size_t>(m * rows), 42);
    dy.put(y0);
    gemv(dm, dgu.p, ld, dy.p, rows, m, true, nullptr, dgu.p + I, dgu.p + ld - 1, ld);
    for (int64_t t = 0; t < m; ++t)
      for (int64_t r = 0; r < rows; ++r)
        ref[t * rows + r] =
            y0[t * rows + r] + cpu::sigmoid(gu[t * ld + ld - 1]) * ref[t * rows + r];
    EXPECT_LT(max_abs_diff(dy.get(), ref), 1e-4f) << "out_gate, m=" << m;
  }
}

/// The prefill-path converters and the embedding gather, element by element.
TEST(CudaOps, ConvertersEmbeddingAndSiluMul) {
  REQUIRE_GPU();
  const int64_t rows = 13, cols = 37;
  auto w = random_vec(static_cast<size_t>(rows * cols), 70, 0.5f);
  std::vector<float> scale(rows);
  std::vector<int8_t> q(w.size());
  for (int64_t r = 0; r < rows; ++r) {
    scale[r] = 0.01f * static_cast<float>(r + 1);
    for (int64_t c = 0; c < cols; ++c)
      q[r * cols + c] = static_cast<int8_t>(
          std::clamp(std::nearbyint(w[r * cols + c] / scale[r]), -127.0f, 127.0f));
  }
  Dev<uint16_t> dwb(to_bf16(w));
  Dev<int8_t> dwq(q);
  Dev<float> dsc(scale), dwf(w);
  const DevMatrix mb{dwb.p, nullptr, WFormat::kBF16, rows, cols};
  const DevMatrix mq{dwq.p, dsc.p, WFormat::kI8, rows, cols};
  const DevMatrix mf{dwf.p, nullptr, WFormat::kF32, rows, cols};
  // weight_to_f32 / weight_to_bf16 of every format.
  for (const DevMatrix* m : {&mb, &mq, &mf}) {
    std::vector<float> ref(w.size());
    for (size_t i = 0; i < w.size(); ++i)
      ref[i] = m->format == WFormat::kF32    ? w[i]
               : m->format == WFormat::kBF16 ? bf16_to_f32(kernels::f32_to_bf16(w[i]))
                                             : static_cast<float>(q[i]) * scale[i / cols];
    Dev<float> f32(w.size());
    Dev<uint16_t> b16(w.size());
    weight_to_f32(*m, f32.p, nullptr);
    weight_to_bf16(*m, b16.p, nullptr);
    EXPECT_EQ(max_abs_diff(f32.get(), ref), 0.f);
    const auto bits = b16.get();
    for (size_t i = 0; i < ref.size(); ++i) ASSERT_EQ(bits[i], kernels::f32_to_bf16(ref[i]));
  }
  // f32_to_bf16 and the hi/lo split (strided rows): hi + lo reproduces x to ~2^-16 relative.
  const int64_t ld = cols + 3;
  auto x = random_vec(static_cast<size_t>(rows * ld), 71, 3.0f);
  Dev<float> dx(x);
  Dev<uint16_t> hi(rows * cols), lo(rows * cols), one(rows * cols);
  f32_to_bf16_split(dx.p, ld, hi.p, lo.p, rows, cols, nullptr);
  f32_to_bf16(dx.p, ld, one.p, rows, cols, nullptr);
  const auto h = hi.get(), l = lo.get(), o = one.get();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const float v = x[r * ld + c];
      const size_t i = static_cast<size_t>(r * cols + c);
      ASSERT_EQ(h[i], kernels::f32_to_bf16(v));
      ASSERT_EQ(o[i], kernels::f32_to_bf16(v));
      ASSERT_NEAR(bf16_to_f32(h[i]) + bf16_to_f32(l[i]), v, std::fabs(v) * 1.6e-5f);
    }
  // Embedding gather of every format.
  const std::vector<int32_t> ids = {12, 0, 5, 5, 7};
  Dev<int32_t> dids(ids);
  for (const DevMatrix* m : {&mb, &mq, &mf}) {
    Dev<float> out(ids.size() * cols), conv(w.size());
    embed(*m, dids.p, static_cast<int64_t>(ids.size()), out.p, nullptr);
    weight_to_f32(*m, conv.p, nullptr);
    const auto got = out.get(), table = conv.get();
    for (size_t t = 0; t < ids.size(); ++t)
      for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(got[t * cols + c], table[ids[t] * cols + c]);
  }
  // Rows wider than one pass of the kernel (8 values a thread, 256 threads) with a partial tail,
  // and exactly one pass.
  for (int64_t wide : {int64_t{2048}, int64_t{4099}}) {
    auto wt = random_vec(static_cast<size_t>(3 * wide), 73);
    Dev<uint16_t> dwt(to_bf16(wt));
    const DevMatrix mt{dwt.p, nullptr, WFormat::kBF16, 3, wide};
    const std::vector<int32_t> tid = {2, 0, 2};
    Dev<int32_t> dtid(tid);
    Dev<float> out(std::vector<float>(tid.size() * wide, std::numeric_limits<float>::quiet_NaN()));
    embed(mt, dtid.p, static_cast<int64_t>(tid.size()), out.p, nullptr);
    const auto got = out.get();
    for (size_t t = 0; t < tid.size(); ++t)
      for (int64_t c = 0; c < wide; ++c)
        ASSERT_EQ(got[t * wide + c], bf16_to_f32(kernels::f32_to_bf16(wt[tid[t] * wide + c])))
            << "wide=" << wide << " t=" << t << " c=" << c;
  }
  // silu_mul with strided [g | u] rows.
  const int64_t T = 4, I = 29, ldg = 2 * I + 6;
  auto gu = random_vec(static_cast<size_t>(T * ldg), 72);
  Dev<float> dgu(gu), hbuf(T * I);
  silu_mul(dgu.p, dgu.p + I, ldg, hbuf.p, T, I, nullptr);
  const auto hv = hbuf.get();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < I; ++i)
      ASSERT_NEAR(hv[t * I + i], cpu::silu(gu[t * ldg + i]) * gu[t * ldg + I + i], 1e-6f);
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaGemvTest,
    ::testing::Values(GemvCase{WFormat::kBF16, 37, 64, 1}, GemvCase{WFormat::kBF16, 300, 2048, 1},
                      GemvCase{WFormat::kBF16, 129, 4096, 8}, GemvCase{WFormat::kBF16, 17, 50, 3},
                      GemvCase{WFormat::kF32, 33, 96, 5}, GemvCase{WFormat::kF32, 7, 13, 2},
                      GemvCase{WFormat::kI8, 65, 512, 1}, GemvCase{WFormat::kI8, 31, 40, 7},
                      GemvCase{WFormat::kI8, 200, 2048, 4}, GemvCase{WFormat::kBF16, 23, 1001, 1},
                      GemvCase{WFormat::kF32, 2050, 2048, 1}, GemvCase{WFormat::kBF16, 9, 4096, 2},
                      // one warp per row and 16 chunks per lane: past the prefetched first 8
                      GemvCase{WFormat::kBF16, 8192, 4096, 1},
                      // Note [streaming GEMV]: many rows per warp (the ring wraps many times), a
                      // last segment of one chunk, INT8 at the widest staged row, and a row too
                      // wide to stage (the block-per-rows kernel)
                      GemvCase{WFormat::kBF16, 40001, 256, 1},
                      GemvCase{WFormat::kBF16, 97, 2056, 1}, GemvCase{WFormat::kI8, 4099, 1536, 1},
                      GemvCase{WFormat::kI8, 300, 8192, 1}, GemvCase{WFormat::kBF16, 5, 12800, 1},
                      // three segments per row (an odd count above one), the last one partial
                      GemvCase{WFormat::kF32, 129, 2560, 1},
                      GemvCase{WFormat::kBF16, 33, 6144, 1}));

/// Programmatic dependent launch (Note [programmatic dependent launch]): a long chain of dependent
/// kernels (residual + norm -> GEMV -> gated GEMV back into the residual, the decode step's
/// pattern) on a stream, launched one by one and replayed from a CUDA graph, equals the same chain
/// with plain launches bit for bit. A kernel that read its input before the one producing it had
/// finished would show here as a difference.
TEST(CudaOps, ProgrammaticLaunchChainEqualsPlainLaunches) {
  REQUIRE_GPU();
  const int64_t H = 2048, R = 1024, steps = 48;
  auto w1 = random_vec(static_cast<size_t>(R * H), 31, 0.05f);
  auto w2 = random_vec(static_cast<size_t>(H * R / 2), 32, 0.05f);
  auto x0 = random_vec(static_cast<size_t>(H), 33), nw = random_vec(H, 34, 0.1f);
  Dev<uint16_t> d1(to_bf16(w1)), d2(to_bf16(w2));
  Dev<float> dnw(nw), dx(x0), dy(H), dxn(H), dmid(R);
  DevMatrix m1{d1.p, nullptr, WFormat::kBF16, R, H}, m2{d2.p, nullptr, WFormat::kBF16, H, R / 2};
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  auto chain = [&] {
    for (int64_t i = 0; i < steps; ++i) {
      add_rms_norm(dx.p, i == 0 ? nullptr : dy.p, dnw.p, dxn.p, 1, H, 1e-6f, true, s);
      gemv(m1, dxn.p, H, dmid.p, R, 1, false, s);
      gemv(m2, dmid.p, R, dy.p, H, 1, false, s, dmid.p + R / 2);
    }
  };
  // PDL back as it was whatever happens below (a failed assertion returns early).
  struct PdlRestore {
    bool was = pdl_enabled();
    ~PdlRestore() { set_pdl_enabled(was); }
  } restore;
  auto run = [&](bool pdl, bool graph) {
    set_pdl_enabled(pdl);
    dx.put(x0);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);  // the copy is on the legacy stream, not s
    if (graph) {
      cudaGraph_t g = nullptr;
      cudaGraphExec_t e = nullptr;
      EXPECT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
      chain();
      EXPECT_EQ(cudaStreamEndCapture(s, &g), cudaSuccess);
      EXPECT_EQ(cudaGraphInstantiate(&e, g, 0), cudaSuccess);
      EXPECT_EQ(cudaGraphLaunch(e, s), cudaSuccess);
      EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
      cudaGraphExecDestroy(e);
      cudaGraphDestroy(g);
    } else {
      chain();
      EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
    }
    EXPECT_EQ(cudaGetLastError(), cudaSuccess);
    return dx.get();
  };
  const auto plain = run(false, false);
  float norm = 0.f;
  for (float v : plain) norm += v * v;
  ASSERT_GT(norm, 0.f);
  ASSERT_TRUE(std::all_of(plain.begin(), plain.end(), [](float v) { return std::isfinite(v); }));
  for (int rep = 0; rep < 3; ++rep) {
    EXPECT_EQ(max_abs_diff(run(true, false), plain), 0.f) << "PDL, launches, rep " << rep;
    EXPECT_EQ(max_abs_diff(run(true, true), plain), 0.f) << "PDL, graph, rep " << rep;
  }
  cudaStreamDestroy(s);
}

TEST(CudaOps, KernelStampsRecordEachKernelOnceInOrder) {
  REQUIRE_GPU();
  // Note [Kernel stamps]: three kernels, one graph replay of them, then nothing once stamps end.
  const int64_t H = 512, R = 256;
  auto w = random_vec(static_cast<size_t>(R * H), 41, 0.05f);
  Dev<uint16_t> dw(to_bf16(w));
  Dev<float> dx(random_vec(H, 42)), dnw(random_vec(H, 43, 0.1f)), dxn(H), dy(R);
  DevMatrix m{dw.p, nullptr, WFormat::kBF16, R, H};
  cudaStream_t s = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
  auto chain = [&] {
    rms_norm(dx.p, H, dnw.p, dxn.p, H, 1, H, 1e-6f, false, s);
    gemv(m, dxn.p, H, dy.p, R, 1, false, s);
    rms_norm(dx.p, H, dnw.p, dxn.p, H, 1, H, 1e-6f, false, s);
  };
  stamps_begin(2);  // capacity 2 of 3: the third is dropped, not written past the buffer
  chain();
  auto st = stamps_end();
  ASSERT_EQ(st.size(), 2u);
  stamps_begin(64);
  chain();
  cudaGraph_t g = nullptr;
  cudaGraphExec_t e = nullptr;
  ASSERT_EQ(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), cudaSuccess);
  chain();
  ASSERT_EQ(cudaStreamEndCapture(s, &g), cudaSuccess);
  ASSERT_EQ(cudaGraphInstantiate(&e, g, 0), cudaSuccess);
  ASSERT_EQ(cudaGraphLaunch(e, s), cudaSuccess);
  st = stamps_end();
  ASSERT_EQ(st.size(), 6u);  // three launched, three replayed (capture itself runs nothing)
  for (size_t i = 0; i < st.size(); ++i) {
    const std::string name = st[i].name;
    if (i % 3 == 1)  // the streaming GEMV, or the block-per-rows one under TIDAL_GEMV_STREAM=0
      EXPECT_EQ(name.rfind("gemv", 0), 0u) << name;
    else
      EXPECT_EQ(name.rfind("rms_norm", 0), 0u) << name;  // rms_norm_reg_kernel at this width
    EXPECT_GE(st[i].release_ns, st[i].entry_ns) << i;
    EXPECT_GT(st[i].blocks, 0u);
    EXPECT_GT(st[i].threads, 0u);
    if (i > 0) {
      EXPECT_GE(st[i].release_ns, st[i - 1].release_ns) << i;
    }
  }
  for (const auto& k : st) EXPECT_EQ(k.mark_ns[0], 0u) << k.name;  // these mark nothing
  ASSERT_EQ(cudaGraphLaunch(e, s), cudaSuccess);                   // stamps off: nothing recorded
  EXPECT_TRUE(stamps_end().empty());
  // A kernel that marks its stages (the one-token delta rule): three marks, in order, after its
  // release.
  {
    const int64_t nk = 2, nv = 4, dk = 64, dv = 64;
    Dev<float> q(random_vec(nk * dk, 44)), k(random_vec(nk * dk, 45)), v(random_vec(nv * dv, 46)),
        g(std::vector<float>(nv, -0.1f)), b(std::vector<float>(nv, 0.5f)), o(nv * dv),
        rec(nv * dk * dv);
    Dev<LayerStateDev> dls(
        std::vector<LayerStateDev>{LayerStateDev{nullptr, nullptr, nullptr, rec.p}});
    Dev<StepDev> dstep(std::vector<StepDev>{StepDev{0, dls.p}});
    stamps_begin(8);
    delta_rule(q.p, k.p, v.p, g.p, b.p, dstep.p, 0, o.p, 1, nk, nv, dk, dv, s);
    st = stamps_end();
    ASSERT_EQ(st.size(), 1u);
    EXPECT_EQ(std::string(st[0].name).rfind("delta_rule", 0), 0u) << st[0].name;
    EXPECT_GE(st[0].mark_ns[0], st[0].release_ns);
    EXPECT_GE(st[0].mark_ns[1], st[0].mark_ns[0]);
    EXPECT_GE(st[0].mark_ns[2], st[0].mark_ns[1]);
  }
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  cudaGraphExecDestroy(e);
  cudaGraphDestroy(g);
  cudaStreamDestroy(s);
}

// --------------------------------------------------------------------------------- norms etc.

TEST(CudaOps, RmsNormVariantsAndFusedResidual) {
  REQUIRE_GPU();
  const int64_t rows = 5, dim = 333;
  auto x = random_vec(rows * dim, 4), y = random_vec(rows * dim, 5), w = random_vec(dim, 6, 0.1f);
  Dev<float> dw(w);
  for (bool zc : {false, true}) {
    Dev<float> dx(x), dout(rows * dim);
    rms_norm(dx.p, dim, dw.p, dout.p, dim, rows, dim, 1e-6f, zc, nullptr);
    std::vector<float> ref(x.size());
    for (int64_t r = 0; r < rows; ++r)
      cpu::rms_norm_row(&x[r * dim], w.data(), &ref[r * dim], dim, 1e-6f,
                        zc ? cpu::NormScale::kZeroCentred : cpu::NormScale::kPlain);
    EXPECT_LT(max_abs_diff(dout.get(), ref), 1e-5f);
    // Fused: x += y; xn = norm(x).
    Dev<float> dy(y);
    add_rms_norm(dx.p, dy.p, dw.p, dout.p, rows, dim, 1e-6f, zc, nullptr);
    std::vector<float> xs(x.size());
    for (size_t i = 0; i < x.size(); ++i) xs[i] = x[i] + y[i];
    for (int64_t r = 0; r < rows; ++r)
      cpu::rms_norm_row(&xs[r * dim], w.data(), &ref[r * dim], dim, 1e-6f,
                        zc ? cpu::NormScale::kZeroCentred : cpu::NormScale::kPlain);
    EXPECT_EQ(max_abs_diff(dx.get(), xs), 0.f);
    EXPECT_LT(max_abs_diff(dout.get(), ref), 1e-5f);
  }
  // Gated norm of the DeltaNet output.
  auto z = random_vec(rows * dim, 7);
  Dev<float> dx(x), dz(z), dout(rows * dim);
  rms_norm_gated(dx.p, dz.p, 0, 1, dw.p, dout.p, rows, dim, 1e-6f, nullptr);
  std::vector<float> ref(x.size());
  for (int64_t r = 0; r < rows; ++r)
    cpu::rms_norm_gated_row(&x[r * dim], &z[r * dim], w.data(), &ref[r * dim], dim, 1e-6f);
  EXPECT_LT(max_abs_diff(dout.get(), ref), 1e-5f);
}

TEST(CudaOps, RouterMatchesCpuIncludingTies) {
  REQUIRE_GPU();
  for (auto [T, E, k] :
       {std::tuple{5, 256, 8}, std::tuple{3, 48, 4}, std::tuple{2, 512, 10}, std::tuple{1, 7, 3}}) {
    auto l = random_vec(static_cast<size_t>(T * E), 8 + E);
    l[3] = l[4] = 9.f;  // a tie on top: the lower id first
    Dev<float> dl(l);
    Dev<int32_t> di(T * k);
    Dev<float> dwt(T * k);
    for (bool renorm : {true, false}) {
      moe_route(dl.p, 0, T, E, k, renorm, di.p, dwt.p, nullptr);
      std::vector<int32_t> ids(T * k);
      std::vector<float> wts(T * k);
      cpu::moe_route(l.data(), T, E, k, renorm, ids.data(), wts.data());
      EXPECT_EQ(di.get(), ids) << "E=" << E;
      EXPECT_LT(max_abs_diff(dwt.get(), wts), 1e-6f);
      // The same logits inside wider rows (the stacked router | shared expert output).
      const int64_t ld = E + 5;
      std::vector<float> wide(static_cast<size_t>(T * ld), 50.f);
      for (int64_t t = 0; t < T; ++t) std::copy(&l[t * E], &l[t * E] + E, &wide[t * ld]);
      Dev<float> dwide(wide);
      moe_route(dwide.p, ld, T, E, k, renorm, di.p, dwt.p, nullptr);
      EXPECT_EQ(di.get(), ids) << "strided E=" << E;
    }
  }
}

// --------------------------------------------------------------------------------- attention

struct AttnCase {
  int64_t nh, nkv, d, pos0, T;
  bool gated;
  bool kv_f32 = false;  ///< fp32 cache (gpu_precision="fp32")
};
class CudaAttentionTest : public ::testing::TestWithParam<AttnCase> {};

/// attn_prep + attention vs the CPU: q/k norms, RoPE (partial), cache write in BF16, causal GQA
/// with the sigmoid gate. The CPU reference attends over the same BF16-rounded cache.
TEST_P(CudaAttentionTest, PrepAndAttentionMatchCpu) {
  REQUIRE_GPU();
  const auto c = GetParam();
  const int64_t n = c.pos0 + c.T, kvw = c.nkv * c.d, qw = c.nh * c.d * (c.gated ? 2 : 1);
  const int64_t rot = std::max<int64_t>(2, c.d / 4 / 2 * 2);  // partial rotary (d/4, even)
  const auto table = cpu::rope_table_default(1e7, rot);
  auto qg = random_vec(c.T * qw, 10), kn = random_vec(c.T * kvw, 11),
       vn = random_vec(c.T * kvw, 12);
  auto qnorm = random_vec(c.d, 13, 0.1f), knorm = random_vec(c.d, 14, 0.1f);
  // Cache history (positions < pos0), as BF16.
  auto kh = round_bf16(random_vec(n * kvw, 15)), vh = round_bf16(random_vec(n * kvw, 16));
  Dev<uint16_t> dk(to_bf16(kh)), dv(to_bf16(vh));
  Dev<float> dkf(kh), dvf(vh);  // the fp32 cache variant
  LayerStateDev ls{dk.p, dv.p, nullptr, nullptr};
  if (c.kv_f32) ls = LayerStateDev{dkf.p, dvf.p, nullptr, nullptr};
  Dev<LayerStateDev> dls(std::vector<LayerStateDev>{ls});
  Dev<StepDev> dstep(std::vector<StepDev>{StepDev{c.pos0, dls.p}});
  Dev<float> dqg(qg), dkn(kn), dvn(vn), dqn(qnorm), dkn2(knorm), dinv(table.inv_freq);
  Dev<float> dq(c.T * c.nh * c.d), dgate(c.T * c.nh * c.d), dout(c.T * c.nh * c.d);
  AttnPrepArgs p;
  p.qg = dqg.p;
  p.k = dkn.p;
  p.v = dvn.p;
  p.q_norm = dqn.p;
  p.k_norm = dkn2.p;
  p.inv_freq = dinv.p;
  p.q = dq.p;
  p.gate = dgate.p;
  p.step = dstep.p;
  p.T = c.T;
  p.nh = c.nh;
  p.nkv = c.nkv;
  p.d = c.d;
  p.rotary_dim = rot;
  p.zero_centred = c.gated;
  p.gated = c.gated;
  p.kv_f32 = c.kv_f32;
  attn_prep(p, nullptr);
  AttentionArgs a;
  a.q = dq.p;
  a.gate = c.gated ? dgate.p : nullptr;
  a.out = dout.p;
  a.step = dstep.p;
  a.T = c.T;
  a.nh = c.nh;
  a.nkv = c.nkv;
  a.d = c.d;
  a.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
  a.kv_f32 = c.kv_f32;
  // Every split count on the tensor-core decode kernel and on the SIMT kernels.
  for (int splits : {1, 3, attention_max_splits(c.T, c.nkv, 132)})
    for (bool tc : {true, false}) {
      a.max_splits = splits;
      a.tensor_cores = tc;
      // The tensor-core kernel must really run where it applies (sm_90: every BF16-cache decode
      // case here); elsewhere the SIMT kernels stand in and are what this checks.
      int major = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
      const int64_t G = c.nh / c.nkv;
      const bool prefill_tc = c.T >= 2 && 64 % G == 0 && c.T * c.nh * c.d >= 65536;
      if (tc && major >= 9 && (c.T == 1 || prefill_tc) && !c.kv_f32 &&
          (c.d == 64 || c.d == 128 || c.d == 256)) {
        EXPECT_TRUE(attention_uses_tensor_cores(a))
            << "nh=" << c.nh << " d=" << c.d << " T=" << c.T;
      }
      if (!tc) {
        EXPECT_FALSE(attention_uses_tensor_cores(a));
      }
      Dev<float> part(attention_workspace_floats(c.T, c.nh, c.d, splits));
      a.partial = part.p;
      attention(a, nullptr);
      // CPU: same prep, then attention over the BF16 cache.
      const auto scale = c.gated ? cpu::NormScale::kZeroCentred : cpu::NormScale::kPlain;
      std::vector<float> q(c.T * c.nh * c.d), gate(q.size());
      for (int64_t t = 0; t < c.T; ++t)
        for (int64_t h = 0; h < c.nh; ++h) {
          const float* src = &qg[t * qw + h * c.d * (c.gated ? 2 : 1)];
          cpu::rms_norm_row(src, qnorm.data(), &q[(t * c.nh + h) * c.d], c.d, 1e-6f, scale);
          if (c.gated) std::copy(src + c.d, src + 2 * c.d, &gate[(t * c.nh + h) * c.d]);
        }
      std::vector<float> kcur(c.T * kvw);
      for (int64_t r = 0; r < c.T * c.nkv; ++r)
        cpu::rms_norm_row(&kn[r * c.d], knorm.data(), &kcur[r * c.d], c.d, 1e-6f, scale);
      cpu::rope_apply(q.data(), c.T, c.nh * c.d, c.nh, c.d, c.pos0, table);
      cpu::rope_apply(kcur.data(), c.T, kvw, c.nkv, c.d, c.pos0, table);
      std::vector<float> kc = kh, vc = vh;
      for (int64_t i = 0; i < c.T * kvw; ++i) {
        kc[c.pos0 * kvw + i] = c.kv_f32 ? kcur[i] : bf16_to_f32(kernels::f32_to_bf16(kcur[i]));
        vc[c.pos0 * kvw + i] = c.kv_f32 ? vn[i] : bf16_to_f32(kernels::f32_to_bf16(vn[i]));
      }
      // The cache the GPU wrote equals the rounded CPU values (up to RoPE's sin/cos ulps).
      std::vector<float> kgot(n * kvw);
      if (c.kv_f32) {
        kgot = dkf.get();
        EXPECT_LT(max_abs_diff(kgot, kc), 1e-4f);
        EXPECT_EQ(max_abs_diff(dvf.get(), vc), 0.f);
      } else {
        const auto kbits = dk.get();
        for (size_t i = 0; i < kgot.size(); ++i) kgot[i] = bf16_to_f32(kbits[i]);
        EXPECT_LT(max_abs_diff(kgot, kc), 2e-2f);
      }
      std::vector<float> ref(c.T * c.nh * c.d);
      auto ex = cpu();
      cpu::AttentionArgs ca;
      ca.q = q.data();
      ca.ld_q = c.nh * c.d;
      ca.k_cache = kgot.data();  // attend over exactly the cache the GPU holds
      ca.v_cache = vc.data();
      ca.dst = ref.data();
      ca.num_q = c.T;
      ca.q_pos0 = c.pos0;
      ca.num_heads = c.nh;
      ca.num_kv_heads = c.nkv;
      ca.head_dim = c.d;
      ca.scale = a.scale;
      cpu::attention(ca, *ex);
      if (c.gated)
        for (size_t i = 0; i < ref.size(); ++i) ref[i] *= cpu::sigmoid(gate[i]);
      EXPECT_LT(max_abs_diff(dout.get(), ref), 2e-5f)
          << "splits=" << splits << " tensor_cores=" << tc << " nh=" << c.nh << " nkv=" << c.nkv
          << " d=" << c.d << " pos0=" << c.pos0 << " T=" << c.T;
      if (!(tc && attention_uses_tensor_cores(a)) || c.T != 1) continue;
      // The same step with the prep inside the attention kernel (fused_prep, Note [attention prep
      // in the decode kernel]), from the cache as it was before this step's row was written, at
      // the default and at a larger minimum of keys per split: the same output, and the same new
      // cache row (the norm's sum in another order: a BF16 ulp at most).
      for (int64_t mk : {int64_t{0}, int64_t{256}}) {
        dk.put(to_bf16(kh));
        dv.put(to_bf16(vh));
        AttentionArgs f = a;
        f.fused_prep = true;
        f.prep = p;
        f.q = nullptr;
        f.gate = nullptr;
        f.min_split_keys = mk;
        Dev<float> fout(dout.n);
        f.out = fout.p;
        attention(f, nullptr);
        EXPECT_LT(max_abs_diff(fout.get(), ref), 5e-5f)
            << "fused prep, splits=" << splits << " min keys=" << mk << " nh=" << c.nh
            << " d=" << c.d << " pos0=" << c.pos0;
        const auto kbits = dk.get();
        std::vector<float> kf(kbits.size());
        for (size_t i = 0; i < kf.size(); ++i) kf[i] = bf16_to_f32(kbits[i]);
        EXPECT_LT(max_abs_diff(kf, kgot), 2e-2f) << "fused prep key row";
        const auto vbits = dv.get();
        std::vector<float> vf(vbits.size());
        for (size_t i = 0; i < vf.size(); ++i) vf[i] = bf16_to_f32(vbits[i]);
        EXPECT_EQ(max_abs_diff(vf, vc), 0.f) << "fused prep value row";
      }
      // Put the step's cache back as attn_prep wrote it, for the next split count.
      std::vector<uint16_t> kb(kgot.size());
      for (size_t i = 0; i < kb.size(); ++i) kb[i] = kernels::f32_to_bf16(kgot[i]);
      dk.put(kb);
      dv.put(to_bf16(vc));
    }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CudaAttentionTest,
    ::testing::Values(AttnCase{16, 2, 256, 1000, 1, true},  // 35B decode
                      AttnCase{16, 2, 256, 77, 37, true},   // prefill chunk after a prefix
                      AttnCase{4, 2, 24, 0, 45, false},     // qwen3_moe fixture shape, odd d
                      AttnCase{4, 2, 64, 5, 1, true},       // tidal-mini decode
                      AttnCase{32, 4, 128, 300, 3, false},  // 30B-A3B, 3 tokens
                      AttnCase{8, 1, 32, 0, 1, true},       // first token, one KV head
                      AttnCase{16, 2, 128, 700, 1, false},  // tiled decode at d = 128
                      AttnCase{32, 2, 128, 300, 1, false},  // G = 16 (tiled, 16 heads per pass)
                      AttnCase{12, 2, 128, 333, 1, true},   // G = 6: tensor cores, not tiled
                      AttnCase{16, 2, 256, 4999, 1, true},  // many tiles per split, odd tail
                      AttnCase{16, 2, 64, 31, 1, false},    // d = 64, 32 keys (one full tile)
                      AttnCase{16, 2, 256, 513, 1, true, true},  // fp32 cache, decode
                      AttnCase{4, 2, 24, 9, 30, false, true},    // fp32 cache, prefill, odd d
                      // Tensor-core prefill (Note [tensor-core prefill attention]): several row
                      // tiles with a partial last one, a prefix that is no multiple of a tile,
                      // G = 1 and G = 32, a long prefix
                      AttnCase{16, 2, 256, 0, 300, true},  // 35B shape, first chunk
                      AttnCase{16, 2, 128, 1000, 150, false},
                      AttnCase{8, 8, 64, 5, 1100, true},       // G = 1: a block is 64 tokens
                      AttnCase{64, 2, 128, 3, 40, true},       // G = 32: two tokens per block
                      AttnCase{16, 2, 256, 4001, 70, true}));  // long prefix, tile-crossing rows

// -------------------------------------------------------------------------- Gated DeltaNet

TEST(CudaOps, ConvAndPrepMatchCpu) {
  REQUIRE_GPU();
  const int64_t nk = 2, nv = 4, dk = 16, dv = 32, K = 4, C = 2 * nk * dk + nv * dv;
  // The conv of Tc tokens against the CPU (output and the state it leaves); its output.
  auto conv_case = [&](int64_t Tc) {
    auto src = random_vec(Tc * C, 20), w = random_vec(C * K, 21, 0.3f),
         st0 = random_vec((K - 1) * C, 22);
    Dev<float> dsrc(src), dw(w), dst0(st0), dout(Tc * C);
    LayerStateDev ls{nullptr, nullptr, dst0.p, nullptr};
    Dev<LayerStateDev> dls(std::vector<LayerStateDev>{ls});
    Dev<StepDev> dstep(std::vector<StepDev>{StepDev{0, dls.p}});
    causal_conv1d_silu(dsrc.p, 0, Tc, C, K, dw.p, dstep.p, 0, dout.p, nullptr);
    std::vector<float> ref(Tc * C), st = st0;
    auto ex = cpu();
    cpu::causal_conv1d_silu(src.data(), Tc, C, K, w.data(), st.data(), ref.data(), *ex);
    const auto got = dout.get();
    EXPECT_LT(max_abs_diff(got, ref), 1e-5f) << "T=" << Tc;
    EXPECT_EQ(max_abs_diff(dst0.get(), st), 0.f) << "T=" << Tc;
    return got;
  };
  // Short prompts walk the tokens per channel; from 64 tokens on the conv runs in parallel over
  // 32-token segments (a partial last one at 70) and writes the state after.
  conv_case(5);
  conv_case(200);
  const int64_t T = 70;
  const auto u = conv_case(T);
  // Prep: L2 norms (q scaled by dk^-1/2), beta, g.
  auto b = random_vec(T * nv, 23), a = random_vec(T * nv, 24), alog = random_vec(nv, 25, 0.5f),
       dtb = random_vec(nv, 26, 0.5f);
  Dev<float> du(u), db(b), da(a), dal(alog), ddt(dtb), q(T * nk * dk), k(T * nk * dk),
      v(T * nv * dv), beta(T * nv), g(T * nv);
  gdn_prep(du.p, db.p, da.p, 0, dal.p, ddt.p, q.p, k.p, v.p, beta.p, g.p, T, nk, nv, dk, dv,
           nullptr);
  const auto qg = q.get(), kg = k.get(), bg = beta.get(), gg = g.get();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < nk; ++h)
      for (int which = 0; which < 2; ++which) {
        const float* s = &u[t * C + which * nk * dk + h * dk];
        double ss = 0;
        for (int64_t i = 0; i < dk; ++i) ss += static_cast<double>(s[i]) * s[i];
        const float f = 1.0f / std::sqrt(static_cast<float>(ss) + 1e-6f) *
                        (which == 0 ? 1.0f / std::sqrt(static_cast<float>(dk)) : 1.0f);
        const auto& got = which == 0 ? qg : kg;
        for (int64_t i = 0; i < dk; ++i) ASSERT_NEAR(got[(t * nk + h) * dk + i], s[i] * f, 1e-6f);
      }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < nv; ++h) {
      ASSERT_NEAR(bg[t * nv + h], cpu::sigmoid(b[t * nv + h]), 1e-6f);
      ASSERT_NEAR(gg[t * nv + h], -std::exp(alog[h]) * cpu::softplus(a[t * nv + h] + dtb[h]),
                  1e-5f);
    }
}

struct DeltaCase {
  int64_t T, nk, nv, dk, dv;
};
class CudaDeltaRuleTest : public ::testing::TestWithParam<DeltaCase> {};
void check_delta_rule_case(const DeltaCase& c, size_t scratch_bytes);

/// The register-resident recurrence against the CPU chunked form (T not a multiple of the chunk)
/// and recurrent form, then a decode step after it.
TEST_P(CudaDeltaRuleTest, MatchesCpuAcrossChunkBoundariesThenDecode) {
  REQUIRE_GPU();
  struct ModeRestore {
    int was = delta_rule_mode();
    ~ModeRestore() { set_delta_rule_mode(was); }
  } restore;
  // The staged token-by-token kernel, the chunked form (Note [chunked delta rule]) and the
  // two-pass chunked form (Note [two-pass chunked delta rule]) with scratch for the whole prompt
  // and for two chunks at a time (ranges end inside the prompt).
  for (int mode : {0, 1, 2, 3}) {
    set_delta_rule_mode(mode == 3 ? 2 : mode);
    SCOPED_TRACE(mode == 0   ? "staged"
                 : mode == 1 ? "chunked"
                 : mode == 2 ? "two-pass"
                             : "two-pass, ranges");
    const DeltaCase& c = GetParam();
    check_delta_rule_case(c, mode == 2   ? delta_rule_scratch_bytes(c.T, c.nv, c.dk, c.dv)
                             : mode == 3 ? delta_rule_scratch_bytes(64, c.nv, c.dk, c.dv)
                                         : 0);
  }
}

void check_delta_rule_case(const DeltaCase& c, size_t scratch_bytes) {
  auto q = random_vec(c.T * c.nk * c.dk, 30, 0.2f), k = random_vec(c.T * c.nk * c.dk, 31, 0.2f),
       v = random_vec(c.T * c.nv * c.dv, 32), g = random_vec(c.T * c.nv, 33, 0.1f),
       beta = random_vec(c.T * c.nv, 34, 0.3f), s0 = random_vec(c.nv * c.dk * c.dv, 35, 0.1f);
  for (auto& x : g) x = -std::fabs(x);
  for (auto& x : beta) x = cpu::sigmoid(x);
  Dev<float> dq(q), dk(k), dv(v), dg(g), db(beta), ds(s0), dout(c.T * c.nv * c.dv);
  LayerStateDev ls{nullptr, nullptr, nullptr, ds.p};
  Dev<LayerStateDev> dls(std::vector<LayerStateDev>{ls});
  Dev<StepDev> dstep(std::vector<StepDev>{StepDev{0, dls.p}});
  // Scratch filled with NaN: whatever the two-pass form reads must be what it wrote.
  Dev<float> scr(std::vector<float>(scratch_bytes / sizeof(float) + 1,
                                    std::numeric_limits<float>::quiet_NaN()));
  delta_rule(dq.p, dk.p, dv.p, dg.p, db.p, dstep.p, 0, dout.p, c.T, c.nk, c.nv, c.dk, c.dv, nullptr,
             1, false, scratch_bytes ? scr.p : nullptr, scratch_bytes);
  if (scratch_bytes > 0 && delta_rule_mode() == 2) {
    // The two-pass form ran where its shape qualifies (not a silent fallback): its first pass
    // overwrote the scratch's NaNs.
    const bool applies =
        delta_rule_two_pass_applies(c.T, 1, c.nk, c.nv, c.dk, c.dv, scr.p, scratch_bytes);
    // (d_k = 256 needs ~139 KB of shared memory a block: only where the device has it.)
    if (c.dk <= 128) {
      EXPECT_EQ(applies, c.T >= 2 && c.dv % 32 == 0 && c.dk % 8 == 0);
    }
    float first = 0.f;
    cudaMemcpy(&first, scr.p, sizeof first, cudaMemcpyDeviceToHost);
    EXPECT_EQ(std::isnan(first), !applies);
  }
  std::vector<float> ref(dout.n), S = s0;
  cpu::DeltaRuleArgs a{q.data(),   k.data(), v.data(), g.data(), beta.data(), S.data(),
                       ref.data(), c.T,      c.nk,     c.nv,     c.dk,        c.dv};
  auto ex = cpu();
  if (c.T > 1)
    cpu::delta_rule_chunked(a, *ex);
  else
    cpu::delta_rule_recurrent(a, *ex);
  EXPECT_LT(max_abs_diff(dout.get(), ref), test::kDeltaRuleAtol);
  EXPECT_LT(max_abs_diff(ds.get(), S), test::kDeltaRuleAtol);
  // One decode token on the updated state.
  Dev<float> dout1(c.nv * c.dv);
  delta_rule(dq.p, dk.p, dv.p, dg.p, db.p, dstep.p, 0, dout1.p, 1, c.nk, c.nv, c.dk, c.dv, nullptr);
  std::vector<float> ref1(dout1.n);
  cpu::DeltaRuleArgs a1{q.data(),    k.data(), v.data(), g.data(), beta.data(), S.data(),
                        ref1.data(), 1,        c.nk,     c.nv,     c.dk,        c.dv};
  cpu::delta_rule_recurrent(a1, *ex);
  EXPECT_LT(max_abs_diff(dout1.get(), ref1), test::kDeltaRuleAtol);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaDeltaRuleTest,
                         ::testing::Values(DeltaCase{1, 16, 32, 128, 128},    // 35B decode
                                           DeltaCase{70, 16, 32, 128, 128},   // 64 + 6
                                           DeltaCase{129, 2, 4, 16, 16},      // fixtures
                                           DeltaCase{33, 2, 4, 64, 64},       // tidal-mini
                                           DeltaCase{5, 1, 2, 32, 16},        // dv < 32
                                           DeltaCase{301, 16, 32, 128, 128},  // many chunks
                                           DeltaCase{100, 2, 4, 16, 64},      // d_v > d_k
                                           DeltaCase{17, 2, 2, 256, 32}));    // d_k = 256

/// In-kernel q/k L2 normalisation (l2norm_qk) over a prompt equals normalising first (Note [delta
/// rule over a prompt]: the staged kernel computes the factors per chunk).
TEST(CudaOps, DeltaRulePromptNormalisesQkInKernel) {
  REQUIRE_GPU();
  const int64_t T = 37, nk = 2, nv = 4, dk = 64, dv = 64;
  auto q = random_vec(T * nk * dk, 60), k = random_vec(T * nk * dk, 61),
       v = random_vec(T * nv * dv, 62), g = random_vec(T * nv, 63, 0.1f),
       beta = random_vec(T * nv, 64, 0.3f), s0 = random_vec(nv * dk * dv, 65, 0.1f);
  for (auto& x : g) x = -std::fabs(x);
  for (auto& x : beta) x = cpu::sigmoid(x);
  auto qn = q, kn = k;
  for (int64_t r = 0; r < T * nk; ++r) {
    double sq = 0, sk = 0;
    for (int64_t i = 0; i < dk; ++i) {
      sq += double{q[r * dk + i]} * q[r * dk + i];
      sk += double{k[r * dk + i]} * k[r * dk + i];
    }
    const float fq =
        1.0f / std::sqrt(static_cast<float>(sq) + 1e-6f) / std::sqrt(static_cast<float>(dk));
    const float fk = 1.0f / std::sqrt(static_cast<float>(sk) + 1e-6f);
    for (int64_t i = 0; i < dk; ++i) {
      qn[r * dk + i] *= fq;
      kn[r * dk + i] *= fk;
    }
  }
  Dev<float> dq(q), dk_(k), dqn(qn), dkn(kn), dvv(v), dg(g), db(beta), ds1(s0), ds2(s0),
      o1(T * nv * dv), o2(T * nv * dv);
  LayerStateDev l1{nullptr, nullptr, nullptr, ds1.p}, l2{nullptr, nullptr, nullptr, ds2.p};
  Dev<LayerStateDev> dl1(std::vector<LayerStateDev>{l1}), dl2(std::vector<LayerStateDev>{l2});
  Dev<StepDev> st1(std::vector<StepDev>{StepDev{0, dl1.p}}),
      st2(std::vector<StepDev>{StepDev{0, dl2.p}});
  struct ModeRestore {
    int was = delta_rule_mode();
    ~ModeRestore() { set_delta_rule_mode(was); }
  } restore;
  // The staged kernel on pre-normalised input is the reference; each kernel's in-kernel
  // normalisation must give the same answer.
  set_delta_rule_mode(0);
  delta_rule(dqn.p, dkn.p, dvv.p, dg.p, db.p, st2.p, 0, o2.p, T, nk, nv, dk, dv, nullptr, 1, false);
  const auto b = o2.get();
  float scale = 0.f;
  for (float x : b) scale = std::max(scale, std::fabs(x));
  ASSERT_GT(scale, 1e-3f);
  const size_t scratch_bytes = delta_rule_scratch_bytes(T, nv, dk, dv);
  Dev<float> scr(scratch_bytes / sizeof(float));
  for (int mode : {0, 1, 2}) {
    set_delta_rule_mode(mode);
    ds1.put(s0);
    delta_rule(dq.p, dk_.p, dvv.p, dg.p, db.p, st1.p, 0, o1.p, T, nk, nv, dk, dv, nullptr, 1, true,
               scr.p, scratch_bytes);
    EXPECT_LT(max_abs_diff(o1.get(), b), 1e-5f * std::max(1.f, scale)) << "mode=" << mode;
    EXPECT_LT(max_abs_diff(ds1.get(), ds2.get()), 1e-5f) << "mode=" << mode;
  }
}

/// The decode-step fusions equal the unfused kernels: conv1d + prep in one kernel, the delta rule
/// with the gated norm, the residual add with the gated shared expert.
TEST(CudaOps, FusedDecodeKernelsMatchUnfused) {
  REQUIRE_GPU();
  for (auto [nk, nv, dk, dv] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{16, 32, 128, 128},
                                {2, 4, 16, 16},
                                {2, 4, 64, 64},
                                {1, 2, 32, 64}}) {
    const int64_t K = 4, C = 2 * nk * dk + nv * dv;
    auto src = random_vec(C, 50), w = random_vec(C * K, 51, 0.3f),
         st0 = random_vec((K - 1) * C, 52);
    auto b = random_vec(nv, 53), a = random_vec(nv, 54), alog = random_vec(nv, 55, 0.5f),
         dtb = random_vec(nv, 56, 0.5f), s0 = random_vec(nv * dk * dv, 57, 0.1f),
         z = random_vec(nv * dv, 58), nw = random_vec(dv, 59, 0.2f);
    Dev<float> dsrc(src), dw(w), db(b), da(a), dal(alog), ddt(dtb), dz(z), dnw(nw);
    std::vector<std::vector<float>> outs;
    for (int fused = 0; fused < 2; ++fused) {
      Dev<float> conv(st0), rec(s0), u(C), q(nk * dk), k(nk * dk), v(nv * dv), beta(nv), g(nv),
          o(nv * dv);
      LayerStateDev ls{nullptr, nullptr, conv.p, rec.p};
      Dev<LayerStateDev> dls(std::vector<LayerStateDev>{ls});
      Dev<StepDev> dstep(std::vector<StepDev>{StepDev{0, dls.p}});
      if (fused) {
        gdn_conv_prep_step(dsrc.p, dw.p, dstep.p, 0, K, db.p, da.p, dal.p, ddt.p, q.p, k.p, v.p,
                           beta.p, g.p, nk, nv, dk, dv, nullptr);
        // One block per head: heads of fewer than 32 columns take the unfused path.
        const bool ran = delta_rule_normed(q.p, k.p, v.p, g.p, beta.p, dstep.p, 0, dz.p, 0, dnw.p,
                                           1e-6f, o.p, 1, nk, nv, dk, dv, nullptr);
        ASSERT_EQ(ran, dv % 32 == 0);
        if (!ran) {
          delta_rule(q.p, k.p, v.p, g.p, beta.p, dstep.p, 0, o.p, 1, nk, nv, dk, dv, nullptr);
          rms_norm_gated(o.p, dz.p, 0, nv, dnw.p, o.p, nv, dv, 1e-6f, nullptr);
        }
      } else {
        causal_conv1d_silu(dsrc.p, 0, 1, C, K, dw.p, dstep.p, 0, u.p, nullptr);
        gdn_prep(u.p, db.p, da.p, 0, dal.p, ddt.p, q.p, k.p, v.p, beta.p, g.p, 1, nk, nv, dk, dv,
                 nullptr);
        delta_rule(q.p, k.p, v.p, g.p, beta.p, dstep.p, 0, o.p, 1, nk, nv, dk, dv, nullptr);
        rms_norm_gated(o.p, dz.p, 0, nv, dnw.p, o.p, nv, dv, 1e-6f, nullptr);
      }
      auto out = o.get();
      const auto cs = conv.get(), rs = rec.get();
      out.insert(out.end(), cs.begin(), cs.end());
      out.insert(out.end(), rs.begin(), rs.end());
      outs.push_back(out);
    }
    EXPECT_LT(max_abs_diff(outs[0], outs[1]), 2e-5f) << "nk=" << nk << " dv=" << dv;
  }
  // x += y + sigmoid(gate) · hs, then the norm.
  const int64_t T = 3, H = 200, ld = 7;
  auto x = random_vec(T * H, 60), y = random_vec(T * H, 61), hs = random_vec(T * H, 62),
       gate = random_vec(T * ld, 63), w = random_vec(H, 64, 0.1f);
  Dev<float> dx(x), dy(y), dh(hs), dg(gate), dw(w), dxn(T * H);
  add_rms_norm(dx.p, dy.p, dw.p, dxn.p, T, H, 1e-6f, true, nullptr, dh.p, dg.p, ld);
  std::vector<float> xs(x.size()), ref(x.size());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < H; ++i)
      xs[t * H + i] = x[t * H + i] + y[t * H + i] + cpu::sigmoid(gate[t * ld]) * hs[t * H + i];
  for (int64_t t = 0; t < T; ++t)
    cpu::rms_norm_row(&xs[t * H], w.data(), &ref[t * H], H, 1e-6f, cpu::NormScale::kZeroCentred);
  EXPECT_LT(max_abs_diff(dx.get(), xs), 1e-6f);
  EXPECT_LT(max_abs_diff(dxn.get(), ref), 1e-5f);
}

/// Note [early loads]: the one-token delta rule (plain and normed, q/k normalised first or in the
/// kernel, one and two rows) and the split-attention merge (few and many splits: more than the
/// eight per warp loaded early and more than the 256 m/l loaded early; gated, ungated and the
/// fused prep's gate; tensor-core and SIMT kernels) give the same bits with and without.
TEST(CudaOps, EarlyLoadsAreBitIdentical) {
  REQUIRE_GPU();
  struct Restore {
    bool was = early_loads();
    ~Restore() { set_early_loads(was); }
  } restore;
  for (auto [nk, nv, dk, dv] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{16, 32, 128, 128},
                                {2, 4, 64, 64},
                                {1, 2, 32, 64},
                                {2, 4, 16, 16}})
    for (int64_t rows : {1, 2})
      for (bool l2 : {false, true})
        for (bool normed : {false, true}) {
          auto q = random_vec(rows * nk * dk, 70, 0.5f), k = random_vec(rows * nk * dk, 71, 0.5f),
               v = random_vec(rows * nv * dv, 72), g = random_vec(rows * nv, 73, 0.1f),
               beta = random_vec(rows * nv, 74, 0.3f), z = random_vec(rows * nv * dv, 75),
               nw = random_vec(dv, 76, 0.2f);
          for (auto& x : g) x = -std::fabs(x);
          for (auto& x : beta) x = cpu::sigmoid(x);
          Dev<float> dq(q), dk_(k), dvv(v), dg(g), db(beta), dz(z), dnw(nw);
          std::vector<std::vector<float>> outs;
          for (bool early : {false, true}) {
            set_early_loads(early);
            std::vector<LayerStateDev> lss;
            std::vector<std::unique_ptr<Dev<float>>> states;
            for (int64_t r = 0; r < rows; ++r) {
              states.push_back(
                  std::make_unique<Dev<float>>(random_vec(nv * dk * dv, 77 + r, 0.1f)));
              lss.push_back(LayerStateDev{nullptr, nullptr, nullptr, states.back()->p});
            }
            std::vector<std::unique_ptr<Dev<LayerStateDev>>> dls;
            std::vector<StepDev> steps;
            for (int64_t r = 0; r < rows; ++r) {
              dls.push_back(
                  std::make_unique<Dev<LayerStateDev>>(std::vector<LayerStateDev>{lss[r]}));
              steps.push_back(StepDev{0, dls.back()->p});
            }
            Dev<StepDev> dstep(steps);
            Dev<float> o(
                std::vector<float>(rows * nv * dv, std::numeric_limits<float>::quiet_NaN()));
            bool ran = false;
            if (normed)
              ran = delta_rule_normed(dq.p, dk_.p, dvv.p, dg.p, db.p, dstep.p, 0, dz.p, nv * dv,
                                      dnw.p, 1e-6f, o.p, 1, nk, nv, dk, dv, nullptr, rows, l2);
            if (!normed) {
              delta_rule(dq.p, dk_.p, dvv.p, dg.p, db.p, dstep.p, 0, o.p, 1, nk, nv, dk, dv,
                         nullptr, rows, l2);
              ran = true;
            }
            if (!ran) continue;  // d_v < 32: no normed kernel (FusedDecodeKernelsMatchUnfused)
            auto out = o.get();
            for (auto& st : states) {
              const auto sv = st->get();
              out.insert(out.end(), sv.begin(), sv.end());
            }
            outs.push_back(std::move(out));
          }
          if (outs.size() < 2) continue;
          ASSERT_EQ(outs[0].size(), outs[1].size());
          size_t diff = 0;
          for (size_t i = 0; i < outs[0].size(); ++i) {
            EXPECT_FALSE(std::isnan(outs[0][i])) << i;
            diff += std::memcmp(&outs[0][i], &outs[1][i], sizeof(float)) != 0;
          }
          EXPECT_EQ(diff, 0u) << "delta rule nk=" << nk << " dv=" << dv << " rows=" << rows
                              << " l2=" << l2 << " normed=" << normed;
        }
  // The merge: decode over caches of 1000, 5000 (79 of 132 splits used) and 20000 keys (more
  // than 256 of 512 splits used), and a 3-token chunk on the SIMT kernels.
  struct Case {
    int64_t nh, nkv, d, pos0, T;
    int splits;
  };
  for (const Case c : {Case{16, 2, 256, 1000, 1, 132}, Case{16, 2, 256, 4999, 1, 132},
                       Case{16, 2, 256, 20000, 1, 512}, Case{4, 2, 64, 300, 3, 17}}) {
    const int64_t n = c.pos0 + c.T, kvw = c.nkv * c.d;
    const auto kh = to_bf16(random_vec(n * kvw, 80, 1.0f)),
               vh = to_bf16(random_vec(n * kvw, 81, 1.0f));
    const auto qv = random_vec(c.T * c.nh * c.d, 82), gv = random_vec(c.T * c.nh * c.d, 83);
    const auto qg = random_vec(c.nh * c.d * 2, 84), kn = random_vec(kvw, 85),
               vn = random_vec(kvw, 86), qnorm = random_vec(c.d, 87, 0.1f),
               knorm = random_vec(c.d, 88, 0.1f);
    const auto table = cpu::rope_table_default(1e7, c.d / 4);
    for (bool tc : {true, false})
      for (int gate_mode = 0; gate_mode < 3; ++gate_mode) {  // none, gate tensor, fused prep
        if (gate_mode == 2 && (!tc || c.T != 1)) continue;
        Dev<uint16_t> dkc(kh), dvc(vh);
        Dev<LayerStateDev> dls(
            std::vector<LayerStateDev>{LayerStateDev{dkc.p, dvc.p, nullptr, nullptr}});
        Dev<StepDev> dstep(std::vector<StepDev>{StepDev{c.pos0, dls.p}});
        Dev<float> dq(qv), dgate(gv), dqg(qg), dkn(kn), dvn(vn), dqn(qnorm), dkn2(knorm),
            dinv(table.inv_freq);
        Dev<float> part(attention_workspace_floats(c.T, c.nh, c.d, c.splits));
        AttentionArgs a;
        a.q = dq.p;
        a.gate = gate_mode == 1 ? dgate.p : nullptr;
        a.step = dstep.p;
        a.T = c.T;
        a.nh = c.nh;
        a.nkv = c.nkv;
        a.d = c.d;
        a.scale = 1.0f / std::sqrt(static_cast<float>(c.d));
        a.max_splits = c.splits;
        a.tensor_cores = tc;
        a.partial = part.p;
        if (gate_mode == 2) {
          a.fused_prep = true;
          a.q = nullptr;
          AttnPrepArgs& p = a.prep;
          p.qg = dqg.p;
          p.k = dkn.p;
          p.v = dvn.p;
          p.q_norm = dqn.p;
          p.k_norm = dkn2.p;
          p.inv_freq = dinv.p;
          p.step = dstep.p;
          p.T = 1;
          p.nh = c.nh;
          p.nkv = c.nkv;
          p.d = c.d;
          p.rotary_dim = c.d / 4;
          p.zero_centred = true;
          p.gated = true;
          if (!attention_uses_tensor_cores(a)) continue;
        }
        std::vector<std::vector<float>> outs;
        for (bool early : {false, true}) {
          set_early_loads(early);
          Dev<float> out(
              std::vector<float>(c.T * c.nh * c.d, std::numeric_limits<float>::quiet_NaN()));
          a.out = out.p;
          attention(a, nullptr);
          outs.push_back(out.get());
        }
        size_t diff = 0, nan = 0;
        for (size_t i = 0; i < outs[0].size(); ++i) {
          nan += std::isnan(outs[0][i]);
          diff += std::memcmp(&outs[0][i], &outs[1][i], sizeof(float)) != 0;
        }
        EXPECT_EQ(nan, 0u);
        EXPECT_EQ(diff, 0u) << "merge pos0=" << c.pos0 << " T=" << c.T << " splits=" << c.splits
                            << " tc=" << tc << " gate_mode=" << gate_mode;
      }
  }
}

/// Note [Router in the MoE in-projection]: gemv_route equals the GEMV then moe_route bit for bit
/// (the same kernels' code): the projection output, the ids and the weights; normed and plain
/// input, every weight format, the models' expert counts and an odd one, twice in a row (the
/// counter comes back to zero); shapes it does not take launch nothing.
TEST(CudaOps, RouterInGemvMatchesGemvThenRoute) {
  REQUIRE_GPU();
  if (const char* e = std::getenv("TIDAL_GEMV_STREAM"); e && std::string(e) == "0")
    GTEST_SKIP() << "TIDAL_GEMV_STREAM=0 turns the streaming GEMV, and so this path, off";
  struct Case {
    int64_t E, k, rows, K;
    bool renorm;
  };
  // The models' experts (256 of 8, 512 of 10), an odd count, one expert, the largest E taken
  // (route_row<32>), and more rows than one wave of warps (each warp takes several rows).
  for (const Case c :
       {Case{256, 8, 1281, 2048, true}, Case{512, 10, 1537, 2048, true}, Case{60, 4, 75, 96, false},
        Case{1, 1, 5, 64, true}, Case{1024, 32, 1030, 64, true}, Case{256, 8, 20000, 64, true}})
    for (const WFormat fmt : {WFormat::kBF16, WFormat::kI8, WFormat::kF32})
      for (const bool normed : {true, false}) {
        const std::string what = "E=" + std::to_string(c.E) +
                                 " fmt=" + std::to_string(static_cast<int>(fmt)) +
                                 " normed=" + std::to_string(normed);
        auto wv = random_vec(static_cast<size_t>(c.rows * c.K), 140, 0.05f);
        auto nw = random_vec(c.K, 142, 0.1f);
        std::vector<int8_t> w8(wv.size());
        std::vector<float> sc(c.rows);
        for (int64_t r = 0; r < c.rows; ++r) {
          float m = 0.f;
          for (int64_t j = 0; j < c.K; ++j) m = std::max(m, std::abs(wv[r * c.K + j]));
          sc[r] = m > 0 ? m / 127.f : 1.f;
          for (int64_t j = 0; j < c.K; ++j)
            w8[r * c.K + j] = static_cast<int8_t>(std::lround(wv[r * c.K + j] / sc[r]));
        }
        Dev<uint16_t> wb(to_bf16(wv));
        Dev<float> wf(wv), dsc(sc), dx(c.K), dnw(nw), yref(c.rows), y(c.rows), wref(c.k), wgot(c.k);
        Dev<int8_t> wq(w8);
        Dev<int32_t> iref(c.k), igot(c.k);
        Dev<unsigned> sync(2);
        const DevMatrix W = fmt == WFormat::kBF16 ? DevMatrix{wb.p, nullptr, fmt, c.rows, c.K}
                            : fmt == WFormat::kI8 ? DevMatrix{wq.p, dsc.p, fmt, c.rows, c.K}
                                                  : DevMatrix{wf.p, nullptr, fmt, c.rows, c.K};
        RouteTail rt;
        rt.E = c.E;
        rt.k = c.k;
        rt.renorm = c.renorm;
        rt.ids = igot.p;
        rt.weights = wgot.p;
        rt.sync = sync.p;
        // Two calls in a row on different inputs, the outputs poisoned before each: the second
        // must route again (the counter came back to zero) from its own logits.
        for (int rep = 0; rep < 2; ++rep) {
          dx.put(random_vec(c.K, 141 + static_cast<uint32_t>(rep)));
          if (normed)
            gemv_rms_norm(W, dx.p, dnw.p, 1e-6f, true, yref.p, false, nullptr);
          else
            gemv(W, dx.p, c.K, yref.p, c.rows, 1, false, nullptr);
          moe_route(yref.p, c.rows, 1, c.E, c.k, c.renorm, iref.p, wref.p, nullptr);
          const auto want_y = yref.get(), want_w = wref.get();
          const auto want_i = iref.get();
          y.put(std::vector<float>(c.rows, std::nanf("")));
          igot.put(std::vector<int32_t>(c.k, -1));
          wgot.put(std::vector<float>(c.k, std::nanf("")));
          ASSERT_TRUE(gemv_route(W, dx.p, normed ? dnw.p : nullptr, 1e-6f, true, y.p, rt, nullptr))
              << what;
          EXPECT_EQ(max_abs_diff(y.get(), want_y), 0.f) << what << " rep " << rep;
          EXPECT_EQ(igot.get(), want_i) << what << " rep " << rep;
          EXPECT_EQ(max_abs_diff(wgot.get(), want_w), 0.f) << what << " rep " << rep;
          EXPECT_EQ(sync.get()[0], 0u) << what << " rep " << rep;
          float ws = 0.f;  // real routing: distinct ids, weights summing to 1 when renormalised
          for (float v : want_w) ws += v;
          if (c.renorm) {
            EXPECT_NEAR(ws, 1.0f, 1e-5f) << what;
          }
          auto ids = want_i;
          std::sort(ids.begin(), ids.end());
          EXPECT_EQ(std::unique(ids.begin(), ids.end()), ids.end()) << what;
        }
        EXPECT_EQ(cudaGetLastError(), cudaSuccess) << what;
      }
  // Not taken: more experts than rows, k above 32; nothing launched.
  Dev<uint16_t> wb(to_bf16(random_vec(64 * 64, 143)));
  Dev<float> dx(random_vec(64, 144)), y(64);
  Dev<int32_t> ids(40);
  Dev<float> w(40);
  Dev<unsigned> sync(2);
  RouteTail rt;
  rt.ids = ids.p;
  rt.weights = w.p;
  rt.sync = sync.p;
  rt.E = 65;
  rt.k = 8;
  EXPECT_FALSE(gemv_route(DevMatrix{wb.p, nullptr, WFormat::kBF16, 64, 64}, dx.p, nullptr, 1e-6f,
                          false, y.p, rt, nullptr));
  rt.E = 64;
  rt.k = 33;
  EXPECT_FALSE(gemv_route(DevMatrix{wb.p, nullptr, WFormat::kBF16, 64, 64}, dx.p, nullptr, 1e-6f,
                          false, y.p, rt, nullptr));
  EXPECT_EQ(max_abs_diff(y.get(), std::vector<float>(64, 0.f)), 0.f);
}

/// The DeltaNet decode's conv, SiLU, beta and g in the in-projection's epilogue (gemv_gdn_in,
/// Note [DeltaNet conv in the GEMV]), then the delta rule normalising q and k itself, equal the
/// projection followed by gdn_conv_prep_step and the plain delta rule: outputs, z/beta/g rows, the
/// conv state and the recurrent state; normed and plain input, both delta-rule kernels, every
/// weight format; shapes it does not take launch nothing.
TEST(CudaOps, GemvGdnInMatchesSeparateKernels) {
  REQUIRE_GPU();
  struct Case {
    WFormat fmt;
    int64_t nk, nv, dk, dv, H, K;
    bool normed;
  };
  const char* off = std::getenv("TIDAL_GEMV_STREAM");
  const bool stream_off = off && std::string(off) == "0";
  for (const Case c : {Case{WFormat::kBF16, 16, 32, 128, 128, 2048, 4, true},
                       Case{WFormat::kF32, 2, 4, 16, 16, 64, 4, true},
                       Case{WFormat::kI8, 2, 4, 64, 64, 208, 3, true},
                       Case{WFormat::kBF16, 1, 2, 32, 64, 96, 4, false},
                       Case{WFormat::kF32, 2, 4, 32, 32, 4100, 1, true},
                       // Rows of several weight segments (BF16 4096 wide: 2; F32 3072: 3) with
                       // the widest conv (16 taps: lanes 0..30) and a 4-tap one, more rows than
                       // one per warp (3088 rows).
                       Case{WFormat::kBF16, 4, 8, 128, 128, 4096, 16, true},
                       Case{WFormat::kF32, 4, 8, 128, 128, 3072, 4, false},
                       Case{WFormat::kI8, 2, 4, 64, 64, 2048, 2, true}}) {
    const int64_t C = 2 * c.nk * c.dk + c.nv * c.dv, ba = C + c.nv * c.dv, W = ba + 2 * c.nv;
    auto w = random_vec(static_cast<size_t>(W * c.H), 70, 0.05f);
    std::vector<float> scale(static_cast<size_t>(W));
    std::vector<int8_t> q8(w.size());
    for (int64_t r = 0; r < W; ++r) {
      float mx = 1e-6f;
      for (int64_t j = 0; j < c.H; ++j) mx = std::max(mx, std::fabs(w[r * c.H + j]));
      scale[r] = mx / 127.f;
      for (int64_t j = 0; j < c.H; ++j)
        q8[r * c.H + j] = static_cast<int8_t>(std::nearbyint(w[r * c.H + j] / scale[r]));
    }
    Dev<float> dwf(w), dsc(scale);
    Dev<uint16_t> dwb(to_bf16(w));
    Dev<int8_t> dwq(q8);
    DevMatrix dm;
    dm.format = c.fmt;
    dm.rows = W;
    dm.cols = c.H;
    dm.data = c.fmt == WFormat::kF32    ? static_cast<const void*>(dwf.p)
              : c.fmt == WFormat::kBF16 ? static_cast<const void*>(dwb.p)
                                        : static_cast<const void*>(dwq.p);
    dm.scale = dsc.p;
    auto x = random_vec(static_cast<size_t>(c.H), 71), nw = random_vec(c.H, 72, 0.3f),
         cw = random_vec(C * c.K, 73, 0.3f),
         st0 = random_vec(std::max<int64_t>(1, c.K - 1) * C, 74), alog = random_vec(c.nv, 75, 0.5f),
         dtb = random_vec(c.nv, 76, 0.5f), s0 = random_vec(c.nv * c.dk * c.dv, 77, 0.1f),
         z = random_vec(c.nv * c.dv, 78);
    Dev<float> dx(x), dnw(nw), dcw(cw), dal(alog), ddt(dtb), dgn(random_vec(c.dv, 79, 0.2f));
    std::vector<std::vector<float>> outs;
    for (int fused = 0; fused < 2; ++fused)
      for (int normed_rule = 0; normed_rule < 2; ++normed_rule) {
        Dev<float> conv(st0), rec(s0), y(W), q(c.nk * c.dk), k(c.nk * c.dk), v(c.nv * c.dv),
            beta(c.nv), g(c.nv), o(c.nv * c.dv);
        LayerStateDev ls{nullptr, nullptr, conv.p, rec.p};
        Dev<LayerStateDev> dls(std::vector<LayerStateDev>{ls});
        Dev<StepDev> dstep(std::vector<StepDev>{StepDev{0, dls.p}});
        const float* nwp = c.normed ? dnw.p : nullptr;
        const float *pq = q.p, *pk = k.p, *pv = v.p, *pb = beta.p, *pg = g.p;
        if (fused) {
          GdnConvEpilogue e;
          e.conv_w = dcw.p;
          e.step = dstep.p;
          e.C = C;
          e.K = c.K;
          e.ba_row = ba;
          e.nv = c.nv;
          e.A_log = dal.p;
          e.dt_bias = ddt.p;
          if (!gemv_gdn_in(dm, dx.p, nwp, 1e-6f, true, y.p, e, nullptr)) {
            ASSERT_TRUE(stream_off) << "H=" << c.H << " K=" << c.K;
            ASSERT_EQ(y.get(), std::vector<float>(y.n, 0.f));
            ASSERT_EQ(conv.get(), st0);
            return;
          }
          pq = y.p;
          pk = y.p + c.nk * c.dk;
          pv = y.p + 2 * c.nk * c.dk;
          pb = y.p + ba;
          pg = y.p + ba + c.nv;
        } else {
          if (c.normed)
            gemv_rms_norm(dm, dx.p, dnw.p, 1e-6f, true, y.p, false, nullptr);
          else
            gemv(dm, dx.p, c.H, y.p, W, 1, false, nullptr);
          gdn_conv_prep_step(y.p, dcw.p, dstep.p, 0, c.K, y.p + ba, y.p + ba + c.nv, dal.p, ddt.p,
                             q.p, k.p, v.p, beta.p, g.p, c.nk, c.nv, c.dk, c.dv, nullptr);
        }
        Dev<float> dz(z);
        if (normed_rule) {
          if (!delta_rule_normed(pq, pk, pv, pg, pb, dstep.p, 0, dz.p, 0, dgn.p, 1e-6f, o.p, 1,
                                 c.nk, c.nv, c.dk, c.dv, nullptr, 1, fused == 1))
            continue;  // a head wider than one block: the plain kernel's case covers it
        } else {
          delta_rule(pq, pk, pv, pg, pb, dstep.p, 0, o.p, 1, c.nk, c.nv, c.dk, c.dv, nullptr, 1,
                     fused == 1);
        }
        auto out = o.get();
        const auto yv = y.get(), cs = conv.get(), rs = rec.get();
        out.insert(out.end(), yv.begin() + C, yv.begin() + ba);  // z rows, as projected
        out.insert(out.end(), cs.begin(), cs.end());
        out.insert(out.end(), rs.begin(), rs.end());
        if (fused) {  // beta and g where the prep kernel puts them
          out.insert(out.end(), yv.begin() + ba, yv.end());
        } else {
          const auto bv = beta.get(), gv = g.get();
          out.insert(out.end(), bv.begin(), bv.end());
          out.insert(out.end(), gv.begin(), gv.end());
        }
        outs.push_back(out);
      }
    ASSERT_EQ(outs.size() % 2, 0u);
    const size_t half = outs.size() / 2;
    for (size_t i = 0; i < half; ++i) {
      ASSERT_EQ(outs[i].size(), outs[half + i].size());
      float worst = 0.f;
      for (size_t j = 0; j < outs[i].size(); ++j)
        worst = std::max(
            worst, std::fabs(outs[i][j] - outs[half + i][j]) / (1.0f + std::fabs(outs[i][j])));
      EXPECT_LT(worst, 2e-5f) << "nk=" << c.nk << " dv=" << c.dv << " K=" << c.K
                              << " fmt=" << static_cast<int>(c.fmt) << " rule=" << i;
    }
  }
  if (stream_off) return;
  // Not taken, nothing launched: a conv kernel wider than 16 taps, a row not a multiple of 4.
  for (auto [H, K] : {std::pair<int64_t, int64_t>{64, 17}, {66, 4}}) {
    const int64_t nk = 1, nv = 1, dk = 32, dv = 32, C = 2 * nk * dk + nv * dv,
                  W = C + nv * dv + 2 * nv;
    Dev<float> dw(random_vec(W * H, 90)), dx(random_vec(H, 91)), dcw(random_vec(C * K, 92)),
        conv(std::vector<float>((K - 1) * C, 3.0f)), y(std::vector<float>(W, 7.0f)),
        dal(random_vec(nv, 93)), ddt(random_vec(nv, 94));
    LayerStateDev ls{nullptr, nullptr, conv.p, nullptr};
    Dev<LayerStateDev> dls(std::vector<LayerStateDev>{ls});
    Dev<StepDev> dstep(std::vector<StepDev>{StepDev{0, dls.p}});
    DevMatrix dm{dw.p, nullptr, WFormat::kF32, W, H};
    GdnConvEpilogue e;
    e.conv_w = dcw.p;
    e.step = dstep.p;
    e.C = C;
    e.K = K;
    e.ba_row = C + nv * dv;
    e.nv = nv;
    e.A_log = dal.p;
    e.dt_bias = ddt.p;
    EXPECT_FALSE(gemv_gdn_in(dm, dx.p, nullptr, 1e-6f, false, y.p, e, nullptr)) << "K=" << K;
    for (float v : y.get()) EXPECT_EQ(v, 7.0f);
    for (float v : conv.get()) EXPECT_EQ(v, 3.0f);
  }
}

TEST(CudaOps, QwenNextSplitMatchesLayout) {
  REQUIRE_GPU();
  const int64_t T = 3, nk = 2, nv = 4, dk = 8, dv = 4, rho = nv / nk, gw = 2 * dk + 2 * rho * dv,
                C = 2 * nk * dk + nv * dv;
  std::vector<float> p(T * nk * gw), ba(T * 2 * nv);
  for (size_t i = 0; i < p.size(); ++i) p[i] = static_cast<float>(i);
  for (size_t i = 0; i < ba.size(); ++i) ba[i] = 1000.f + static_cast<float>(i);
  Dev<float> dp(p), dba(ba), m(T * C), z(T * nv * dv), b(T * nv), a(T * nv);
  gdn_split_next(dp.p, dba.p, 0, m.p, z.p, b.p, a.p, T, nk, nv, dk, dv, nullptr);
  const auto mg = m.get(), zg = z.get(), bg = b.get(), ag = a.get();
  for (int64_t t = 0; t < T; ++t)
    for (int64_t kh = 0; kh < nk; ++kh) {
      const float* grp = &p[t * nk * gw + kh * gw];
      for (int64_t i = 0; i < dk; ++i) {
        EXPECT_EQ(mg[t * C + kh * dk + i], grp[i]);
        EXPECT_EQ(mg[t * C + nk * dk + kh * dk + i], grp[dk + i]);
      }
      for (int64_t j = 0; j < rho; ++j) {
        const int64_t vh = kh * rho + j;
        for (int64_t e = 0; e < dv; ++e) {
          EXPECT_EQ(mg[t * C + 2 * nk * dk + vh * dv + e], grp[2 * dk + j * dv + e]);
          EXPECT_EQ(zg[(t * nv + vh) * dv + e], grp[2 * dk + rho * dv + j * dv + e]);
        }
        EXPECT_EQ(bg[t * nv + vh], ba[t * 2 * nv + 2 * rho * kh + j]);
        EXPECT_EQ(ag[t * nv + vh], ba[t * 2 * nv + 2 * rho * kh + rho + j]);
      }
    }
}

}  // namespace
}  // namespace tidal::kernels::cuda
