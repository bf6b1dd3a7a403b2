// The fused dequant + tensor-core MMA machinery shared by the dense MMA tier (mma.cu) and the grouped MoE kernel
// (moe.cu): lookup tables, fragment decode, and one persistent kernel that a "Problem" specializes (which row
// tiles form a unit, which activation rows a unit reads, what happens to the finished sums).
//
// Product. Per 32 x 32 block (32 rows, one quantization block of inputs) of a tile, each lane of the warp holds the A
// fragments of mma.sync m16n8k16 for two 16-row halves x two 16-input steps (the layout's lane map, kbit_format.cuh), x
// supplies the B fragments (tokens as the n8 columns: one token tile per 8 tokens, up to 8 tiles per launch), and the
// fp32 accumulators of the block are multiplied by the rows' absmax and added to the running sums: one FFMA per
// accumulator per block. With more than one token tile (M > 8) that costs more than scaling the A fragments instead
// (four half2 multiplies per fragment, whatever M), so those kernels (and k = 2's at M <= 8) multiply the decoded
// weights by their absmax and let the MMAs accumulate across blocks. The row scale is applied once per output.
// Activations enter the MMA in their own dtype (fp16 or bf16), so no range scaling is needed; the codebook is rounded
// to that dtype.
//
// Decode. A shared-memory table maps a key, the contiguous stream field of several adjacent weights, to their
// codebook values as packed 16-bit pairs: k=2 keys 4 weights (8 bits, 8-byte entries: two A registers), k=3 and
// k=4 key a pair (6 / 8 bits: one A register), k=5 keys single weights (a 1024-entry pair table would not fit)
// and two lookups are merged with one byte permute. Each entry has a row of copies, and lane l reads copy l (of 32:
// 4-byte entries) or l mod 16 (of 16: k=2's 8-byte entries, which a warp reads in two half-warp passes), so lookups
// never conflict. Byte-sized keys (k=2, k=4) become table offsets in one byte permute (key at bits 8-15: 256-byte
// rows, the copies below); other keys take a shift and a mask (128-byte rows). Tables: k=2 and k=4 64 KB (each uses
// half of every row: 16 copies of 8 bytes, 32 of 4), k=3 8 KB, k=5 4 KB. k=2 with 32 copies built twice the table
// for the same lookups: on an H100, 16 ran 1.00x at M = 1 and 1.04x at M = 16 (geomean; 0.97-1.08x per layer).
//
// Work split. The unit of work is a set of row tiles (32 rows each) over all of K, so a unit ends in finished outputs:
// no workspace, no atomics, deterministic. The warps of a block split a unit's column tiles (K-slices) and their sums
// meet in shared memory at the unit's end, where the Problem stores them. Blocks are persistent, one per multiprocessor
// with block_warps(NT) warps (the table is built once per block), and take units blockIdx.x, blockIdx.x + gridDim.x,
// ... Each lane streams its tiles, unit after unit, through a ring of tiles held in registers (16-80 KB in flight per
// multiprocessor, by k and token tiles): the ring is filled before the table is built, and a slot is refilled with the
// lane's next tile (also one of the next unit) as soon as it is decoded. Activations are read per block straight from
// global memory through L1 (they are small and shared by every row tile).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <utility>

#include "kbit_format.cuh"
#include "kbit_ops.h"

