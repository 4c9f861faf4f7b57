// A prompt chunk's causal attention on AMX tiles, to float32's accuracy (chunk_attention.cpp's contract).
//
// Both products of attention, scores = Q K^T and outputs = P V, are tile multiplies of bf16 parts: each
// float32 operand is cut exactly into three bf16 parts (hi + mid + lo, 8 significant bits each), and of
// the nine products of parts the six that reach float32's last bits are summed (hi*hi, mid*hi, hi*mid,
// lo*hi, mid*mid, hi*lo). Each product of parts is exact in float32 and the tile sums them in float32 as an
// FMA would; the three left out are below 2^-21 of the product, within what a float32 dot product of a
// head's width rounds away (tested against float64). One tile multiply is 8,192 multiply-adds, which
// AVX-512 does in 512 FMAs: six of them still leave the AVX-512 build behind.
//
// A task is 32 query rows ((token, head) pairs of one KV head's group, token-major), two tiles of 16. Its
// keys go in spans of 128: the span's scores in tiles, 32 keys at a time; then, row by row in AVX-512, the
// running maximum (flash attention's online softmax), the probabilities and their parts; then P V for the
// span in tiles, added to the rows' outputs after the rescale their new maximum asks for. The keys and
// values are packed once a call for all tasks, from the pool through the slots, as the tiles' right-hand
// operands.
//
// Measured 2026-12-07 on a 2-core Intel Xeon with AMX (SmolLM2's 9 heads, 3 KV heads, 64 wide; 2 threads;
// one layer, its keys hot in cache; best and median of four processes, against the AVX-512 build): 45 new
// tokens after 2,096 cached ones 1.29 / 1.33 against 1.38 / 1.40 ms; a 512-token prompt 1.64 / 1.70
// against 2.04 / 2.12 ms; 2,048 tokens after 2,048 67.7 / 71.4 against 78.7 / 80.7 ms. What is left is
// mostly reading the packed keys and values from L2 (each tile is read for two multiplies), the softmax
// and the packing, which is why few rows stay on AVX-512 (amx_attention.h).

#include "amx_attention.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "amx_tiles.h"
#include "isa.h"
#include "vectors.h"

