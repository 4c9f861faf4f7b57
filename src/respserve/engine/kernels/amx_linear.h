// The bf16 matmul on AMX tiles (amx_linear.cpp), which bf16_linear.cpp runs where isa.h chose AMX.
#pragma once

#include <cstdint>

namespace respserve {

// Values of k (bf16) one row of a tile holds: K is padded to a multiple of this.
constexpr int64_t kAmxTileK = 32;

// K padded to whole tiles, as the packed weights and the activations' parts hold it.
constexpr int64_t amx_padded_k(int64_t K) { return (K + kAmxTileK - 1) / kAmxTileK * kAmxTileK; }

// y [M, n] = x [M, K] @ w.T + bias (bias may be null), float32, with w packed for the tiles
// ([ceil(n / 16)][Kp / 2][16][2] bfloat16, Kp = amx_padded_k(K); packed_linear.py packs it).
void amx_bf16_linear(const float* x, int64_t M, int64_t K, const uint16_t* packed, int64_t n, const float* bias,
                     float* y);

}  // namespace respserve