namespace kbit {
namespace mma_core {

// Token tiles (the n8 columns of the MMA) of a launch for M tokens: 8 tokens each, up to kMaxTokenTiles.
constexpr int kMaxTokenTiles = 8;
constexpr int kMaxLaunchTokens = 8 * kMaxTokenTiles;
__host__ __device__ constexpr int token_tiles(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }
// Warps per block for NT token tiles. A block runs alone on its multiprocessor; 16 warps hide latency best, but
// they leave 128 registers per thread: NT = 4 (32 accumulators, and 64 registers of B fragments: a column tile's,
// accumulate_tile) fits with a ring of one tile (k = 2 spills a few bytes; 3-23% faster than 8 warps with a ring of
// four on an H100); NT = 8 would spill hundreds of bytes (35% slower), so it runs 8 warps.
__host__ __device__ constexpr int block_warps(int nt) { return nt <= 4 ? 16 : 8; }
// Floats per (warp, token) row of the partial sums: 32 rows + 1 (at most 2 lanes of a warp store to one bank).
constexpr int kPartialStride = kTileRows + 1;

template <int BITS>
struct Lut {
    static constexpr int kKeyWeights = BITS == 2 ? 4 : BITS == 5 ? 1 : 2;
    static constexpr int kKeyBits = BITS * kKeyWeights;
    static constexpr int kEntryBytes = kKeyWeights == 4 ? 8 : 4;
    static constexpr int kRowShift = kKeyBits == 8 ? 8 : 7;           // bytes per entry row: 256 or 128
    static constexpr int kBytes = (1 << kKeyBits) << kRowShift;
    static constexpr int kCopies = 128 / kEntryBytes;                  // one 128-byte pass of the warp's lanes
    static constexpr int kRowVectors = kCopies * kEntryBytes / 16;     // 16-byte vectors of copies per row
    static constexpr int kVectors = (1 << kKeyBits) * kRowVectors;   // vectors written by build_lut
    static_assert(kVectors % 32 == 0, "build_lut runs whole warps");
    // byte offset, within an entry's row, of the copy that `lane` reads
    static __device__ __forceinline__ uint32_t copy_bytes(int lane) { return (lane % kCopies) * kEntryBytes; }
};

// Tiles in flight per lane: 4 * BITS registers each, about 32-40 registers of ring whatever BITS; NT = 4's
// accumulators and B fragments leave room for one tile (at 16 warps), NT = 8's (96 registers, at 8 warps) for the
// base ring.
template <int BITS, int NT>
constexpr int kRingDepth = NT == 4 ? 1 : BITS == 2 ? 4 : BITS == 3 ? 3 : 2;

// Whether the MMA loop checks the activation pointers for null (an empty token slot: zeros). Where it does not, the
// kernel points empty slots at token 0's row (their sums are never stored). On an H100, without the checks k = 4 ran
// 4-12% faster at M = 64; k = 2 then spills and ran 0-5% slower, and every NT <= 4 kernel (empty slots reading a row
// as well) ran up to 9% slower at M = 1.
template <int BITS, int NT>
constexpr bool kCheckedTokens = NT < kMaxTokenTiles || BITS == 2;

// What every problem shares: the weight (in the kernel layout; several stacked weights form one [E * N, K] layout)
// and the work split. Problem-specific pointers and the output live in the Problem (see mma_kernel).
struct MmaParams {
    const uint4* qweight;
    const uint4* absmax;
    const float* scale;
    Codebook codebook;
    int m;            // activation rows (tokens) per unit, <= 8 NT: sizes the partial sums
    int k, groups;
    int slices_log2;  // K-slices (warps) per row tile; a unit is block_warps(NT) >> slices_log2 row tiles
    int steps;        // column tiles per K-slice and row tile: ceil(groups / slices)
    bool chained;     // a launch of the same op follows this one and may start early (allow_next_grid)
};

// What differs between fp16 and bf16 activations.
template <typename T>
struct Act;

template <>
struct Act<__half> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                               const float (&c)[4]) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%10, %11, %12, %13};"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
              "f"(c[3]));
    }
    static __device__ __forceinline__ void store(void* out, long long i, float v) {
        static_cast<__half*>(out)[i] = __float2half_rn(v);
    }
    // (v, v) for v the low (high = false) or high half of the fp16 pair `h2`
    static __device__ __forceinline__ uint32_t broadcast(uint32_t h2, bool high) {
        return __byte_perm(h2, 0, high ? 0x3232 : 0x1010);
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
        return *reinterpret_cast<const uint32_t*>(&r);
    }
};

template <>
struct Act<__nv_bfloat16> {
    static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
        const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
    static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                               const float (&c)[4]) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
            "{%10, %11, %12, %13};"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
              "f"(c[3]));
    }
    static __device__ __forceinline__ void store(void* out, long long i, float v) {
        static_cast<__nv_bfloat16*>(out)[i] = __float2bfloat16_rn(v);
    }
    // (v, v) in bf16 for v the low (high = false) or high half of the fp16 pair `h2` (exact for E4M4 values)
    static __device__ __forceinline__ uint32_t broadcast(uint32_t h2, bool high) {
        const __half v = __ushort_as_half(static_cast<unsigned short>(high ? h2 >> 16 : h2 & 0xffff));
        const float f = __half2float(v);
        return pack(f, f);
    }
    static __device__ __forceinline__ uint32_t mul(uint32_t a, uint32_t b) {
        const __nv_bfloat162 r =
            __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
        return *reinterpret_cast<const uint32_t*>(&r);
    }
};

// Programmatic dependent launch (sm_90+) between the launches of one op (gate/up -> down -> sum of the MoE experts,
// the chunks of a long dense M): a launch that allows it (allow_next_grid) lets the next launch of the op start while
// it finishes, so that one's weight loads and table build overlap its tail; that one waits for its completion
// (wait_for_prior_grid) before reading what it wrote or writing anything. Weights (and the MoE down launch's
// routing) are read before the wait, which is safe because only launches of the same op start early
// (launch_kernel): the first launch of an op starts as any launch does, after whatever kernel came before it has
// finished, so a benchmark of back-to-back calls also measures what a model gets.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_next_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Weights are read once: keep them out of L1.
__device__ __forceinline__ uint4 load_streaming(const uint4* ptr) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(ptr));
    return v;
}

template <int BITS>
__device__ __forceinline__ void load_tile(const uint4* src, uint32_t (&w)[4 * BITS]) {
#pragma unroll
    for (int v = 0; v < BITS; ++v) {
        const uint4 q = load_streaming(src + v * 32);
        w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
    }
}

