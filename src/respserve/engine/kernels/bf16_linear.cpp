// y = x @ w.T + bias for float32 activations x [M, K] and weights w [N, K] stored as bfloat16, multiplied
// and accumulated in float32: with AVX-512 where the CPU has it, else AVX2 + FMA.
//
// Every bfloat16 is a float32 with the low 16 bits zero, so weights whose float32 values bfloat16 holds
// exactly (a bf16 checkpoint served at float32) lose nothing in this form, and a decode step reads half
// the bytes: on a CPU the small-batch matmuls of decoding wait on memory. Each output column is summed in
// k order whatever M is, so a row's result does not depend on the rows batched with it.
//
// The weights are packed in blocks of 16 output columns, [N / 16][K][16] (packed_linear.py pads N), the
// columns of each k step ordered 0-3, 8-11, 4-7, 12-15: interleaving 16 such bf16 with zeros (which puts
// each in the high half of a float) gives columns 0-7 and 8-15 in order, one instruction each. AVX-512
// widens all 16 as they lie and puts them back in order once, when a block's sums are stored.
//
// Both paths make each column's sum with the same fused multiply-adds in the same order, so their results
// are identical bit for bit. isa.h says which runs: on CPUs with full-width 512-bit units AVX-512 does
// twice the multiply-adds per instruction (Zen 5, 2026-12-04: 8- and 32-row products x1.6-1.9 faster).
// On CPUs with AMX the tiles do the products instead (amx_linear.cpp), from weights packed for them.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>

#include "amx_linear.h"
#include "isa.h"