namespace respserve {

#if RESPSERVE_HAVE_AMX

namespace {

constexpr int64_t kRows = 2 * kTileRows;  // query rows of a task: two tiles
constexpr int64_t kStep = 32;      // values of k a tile multiply sums: head elements for scores, keys for P V
constexpr int64_t kColumns = 16;   // columns of a tile of sums: keys of a score tile, head elements of outputs
constexpr int64_t kBlock = 32;     // keys scored at once (two score tiles for each tile of rows)
constexpr int64_t kSpan = 128;     // keys a task scores before weighing their values (measured: 512 and 256 slower)
constexpr int64_t kTileElements = kTileRows * kTileBytes / 2;  // bf16 values of a packed tile

// Tiles: 0-3 sums, tile 2 r + t the product of left tile r (4 + r) and right tile t (6 + t). The left
// tiles hold a part of two tiles of query rows (Q's, or P's), the right ones a part of two tiles of keys
// for scores, or of head elements for outputs (K's or V's): each tile loaded serves two multiplies, which
// halves what is read from L2 per multiply (reading a tile from L2 takes longer than a multiply).
RESPSERVE_AMX void configure_tiles() {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = kTileRows;
    config.bytes_per_row[tile] = kTileBytes;
  }
  _tile_loadconfig(&config);
}

// The six products of parts summed, as (left part, right part): their sum is the product in float32's
// accuracy. Laid end to end along k, they make one dot product six times as long.
constexpr int kProducts[6][2] = {{0, 0}, {1, 0}, {0, 1}, {2, 0}, {1, 1}, {0, 2}};

// One multiply of parts: left tile r's part p, values [32 s, 32 s + 32) of k, at left + p * left_part +
// s * left_step + r * left_tile (rows left_row_bytes apart); right tile t's part q, step s, at right +
// q * right_part + s * right_step + t * right_tile (packed: rows 64 bytes apart).
struct Operands {
  const uint16_t* left;
  int64_t left_part, left_step, left_tile, left_row_bytes;
  const uint16_t* right;
  int64_t right_part, right_step, right_tile;
  int64_t steps;
};

// Sum tiles 0-3 (zeroed first) = each left tile times each right one, in float32's accuracy.
RESPSERVE_AMX void multiply(const Operands& o) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (const auto& product : kProducts) {
    for (int64_t step = 0; step < o.steps; ++step) {
      const uint16_t* left = o.left + product[0] * o.left_part + step * o.left_step;
      const uint16_t* right = o.right + product[1] * o.right_part + step * o.right_step;
      _tile_loadd(4, left, o.left_row_bytes);
      _tile_loadd(6, right, kTileBytes);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, right + o.right_tile, kTileBytes);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, left + o.left_tile, o.left_row_bytes);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Sum tile 2 r + t to rows [16 r, 16 r + 16) of `to` (rows `row` floats apart), from column 16 t.
RESPSERVE_AMX void store_sums(float* to, int64_t row) {
  const int64_t stride = row * static_cast<int64_t>(sizeof(float));
  _tile_stored(0, to, stride);
  _tile_stored(1, to + kColumns, stride);
  _tile_stored(2, to + kTileRows * row, stride);
  _tile_stored(3, to + kTileRows * row + kColumns, stride);
}

// x = part[0] + part[1] + part[2] exactly, each part holding the next 8 significant bits of what is left
// (cut, not rounded: at most 24 bits in all, so the third holds the rest): each part a float whose upper
// half is its bf16 value and whose lower half is zero.
struct Parts {
  __m512i part[kParts];
};

RESPSERVE_AMX Parts cut(__m512 x) {
  const __m512i upper = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  Parts parts;
  __m512 rest = x;
  for (int64_t p = 0; p < kParts; ++p) {
    parts.part[p] = _mm512_and_si512(_mm512_castps_si512(rest), upper);
    rest = _mm512_sub_ps(rest, _mm512_castsi512_ps(parts.part[p]));  // exact: the bits below the cut
  }
  return parts;
}

// The bf16 values of two vectors of cut parts, a's then b's: the upper halves of their 32 floats.
RESPSERVE_AMX __m512i bf16_of(__m512i a, __m512i b) {
  const __m512i odd_halves = _mm512_setr_epi32(0x30001, 0x70005, 0xB0009, 0xF000D, 0x130011, 0x170015, 0x1B0019,
                                               0x1F001D, 0x230021, 0x270025, 0x2B0029, 0x2F002D, 0x330031, 0x370035,
                                               0x3B0039, 0x3F003D);
  return _mm512_permutex2var_epi16(a, odd_halves, b);
}

// 32 floats, a's then b's, as their parts' bf16 values at to, to + part and to + 2 * part.
RESPSERVE_AMX void store_parts(__m512 a, __m512 b, uint16_t* to, int64_t part) {
  const Parts first = cut(a), second = cut(b);
  for (int64_t p = 0; p < kParts; ++p) _mm512_storeu_si512(to + p * part, bf16_of(first.part[p], second.part[p]));
}

// Rows i of a 16 x 16 matrix of 32-bit elements become its columns.
RESPSERVE_AMX void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + e]: rows g .. g + 3 at columns 4 L + e, L the 128-bit lane
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int e = 0; e < 4; ++e) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), v1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
  }
}

