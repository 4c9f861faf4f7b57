// Vectors of floats for the attention kernels, in GCC's vector extensions: 16 lanes (one AVX-512
// register) in the AVX-512 builds, 8 (AVX2) in the others; GCC splits a wider one poorly.
#pragma once

#include <cstdint>
#include <cstring>

namespace respserve {

typedef float Vec16 __attribute__((vector_size(16 * sizeof(float))));
typedef float Vec8 __attribute__((vector_size(8 * sizeof(float))));
typedef float Vec4 __attribute__((vector_size(4 * sizeof(float))));
typedef int32_t Int16 __attribute__((vector_size(16 * sizeof(int32_t))));
typedef int32_t Int8 __attribute__((vector_size(8 * sizeof(int32_t))));

// GCC drops vector_size on a dependent alias template, hence the specializations.
template <int N>
struct VecOf;
template <>
struct VecOf<16> {
  using type = Vec16;
  using ints = Int16;
};
template <>
struct VecOf<8> {
  using type = Vec8;
  using ints = Int8;
};
template <int N>
using Vec = typename VecOf<N>::type;
template <int N>
using Ints = typename VecOf<N>::ints;

#define RESPSERVE_INLINE inline __attribute__((always_inline))

// The running maximum of an online softmax before any key: finite, so rescaling never makes NaN.
constexpr float kNever = -1e30f;

template <int N>
RESPSERVE_INLINE Vec<N> load(const float* p) {
  Vec<N> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int N>
RESPSERVE_INLINE void store(float* p, Vec<N> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <int N>
RESPSERVE_INLINE Vec<N> splat(float x) {
  return Vec<N>{} + x;
}

template <int N>
RESPSERVE_INLINE float sum(Vec<N> v) {
  if constexpr (N == 16) {
    return sum<8>(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  } else {
    static_assert(N == 8);
    const Vec4 q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
    return (q[0] + q[2]) + (q[1] + q[3]);
  }
}

// e^x lane by lane, to about 2 ulp (Cephes' expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2]);
// below -87 it gives about 1e-38 rather than 0.
template <int N>
RESPSERVE_INLINE Vec<N> exp(Vec<N> x) {
  x = x < splat<N>(88.3f) ? x : splat<N>(88.3f);
  x = x > splat<N>(-87.3f) ? x : splat<N>(-87.3f);
  const Vec<N> scaled = x * 1.44269504088896341f + 0.5f;
  Ints<N> n = __builtin_convertvector(scaled, Ints<N>);
  n -= (__builtin_convertvector(n, Vec<N>) > scaled) ? 1 : 0;  // floor, for negative x too
  const Vec<N> whole = __builtin_convertvector(n, Vec<N>);
  const Vec<N> r = x - whole * 0.693359375f + whole * 2.12194440e-4f;
  Vec<N> p = splat<N>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Ints<N> bits = (n + 127) << 23;
  Vec<N> two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

}  // namespace respserve
