// Attention of single-query rows (decode tokens) over the paged KV pool, read in place through each row's
// slots (StepLayout.single_slots): no gathered copy of the keys and values, no mask, and one pass over a
// row's keys per KV head serves every query head that shares it (grouped-query attention). float32.
//
// out[r, h] = softmax_j(scale * q[r, h] . K[slot(r, j), h / group]) @ V[slot(r, j), h / group], for the
// positions j in [first, length) of row r; first = length - window with a sliding window, else 0.
//
// A head whose width is a multiple of 8 up to 256 (64 and 128 in most models) is read a vector at a time
// (16 floats with AVX-512 where the width allows, else 8 with AVX2), each dot product summed in two vector accumulators and
// reduced once, and each output head kept in registers across its keys. isa.h says which build runs; the
// reductions' order follows the vector width, so the two differ in the last bits.
// Other head sizes take a plain loop. Measured 2026-12-04 on the Zen 5 EPYC (9 heads, 3 KV heads, 64 wide,
// slots in blocks of 16, 2 threads, best of 9), the plain loop before against this: 8 rows at context 100
// 49-52 -> 28-32 us a layer, 32 rows 205-224 -> 113-134 us, 8 rows at context 1,000 535-553 -> 351-359 us.
//
// The softmax's exponentials go a vector at a time, each value row read once weighs every query head of its
// group (up to four at once), and the rows a few keys on are prefetched: a row's slots hop from block to
// block, which the hardware's prefetchers do not follow. Measured 2026-12-07 on the Zen 4 EPYC (the same
// shapes, 30 layers each with its own pool, so keys come from memory; medians of three processes of 21
// passes), before -> after: one row at context 2,141 on one thread 17.5-18.9 -> 12.3-13.2 ms (without the
// prefetch 14.6-15.9 ms; prefetching 32 keys on, or the values during the keys' pass, measured no better);
// 32 rows at context 100, two threads 4.1-5.4 -> 3.1-3.6 ms; 8 rows at context 1,000 17.0-19.3 -> 10.3-11.4 ms.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "isa.h"
#include "vectors.h"