// The sequence's keys and values, packed for all tiles: part p of keys [16 b, 16 b + 16) and head elements
// [32 s, 32 s + 32) is one tile at keys + ((kv * 3 + p) * key_tiles + b) * steps + s, its row i the pairs
// (element 2i, 2i + 1) of each key; part p of keys [32 b, 32 b + 32) and head elements [16 c, 16 c + 16)
// is one tile at values + ((kv * 3 + p) * value_tiles + b) * columns + c, its row i the pairs (key 2i,
// 2i + 1) of each element. Keys past the sequence are zeros.
struct Packed {
  const uint16_t* keys;
  const uint16_t* values;
  int64_t key_tiles, value_tiles, steps, columns;
};

RESPSERVE_AMX __m512 row_of(const ChunkAttention& c, const float* pool, int64_t kv, int64_t key, int64_t length,
                            int64_t element) {
  if (key >= length) return _mm512_setzero_ps();
  return _mm512_loadu_ps(pool + (c.slots[key] * c.kv_heads + kv) * c.D + element);
}

RESPSERVE_AMX void pack_key_tiles(const ChunkAttention& c, int64_t length, const Packed& k, int64_t kv, int64_t b,
                                  uint16_t* keys) {
  for (int64_t s = 0; s < k.steps; ++s) {
    __m512i rows[kParts][16];
    for (int64_t j = 0; j < 16; ++j) {
      const Parts low = cut(row_of(c, c.pool_keys, kv, 16 * b + j, length, kStep * s));
      const Parts high = cut(row_of(c, c.pool_keys, kv, 16 * b + j, length, kStep * s + 16));
      for (int64_t p = 0; p < kParts; ++p) rows[p][j] = bf16_of(low.part[p], high.part[p]);
    }
    for (int64_t p = 0; p < kParts; ++p) {
      transpose16(rows[p]);
      uint16_t* tile = keys + (((kv * kParts + p) * k.key_tiles + b) * k.steps + s) * kTileElements;
      for (int64_t i = 0; i < 16; ++i) _mm512_storeu_si512(tile + i * 32, rows[p][i]);
    }
  }
}

RESPSERVE_AMX void pack_value_tiles(const ChunkAttention& c, int64_t length, const Packed& k, int64_t kv, int64_t b,
                                    uint16_t* values) {
  for (int64_t col = 0; col < k.columns; ++col) {
    for (int64_t i = 0; i < 16; ++i) {
      const Parts even = cut(row_of(c, c.pool_values, kv, 32 * b + 2 * i, length, 16 * col));
      const Parts odd = cut(row_of(c, c.pool_values, kv, 32 * b + 2 * i + 1, length, 16 * col));
      for (int64_t p = 0; p < kParts; ++p) {
        const __m512i pair = _mm512_or_si512(_mm512_srli_epi32(even.part[p], 16), odd.part[p]);
        uint16_t* tile = values + (((kv * kParts + p) * k.value_tiles + b) * k.columns + col) * kTileElements;
        _mm512_storeu_si512(tile + i * 32, pair);
      }
    }
  }
}

// Scratch for one thread.
struct Scratch {
  uint16_t* query;    // [3][32][D]: the task's scaled query rows, in parts
  float* scores;      // [32][kSpan]
  uint16_t* weights;  // [3][32][kSpan]: the probabilities, in parts
  float* span_out;    // [32][D]: P V over one span
  float* out;         // [32][D]: the rows' outputs so far
};

// Which of keys [key0, key0 + 16) a row that sees keys [lowest, position] sees.
RESPSERVE_AMX __mmask16 seen_keys(int64_t key0, int64_t lowest, int64_t position) {
  if (key0 >= lowest && key0 + 15 <= position) return 0xFFFF;  // most keys of a long context
  const __m512i key = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(key0)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  return _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(lowest))) &
         _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(position)));
}