namespace {

constexpr int64_t kColumns = 16;  // output columns of a packed block
constexpr int64_t kPrefetchAhead = 2048;  // bytes of weights requested ahead of the ones being read
// Cache lines requested at once: the k loop restarts once per group (12 rows' pointers do not fit in the
// general registers, so each restart reloads some), seen to cost a fifth of an 8-row product with one.
constexpr int kPrefetchLines = 4;

// One block's 16 columns for R rows of x (row stride K), into out [R][16]. A block is read once from
// memory and then from cache by the later passes of a larger M: `ahead` requests one cache line of the
// thread's next weights every `every` k steps, so that memory keeps streaming during those passes too.
using BlockRows = void (*)(const float* x, int64_t K, const uint16_t* w, float* out, const char*& ahead,
                           int64_t every);

namespace avx2 {

constexpr int kMaxRows = 6;  // rows of x per pass: 12 accumulators, 2 weight and 1 broadcast register

inline void load_weights(const uint16_t* w, __m256& low, __m256& high) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i zero = _mm256_setzero_si256();
  low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
  high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
}

template <int R>
void block_rows(const float* x, int64_t K, const uint16_t* w, float* out, const char*& ahead, int64_t every) {
  const char* next = ahead;
  __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0;
  __m256 l3 = l0, h3 = l0, l4 = l0, h4 = l0, l5 = l0, h5 = l0;
  for (int64_t k0 = 0; k0 < K; k0 += kPrefetchLines * every) {
    for (int line = 0; line < kPrefetchLines; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
    next += 64 * kPrefetchLines;
    const int64_t k1 = std::min(K, k0 + kPrefetchLines * every);
    // Named accumulators and `if constexpr`: an array here is kept on the stack by gcc, not in registers.
    for (int64_t k = k0; k < k1; ++k) {
      __m256 low, high, xk;
      load_weights(w + k * kColumns, low, high);
#define RESPSERVE_ROW(r)                                   \
  if constexpr (R > r) {                                   \
    xk = _mm256_broadcast_ss(x + r * K + k);               \
    l##r = _mm256_fmadd_ps(xk, low, l##r);                 \
    h##r = _mm256_fmadd_ps(xk, high, h##r);                \
  }
      RESPSERVE_ROW(0) RESPSERVE_ROW(1) RESPSERVE_ROW(2) RESPSERVE_ROW(3) RESPSERVE_ROW(4) RESPSERVE_ROW(5)
#undef RESPSERVE_ROW
    }
  }
  ahead = next;
#define RESPSERVE_STORE(r)                                 \
  if constexpr (R > r) {                                   \
    _mm256_storeu_ps(out + r * kColumns, l##r);            \
    _mm256_storeu_ps(out + r * kColumns + 8, h##r);        \
  }
  RESPSERVE_STORE(0) RESPSERVE_STORE(1) RESPSERVE_STORE(2) RESPSERVE_STORE(3) RESPSERVE_STORE(4) RESPSERVE_STORE(5)
#undef RESPSERVE_STORE
}

constexpr BlockRows kBlockRows[kMaxRows + 1] = {
    nullptr, block_rows<1>, block_rows<2>, block_rows<3>, block_rows<4>, block_rows<5>, block_rows<6>};

}  // namespace avx2

namespace avx512 {

constexpr int kMaxRows = 12;  // rows of x per pass: 12 accumulators of the 32 registers, 1 for weights

// The same loop as avx2::block_rows, one register per row; x is broadcast from memory by each FMA.
template <int R>
RESPSERVE_AVX512 void block_rows(const float* x, int64_t K, const uint16_t* w, float* out, const char*& ahead,
                                 int64_t every) {
  const char* next = ahead;
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0;
  __m512 a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0;
  for (int64_t k0 = 0; k0 < K; k0 += kPrefetchLines * every) {
    for (int line = 0; line < kPrefetchLines; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
    next += 64 * kPrefetchLines;
    const int64_t k1 = std::min(K, k0 + kPrefetchLines * every);
    for (int64_t k = k0; k < k1; ++k) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * kColumns));
      const __m512 wk = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
#define RESPSERVE_ROW(r) \
  if constexpr (R > r) a##r = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), wk, a##r);
      RESPSERVE_ROW(0) RESPSERVE_ROW(1) RESPSERVE_ROW(2) RESPSERVE_ROW(3) RESPSERVE_ROW(4) RESPSERVE_ROW(5)
      RESPSERVE_ROW(6) RESPSERVE_ROW(7) RESPSERVE_ROW(8) RESPSERVE_ROW(9) RESPSERVE_ROW(10) RESPSERVE_ROW(11)
#undef RESPSERVE_ROW
    }
  }
  ahead = next;
  // The packed order 0-3, 8-11, 4-7, 12-15 swaps columns 4-7 and 8-11, so it is its own inverse.
  const __m512i order = _mm512_setr_epi32(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15);
#define RESPSERVE_STORE(r) \
  if constexpr (R > r) _mm512_storeu_ps(out + r * kColumns, _mm512_permutexvar_ps(order, a##r));
  RESPSERVE_STORE(0) RESPSERVE_STORE(1) RESPSERVE_STORE(2) RESPSERVE_STORE(3) RESPSERVE_STORE(4) RESPSERVE_STORE(5)
  RESPSERVE_STORE(6) RESPSERVE_STORE(7) RESPSERVE_STORE(8) RESPSERVE_STORE(9) RESPSERVE_STORE(10) RESPSERVE_STORE(11)
#undef RESPSERVE_STORE
}

constexpr BlockRows kBlockRows[kMaxRows + 1] = {
    nullptr,         block_rows<1>, block_rows<2>, block_rows<3>,  block_rows<4>,  block_rows<5>, block_rows<6>,
    block_rows<7>,   block_rows<8>, block_rows<9>, block_rows<10>, block_rows<11>, block_rows<12>};

}  // namespace avx512

struct Isa {
  int max_rows;
  const BlockRows* block_rows;  // [max_rows + 1], by the rows of a pass
};

const Isa& chosen_isa() {
  static const Isa isa = respserve::use_avx512() ? Isa{avx512::kMaxRows, avx512::kBlockRows}
                                                 : Isa{avx2::kMaxRows, avx2::kBlockRows};
  return isa;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "bf16_linear: x must be float32, not ", x.scalar_type());
  const int64_t K = x.size(-1);
  const bool amx = respserve::use_amx();
  // The tiles' layout: pairs of k side by side, K padded to whole tiles (amx_linear.h)
  const int64_t packed_k = amx ? respserve::amx_padded_k(K) / 2 : K;
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 3 && packed.is_contiguous() &&
                  packed.size(2) == (amx ? 2 * kColumns : kColumns),
              amx ? "bf16_linear: weights must be packed for AMX as [N / 16, Kp / 2, 32] bfloat16"
                  : "bf16_linear: weights must be packed as [N / 16, K, 16] bfloat16");
  TORCH_CHECK(packed.size(1) == packed_k, "bf16_linear: x has ", K, " features, the weights ", packed.size(1),
              amx ? " pairs" : "");
  TORCH_CHECK(n > (packed.size(0) - 1) * kColumns && n <= packed.size(0) * kColumns, "bf16_linear: bad n ", n);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == at::kFloat && bias->numel() == n && bias->is_contiguous()),
              "bf16_linear: bias must be float32 [n]");
  auto shape = x.sizes().vec();
  shape.back() = n;
  const at::Tensor rows = x.reshape({-1, K}).contiguous();
  const int64_t M = rows.size(0);
  at::Tensor y = at::empty({M, n}, x.options());
  if (M == 0) return y.view(shape);
  const float* xs = rows.data_ptr<float>();
  const uint16_t* ws = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  float* ys = y.data_ptr<float>();
  const float* bs = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  if (amx) {
    respserve::amx_bf16_linear(xs, M, K, ws, n, bs, ys);
    return y.view(shape);
  }
  const Isa& isa = chosen_isa();
  const int64_t passes = (M + isa.max_rows - 1) / isa.max_rows;
  // A block is K * 32 bytes, K / 2 cache lines; over all passes `ahead` moves on by one block. With one
  // pass it runs a little ahead of the reads; with more, a block ahead, since the first pass reads a
  // block at the speed of all of them.
  const int64_t every = 2 * passes;
  const int64_t lead = kPrefetchAhead + (passes > 1 ? K * kColumns * 2 : 0);
  at::parallel_for(0, packed.size(0), 1, [&](int64_t first, int64_t last) {
    static_assert(avx512::kMaxRows >= avx2::kMaxRows);
    alignas(64) float out[avx512::kMaxRows * kColumns];
    const char* ahead = reinterpret_cast<const char*>(ws + first * K * kColumns) + lead;
    for (int64_t block = first; block < last; ++block) {
      const uint16_t* w = ws + block * K * kColumns;
      const int64_t column = block * kColumns, columns = std::min(kColumns, n - column);
      for (int64_t pass = 0, m = 0; pass < passes; ++pass) {
        const int64_t count = (M - m) / (passes - pass);  // the rows spread evenly over the passes
        isa.block_rows[count](xs + m * K, K, w, out, ahead, every);
        for (int64_t r = 0; r < count; ++r) {
          float* dst = ys + (m + r) * n + column;
          for (int64_t c = 0; c < columns; ++c) dst[c] = out[r * kColumns + c] + (bs ? bs[column + c] : 0.f);
        }
        m += count;
      }
    }
  });
  return y.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(respserve, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, int n, Tensor? bias) -> Tensor");
  m.impl("bf16_linear", c10::DispatchKey::CPU, TORCH_FN(bf16_linear));
}