// cb: codebook[lane mod 2^BITS], so that any lane can fetch any codebook value with one shuffle.
template <int BITS, typename T>
__device__ void build_lut(uint4* lut, float cb) {
    using L = Lut<BITS>;
    constexpr int kMask = (1 << BITS) - 1;
    for (int q = threadIdx.x; q < L::kVectors; q += blockDim.x) {
        const int key = q / L::kRowVectors;
        const auto value = [&](int index) { return __shfl_sync(~0u, cb, index); };
        uint4 v;
        if constexpr (L::kKeyWeights == 4) {
            const uint32_t lo = Act<T>::pack(value(key & kMask), value((key >> BITS) & kMask));
            const uint32_t hi = Act<T>::pack(value((key >> 2 * BITS) & kMask), value(key >> 3 * BITS));
            v = make_uint4(lo, hi, lo, hi);
        } else {
            const uint32_t pair = L::kKeyWeights == 2 ? Act<T>::pack(value(key & kMask), value(key >> BITS))
                                                      : Act<T>::pack(value(key), value(key));
            v = make_uint4(pair, pair, pair, pair);
        }
        lut[(key << L::kRowShift) / 16 + q % L::kRowVectors] = v;
    }
}

// Table reads by 32-bit shared-window address (volatile: they must stay behind the barrier after the table build).
__device__ __forceinline__ uint32_t lut_word(uint32_t address) {
    uint32_t v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(address));
    return v;
}

__device__ __forceinline__ uint2 lut_word_pair(uint32_t address) {
    uint2 v;
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "r"(address));
    return v;
}

// Table address (this lane's copy) of the key whose stream field starts at bit `pos`.
template <int BITS, int NW>
__device__ __forceinline__ uint32_t key_address(const uint32_t (&w)[NW], int pos, uint32_t lut, uint32_t copy_bytes) {
    if constexpr (Lut<BITS>::kRowShift == 8) {
        // result bytes: copy_bytes (< 256), the key byte, 0, 0
        return lut + __byte_perm(w[pos / 32], copy_bytes, 0x5504 | (pos / 8 % 4) << 4);
    } else {
        return lut + (stream_field(w, pos, Lut<BITS>::kKeyBits, Lut<BITS>::kRowShift) | copy_bytes);
    }
}

// The A fragment of rows j = 2 rt (registers 0, 2) and 2 rt + 1 (registers 1, 3), inputs t = 4 s + 0..3
// (registers 0, 1: t = 4 s, 4 s + 1; registers 2, 3: t = 4 s + 2, 4 s + 3) of block b.
template <int BITS>
__device__ __forceinline__ void a_fragment(const uint32_t (&w)[4 * BITS], int b, int rt, int s, uint32_t lut,
                                           uint32_t copy_bytes, uint32_t (&a)[4]) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
        const int t = 4 * s + 2 * q;
        if constexpr (Lut<BITS>::kKeyWeights == 4) {
            // one key: rows 2 rt, 2 rt + 1 x inputs t, t + 1 (stream_index), registers 2 q and 2 q + 1 side by side
            const uint2 v = lut_word_pair(key_address<BITS>(w, BITS * stream_index(b, 2 * rt, t), lut, copy_bytes));
            a[2 * q] = v.x, a[2 * q + 1] = v.y;
        } else {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int j = 2 * rt + h;
                if constexpr (Lut<BITS>::kKeyWeights == 2) {
                    a[2 * q + h] = lut_word(key_address<BITS>(w, BITS * stream_index(b, j, t), lut, copy_bytes));
                } else {
                    const uint32_t lo = lut_word(key_address<BITS>(w, BITS * stream_index(b, j, t), lut, copy_bytes));
                    const uint32_t hi =
                        lut_word(key_address<BITS>(w, BITS * stream_index(b, j, t + 1), lut, copy_bytes));
                    a[2 * q + h] = __byte_perm(lo, hi, 0x5410);  // low halves: (value t, value t + 1)
                }
            }
        }
    }
}

// absmax / 16 of rows j = 0..3 of block b of a tile (byte j of the block's code word in the lane's `codes`) as fp16
// pairs: rows 0, 1 (h01) and rows 2, 3 (h23).
__device__ __forceinline__ void block_absmax_pairs(uint4 codes, int b, uint32_t& h01, uint32_t& h23) {
    const uint32_t word = b == 0 ? codes.x : b == 1 ? codes.y : b == 2 ? codes.z : codes.w;
    h01 = e4m4_pair_as_half2_div16(__byte_perm(word, 0, 0x4140));
    h23 = e4m4_pair_as_half2_div16(__byte_perm(word, 0, 0x4342));
}

