// Attention of single-query rows (decode tokens) over the paged KV pool, read in place through each row's
// slots (StepLayout.single_slots): no gathered copy of the keys and values, no mask, and one pass over a
// row's keys per KV head serves every query head that shares it (grouped-query attention). float32.
//
// out[r, h] = softmax_j(scale * q[r, h] . K[slot(r, j), h / group]) @ V[slot(r, j), h / group], for the
// positions j in [first, length) of row r; first = length - window with a sliding window, else 0.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
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
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(ns[r] >= 1 && ns[r] <= width, "paged_decode_attention: row ", r, " has length ", ns[r]);
  }
  const float softmax_scale = static_cast<float>(scale);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, acc(group * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / kv_heads, kv = task % kv_heads;
      const int64_t n = ns[r], first = window > 0 ? std::max<int64_t>(0, n - window) : 0, count = n - first;
      const int64_t* row_slots = table + r * width + first;
      const float* q = qs + (r * heads + kv * group) * D;
      scores.resize(group * count);
      for (int64_t j = 0; j < count; ++j) {
        const int64_t slot = row_slots[j];
        TORCH_CHECK(slot >= 0 && slot < pool, "paged_decode_attention: slot ", slot, " outside the pool");
        const float* k = ks + (slot * kv_heads + kv) * D;
        for (int64_t g = 0; g < group; ++g) scores[g * count + j] = dot(q + g * D, k, D) * softmax_scale;
      }
      for (int64_t g = 0; g < group; ++g) {
        float* s = scores.data() + g * count;
        const float top = *std::max_element(s, s + count);
        float total = 0.f;
        for (int64_t j = 0; j < count; ++j) total += (s[j] = std::exp(s[j] - top));
        const float inverse = 1.f / total;
        for (int64_t j = 0; j < count; ++j) s[j] *= inverse;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < count; ++j) {
        const float* v = vs + (row_slots[j] * kv_heads + kv) * D;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * count + j];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
        }
      }
      std::copy(acc.begin(), acc.end(), os + (r * heads + kv * group) * D);
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