// One task: KV head `kv`, rows [row0, row0 + 32) of its tokens * group (token, head) pairs (token-major).
RESPSERVE_AMX void attend_rows(const ChunkAttention& c, const Packed& k, int64_t kv, int64_t row0, const Scratch& s) {
  const int64_t D = c.D, group = c.heads / c.kv_heads;
  const int64_t rows = std::min<int64_t>(kRows, c.tokens * group - row0);
  int32_t position[kRows], lowest[kRows];
  float top[kRows], total[kRows];
  const __m512 scale = _mm512_set1_ps(c.scale);
  for (int64_t i = 0; i < kRows; ++i) {
    const int64_t row = row0 + std::min<int64_t>(i, rows - 1);  // past the end: a copy of the last row
    const int64_t t = row / group, head = kv * group + row % group;
    position[i] = static_cast<int32_t>(c.first + t);
    lowest[i] = static_cast<int32_t>(c.window > 0 ? std::max<int64_t>(0, c.first + t - c.window + 1) : 0);
    top[i] = kNever;
    total[i] = 0.f;
    const float* q = c.query + (t * c.heads + head) * D;
    for (int64_t d = 0; d < D; d += 32) {
      store_parts(_mm512_mul_ps(_mm512_loadu_ps(q + d), scale), _mm512_mul_ps(_mm512_loadu_ps(q + d + 16), scale),
                  s.query + i * D + d, kRows * D);
    }
  }
  std::fill(s.out, s.out + kRows * D, 0.f);
  const int64_t first_key = *std::min_element(lowest, lowest + kRows) / kBlock * kBlock;
  const int64_t end_key = *std::max_element(position, position + kRows) + 1;
  for (int64_t span0 = first_key; span0 < end_key; span0 += kSpan) {
    const int64_t keys = std::min(kSpan, (end_key - span0 + kBlock - 1) / kBlock * kBlock);
    // The span's scores, 32 keys at a time.
    for (int64_t b = 0; b < keys; b += kBlock) {
      multiply({s.query, kRows * D, kStep, kTileRows * D, D * static_cast<int64_t>(sizeof(uint16_t)),
                k.keys + (kv * kParts * k.key_tiles + (span0 + b) / kColumns) * k.steps * kTileElements,
                k.key_tiles * k.steps * kTileElements, kTileElements, k.steps * kTileElements, k.steps});
      store_sums(s.scores + b, kSpan);
    }
    // Row by row: the running maximum, the probabilities in parts, and the rescale of what came before.
    for (int64_t i = 0; i < kRows; ++i) {
      const float* score = s.scores + i * kSpan;
      __m512 most = _mm512_set1_ps(kNever);
      for (int64_t j = 0; j < keys; j += 16) {
        const __mmask16 seen = seen_keys(span0 + j, lowest[i], position[i]);
        most = _mm512_mask_max_ps(most, seen, most, _mm512_loadu_ps(score + j));
      }
      const float new_top = std::max(top[i], _mm512_reduce_max_ps(most));
      const float rescale = std::exp(top[i] - new_top);
      top[i] = new_top;
      if (rescale != 1.f) {
        const __m512 factor = _mm512_set1_ps(rescale);
        float* o = s.out + i * D;
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(o + d), factor));
      }
      const __m512 shift = _mm512_set1_ps(new_top);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < keys; j += 2 * 16) {
        __m512 p[2];
        for (int64_t half = 0; half < 2; ++half) {
          const int64_t key = j + 16 * half;
          const __mmask16 seen = seen_keys(span0 + key, lowest[i], position[i]);
          p[half] = _mm512_maskz_mov_ps(seen, exp<16>(_mm512_sub_ps(_mm512_loadu_ps(score + key), shift)));
          sum = _mm512_add_ps(sum, p[half]);
        }
        store_parts(p[0], p[1], s.weights + i * kSpan + j, kRows * kSpan);
      }
      total[i] = total[i] * rescale + _mm512_reduce_add_ps(sum);
    }
    // P V over the span, 32 output elements at a time.
    for (int64_t col = 0; col < k.columns; col += 2) {
      multiply({s.weights, kRows * kSpan, kStep, kTileRows * kSpan, kSpan * static_cast<int64_t>(sizeof(uint16_t)),
                k.values + ((kv * kParts * k.value_tiles + span0 / kStep) * k.columns + col) * kTileElements,
                k.value_tiles * k.columns * kTileElements, k.columns * kTileElements, kTileElements, keys / kStep});
      store_sums(s.span_out + col * kColumns, D);
    }
    for (int64_t e = 0; e < kRows * D; e += 16) {
      _mm512_storeu_ps(s.out + e, _mm512_add_ps(_mm512_loadu_ps(s.out + e), _mm512_loadu_ps(s.span_out + e)));
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t row = row0 + i, t = row / group, head = kv * group + row % group;
    const __m512 inverse = _mm512_set1_ps(1.f / total[i]);
    float* o = c.out + (t * c.heads + head) * D;
    for (int64_t d = 0; d < D; d += 16) {
      _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_loadu_ps(s.out + i * D + d), inverse));
    }
  }
}