// Those absmax as (v, v) pairs of T, one per row j: the multipliers of A fragments (row[2 rt + r % 2] for register r
// of row half rt).
template <typename T>
struct RowMultipliers {
    uint32_t row[kLaneRows];
    __device__ __forceinline__ RowMultipliers(uint32_t h01, uint32_t h23)
        : row{Act<T>::broadcast(h01, false), Act<T>::broadcast(h01, true), Act<T>::broadcast(h23, false),
              Act<T>::broadcast(h23, true)} {}
};

// acc += this lane's share of tile (rowtile, column tile kt) . x: acc[rt][nt][i] is row 16 rt + 8 (i / 2) + G,
// token 8 nt + 2 c + i % 2 (the mma accumulator layout), in units of the row scale / 16.
// x_lane[nt]: this lane's 16-byte activations of token G + 8 nt, column tile 0 (null where there is no token, or
// token 0's where !kCheckedTokens).
template <int BITS, int NT, typename T>
__device__ __forceinline__ void accumulate_tile(const MmaParams& p, const uint32_t (&w)[4 * BITS], uint4 codes,
                                                int kt, const uint4* const (&x_lane)[NT], uint32_t lut,
                                                uint32_t copy_bytes, float (&acc)[2][NT][4]) {
    // NT = 1: one FFMA per accumulator and block applies the absmax; NT >= 2: the weights are scaled instead, and
    // so for k = 2 at NT = 1, where the decode is cheapest and the FFMAs weigh most (3-9% faster on an H100).
    constexpr bool kScaleWeights = NT >= 2 || BITS == 2;
    constexpr float kZero[4] = {0.f, 0.f, 0.f, 0.f};
    // B fragments of block b: token G + 8 nt, inputs 8 c .. 8 c + 7 (steps s = 0, 1 take halves). For NT <= 2 the
    // column tile's address is formed once (as an integer: x_lane[nt] may be null), so that each block's load
    // takes a constant offset from it instead of its own 64-bit address arithmetic: on an H100 the MoE experts ran
    // 1.01-1.03x at M = 1..16, dense layers 1.00-1.03x at M = 1 and broke even at M = 8..16. At NT >= 4 the extra
    // pointers spill (benchmarks/kernel_experiments.md).
    constexpr bool kColumnBase = NT <= 2;
    const uint4* x_column[NT];
    if constexpr (kColumnBase) {
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            x_column[nt] = reinterpret_cast<const uint4*>(reinterpret_cast<uintptr_t>(x_lane[nt]) +
                                                          static_cast<uintptr_t>(kt) * kTileK * sizeof(T));
        }
    }
    const auto load_x = [&](int b, uint4 (&xf)[NT]) {
        const bool inside = kt * kTileK + b * kBlockSize < p.k;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            xf[nt] = inside && (!kCheckedTokens<BITS, NT> || x_lane[nt] != nullptr)
                         ? __ldg(kColumnBase ? x_column[nt] + b * (kBlockSize / 8)
                                             : x_lane[nt] + kt * (kTileK / 8) + b * (kBlockSize / 8))
                         : make_uint4(0, 0, 0, 0);
        }
    };
    // Loaded per block, or for NT = 4 (a ring of one tile: little else in flight) all four blocks up front, so that
    // their latencies overlap: at M = 32, k = 4, 1.01-1.10x on the Llama-3 layers (Llama-3-8B gate_up 1.09-1.10x;
    // two runs on two H100s), 0.98-1.04x at k = 2 and on Qwen3-Next's. Up front at every NT ran 0.92-0.96x on some
    // layers at M = 16 and 64 (benchmarks/kernel_experiments.md).
    constexpr bool kUpfront = NT == 4;
    uint4 x_tile[kTileBlocks][NT];  // unrolled: per block, registers only while that block's fragments are live
    if constexpr (kUpfront) {
#pragma unroll
        for (int b = 0; b < kTileBlocks; ++b) load_x(b, x_tile[b]);
    }
    // No branch between the blocks, so that the compiler can overlap one block's lookups with another's MMAs: K
    // padding blocks multiply zero activations (and have absmax 0).
#pragma unroll
    for (int b = 0; b < kTileBlocks; ++b) {
        if constexpr (!kUpfront) load_x(b, x_tile[b]);
        const uint4(&xf)[NT] = x_tile[b];
        uint32_t h01, h23;
        block_absmax_pairs(codes, b, h01, h23);

        if constexpr (kScaleWeights) {
            const RowMultipliers<T> absmax(h01, h23);
#pragma unroll
            for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    uint32_t a[4];
                    a_fragment<BITS>(w, b, rt, s, lut, copy_bytes, a);
#pragma unroll
                    for (int r = 0; r < 4; ++r) a[r] = Act<T>::mul(a[r], absmax.row[2 * rt + r % 2]);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        Act<T>::mma(acc[rt][nt], a, s == 0 ? xf[nt].x : xf[nt].z, s == 0 ? xf[nt].y : xf[nt].w,
                                    acc[rt][nt]);
                    }
                }
            }
        } else {
            const float2 s01 = __half22float2(*reinterpret_cast<const __half2*>(&h01));
            const float2 s23 = __half22float2(*reinterpret_cast<const __half2*>(&h23));
            const float absmax[kLaneRows] = {s01.x, s01.y, s23.x, s23.y};
#pragma unroll
            for (int rt = 0; rt < 2; ++rt) {
                float block_acc[NT][4];
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    uint32_t a[4];
                    a_fragment<BITS>(w, b, rt, s, lut, copy_bytes, a);
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
                        if (s == 0) {
                            Act<T>::mma(block_acc[nt], a, xf[nt].x, xf[nt].y, kZero);
                        } else {
                            Act<T>::mma(block_acc[nt], a, xf[nt].z, xf[nt].w, block_acc[nt]);
                        }
                    }
                }
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        acc[rt][nt][i] = fmaf(block_acc[nt][i], absmax[2 * rt + i / 2], acc[rt][nt][i]);
                    }
                }
            }
        }
    }
}

