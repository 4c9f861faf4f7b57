// float32 activations times bfloat16-stored weights on AMX tiles, in float32 (bf16_linear.cpp's contract).
//
// A tile multiply takes bf16 on both sides, so each activation is split into three bf16 parts,
// x = hi + mid + lo, exactly: each part holds the next 8 of float32's 24 significant bits. A weight holds
// exactly in bf16, so each part's product with it is exact in float32 (16 significant bits), and the
// tile sums them in float32 as an FMA would. The three partial sums are added at the end, hi + (mid + lo):
// the error is a float32 sum's, not bf16's. Three multiplies for one are cheap here: one tile multiply is
// 8,192 multiply-adds, which AVX-512 does in 256 FMA instructions.
//
// A row's result depends only on that row and the k order, which is the same whatever M is, so a row's
// product does not depend on the rows batched with it (as on the AVX paths). The bits differ from the
// AVX paths', which sum each product once: the same float32 accuracy, another rounding order.
//
// x's rows become 3M rows of parts (row 3m + p is part p of row m), laid in tiles of 16 rows; all of them
// fit one tile up to 5 rows of x, so a decode step of a few streams costs one tile multiply per block and
// 32 values of k. A thread takes its blocks two at a time, and the row tiles two at a time against them
// (pair_tiles: four sums in tiles, each tile of weights or parts loaded once for two multiplies).
//
// Measured on a 2-core Intel Xeon with AMX (2026-12-07), [M x 576] @ [576 x 1536], weights in cache, against
// the AVX-512 path: 1 row 38 -> 17-20 us, 8 rows 55 -> 28-32 us, 32 rows 203 -> 85-100 us; the output head
// ([32 x 576] @ [576 x 49152]) 7.2 -> 3.0-3.7 ms. A decode step of SmolLM2 at 32 rows 55-61 -> 45-54 ms
// (before pairs); a 2,048-token prompt chunk's matmuls 1.0 s (about 550 GFLOP/s).

#include "amx_linear.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "isa.h"

namespace respserve {

#if RESPSERVE_HAVE_AMX

namespace {

constexpr int64_t kRows = kTileRows;  // rows of a tile (of parts, or of sums)
constexpr int64_t kColumns = 16;       // output columns of a packed block
constexpr int64_t kRowBytes = kTileBytes;
constexpr int64_t kL2Parts = 1024 * 1024;  // bytes of parts a group of rows keeps in L2 (2 MB on Sapphire Rapids)

RESPSERVE_AMX __m512 widen(__m256bh part) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(part)), 16));
}

// parts [tiles * kRows][Kp]: row 3m + p is part p of x's row m; rows past 3M and columns past K are zero.
RESPSERVE_AMX void split_rows(const float* x, int64_t M, int64_t K, int64_t Kp, int64_t tiles, uint16_t* parts) {
  for (int64_t m = 0; m < M; ++m) {
    uint16_t* dst = parts + kParts * m * Kp;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mask = static_cast<__mmask16>((1u << std::min<int64_t>(16, K - k)) - 1);
      const __m512 value = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      const __m256bh hi = _mm512_cvtneps_pbh(value);  // round to nearest even
      const __m512 rest = _mm512_sub_ps(value, widen(hi));  // exact: hi is value's nearest bf16
      const __m256bh mid = _mm512_cvtneps_pbh(rest);
      const __m256bh lo = _mm512_cvtneps_pbh(_mm512_sub_ps(rest, widen(mid)));
      _mm256_mask_storeu_epi16(dst + k, mask, reinterpret_cast<__m256i>(hi));
      _mm256_mask_storeu_epi16(dst + Kp + k, mask, reinterpret_cast<__m256i>(mid));
      _mm256_mask_storeu_epi16(dst + 2 * Kp + k, mask, reinterpret_cast<__m256i>(lo));
    }
    for (int64_t p = 0; p < kParts; ++p) std::memset(dst + p * Kp + K, 0, (Kp - K) * sizeof(uint16_t));
  }
  std::memset(parts + kParts * M * Kp, 0, (tiles * kRows - kParts * M) * Kp * sizeof(uint16_t));
}

// Tiles 0-3 sums, 4-5 weights, 6-7 parts; `rows` in each (fewer than 16 when all of x's parts fit one tile).
RESPSERVE_AMX void configure_tiles(int rows) {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = tile == 4 || tile == 5 ? kRows : rows;
    config.bytes_per_row[tile] = kRowBytes;
  }
  _tile_loadconfig(&config);
}

// y's rows [m0, m1) in one block's columns, from the block's sums (row m0's parts first): each row's three
// parts added, and the bias.
RESPSERVE_AMX void store_block(const float* sums, int64_t m0, int64_t m1, int64_t n, int64_t block, const float* bias,
                               float* y) {
  const int64_t column = block * kColumns;
  const __mmask16 mask = static_cast<__mmask16>((1u << std::min(kColumns, n - column)) - 1);
  const __m512 offset = bias ? _mm512_maskz_loadu_ps(mask, bias + column) : _mm512_setzero_ps();
  for (int64_t m = m0; m < m1; ++m) {
    const float* hi = sums + kParts * (m - m0) * kColumns;  // then mid, then lo
    const __m512 rest = _mm512_add_ps(_mm512_loadu_ps(hi + kColumns), _mm512_loadu_ps(hi + 2 * kColumns));
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(hi), rest), offset);
    _mm512_mask_storeu_ps(y + m * n + column, mask, sum);
  }
}

