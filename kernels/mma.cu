// MMA tier (M = 1..16): out [M, n] = x [M, k] @ W^T with W in the kernel layout, read once from HBM and decoded in
// registers straight into tensor-core operands, so the decode cost per weight does not depend on M (M <= 8 takes
// one MMA per fragment, M <= 16 two).
//
// Product. Per 32 x 32 block (32 rows, one quantization block of inputs) of a tile, each lane of the warp holds
// the A fragments of mma.sync m16n8k16 for two 16-row halves x two 16-input steps (the layout's lane map,
// kbit_format.cuh), x supplies the B fragments (tokens as the n8 columns; M > 8 takes two), and the fp32
// accumulators of the block are multiplied by the rows' absmax and added to the running sums: one FFMA per
// accumulator per block. The row scale is applied once per output. Activations enter the MMA in their own dtype
// (fp16 or bf16), so no range scaling is needed; the codebook is rounded to that dtype.
//
// Decode. A shared-memory table maps a key, the contiguous stream field of several adjacent weights, to their
// codebook values as packed 16-bit pairs: k=2 keys 4 weights (8 bits, 8-byte entries: two A registers), k=3 and
// k=4 key a pair (6 / 8 bits: one A register), k=5 keys single weights (a 1024-entry pair table would not fit)
// and two lookups are merged with one byte permute. Each entry has a row of 32 copies, and lane l reads copy l,
// so lookups never conflict. Byte-sized keys (k=2, k=4) become table offsets in one byte permute (key at bits
// 8-15: 256-byte rows, the copies below); other keys take a shift and a mask (128-byte rows). Tables: k=2 and
// k=4 64 KB (k=4 uses half of each row), k=3 8 KB, k=5 4 KB.
//
// Work split. The unit of work is a row tile (32 rows) over all of K, or several row tiles where K has fewer
// column tiles than a block has warps, so a unit ends in finished outputs: no workspace, no atomics,
// deterministic. The warps of a block split a unit's column tiles (K-slices) and their sums meet in shared
// memory at the unit's end. Blocks are persistent, one per multiprocessor with kWarps warps (the table is built
// once per block), and take units blockIdx.x, blockIdx.x + gridDim.x, ... Each lane streams its tiles, unit after
// unit, through a ring of tiles held in registers (about 64 KB in flight per multiprocessor): the ring is filled
// before the table is built, and a slot is refilled with the lane's next tile (also one of the next unit) as
// soon as it is decoded. Activations are read per block straight from global memory through L1 (they are small
// and shared by every row tile).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>

#include "kbit_format.cuh"
#include "kbit_ops.h"