// The persistent kernel. Problem (a trivially copyable struct, passed by value) provides:
//   struct Shared                    its per-block shared memory (after the table and the partial sums);
//   setup(Shared&)                   run by all threads first (may synchronize the block); it calls
//                                    wait_for_prior_grid() before reading inputs that the previous launch on
//                                    the stream may have written;
//   units(const Shared&)             the number of units;
//   rowtile(const Shared&, unit, sub) the row tile (of the stacked layout) that the warps `sub` (0 ..
//                                    block_warps(NT) >> slices_log2) of `unit` decode, or -1 (none; also for
//                                    unit >= units);
//   begin_unit(Shared&, p, unit, warp, lane, x_lane, slot_factor)
//                                    per warp, before the unit is decoded: this lane's activation pointers
//                                    (x_lane[nt]: 16-byte activations of token G + 8 nt, column tile 0, at input
//                                    8 c; null where there is no token; slot 0 always holds one where the warp
//                                    has a row tile) and the factor of token `lane`'s outputs (slot_factor, e.g.
//                                    a routing weight; 1 for none);
//   store<T>(const Shared&, partial, p, unit)
//                                    all threads, once the unit's partial sums are in shared memory (sum them
//                                    with slice_sum: row scale and token factor are applied); the block
//                                    synchronizes before and after.
// The row scales of a unit and the token factors are loaded when the unit starts and applied to the sums before
// they go to shared memory, so that no global load stands between the unit's last MMA and its stores.
template <class Problem, int BITS, int NT, typename T>
__global__ void __launch_bounds__(block_warps(NT) * 32, 1) mma_kernel(const MmaParams p, const Problem prob) {
    extern __shared__ uint4 smem[];  // the table (Lut<BITS>::kBytes), the partial sums
                                     // [block_warps(NT)][p.m][kPartialStride], then Problem::Shared
    uint4* lut = smem;
    float* partial = reinterpret_cast<float*>(smem + Lut<BITS>::kBytes / 16);
    auto& shared = *reinterpret_cast<typename Problem::Shared*>(partial + block_warps(NT) * p.m * kPartialStride);
    constexpr int R = kRingDepth<BITS, NT>;

    // The warp index through a shuffle from lane 0: provably uniform across the warp to the compiler, so per-warp
    // values and branches use the uniform datapath, and the table base folds into each lookup ([R + UR]).
    const int lane = threadIdx.x & 31, warp = __shfl_sync(~0u, threadIdx.x >> 5, 0);
    const int G = lane >> 2;
    const int slices = 1 << p.slices_log2;
    const int slice = warp & (slices - 1), sub = warp >> p.slices_log2;  // K-slice, row tile within the unit
    prob.setup(shared);
    const int units = prob.units(shared);
    // The warp's items are (unit, step t): column tile slice + t * slices of its row tile, p.steps per unit. Warps
    // whose tile is outside the weight skip it, so that all warps walk the same sequence and reach unit ends
    // together.
    // The rounds are counted, not divided (for the dense problem, no division precedes the first weight loads).
    int rounds = 0;
    for (int u = blockIdx.x; u < units; u += gridDim.x) ++rounds;
    const int items = rounds * p.steps;
    // Uniform across the block. A Problem's setup waits before this where it must (the MoE gate/up launch: the down
    // launch after it reads the routing before its own wait).
    if (items == 0) return;

    uint32_t w[R][4 * BITS];
    uint4 codes[R];
    // The next item to load: its row tile, column tile and addresses.
    int load_unit = blockIdx.x, load_step = 0, load_rowtile = 0, load_kt = 0;
    const uint4* load_weights = nullptr;
    const uint4* load_codes = nullptr;
    const auto start_unit = [&]() {
        load_rowtile = prob.rowtile(shared, load_unit, sub), load_kt = slice;
        load_weights = p.qweight + tile_vector_offset(BITS, p.groups, load_rowtile, load_kt, lane);
        load_codes = p.absmax + tile_absmax_offset(p.groups, load_rowtile, load_kt, G);
    };
    const auto load_next = [&](int slot) {
        if (load_rowtile >= 0 && load_kt < p.groups) {
            load_tile<BITS>(load_weights, w[slot]);
            codes[slot] = load_streaming(load_codes);
        }
        if (++load_step < p.steps) {
            load_kt += slices, load_weights += slices * BITS * 32, load_codes += slices * 8;
        } else {
            load_step = 0, load_unit += gridDim.x;
            start_unit();
        }
    };
    start_unit();
#pragma unroll
    for (int i = 0; i < R; ++i) {
        if (i < items) load_next(i);
    }
    build_lut<BITS, T>(lut, p.codebook.value[lane & ((1 << BITS) - 1)]);
    wait_for_prior_grid();  // from here on: activations, and the stores of the units
    if (p.chained) allow_next_grid();

    const uint32_t lut_address = static_cast<uint32_t>(__cvta_generic_to_shared(lut));
    const uint32_t copy_bytes = Lut<BITS>::copy_bytes(lane);
    const uint4* x_lane[NT];
    int unit = blockIdx.x, step = 0;  // the item being decoded
    int rowtile;
    float row_scale, slot_factor;  // of row `lane` of the warp's row tile, of token slot `lane`
    const auto begin_unit = [&]() {
        rowtile = prob.rowtile(shared, unit, sub);
        // x 16: the MMA sums carry absmax / 16 (e4m4_pair_as_half2_div16)
        row_scale = rowtile >= 0 ? __ldg(p.scale + static_cast<long long>(rowtile) * kTileRows + lane) * 16.f : 0.f;
        prob.begin_unit(shared, p, unit, warp, lane, x_lane, slot_factor);
        if constexpr (!kCheckedTokens<BITS, NT>) {  // empty slots read token 0's row (lane c's x_lane[0])
            const auto token0 = reinterpret_cast<uintptr_t>(x_lane[0]);
            const uint32_t lo = __shfl_sync(~0u, static_cast<uint32_t>(token0), lane & 3);
            const uint32_t hi = __shfl_sync(~0u, static_cast<uint32_t>(token0 >> 32), lane & 3);
            const auto* row0 = reinterpret_cast<const uint4*>(static_cast<uintptr_t>(hi) << 32 | lo);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) x_lane[nt] = x_lane[nt] != nullptr ? x_lane[nt] : row0;
        }
    };
    begin_unit();
    __syncthreads();  // the table
    float acc[2][NT][4] = {};
    for (int base = 0; base < items; base += R) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
            if (base + i >= items) break;  // uniform across the block
            const int kt = slice + step * slices;
            if (rowtile >= 0 && kt < p.groups) {
                accumulate_tile<BITS, NT, T>(p, w[i], codes[i], kt, x_lane, lut_address, copy_bytes, acc);
            }
            if (base + i + R < items) load_next(i);
            if (++step < p.steps) continue;
            // End of the unit: the K-slices' sums, scaled, go through shared memory to the Problem's store.
            const int c = lane & 3;
            float scale_of_row[2][2], factor_of_token[NT][2];  // rows 16 rt + 8 h + G, tokens 8 nt + 2 c + i