// Tasks [begin, end) of kv_heads * per_head, on one thread (a lambda would not carry the AMX target along).
RESPSERVE_AMX void attend(const ChunkAttention& c, const Packed& k, int64_t per_head, int64_t begin, int64_t end) {
  configure_tiles();  // per thread: a thread's state
  const int64_t D = c.D;
  std::vector<uint16_t> parts(kParts * kRows * (D + kSpan));
  std::vector<float> sums(kRows * (kSpan + 2 * D));
  const Scratch s{parts.data(), sums.data(), parts.data() + kParts * kRows * D, sums.data() + kRows * kSpan,
                  sums.data() + kRows * (kSpan + D)};
  for (int64_t task = begin; task < end; ++task) attend_rows(c, k, task / per_head, task % per_head * kRows, s);
  _tile_release();  // so that the kernel need not save the tiles' state at each switch
}

RESPSERVE_AMX void pack_keys(const ChunkAttention& c, int64_t length, const Packed& k, uint16_t* keys, int64_t begin,
                             int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    pack_key_tiles(c, length, k, task / k.key_tiles, task % k.key_tiles, keys);
  }
}

RESPSERVE_AMX void pack_values(const ChunkAttention& c, int64_t length, const Packed& k, uint16_t* values,
                               int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    pack_value_tiles(c, length, k, task / k.value_tiles, task % k.value_tiles, values);
  }
}

}  // namespace

void amx_chunk_attention(const ChunkAttention& c) {
  const int64_t length = c.first + c.tokens, padded = (length + kBlock - 1) / kBlock * kBlock;
  const int64_t key_tiles = padded / kColumns, value_tiles = padded / kStep;
  const int64_t tile_count = c.kv_heads * kParts * padded * c.D / kTileElements;
  const at::Tensor buffer = at::empty({2 * tile_count * kTileElements}, at::kBFloat16);
  uint16_t* keys = reinterpret_cast<uint16_t*>(buffer.data_ptr<at::BFloat16>());
  uint16_t* values = keys + tile_count * kTileElements;
  const Packed k{keys, values, key_tiles, value_tiles, c.D / kStep, c.D / kColumns};
  at::parallel_for(0, c.kv_heads * key_tiles, 8, [&](int64_t begin, int64_t end) {
    pack_keys(c, length, k, keys, begin, end);
  });
  at::parallel_for(0, c.kv_heads * value_tiles, 4, [&](int64_t begin, int64_t end) {
    pack_values(c, length, k, values, begin, end);
  });
  const int64_t per_head = (c.tokens * (c.heads / c.kv_heads) + kRows - 1) / kRows;
  at::parallel_for(0, c.kv_heads * per_head, 1,
                   [&](int64_t begin, int64_t end) { attend(c, k, per_head, begin, end); });
}

#else

void amx_chunk_attention(const ChunkAttention&) {
  TORCH_CHECK(false, "paged_chunk_attention: this build has no AMX path");
}

#endif

}  // namespace respserve
