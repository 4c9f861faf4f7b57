// RMSNorm in one call: y = x / sqrt(mean(x^2) + eps) * (weight + offset), float32, over the last dim.
//
// transformers writes it as eight tensor ops (to, pow, mean, add, rsqrt, mul, to, mul), and on a small
// CPU each op of a decode step's few rows costs more in dispatch than in arithmetic: SmolLM2's 61 norms
// a step. `offset` is 1 for the norms that scale by (1 + weight), Gemma's, else 0.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>

namespace {

constexpr int64_t kRowsPerTask = 64;  // decode steps' few rows stay on the calling thread

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, double offset) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 only");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D && weight.is_contiguous(), "rms_norm: weight must be [", D, "]");
  const at::Tensor input = x.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t rows = D ? input.numel() / D : 0;
  const float* xs = input.data_ptr<float>();
  const float* ws = weight.data_ptr<float>();
  float* ys = out.data_ptr<float>();
  const float shift = static_cast<float>(offset), epsilon = static_cast<float>(eps);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      const float* row = xs + r * D;
      float squares = 0.f;
#pragma omp simd reduction(+ : squares)
      for (int64_t i = 0; i < D; ++i) squares += row[i] * row[i];
      const float inverse = 1.f / std::sqrt(squares / static_cast<float>(D) + epsilon);
      float* y = ys + r * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) y[i] = (ws[i] + shift) * (row[i] * inverse);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(respserve, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, TORCH_FN(rms_norm));
}