#pragma unroll
            for (int i = 0; i < 4; ++i) scale_of_row[i / 2][i % 2] = __shfl_sync(~0u, row_scale, 8 * i + G);
#pragma unroll
            for (int i = 0; i < 2 * NT; ++i) {
                factor_of_token[i / 2][i % 2] = __shfl_sync(~0u, slot_factor, 8 * (i / 2) + 2 * c + i % 2);
            }
#pragma unroll
            for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const int m = 8 * nt + 2 * c + r % 2, row = 16 * rt + 8 * (r / 2) + G;
                        if (m < p.m) {
                            partial[(warp * p.m + m) * kPartialStride + row] =
                                acc[rt][nt][r] * (scale_of_row[rt][r / 2] * factor_of_token[nt][r % 2]);
                        }
                        acc[rt][nt][r] = 0.f;
                    }
                }
            }
            __syncthreads();
            prob.template store<T>(shared, partial, p, unit);
            __syncthreads();
            step = 0, unit += gridDim.x;
            if (unit < units) begin_unit();
        }
    }
}

// first[0] + first[stride] + ... + first[(N - 1) stride], as a tree of adds (a fixed order): its loads all in flight
// and log2(N) dependent adds, on the path from the last MMA of a unit to its stores.
template <int N>
__device__ __forceinline__ float pairwise_sum(const float* first, int stride) {
    float v[N];
#pragma unroll
    for (int q = 0; q < N; ++q) v[q] = first[q * stride];
#pragma unroll
    for (int level = 1; level < N; level *= 2) {  // v[q] += v[q + level] for q a multiple of 2 level
#pragma unroll
        for (int q = 0; q + level < N; q += 2 * level) v[q] += v[q + level];
    }
    return v[0];
}

