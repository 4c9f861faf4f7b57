// A prompt chunk's attention on AMX tiles (amx_attention.cpp), which chunk_attention.cpp runs where isa.h
// chose AMX and amx_chunk_attention_takes the chunk.
#pragma once

#include <cstdint>

namespace respserve {

// What chunk_attention.cpp's kernel computes: out [tokens, heads, D] is the causal attention of query
// [tokens, heads, D] (scaled by `scale`) over the keys and values of the pool ([slots, kv_heads, D]) at
// `slots` (first + tokens of them, in position order), the chunk's tokens at positions first .. first +
// tokens - 1, each seeing keys from max(0, position - window + 1) (from 0 when window is 0) to its own.
struct ChunkAttention {
  const float* query;
  const float* pool_keys;
  const float* pool_values;
  const int64_t* slots;
  int64_t tokens, heads, kv_heads, D, first, window;
  float scale;
  float* out;
};

// A head size of whole tiles, and enough rows per KV head ((token, head) pairs) to repay packing the keys
// and values into bf16 parts. Measured on a 2-core Xeon (2026-12-07; SmolLM2's shapes after 2,256 cached
// tokens, 30 layers whose keys come from memory, median of 7, against AVX-512): 96 new tokens (288 rows)
// 83 against 81 ms, 384 tokens 285 against 314 ms; 45 tokens (135 rows) 51 against 45 ms before this rule.
constexpr bool amx_chunk_attention_takes(int64_t D, int64_t rows_per_kv_head) {
  return D % 32 == 0 && D <= 256 && rows_per_kv_head >= 512;
}

void amx_chunk_attention(const ChunkAttention& c);

}  // namespace respserve
