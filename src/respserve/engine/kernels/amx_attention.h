// A prompt chunk's attention on AMX tiles (amx_attention.cpp), which chunk_attention.cpp runs where isa.h
// chose AMX and the head size is a multiple of 32.
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

constexpr bool amx_chunk_attention_takes(int64_t D) { return D % 32 == 0 && D <= 256; }

void amx_chunk_attention(const ChunkAttention& c);

}  // namespace respserve