// Sum over the K-slices (at most block_warps(1) = 16), in a fixed order, of row `row` (0..31) of row tile `rs` of the
// unit, token m: the output with its row scale and token factor.
__device__ __forceinline__ float slice_sum(const float* partial, const MmaParams& p, int rs, int m, int row) {
    static_assert(block_warps(1) <= 16, "more K-slices than the cases below (block_warps is largest at NT = 1)");
    const float* first = partial + ((rs << p.slices_log2) * p.m + m) * kPartialStride + row;
    const int stride = p.m * kPartialStride;
    switch (p.slices_log2) {
        case 0: return first[0];
        case 1: return pairwise_sum<2>(first, stride);
        case 2: return pairwise_sum<4>(first, stride);
        case 3: return pairwise_sum<8>(first, stride);
        default: return pairwise_sum<16>(first, stride);
    }
}

// The activation pointer of lane (G, c) for activation row `row` (null for row < 0).
__device__ __forceinline__ const uint4* lane_activations(const void* x, int k, int row, int c) {
    return row < 0 ? nullptr
                   : static_cast<const uint4*>(x) + (static_cast<size_t>(row) * k + kLaneInputs * c) / 8;
}

constexpr int kMaxDevices = 64;

inline int current_device() {
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    return dev;
}

// An attribute of the current device, cached per device.
template <cudaDeviceAttr ATTRIBUTE>
int device_attribute() {
    static std::array<int, kMaxDevices> cached{};
    const int dev = current_device();
    if (dev < kMaxDevices && cached[dev] != 0) return cached[dev];
    int value = 0;
    check_cuda(cudaDeviceGetAttribute(&value, ATTRIBUTE, dev), "cudaDeviceGetAttribute");
    if (dev < kMaxDevices) cached[dev] = value;
    return value;
}

inline int multiprocessors() { return device_attribute<cudaDevAttrMultiProcessorCount>(); }

// K-slices per row tile (log2): enough warps for every column tile, up to `max_slices` (then each warp takes
// several); a block whose warps outnumber the column tiles works on several row tiles at once.
inline int slices_log2_for(int groups, int max_slices) {
    int s = 0;
    while ((1 << s) < groups && (1 << s) < max_slices) ++s;
    return s;
}

inline MmaParams make_params(const KernelWeight& w, int m, int max_slices, bool chained) {
    const int groups = k_groups(w.k);
    const int slices_log2 = slices_log2_for(groups, max_slices);
    const int slices = 1 << slices_log2;
    return {static_cast<const uint4*>(w.qweight), static_cast<const uint4*>(w.absmax), w.scale, w.codebook, m, w.k,
            groups, slices_log2, (groups + slices - 1) / slices, chained};
}

// The K-split of a launch (K-slices per row tile, and so row tiles per unit): of make_params' splits for max_slices
// = most, most / 2, ..., 1, the one whose busiest block finishes first by a simple cost, rounds(p) x (column tiles
// per warp and unit + 1), where a round is one unit on every block and the 1 stands for a unit's end (its barriers,
// the sums through shared memory, the stores, the restart of the warps' load pipelines), which measured about a
// column tile's time; on a tie, fewer K-slices (fewer barriers; more warps also read the same activations through
// L1). On an H100 this picks the fastest of the 4-5 splits measured for every dense benchmark shape and M
// (benchmarks/kernel_experiments.md).
template <class Rounds>
MmaParams least_cost_split(const KernelWeight& w, int m, int most, bool chained, Rounds&& rounds) {
    const auto cost = [&](const MmaParams& p) { return rounds(p) * (p.steps + 1.0); };
    MmaParams best = make_params(w, m, most, chained);
    double best_cost = cost(best);
    for (int max_slices = most / 2; max_slices >= 1; max_slices /= 2) {
        const MmaParams fewer = make_params(w, m, max_slices, chained);
        const double fewer_cost = cost(fewer);
        if (fewer_cost <= best_cost) best = fewer, best_cost = fewer_cost;
    }
    return best;
}

// Bytes of the table for `bits` (Lut<bits>::kBytes at run time).
inline size_t lut_bytes(int bits) {
    switch (bits) {
        case 2: return Lut<2>::kBytes;
        case 3: return Lut<3>::kBytes;
        case 4: return Lut<4>::kBytes;
        default: return Lut<5>::kBytes;
    }
}

// Dynamic shared memory of a launch for m tokens: the table, the partial sums, then `problem_bytes`.
inline size_t launch_smem(int bits, int m, size_t problem_bytes) {
    return lut_bytes(bits) + problem_bytes +
           static_cast<size_t>(block_warps(token_tiles(m))) * m * kPartialStride * sizeof(float);
}

