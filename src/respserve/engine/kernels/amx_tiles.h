// What the AMX kernels share (amx_linear.cpp, amx_attention.cpp): the tiles' shape and configuration.
#pragma once

#include <cstdint>

#include "isa.h"

#if RESPSERVE_HAVE_AMX

namespace respserve {

constexpr int64_t kTileRows = 16;   // rows of a tile
constexpr int64_t kTileBytes = 64;  // bytes of a tile's row: 16 float32 sums, or 32 bf16 values of k
constexpr int64_t kParts = 3;       // bf16 parts of a float32

// The layout _tile_loadconfig reads (palette 1: eight tiles).
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace respserve

#endif