namespace kbit {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
// Floats per (warp, token) row of the partial sums: 32 rows + 1 (at most 2 lanes of a warp store to one bank), so
// that the largest table and the partial sums of M = 16 fit the 99 KB of shared memory of sm_86 / sm_89.
constexpr int kPartialStride = kTileRows + 1;

template <int BITS>
struct Lut {
    static constexpr int kKeyWeights = BITS == 2 ? 4 : BITS == 5 ? 1 : 2;
    static constexpr int kKeyBits = BITS * kKeyWeights;
    static constexpr int kEntryBytes = kKeyWeights == 4 ? 8 : 4;
    static constexpr int kRowShift = kKeyBits == 8 ? 8 : 7;           // bytes per entry row: 256 or 128
    static constexpr int kBytes = (1 << kKeyBits) << kRowShift;
    static constexpr int kRowVectors = 32 * kEntryBytes / 16;         // 16-byte vectors of copies per row
    static constexpr int kVectors = (1 << kKeyBits) * kRowVectors;   // vectors written by build_lut
    static_assert(kVectors % 32 == 0, "build_lut runs whole warps");
};

// Tiles in flight per lane: 4 * BITS registers each, about 32-40 registers of ring whatever BITS.
template <int BITS>
constexpr int kRingDepth = BITS == 2 ? 4 : BITS == 3 ? 3 : 2;

struct MmaParams {
    void* out;
    const uint4* x;
    const uint4* qweight;
    const uint4* absmax;
    const float* scale;
    const float* codebook;
    int m, n, k, groups, rowtiles;
    int slices_log2;  // K-slices (warps) per row tile; a unit is kWarps >> slices_log2 row tiles
    int steps;        // column tiles per K-slice and row tile: ceil(groups / slices)
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
};

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
    for (int q = threadIdx.x; q < L::kVectors; q += kThreads) {
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
    for (int h = 0; h < 2; ++h) {
        const int j = 2 * rt + h;
        if constexpr (Lut<BITS>::kKeyWeights == 4) {
            const uint2 v = lut_word_pair(key_address<BITS>(w, BITS * stream_index(b, j, 4 * s), lut, copy_bytes));
            a[h] = v.x, a[2 + h] = v.y;
        } else {
#pragma unroll
            for (int q = 0; q < 2; ++q) {
                const int t = 4 * s + 2 * q;
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

// acc += this lane's share of tile (rowtile, column tile kt) . x: acc[rt][nt][i] is row 16 rt + 8 (i / 2) + G,
// token 8 nt + 2 c + i % 2 (the mma accumulator layout).
// x_lane[nt]: this lane's 16-byte activations of token G + 8 nt, column tile 0 (null where the token is >= M).
template <int BITS, int NT, typename T>
__device__ __forceinline__ void accumulate_tile(const MmaParams& p, const uint32_t (&w)[4 * BITS], uint4 codes,
                                                int kt, const uint4* const (&x_lane)[NT], uint32_t lut,
                                                uint32_t copy_bytes, float (&acc)[2][NT][4]) {
    constexpr float kZero[4] = {0.f, 0.f, 0.f, 0.f};
    // No branch between the blocks, so that the compiler can overlap one block's lookups with another's MMAs: K
    // padding blocks multiply zero activations (and have absmax 0).
#pragma unroll
    for (int b = 0; b < kTileBlocks; ++b) {
        const bool inside = kt * kTileK + b * kBlockSize < p.k;
        // B fragments: token G + 8 nt, inputs 8 c .. 8 c + 7 of the block (steps s = 0, 1 take halves)
        uint4 xf[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            xf[nt] = inside && x_lane[nt] != nullptr ? __ldg(x_lane[nt] + kt * (kTileK / 8) + b * (kBlockSize / 8))
                                                     : make_uint4(0, 0, 0, 0);
        }
        // absmax / 16 of rows j = 0..3 (byte j of the block's code word)
        const uint32_t word = b == 0 ? codes.x : b == 1 ? codes.y : b == 2 ? codes.z : codes.w;
        uint32_t h01 = e4m4_pair_as_half2_div16(__byte_perm(word, 0, 0x4140));
        uint32_t h23 = e4m4_pair_as_half2_div16(__byte_perm(word, 0, 0x4342));
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

template <int BITS, int NT, typename T>
__global__ void __launch_bounds__(kThreads, 1) mma_kernel(const MmaParams p) {
    extern __shared__ uint4 smem[];  // the table (Lut<BITS>::kBytes), then the partial sums [kWarps][p.m][kPartialStride]
    uint4* lut = smem;
    float* partial = reinterpret_cast<float*>(smem + Lut<BITS>::kBytes / 16);
    constexpr int R = kRingDepth<BITS>;

    // The warp index through a shuffle from lane 0: provably uniform across the warp to the compiler, so per-warp
    // values and branches use the uniform datapath, and the table base folds into each lookup ([R + UR]).
    const int lane = threadIdx.x & 31, warp = __shfl_sync(~0u, threadIdx.x >> 5, 0);
    const int G = lane >> 2, c = lane & 3;
    const int slices = 1 << p.slices_log2;
    const int slice = warp & (slices - 1), sub = warp >> p.slices_log2;  // K-slice, row tile within the unit
    const int unit_rowtiles = kWarps >> p.slices_log2;
    const int units = (p.rowtiles + unit_rowtiles - 1) / unit_rowtiles;
    // The warp's items are (unit, step t): column tile slice + t * slices of its row tile, p.steps per unit. Warps
    // whose tile is outside the weight skip it, so that all warps walk the same sequence and reach unit ends
    // together.
    const int items = (units - blockIdx.x + gridDim.x - 1) / gridDim.x * p.steps;

    uint32_t w[R][4 * BITS];
    uint4 codes[R];
    // The next item to load: its row tile, column tile and addresses.
    int load_unit = blockIdx.x, load_step = 0, load_rowtile = 0, load_kt = 0;
    const uint4* load_weights = nullptr;
    const uint4* load_codes = nullptr;
    const auto start_unit = [&]() {
        load_rowtile = load_unit * unit_rowtiles + sub, load_kt = slice;
        load_weights = p.qweight + tile_vector_offset(BITS, p.groups, load_rowtile, load_kt, lane);
        load_codes = p.absmax + tile_absmax_offset(p.groups, load_rowtile, load_kt, G);
    };
    const auto load_next = [&](int slot) {
        if (load_rowtile < p.rowtiles && load_kt < p.groups) {
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
    build_lut<BITS, T>(lut, __ldg(p.codebook + (lane & ((1 << BITS) - 1))));
    __syncthreads();

    const uint32_t lut_address = static_cast<uint32_t>(__cvta_generic_to_shared(lut));
    const uint4* x_lane[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const int m = G + 8 * nt;
        x_lane[nt] = m < p.m ? p.x + (static_cast<size_t>(m) * p.k + kLaneInputs * c) / 8 : nullptr;
    }
    const uint32_t copy_bytes = lane * Lut<BITS>::kEntryBytes;
    float acc[2][NT][4] = {};
    int unit = blockIdx.x, step = 0;  // the item being decoded
    for (int base = 0; base < items; base += R) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
            if (base + i >= items) break;  // uniform across the block
            const int rowtile = unit * unit_rowtiles + sub, kt = slice + step * slices;
            if (rowtile < p.rowtiles && kt < p.groups) {
                accumulate_tile<BITS, NT, T>(p, w[i], codes[i], kt, x_lane, lut_address, copy_bytes, acc);
            }
            if (base + i + R < items) load_next(i);
            if (++step < p.steps) continue;
            // End of the unit: sum the K-slices in a fixed order and store.
#pragma unroll
            for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        const int m = 8 * nt + 2 * c + r % 2, row = 16 * rt + 8 * (r / 2) + G;
                        if (m < p.m) partial[(warp * p.m + m) * kPartialStride + row] = acc[rt][nt][r];
                        acc[rt][nt][r] = 0.f;
                    }
                }
            }
            __syncthreads();
            for (int o = threadIdx.x; o < unit_rowtiles * p.m * kTileRows; o += kThreads) {
                const int row = o % kTileRows, m = o / kTileRows % p.m, rs = o / kTileRows / p.m;
                const int out_rowtile = unit * unit_rowtiles + rs;
                if (out_rowtile >= p.rowtiles) continue;
                float sum = 0.f;
                for (int q = 0; q < slices; ++q) sum += partial[((rs * slices + q) * p.m + m) * kPartialStride + row];
                const int n = out_rowtile * kTileRows + row;
                Act<T>::store(p.out, static_cast<long long>(m) * p.n + n, sum * (p.scale[n] * 16.f));  // absmax/16
            }
            __syncthreads();
            step = 0, unit += gridDim.x;
        }
    }
}

constexpr int kMaxDevices = 64;

int current_device() {
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    return dev;
}

int multiprocessors() {
    static std::array<int, kMaxDevices> cached{};
    const int dev = current_device();
    if (dev < kMaxDevices && cached[dev] != 0) return cached[dev];
    int value = 0;
    check_cuda(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    if (dev < kMaxDevices) cached[dev] = value;
    return value;
}

template <int BITS, int NT, typename T>
void launch(const MmaParams& p, int grid, cudaStream_t stream) {
    // Up to 64 KB of table and 33 KB of partial sums: above 48 KB a kernel must opt in. Once per device.
    constexpr int kMaxSmem = Lut<BITS>::kBytes + kWarps * kMmaMaxM * kPartialStride * sizeof(float);
    static std::array<bool, kMaxDevices> opted_in{};
    const int dev = current_device();
    if (dev >= kMaxDevices || !opted_in[dev]) {
        check_cuda(cudaFuncSetAttribute(mma_kernel<BITS, NT, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        kMaxSmem),
                   "cudaFuncSetAttribute(mma_kernel)");
        if (dev < kMaxDevices) opted_in[dev] = true;
    }
    const size_t smem = Lut<BITS>::kBytes + static_cast<size_t>(kWarps) * p.m * kPartialStride * sizeof(float);
    mma_kernel<BITS, NT, T><<<grid, kThreads, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "mma kernel launch");
}

template <int BITS, typename T>
void launch_bits(const MmaParams& p, int grid, cudaStream_t stream) {
    if (p.m > 8) {
        launch<BITS, 2, T>(p, grid, stream);
    } else {
        launch<BITS, 1, T>(p, grid, stream);
    }
}

template <typename T>
void launch_dtype(const MmaParams& p, int bits, int grid, cudaStream_t stream) {
    switch (bits) {
        case 2: launch_bits<2, T>(p, grid, stream); break;
        case 3: launch_bits<3, T>(p, grid, stream); break;
        case 4: launch_bits<4, T>(p, grid, stream); break;
        case 5: launch_bits<5, T>(p, grid, stream); break;
        default: throw std::invalid_argument("vllm_kbit.mma: bits must be 2, 3, 4 or 5");
    }
}

}  // namespace

void mma(void* out, const void* x, const KernelWeight& w, int m, DType dtype, cudaStream_t stream) {
    if (m < 1 || m > kMmaMaxM) throw std::invalid_argument("vllm_kbit.mma: M must be in 1..16");
    const int groups = k_groups(w.k);
    // K-slices per row tile: enough warps for every column tile, up to the whole block (then each warp takes
    // several); a block whose warps outnumber the column tiles works on several row tiles at once.
    int slices_log2 = 0;
    while ((1 << slices_log2) < std::min(groups, kWarps)) ++slices_log2;
    const int slices = 1 << slices_log2;
    const int rowtiles = w.n / kTileRows;
    const MmaParams p{out,
                      static_cast<const uint4*>(x),
                      static_cast<const uint4*>(w.qweight),
                      static_cast<const uint4*>(w.absmax),
                      w.scale,
                      w.codebook,
                      m,
                      w.n,
                      w.k,
                      groups,
                      rowtiles,
                      slices_log2,
                      (groups + slices - 1) / slices};
    const int unit_rowtiles = kWarps / slices;
    const int units = (rowtiles + unit_rowtiles - 1) / unit_rowtiles;
    const int grid = std::min(units, multiprocessors());  // persistent: one block per multiprocessor
    if (dtype == DType::kFloat16) {
        launch_dtype<__half>(p, w.bits, grid, stream);
    } else {
        launch_dtype<__nv_bfloat16>(p, w.bits, grid, stream);
    }
}

}  // namespace kbit