// Most tokens one launch can take on this device. On sm_86 / sm_89 (99 KB per block) the 64 KB tables of k = 2 and
// 4 leave room for the partial sums of 16 tokens (8 in the MoE kernel); k = 3 and 5 take 64.
inline int max_launch_tokens(int bits, size_t problem_bytes) {
    const int limit = device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>();
    int m = kMaxLaunchTokens;
    while (m > 8 && launch_smem(bits, m, problem_bytes) > static_cast<size_t>(limit)) m /= 2;
    return m;
}

// Whether KERNEL may start early on the current device: sm_90+, and code built for it (PTX for an older architecture,
// JIT-compiled for this GPU, lacks the wait). Cached per device.
template <auto KERNEL>
bool early_start_supported() {
    static std::array<signed char, kMaxDevices> known{};  // 0 unknown, 1 yes, -1 no
    const int dev = current_device();
    if (dev < kMaxDevices && known[dev] != 0) return known[dev] > 0;
    cudaFuncAttributes attributes{};
    check_cuda(cudaFuncGetAttributes(&attributes, KERNEL), "cudaFuncGetAttributes");
    const bool yes = device_attribute<cudaDevAttrComputeCapabilityMajor>() >= 9 && attributes.ptxVersion >= 90;
    if (dev < kMaxDevices) known[dev] = yes ? 1 : -1;
    return yes;
}

// Launches KERNEL; with early_start (the launch before it on the stream is one of the same op that allows it), it
// may start before that launch has finished, where early_start_supported.
template <auto KERNEL, typename... Args>
void launch_kernel(bool early_start, int grid, int block, size_t smem, cudaStream_t stream, const char* what,
                   Args&&... args) {
    cudaLaunchAttribute attribute{};
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(block);
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = early_start && early_start_supported<KERNEL>() ? 1 : 0;
    check_cuda(cudaLaunchKernelEx(&config, KERNEL, std::forward<Args>(args)...), what);
}

// Lets KERNEL use `bytes` of dynamic shared memory (more than 48 KB needs an opt-in), once per device.
template <auto KERNEL>
void allow_dynamic_smem(size_t bytes, const char* what) {
    static std::array<bool, kMaxDevices> opted_in{};
    const int dev = current_device();
    if (dev < kMaxDevices && opted_in[dev]) return;
    check_cuda(cudaFuncSetAttribute(KERNEL, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what);
    if (dev < kMaxDevices) opted_in[dev] = true;
}

template <class Problem, int BITS, int NT, typename T>
void launch(const MmaParams& p, const Problem& prob, int grid, bool early_start, cudaStream_t stream) {
    // The table and the partial sums take more than 48 KB: the most this kernel will use (8 NT tokens).
    allow_dynamic_smem<mma_kernel<Problem, BITS, NT, T>>(launch_smem(BITS, 8 * NT, sizeof(typename Problem::Shared)),
                                                         "cudaFuncSetAttribute(mma_kernel)");
    launch_kernel<mma_kernel<Problem, BITS, NT, T>>(early_start, grid, block_warps(NT) * 32,
                                                    launch_smem(BITS, p.m, sizeof(typename Problem::Shared)), stream,
                                                    "mma kernel launch", p, prob);
}

// Calls f(std::integral_constant<int, B>{}, T{}) for the runtime bits B and activation dtype T.
template <class F>
void with_bits_and_dtype(int bits, DType dtype, F&& f) {
    const auto by_bits = [&](auto act) {
        switch (bits) {
            case 2: f(std::integral_constant<int, 2>{}, act); break;
            case 3: f(std::integral_constant<int, 3>{}, act); break;
            case 4: f(std::integral_constant<int, 4>{}, act); break;
            case 5: f(std::integral_constant<int, 5>{}, act); break;
            default: throw std::invalid_argument("vllm_kbit: bits must be 2, 3, 4 or 5");
        }
    };
    if (dtype == DType::kFloat16) {
        by_bits(__half{});
    } else {
        by_bits(__nv_bfloat16{});
    }
}

// Instantiates the kernel for the runtime bits, token tiles (token_tiles(p.m), at most MAX_NT) and dtype;
// early_start: see launch_kernel.
template <class Problem, int MAX_NT>
void launch_any(const MmaParams& p, const Problem& prob, int bits, DType dtype, int grid, bool early_start,
                cudaStream_t stream) {
    with_bits_and_dtype(bits, dtype, [&](auto bits_constant, auto act) {
        using T = decltype(act);
        constexpr int B = decltype(bits_constant)::value;
        switch (token_tiles(p.m)) {
            case 1: launch<Problem, B, 1, T>(p, prob, grid, early_start, stream); break;
            case 2: if constexpr (MAX_NT >= 2) launch<Problem, B, 2, T>(p, prob, grid, early_start, stream); break;
            case 4: if constexpr (MAX_NT >= 4) launch<Problem, B, 4, T>(p, prob, grid, early_start, stream); break;
            default: if constexpr (MAX_NT >= 8) launch<Problem, B, 8, T>(p, prob, grid, early_start, stream); break;
        }
    });
}

}  // namespace mma_core
}  // namespace kbit
