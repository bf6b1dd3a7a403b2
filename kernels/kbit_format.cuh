// The kbit weight format as the kernels see it. Mirrors vllm_kbit/format.py: change both together.
//
// On disk (format.py module docstring): blocks of BLOCK_SIZE = 32 weights along K, a codebook of 2^bits fp32
// values in [-1, 1], one E4M4 absmax code per block, one fp32 scale per output row.
// The kernels read the "kernel layout" made by format.py `to_kernel_layout` (see the "Kernel layout" section
// there): tiles of kTileRows rows x kTileK inputs, one warp per tile. Lane l = 4 G + c owns rows G + 8 j
// (j = 0..3) and inputs 32 b + 8 c + t (block b = 0..3, t = 0..7): the weights of its mma.sync m16n8k16 A
// fragments. Its 128 indices, in the order of the fragments (stream_index), are a little-endian bit stream (weight
// i at stream bits [bits*i, bits*i + bits)) of `bits` 16-byte vectors stored vector-major ([rowtile][g][v][lane][16 B]:
// stream word w at vector w / 4, word w % 4). Absmax codes: [rowtile][g][4 G + b][j] (16 bytes per G).
// K is padded to a multiple of kTileK with index 0 and absmax code 0.
#pragma once

#include <cstdint>

namespace kbit {

constexpr int kBlockSize = 32;                       // format.BLOCK_SIZE
constexpr int kE4M4Bias = 11;                        // format.E4M4_BIAS
constexpr int kTileRows = 32;                        // format.KERNEL_TILE_ROWS
constexpr int kTileK = 128;                          // format.KERNEL_TILE_K
constexpr int kTileBlocks = kTileK / kBlockSize;     // format.KERNEL_TILE_BLOCKS
constexpr int kLaneRows = 4;                         // rows G + 8 j of a lane
constexpr int kLaneInputs = 8;                       // inputs 32 b + 8 c + t of a lane per block

// Position of weight (block b, row j, input t) in its lane's index stream: with j = 2 rh + h and t = 4 s + 2 q + e,
// 32 b + 16 rh + 8 s + 4 q + 2 h + e. Inputs t, t + 1 of a row (e = 0, 1) are adjacent, the pair-keyed tables' key;
// k = 2's key, four weights, takes rows 2 rh and 2 rh + 1 of that pair (h = 0, 1), the two A registers that an
// m16n8k16 MMA holds side by side, so that one 8-byte table read fills both (mma_core.cuh a_fragment).
__host__ __device__ constexpr int stream_index(int b, int j, int t) {
    return 32 * b + 16 * (j >> 1) + 8 * (t >> 2) + 4 * (t >> 1 & 1) + 2 * (j & 1) + (t & 1);
}

// format.kernel_k_groups
__host__ __device__ constexpr int k_groups(int in_features) { return (in_features + kTileK - 1) / kTileK; }

// Offset, in 16-byte vectors, of vector 0 of `lane` in tile (rowtile, g); vector v is 32 further each.
__host__ __device__ inline long long tile_vector_offset(int bits, int groups, int rowtile, int g, int lane) {
    return ((static_cast<long long>(rowtile) * groups + g) * bits) * 32 + lane;
}

// Offset, in 16-byte units, of the absmax codes of rows G + 8 j (all 4 blocks) in tile (rowtile, g).
__host__ __device__ inline long long tile_absmax_offset(int groups, int rowtile, int g, int G) {
    return (static_cast<long long>(rowtile) * groups + g) * 8 + G;
}

#ifdef __CUDACC__
// E4M4 code -> value (format.e4m4_table). Shifted left by 19, the code is the exponent and top mantissa bits of
// an fp32 whose exponent bias is 127 instead of 11; exponent 0 lands on fp32 subnormals exactly as E4M4's
// subnormals, so one multiply by 2^(127 - 11) finishes the decode (needs denormals kept: no -ftz).
__device__ __forceinline__ float e4m4_decode(uint32_t code) {
    static_assert(kE4M4Bias == 11, "the 2^116 below is 2^(127 - kE4M4Bias)");
    return __uint_as_float(code << 19) * 0x1p116f;
}

// Two E4M4 codes (bits 0-7 and 16-23 of `codes`, zeros elsewhere) -> the fp16x2 bit pattern of their values / 16.
// Shifted left by 6, a code's exponent and mantissa fill the low exponent and top mantissa bits of an fp16, whose
// bias is 15 instead of 11; its subnormals line up with E4M4's as in e4m4_decode. Exact.
__device__ __forceinline__ uint32_t e4m4_pair_as_half2_div16(uint32_t codes) {
    static_assert(kE4M4Bias == 11, "the 1/16 is 2^(11 - 15)");
    return codes << 6;
}

// Bits [pos, pos + nbits) of a lane's index stream (words w[], pos and nbits compile-time after unrolling),
// returned shifted left by `shl`, in two instructions: a shift (a funnel shift where the field straddles two
// words) and a mask.
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