namespace {

constexpr int64_t kMaxWidth = 256;  // heads up to this wide take the vector path
using respserve::kNever;
using respserve::load;
using respserve::store;
using respserve::sum;
using respserve::Vec;

// What one task needs: a row's query heads for one KV head, its slots, and where its output goes.
struct Task {
  const float* q;         // [group, D]
  const float* keys;      // the pool's keys for this KV head: slot s at keys + s * stride
  const float* values;    // the same for values
  const int64_t* slots;   // [count]
  int64_t count, group, stride;
  int64_t span;  // the scores' row length: count, rounded up to a whole vector on the vector paths
  float scale;
  float* scores;  // [group, span], scratch
  float* out;     // [group, D]
};

// Softmax of each query head's scores in place (max subtracted, so exp never overflows).
void softmax_rows(const Task& t) {
  for (int64_t g = 0; g < t.group; ++g) {
    float* s = t.scores + g * t.span;
    const float top = *std::max_element(s, s + t.count);
    float total = 0.f;
    for (int64_t j = 0; j < t.count; ++j) total += (s[j] = std::exp(s[j] - top));
    const float inverse = 1.f / total;
    for (int64_t j = 0; j < t.count; ++j) s[j] *= inverse;
  }
}

// The same a vector at a time: the lanes past `count` are set to kNever and weigh exactly 0.
template <int N>
RESPSERVE_INLINE void softmax_vectors(const Task& t) {
  const Vec<N> never = respserve::splat<N>(kNever);
  for (int64_t g = 0; g < t.group; ++g) {
    float* s = t.scores + g * t.span;
    std::fill(s + t.count, s + t.span, kNever);
    Vec<N> most = never;
    for (int64_t j = 0; j < t.span; j += N) {
      const Vec<N> x = load<N>(s + j);
      most = most > x ? most : x;
    }
    float lanes[N];
    store<N>(lanes, most);
    const Vec<N> top = respserve::splat<N>(*std::max_element(lanes, lanes + N));
    Vec<N> total = {};
    for (int64_t j = 0; j < t.span; j += N) {
      const Vec<N> x = load<N>(s + j);
      const Vec<N> p = x > never ? respserve::exp<N>(x - top) : Vec<N>{};
      store<N>(s + j, p);
      total += p;
    }
    const float inverse = 1.f / sum<N>(total);
    for (int64_t j = 0; j < t.span; j += N) store<N>(s + j, load<N>(s + j) * inverse);
  }
}

// The pool rows `ahead` keys on, asked for before they are needed: a row's slots hop from block to block,
// which the hardware prefetcher does not follow, and one decode row is a chain of such reads.
constexpr int64_t kAhead = 8;

template <int L, int N>
RESPSERVE_INLINE void prefetch_row(const float* base, const Task& t, int64_t j) {
  if (j + kAhead < t.count) {
    const float* row = base + t.slots[j + kAhead] * t.stride;
    for (int l = 0; l < L * N; l += 16) __builtin_prefetch(row + l);  // 16 floats: one 64-byte line
  }
}

// Values weighed by G query heads at once, so that each value row read serves all of them.
template <int N, int L, int G>
RESPSERVE_INLINE void weigh_values(const Task& t, int64_t g0) {
  Vec<N> acc[G][L] = {};
  const float* p = t.scores + g0 * t.span;
  for (int64_t j = 0; j < t.count; ++j) {
    prefetch_row<L, N>(t.values, t, j);
    const float* v = t.values + t.slots[j] * t.stride;
    for (int l = 0; l < L; ++l) {
      const Vec<N> x = load<N>(v + l * N);
      for (int g = 0; g < G; ++g) acc[g][l] += p[g * t.span + j] * x;
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int l = 0; l < L; ++l) store<N>(t.out + ((g0 + g) * L + l) * N, acc[g][l]);
  }
}

// A head of L vectors of N floats.
template <int N, int L>
RESPSERVE_INLINE void attend_vectors(const Task& t) {
  for (int64_t j = 0; j < t.count; ++j) {
    prefetch_row<L, N>(t.keys, t, j);
    const float* k = t.keys + t.slots[j] * t.stride;
    Vec<N> key[L];
    for (int l = 0; l < L; ++l) key[l] = load<N>(k + l * N);
    for (int64_t g = 0; g < t.group; ++g) {
      const float* q = t.q + g * L * N;
      Vec<N> even = {}, odd = {};  // two chains of FMAs instead of one
      for (int l = 0; l + 1 < L; l += 2) {
        even += load<N>(q + l * N) * key[l];
        odd += load<N>(q + (l + 1) * N) * key[l + 1];
      }
      if constexpr (L % 2 == 1) even += load<N>(q + (L - 1) * N) * key[L - 1];
      t.scores[g * t.span + j] = sum<N>(even + odd) * t.scale;
    }
  }
  softmax_vectors<N>(t);
  // As many heads at once as their accumulators leave registers for (32 with AVX-512, 16 with AVX2).
  constexpr int G = std::max(1, std::min(4, (N == 16 ? 24 : 12) / L));
  int64_t g0 = 0;
  for (; g0 + G <= t.group; g0 += G) weigh_values<N, L, G>(t, g0);
  for (; g0 < t.group; ++g0) weigh_values<N, L, 1>(t, g0);
}

// attend_vectors<N, D / N>, for D = N, 2N, ... kMaxWidth.
template <int N, int... Ls>
RESPSERVE_INLINE void attend_by_width(const Task& t, int64_t D, std::integer_sequence<int, Ls...>) {
  ((D == (Ls + 1) * N ? attend_vectors<N, Ls + 1>(t) : void()), ...);
}

RESPSERVE_AVX512 void attend_avx512(const Task& t, int64_t D) {
  attend_by_width<16>(t, D, std::make_integer_sequence<int, kMaxWidth / 16>{});
}

void attend_avx2(const Task& t, int64_t D) {
  attend_by_width<8>(t, D, std::make_integer_sequence<int, kMaxWidth / 8>{});
}

// Any head size: one query head's dot product at a time.
void attend_plain(const Task& t, int64_t D) {
  for (int64_t j = 0; j < t.count; ++j) {
    const float* k = t.keys + t.slots[j] * t.stride;
    for (int64_t g = 0; g < t.group; ++g) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += t.q[g * D + d] * k[d];
      t.scores[g * t.span + j] = dot * t.scale;
    }
  }
  softmax_rows(t);
  std::fill(t.out, t.out + t.group * D, 0.f);
  for (int64_t j = 0; j < t.count; ++j) {
    const float* v = t.values + t.slots[j] * t.stride;
    for (int64_t g = 0; g < t.group; ++g) {
      const float p = t.scores[g * t.span + j];
      for (int64_t d = 0; d < D; ++d) t.out[g * D + d] += p * v[d];
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                                  const at::Tensor& slots, const at::Tensor& lengths, double scale, int64_t window) {
  TORCH_CHECK(query.dim() == 3 && keys.dim() == 3 && values.sizes() == keys.sizes(),
              "paged_decode_attention: query [rows, heads, D], keys and values [slots, kv_heads, D]");
  TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                  values.scalar_type() == at::kFloat,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(query.is_contiguous() && keys.is_contiguous() && values.is_contiguous() && slots.is_contiguous() &&
                  lengths.is_contiguous(),
              "paged_decode_attention: contiguous tensors only");
  const int64_t rows = query.size(0), heads = query.size(1), D = query.size(2);
  const int64_t kv_heads = keys.size(1), width = slots.size(1);
  TORCH_CHECK(keys.size(2) == D && heads % kv_heads == 0, "paged_decode_attention: heads do not match");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.size(0) == rows && lengths.scalar_type() == at::kLong &&
                  lengths.numel() == rows,
              "paged_decode_attention: slots [rows, width] and lengths [rows], int64");
  const int64_t group = heads / kv_heads, pool = keys.size(0);
  at::Tensor out = at::empty_like(query);
  const float* qs = query.data_ptr<float>();
  const float* ks = keys.data_ptr<float>();
  const float* vs = values.data_ptr<float>();
  const int64_t* table = slots.data_ptr<int64_t>();
  const int64_t* ns = lengths.data_ptr<int64_t>();
  float* os = out.data_ptr<float>();
  auto first_of = [&](int64_t r) { return window > 0 ? std::max<int64_t>(0, ns[r] - window) : int64_t{0}; };
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ns[r] >= 1 && ns[r] <= width, "paged_decode_attention: row ", r, " has length ", ns[r]);
    for (int64_t j = first_of(r); j < ns[r]; ++j) {
      const int64_t slot = table[r * width + j];
      TORCH_CHECK(slot >= 0 && slot < pool, "paged_decode_attention: slot ", slot, " outside the pool");
    }
  }
  // A head size that is a multiple of 8 but not of 16 takes the AVX2 build on an AVX-512 CPU too.
  const bool avx512 = respserve::use_avx512() && D % 16 == 0, vectorized = D % 8 == 0 && D <= kMaxWidth;
  const int64_t lanes = avx512 ? 16 : 8;
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kv = task % kv_heads, first = first_of(r), count = ns[r] - first;
      const int64_t span = vectorized ? (count + lanes - 1) / lanes * lanes : count;
      scores.resize(group * span);
      const Task t{qs + (r * heads + kv * group) * D,
                   ks + kv * D,
                   vs + kv * D,
                   table + r * width + first,
                   count,
                   group,
                   kv_heads * D,
                   span,
                   static_cast<float>(scale),
                   scores.data(),
                   os + (r * heads + kv * group) * D};
      if (vectorized && avx512) {
        attend_avx512(t, D);
      } else if (vectorized) {
        attend_avx2(t, D);
      } else {
        attend_plain(t, D);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(respserve, m) {
  m.def(
      "paged_decode_attention(Tensor query, Tensor keys, Tensor values, Tensor slots, Tensor lengths, float scale, "
      "int window) -> Tensor");
  m.impl("paged_decode_attention", c10::DispatchKey::CPU, TORCH_FN(paged_decode_attention));
}