// Two blocks' columns for R tiles of rows (R <= 2), into sums0 and sums1 [R * 16][16]: tiles 0-3 the four
// sums, 4 and 5 the two blocks' weights, 6 and 7 the row tiles' parts, each loaded once for two
// multiplies (four loads for four multiplies, where one block and four row tiles take five). Measured
// against one block at a time (2026-12-07, alternated processes): 40 weights streamed at 32 rows 10.9-12.8
// -> 9.0-10.4 ms; a 2,048-token chunk's matmuls 1.2 -> 0.96-1.05 s. The weights stream in block order,
// which the hardware prefetches: requesting them a few tiles ahead (to L1 or L2) measured the same as not,
// and taking k in chunks whose parts stay in L1 was no faster.
template <int R>
RESPSERVE_AMX void pair_tiles(const uint16_t* w0, const uint16_t* w1, const uint16_t* parts, int64_t Kp,
                              float* sums0, float* sums1) {
  const int64_t stride = Kp * sizeof(uint16_t), tile = kRows * Kp, out = kRows * kColumns;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (R > 1) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k = 0; k < Kp; k += kAmxTileK) {
    _tile_loadd(4, w0 + k * kColumns, kRowBytes);
    _tile_loadd(5, w1 + k * kColumns, kRowBytes);
    _tile_loadd(6, parts + k, stride);
    _tile_dpbf16ps(0, 6, 4);
    _tile_dpbf16ps(1, 6, 5);
    if constexpr (R > 1) {
      _tile_loadd(7, parts + tile + k, stride);
      _tile_dpbf16ps(2, 7, 4);
      _tile_dpbf16ps(3, 7, 5);
    }
  }
  _tile_stored(0, sums0, kRowBytes);
  _tile_stored(1, sums1, kRowBytes);
  if constexpr (R > 1) {
    _tile_stored(2, sums0 + out, kRowBytes);
    _tile_stored(3, sums1 + out, kRowBytes);
  }
}

// Blocks [first, last) of y's columns, on one thread (a lambda would not carry the AMX target along).
//
// Every tile multiply loads a tile of parts: a prompt's thousands of rows go in groups whose parts stay in
// L2 while the group passes over the blocks (the weights are then read once a group, from memory or L3).
// Seen without groups: a 2,048-token chunk of SmolLM2 multiplied at 281 GFLOP/s, its parts (7 MB for
// K = 576) read from L3 by every block.
RESPSERVE_AMX void multiply_blocks(int64_t first, int64_t last, const uint16_t* parts, int64_t tiles, int64_t M,
                                   int64_t Kp, const uint16_t* packed, int64_t n, const float* bias, float* y) {
  configure_tiles(static_cast<int>(std::min(kRows, kParts * M)));  // per thread: a thread's state
  // Tiles of a group: a multiple of 6, so that row tiles go in pairs and no row's parts straddle two groups.
  const int64_t group = std::max<int64_t>(6, kL2Parts / (kRows * Kp * sizeof(uint16_t)) / 6 * 6);
  std::vector<float> sums(std::min(tiles, group) * kRows * kColumns), pair_sums(sums.size());
  for (int64_t g = 0; g < tiles; g += group) {
    const int64_t group_tiles = std::min(group, tiles - g);
    const int64_t m0 = g * kRows / kParts, m1 = std::min(M, (g + group_tiles) * kRows / kParts);
    for (int64_t block = first; block < last; block += 2) {
      const bool pair = block + 1 < last;  // an odd one out goes with itself, the copy's sums thrown away
      const uint16_t* w0 = packed + block * Kp * kColumns;
      const uint16_t* w1 = pair ? w0 + Kp * kColumns : w0;
      for (int64_t t = 0; t < group_tiles; t += 2) {  // two row tiles at a time
        const uint16_t* rows = parts + (g + t) * kRows * Kp;
        float *first_sums = sums.data() + t * kRows * kColumns, *second_sums = pair_sums.data() + t * kRows * kColumns;
        if (group_tiles - t >= 2) {
          pair_tiles<2>(w0, w1, rows, Kp, first_sums, second_sums);
        } else {
          pair_tiles<1>(w0, w1, rows, Kp, first_sums, second_sums);
        }
      }
      store_block(sums.data(), m0, m1, n, block, bias, y);
      if (pair) store_block(pair_sums.data(), m0, m1, n, block + 1, bias, y);
    }
  }
  _tile_release();  // so that the kernel need not save the tiles' state at each switch
}

}  // namespace

void amx_bf16_linear(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t n, const float* bias,
                     float* y) {
  const int64_t Kp = amx_padded_k(K), tiles = (kParts * M + kRows - 1) / kRows;
  const at::Tensor split = at::empty({tiles * kRows * Kp}, at::kBFloat16);
  uint16_t* parts = reinterpret_cast<uint16_t*>(split.data_ptr<at::BFloat16>());
  split_rows(x, M, K, Kp, tiles, parts);
  at::parallel_for(0, (n + kColumns - 1) / kColumns, 1, [&](int64_t first, int64_t last) {
    multiply_blocks(first, last, parts, tiles, M, Kp, packed, n, bias, y);
  });
}

#else

void amx_bf16_linear(const float*, int64_t, int64_t, const uint16_t*, int64_t, const float*, float*) {
  TORCH_CHECK(false, "bf16_linear: this build has no AMX path");
}

#endif

}  // namespace respserve
