// The kbit weight format as the kernels see it. Mirrors vllm_kbit/format.py: change both together.
//
// On disk (format.py module docstring): blocks of BLOCK_SIZE = 32 weights along K, a codebook of 2^bits fp32
// values in [-1, 1], one E4M4 absmax code per block, one fp32 scale per output row.
// The kernels read the "kernel layout" made by format.py `to_kernel_layout` (see the "Kernel layout" section
// there): tiles of kTileRows rows x kTileK inputs; per row of a tile `bits` 16-byte vectors, vector-major
// ([rowtile][g][v][row][16 B]), holding a little-endian bit stream of the row's 128 indices (index i at stream
// bits [bits*i, bits*i + bits), stream word j at vector j / 4, word j % 4); absmax codes as
// [rowtile][g][row][4 bytes]. K is padded to a multiple of kTileK with index 0 and absmax code 0.
#pragma once

#include <cstdint>

namespace kbit {

constexpr int kBlockSize = 32;                       // format.BLOCK_SIZE
constexpr int kE4M4Bias = 11;                        // format.E4M4_BIAS
constexpr int kTileRows = 32;                        // format.KERNEL_TILE_ROWS
constexpr int kTileK = 128;                          // format.KERNEL_TILE_K
constexpr int kTileBlocks = kTileK / kBlockSize;     // format.KERNEL_TILE_BLOCKS

// 16-byte vectors (and so 4 * bits stream words) per row of a tile.
__host__ __device__ constexpr int tile_vectors(int bits) { return bits; }

// format.kernel_k_groups
__host__ __device__ constexpr int k_groups(int in_features) { return (in_features + kTileK - 1) / kTileK; }

// Offset, in 16-byte vectors, of vector 0 of row `tile_row` of tile (rowtile, g); vector v is 32 further each.
__host__ __device__ inline long long tile_vector_offset(int bits, int groups, int rowtile, int g, int tile_row) {
    return ((static_cast<long long>(rowtile) * groups + g) * tile_vectors(bits)) * kTileRows + tile_row;
}

// Offset, in 32-bit words (4 absmax codes), of row `tile_row` of tile (rowtile, g) in absmax_tiled.
__host__ __device__ inline long long tile_absmax_offset(int groups, int rowtile, int g, int tile_row) {
    return (static_cast<long long>(rowtile) * groups + g) * kTileRows + tile_row;
}

#ifdef __CUDACC__
// E4M4 code -> value (format.e4m4_table). Shifted left by 19, the code is the exponent and top mantissa bits of
// an fp32 whose exponent bias is 127 instead of 11; exponent 0 lands on fp32 subnormals exactly as E4M4's
// subnormals, so one multiply by 2^(127 - 11) finishes the decode (needs denormals kept: no -ftz).
__device__ __forceinline__ float e4m4_decode(uint32_t code) {
    static_assert(kE4M4Bias == 11, "the 2^116 below is 2^(127 - kE4M4Bias)");
    return __uint_as_float(code << 19) * 0x1p116f;
}

// Bits [pos, pos + nbits) of a row's index stream (words w[], pos and nbits compile-time after unrolling),
// returned shifted left by `shl` (the caller's table stride), in two instructions: a shift (a funnel shift where
// the field straddles two words) and a mask.
template <int NWORDS>
__device__ __forceinline__ uint32_t stream_field(const uint32_t (&w)[NWORDS], int pos, int nbits, int shl) {
    const int word = pos >> 5, off = pos & 31;
    uint32_t v;
    if (off + nbits <= 32) {
        v = off >= shl ? (w[word] >> (off - shl)) : (w[word] << (shl - off));
    } else {
        v = __funnelshift_r(w[word], w[word + 1], off - shl);
    }
    return v & (((1u << nbits) - 1u) << shl);
}
#endif

}  // namespace kbit
