// Hopper tier (sm_90a): out [M, n] = x [M, k] @ W^T on the warpgroup MMA (wgmma), whose multiply-adds run
// asynchronously while the warps decode the next weights; for M = 33..1024 on weights large enough for that M
// (vllm_kbit/capabilities.py). mma.sync (mma_core.cuh) cannot reach the tensor-core rate of cuBLAS from M = 128 on,
// and dequantize + cuBLAS moves the weight three times.
//
// Operands. The weight is the register operand A (wgmma m64nNk16: warp w of a warpgroup supplies rows 16 w .. 16 w +
// 15, each lane the same fragment as for mma.sync m16n8k16), so the lane map of the kernel layout (kbit_format.cuh)
// and the table decode of mma_core.cuh feed it unchanged: each warp decodes one row tile (32 rows) per column tile,
// its two 16-row halves feeding the warpgroup's two MMAs (rows of 4 row tiles, 128 outputs). Tokens are operand B,
// read by the MMA from shared memory: TOKENS tokens x 16 inputs per step (wgmma N: 128, or 64 for M <= 64, where 128
// would double the tensor-core work). The fragment of lane c holds inputs 8 c .. 8 c + 7 of each 32-input block, so
// the MMA's input order within a block is a permutation of x's: logical input 8 h + 2 c + u of step s is input
// 8 c + 4 s + 2 h + u (u = 0, 1), a 4 x 4 transpose of the block's 32-bit words. A first launch writes x in that
// order as an image of the MMA's shared-memory operand (a workspace): per token tile and column tile, the bytes that
// the operand buffer holds (K-major, 128-byte swizzle: 64 inputs per 128-byte row, the 16-byte chunk index XOR the
// row mod 8; zeros past M and K). So the main launch copies a column tile with one bulk copy (the TMA engine),
// issued by one thread and completing on an mbarrier, into one of four buffers two column tiles ahead, instead of
// every thread copying 16-byte pieces with cp.async and waiting for them.
//
// Work split. A block (two warpgroups, 8 warps) computes 8 row tiles (256 outputs) x TOKENS tokens over one K-slice
// of column tiles. Where there are fewer such blocks than multiprocessors, K is split (as long as the blocks still
// fit in one wave), the fp32 sums of the slices go to the workspace, and a last launch adds them up in slice order
// (deterministic). A k16 step's A registers are rewritten two steps later, after wgmma.wait_group 1. The buffers
// pass between the copies and the warps through mbarriers, without a block barrier: a buffer's "full" mbarrier
// completes when its copy has landed, its "empty" one when every warp is done with it; thread 0 waits on that before
// it copies the column tile two ahead into it (benchmarks/kernel_experiments.md, session 16).
#include <algorithm>
#include <limits>
#include <type_traits>

#include "mma_core.cuh"

namespace kbit {
namespace {

using namespace mma_core;

constexpr int kMaxTokens = 128;                      // operand B rows (wgmma N) per block: this, or kFewTokens
constexpr int kFewTokens = 64;                       // ... for M <= kFewTokens (tokens_for)
constexpr int kWarps = 8;                            // two warpgroups, one row tile per warp
constexpr int kThreads = kWarps * 32;
constexpr int kRowBytes = 128;                       // one swizzled row: 64 inputs
constexpr int kStages = 4;                           // column tiles of x in shared memory
constexpr int kAlign = 1024;                         // the swizzle repeats every 8 rows

// Operand B tokens of a launch for M tokens.
__host__ __device__ constexpr int tokens_for(int m) { return m <= kFewTokens ? kFewTokens : kMaxTokens; }
// Blocks along M, and operand images of x per column tile.
constexpr int token_tiles_for(int m) { return (m + tokens_for(m) - 1) / tokens_for(m); }
// Bytes of inputs 64 a .. 64 a + 63 of all tokens (an atom), of one column tile (128 inputs: two atoms).
__host__ __device__ constexpr int atom_bytes(int tokens) { return tokens * kRowBytes; }
__host__ __device__ constexpr int operand_bytes(int tokens) { return 2 * atom_bytes(tokens); }

// The operand buffers, the table, then two mbarriers per buffer (8-byte aligned: the table's bytes are a multiple of
// 16, asserted in wgmma_kernel).
constexpr size_t wgmma_smem(int lut_bytes, int tokens) {
    return kAlign + kStages * operand_bytes(tokens) + lut_bytes + 2 * kStages * sizeof(uint64_t);
}

// Tiles in flight per lane (the register ring). At 128 tokens: as many as fit next to 128 accumulators and 16 A
// registers without spills in the main loop (the epilogue's row addresses spill 56-76 bytes). At 64 tokens (64
// accumulators) k = 4 takes 4 tiles (254 registers, no spills): on an H100 it ran 1.03-1.16x faster than with 2 at
// M = 33..64 on the Llama-3 layers from qkv up (Qwen3-Next's 0.98-1.02x). k = 3 takes 4 and k = 5 (the largest
// tiles) 3 by the same reasoning, not timed on their own; a ring of 6 for k = 2 ran 0.97-1.01x, so it keeps 4.
template <int BITS, int TOKENS>
__host__ __device__ constexpr int wgmma_ring_depth() {
    if (BITS == 2) return 4;
    if (TOKENS == kMaxTokens) return 2;
    return BITS == 5 ? 3 : 4;
}

struct WgmmaParams {
    const uint4* qweight;
    const uint4* absmax;
    const float* scale;
    const float* codebook;  // in the workspace, where the image launch writes it
    const uint8_t* x_image;  // [token_tiles][groups] operand images (x in the MMA's input order, swizzled)
    void* out;          // [m, n] of T, where slices == 1
    float* partial;     // [slices, m, n] fp32, where slices > 1
    int m, n, k, groups, rowtiles;
    int token_tiles;   // ceil(m / TOKENS)
    int slices;        // K-slices
    int slice_tiles;   // column tiles per K-slice
};

__device__ __forceinline__ void mbarrier_init(uint32_t barrier, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(barrier), "r"(arrivals) : "memory");
}
// The initialised mbarriers become visible to the bulk copies (async proxy).
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// bytes (a multiple of 16, both addresses 16-byte aligned) from global to shared memory by the TMA engine; the
// mbarrier (one arrival) completes its phase once they have landed.
__device__ __forceinline__ void bulk_copy_to_shared(uint32_t dst, const void* src, uint32_t bytes, uint32_t barrier) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(barrier), "r"(bytes) : "memory");
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(dst), "l"(src), "r"(bytes), "r"(barrier) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint32_t barrier) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(barrier) : "memory");
}
// Until the mbarrier's phase of this parity has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t barrier, uint32_t parity) {
    uint32_t done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(barrier), "r"(parity) : "memory");
    } while (!done);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Shared-memory matrix descriptor of operand B: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t operand_descriptor(uint32_t address) {
    return static_cast<uint64_t>((address & 0x3FFFF) >> 4) | (uint64_t{1} << 16) | (uint64_t{1024 >> 4} << 32) |
           (uint64_t{1} << 62);
}

#define KBIT_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                     "+f"(d[i + 6]), "+f"(d[i + 7])
#define KBIT_WGMMA_M64N128K16(TYPE)                                                                                   \
    asm volatile(                                                                                                     \
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                                    \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                             \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
        "%23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, "   \
        "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "       \
        "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"                                                                 \
        : KBIT_ACC8(0), KBIT_ACC8(8), KBIT_ACC8(16), KBIT_ACC8(24), KBIT_ACC8(32), KBIT_ACC8(40), KBIT_ACC8(48),      \
          KBIT_ACC8(56)                                                                                               \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))
#define KBIT_WGMMA_M64N64K16(TYPE)                                                                                    \
    asm volatile(                                                                                                     \
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                                    \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                              \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, " \
        "%23, %24, %25, %26, %27, %28, %29, %30, %31}, "                                                              \
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"                                                                 \
        : KBIT_ACC8(0), KBIT_ACC8(8), KBIT_ACC8(16), KBIT_ACC8(24)                                                    \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc))

// d (TOKENS / 2 accumulators: row 16 w + G + 8 (i / 2 % 2), token 8 (i / 4) + 2 c + i % 2) += A (registers) . B
// (desc: TOKENS tokens)
template <typename T, int TOKENS>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[TOKENS / 2], const uint32_t (&a)[4], uint64_t desc) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    static_assert(TOKENS == kFewTokens || TOKENS == kMaxTokens, "wgmma N: 64 or 128 tokens");
    constexpr bool kHalf = std::is_same_v<T, __half>;
    if constexpr (TOKENS == kMaxTokens && kHalf) {
        KBIT_WGMMA_M64N128K16("f16");
    } else if constexpr (TOKENS == kMaxTokens) {
        KBIT_WGMMA_M64N128K16("bf16");
    } else if constexpr (kHalf) {
        KBIT_WGMMA_M64N64K16("f16");
    } else {
        KBIT_WGMMA_M64N64K16("bf16");
    }
#endif
}
#undef KBIT_WGMMA_M64N128K16
#undef KBIT_WGMMA_M64N64K16
#undef KBIT_ACC8

// The operand images of x: [token tile][column tile][2 atoms][tokens][128 bytes], each 16-byte piece (8 inputs) at
// its swizzled place, holding x with the 32-bit words of each 32-input block transposed (4 x 4): word 4 q + c of a
// block is x's word 4 c + q, so piece q of a block is (word q of each of x's four pieces). Zeros for the tokens past
// M of the last token tile and the blocks past K of the last column tile. One thread per (token, block) of the padded
// x. It also writes the codebook, which arrives by value, to the workspace: the main kernel reads it from there after
// its wait, as it reads the images. (With the codebook by value in the main kernel's own parameters, as in the MMA
// tier, ptxas rematerialized the epilogue's addresses instead of spilling them: 1.8x the instructions, and 2-17%
// slower at M = 64..256; benchmarks/kernel_experiments.md.)
__global__ void mma_image_kernel(uint4* image, const uint4* x, int m, int k, int tokens, long long padded_blocks,
                                 float* codebook_out, const __grid_constant__ Codebook codebook) {
    allow_next_grid();  // the main launch may start loading its first weight tiles
    const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
    if (i < kMaxCodebook) codebook_out[i] = codebook.value[i];
    if (i >= padded_blocks) return;
    const int groups = k_groups(k), row_blocks = groups * kTileBlocks;
    const long long token = i / row_blocks;
    const int block = static_cast<int>(i % row_blocks);
    uint4 v0{}, v1{}, v2{}, v3{};
    if (token < m && block * kBlockSize < k) {
        const uint4* src = x + (token * k + block * kBlockSize) / 8;
        v0 = src[0], v1 = src[1], v2 = src[2], v3 = src[3];
    }
    const int row = static_cast<int>(token % tokens), first_piece = (block % kTileBlocks) * 4;
    uint4* const dst = image + ((token / tokens) * groups + block / kTileBlocks) * (operand_bytes(tokens) / 16) +
                       row * (kRowBytes / 16);
    const auto put = [&](int q, const uint4& words) {
        const int piece = first_piece + q;
        dst[(piece / 8) * (atom_bytes(tokens) / 16) + ((piece % 8) ^ (row % 8))] = words;
    };
    put(0, make_uint4(v0.x, v1.x, v2.x, v3.x));
    put(1, make_uint4(v0.y, v1.y, v2.y, v3.y));
    put(2, make_uint4(v0.z, v1.z, v2.z, v3.z));
    put(3, make_uint4(v0.w, v1.w, v2.w, v3.w));
}

template <int BITS, typename T, int TOKENS>
__global__ void __launch_bounds__(kThreads, 1) wgmma_kernel(const WgmmaParams p) {
    constexpr int kAtomBytes = atom_bytes(TOKENS), kOperandBytes = operand_bytes(TOKENS);
    extern __shared__ uint8_t smem_unaligned[];
    const uint32_t unaligned = static_cast<uint32_t>(__cvta_generic_to_shared(smem_unaligned));
    const uint32_t operand = (unaligned + kAlign - 1) & ~uint32_t{kAlign - 1};  // [kStages][2 atoms][TOKENS][128 B]
    uint4* const lut = reinterpret_cast<uint4*>(smem_unaligned + (operand - unaligned) + kStages * kOperandBytes);
    // Per operand buffer: its copy has landed (one arrival and the copy's bytes); every warp is done with it (one
    // arrival per warp).
    static_assert(Lut<BITS>::kBytes % 16 == 0, "the mbarriers after the table are 8-byte aligned");
    const uint32_t full = operand + kStages * kOperandBytes + Lut<BITS>::kBytes;
    const uint32_t empty = full + kStages * sizeof(uint64_t);
    const auto barrier = [](uint32_t array, int t) { return array + (t % kStages) * sizeof(uint64_t); };
    constexpr int R = wgmma_ring_depth<BITS, TOKENS>();

    const int lane = threadIdx.x & 31, warp = __shfl_sync(~0u, threadIdx.x >> 5, 0);
    const int G = lane >> 2;
    int block = blockIdx.x;
    const int token_tile = block % p.token_tiles;
    block /= p.token_tiles;
    const int slice = block % p.slices, rowtile = block / p.slices * kWarps + warp;
    const bool has_rows = rowtile < p.rowtiles;
    const int first_kt = slice * p.slice_tiles, tiles = min(p.groups - first_kt, p.slice_tiles);
    const int first_token = token_tile * TOKENS;

    // Column tile t of the slice into operand buffer t % kStages: one bulk copy of its image, by thread 0, completing
    // phase t / kStages of the buffer's full mbarrier.
    const uint8_t* const image = p.x_image + (static_cast<size_t>(token_tile) * p.groups + first_kt) * kOperandBytes;
    const auto stage_x = [&](int t) {
        bulk_copy_to_shared(operand + (t % kStages) * kOperandBytes, image + static_cast<size_t>(t) * kOperandBytes,
                            kOperandBytes, barrier(full, t));
    };
    if (threadIdx.x == 0) {
#pragma unroll
        for (int s = 0; s < kStages; ++s) {
            mbarrier_init(barrier(full, s), 1);
            mbarrier_init(barrier(empty, s), kWarps);
        }
        fence_mbarrier_init();
    }

    // The warp's weight tiles, R ahead. Every load is made, from an address clamped into the weight (row tile 0 for a
    // warp past the last row tile, whose sums are never stored; the slice's last tile past its end, never decoded):
    // with the loads conditional (zeros otherwise), ptxas loaded into temporaries and copied them into the ring at
    // once, so each warp waited for its tile right after asking for it (Nsight Compute: 15% of the stall samples).
    // Unconditional, on an H100 at M = 128..1024: 1.03-1.19x on the Llama-3 layers at k = 4, 1.02-1.09x at k = 2,
    // 0.99-1.09x on Qwen3-Next's (benchmarks/kernel_experiments.md, session 14).
    uint32_t w[R][4 * BITS];
    uint4 codes[R];
    const uint4* weights = p.qweight + tile_vector_offset(BITS, p.groups, has_rows ? rowtile : 0, first_kt, lane);
    const uint4* absmax = p.absmax + tile_absmax_offset(p.groups, has_rows ? rowtile : 0, first_kt, G);
    const auto load = [&](int slot, int t) {
        const int tile = min(t, tiles - 1);
        load_tile<BITS>(weights + tile * BITS * 32, w[slot]);
        codes[slot] = load_streaming(absmax + tile * 8);
    };
#pragma unroll
    for (int i = 0; i < R; ++i) load(i, i);
    wait_for_prior_grid();  // the images
    if (threadIdx.x == 0) {
        stage_x(0);
        if (tiles > 1) stage_x(1);
    }
    build_lut<BITS, T>(lut, __ldg(p.codebook + (lane & ((1 << BITS) - 1))));
    // Rows G + 8 j of the warp's row tile, x 16: the MMA sums carry absmax / 16 (e4m4_pair_as_half2_div16).
    float row_scale[kLaneRows];
#pragma unroll
    for (int j = 0; j < kLaneRows; ++j) {
        row_scale[j] = has_rows ? __ldg(p.scale + rowtile * kTileRows + G + 8 * j) * 16.f : 0.f;
    }
    const uint32_t lut_address = static_cast<uint32_t>(__cvta_generic_to_shared(lut));
    const uint32_t copy_bytes = Lut<BITS>::copy_bytes(lane);
    float acc[2][TOKENS / 2];
#pragma unroll
    for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
        for (int i = 0; i < TOKENS / 2; ++i) acc[rt][i] = 0.f;
    }
    __syncthreads();  // the table and the mbarriers
    uint32_t a[2][2][4];  // [k16 step parity][row half rt]: read by the MMAs until two steps later
    for (int base = 0; base < tiles; base += R) {
#pragma unroll
        for (int slot = 0; slot < R; ++slot) {
            const int t = base + slot;
            if (t >= tiles) break;  // uniform across the block
            // This warp is past the last step of tile t - 1, so its MMAs of tile t - 2, the last readers of buffer
            // (t + 2) % kStages, are done (wait_group 1). Thread 0 copies tile t + 2 into that buffer once every
            // warp has said so (its use by tile t - 2 is that mbarrier's phase (t - 2) / kStages); the warps wait only
            // for the copy of tile t.
            if (t >= 2 && lane == 0) mbarrier_arrive(barrier(empty, t + 2));
            if (threadIdx.x == 0 && t + 2 < tiles) {
                if (t >= 2) mbarrier_wait(barrier(empty, t + 2), ((t - 2) / kStages) & 1);
                stage_x(t + 2);
            }
            mbarrier_wait(barrier(full, t), (t / kStages) & 1);
            const uint32_t buffer = operand + (t % kStages) * kOperandBytes;
#pragma unroll
            for (int b = 0; b < kTileBlocks; ++b) {
                uint32_t h01, h23;
                block_absmax_pairs(codes[slot], b, h01, h23);
                const RowMultipliers<T> absmax(h01, h23);
#pragma unroll
                for (int s = 0; s < 2; ++s) {
                    // The lookups (volatile, so they keep their place) go before the wait, so that their latency
                    // overlaps it; only the products write a[s].
                    uint32_t values[2][4];
#pragma unroll
                    for (int rt = 0; rt < 2; ++rt) {
                        a_fragment<BITS>(w[slot], b, rt, s, lut_address, copy_bytes, values[rt]);
                    }
                    wgmma_wait<1>();  // the MMAs of two steps ago are done with a[s]
#pragma unroll
                    for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            a[s][rt][r] = Act<T>::mul(values[rt][r], absmax.row[2 * rt + r % 2]);
                        }
                    }
                    const uint64_t desc =
                        operand_descriptor(buffer + (b / 2) * kAtomBytes + ((b % 2) * 2 + s) * 32);
                    wgmma_fence();
                    wgmma_m64k16<T, TOKENS>(acc[0], a[s][0], desc);
                    wgmma_m64k16<T, TOKENS>(acc[1], a[s][1], desc);
                    wgmma_commit();
                }
            }
            load(slot, t + R);
        }
    }
    wgmma_wait<0>();

    // The lane's outputs, f(token of the block's tile, row of the warp's row tile, sum x row scale): accumulator i of
    // row half rt is row 16 rt + G + 8 h (row scale j = 2 rt + h, h = i / 2 % 2), token 8 (i / 4) + 2 c + i % 2.
    const int c = lane & 3;
    const auto for_each_output = [&](auto&& f) {
#pragma unroll
        for (int rt = 0; rt < 2; ++rt) {
#pragma unroll
            for (int i = 0; i < TOKENS / 2; ++i) {
                const int h = i / 2 % 2;
                f(8 * (i / 4) + 2 * c + i % 2, 16 * rt + G + 8 * h, acc[rt][i] * row_scale[2 * rt + h]);
            }
        }
    };
    if (p.slices > 1) {  // the K-slice's fp32 sums, to the workspace
        if (!has_rows) return;
        for_each_output([&](int tile_token, int tile_row, float v) {
            const int token = first_token + tile_token, row = rowtile * kTileRows + tile_row;
            if (token < p.m) p.partial[(static_cast<long long>(slice) * p.m + token) * p.n + row] = v;
        });
        return;
    }
    // The block's outputs (TOKENS tokens x 256 rows) go through shared memory, in the operand buffers (free once
    // both warpgroups are past their last MMAs), so that out is written in whole 16-byte pieces of its rows instead
    // of 2-byte stores scattered over four rows each: with the loads above, 1.04-1.33x at M = 128..1024 on the Llama-3
    // layers at k = 4, 1.01-1.21x at k = 2 (alone: 1.03-1.31x, 0.97-1.14x; session 14).
    constexpr int kStagedStride = kWarps * kTileRows + 8;  // elements per token; the 16-byte pad spreads the banks
    constexpr int kPiecesPerToken = kWarps * kTileRows / 8;
    static_assert(TOKENS * kStagedStride * sizeof(T) <= kStages * kOperandBytes, "the outputs fit the operand buffers");
    T* const staged = reinterpret_cast<T*>(smem_unaligned + (operand - unaligned));
    __syncthreads();
    for_each_output([&](int token, int row, float v) {
        Act<T>::store(staged, token * kStagedStride + (warp * kTileRows + row), v);
    });
    __syncthreads();
    const int first_rowtile = rowtile - warp;
#pragma unroll
    for (int q = threadIdx.x; q < TOKENS * kPiecesPerToken; q += kThreads) {
        const int token = q / kPiecesPerToken, piece = q % kPiecesPerToken;
        if (first_token + token < p.m && first_rowtile + piece / 4 < p.rowtiles) {
            reinterpret_cast<uint4*>(p.out)[(static_cast<long long>(first_token + token) * p.n +
                                             first_rowtile * kTileRows) / 8 + piece] =
                reinterpret_cast<const uint4*>(staged + token * kStagedStride)[piece];
        }
    }
}

// out [m, n] = the sum over the K-slices of partial [slices, m, n], in slice order.
template <typename T>
__global__ void sum_slices_kernel(void* out, const float4* partial, long long quads, int slices) {
    const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
    if (i >= quads) return;
    float4 sum = partial[i];
    for (int s = 1; s < slices; ++s) {
        const float4 v = partial[s * quads + i];
        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    const uint2 packed = make_uint2(Act<T>::pack(sum.x, sum.y), Act<T>::pack(sum.z, sum.w));
    reinterpret_cast<uint2*>(out)[i] = packed;
}

struct WgmmaSplit {
    int token_tiles, slices, slice_tiles, blocks;
};

// K-slices: the split cost of the MMA tier, rounds (blocks / multiprocessors, rounded up) x (column tiles per slice
// + 1), over the splits that keep the blocks within one wave (more would only add workspace traffic); on a tie,
// fewer slices.
WgmmaSplit wgmma_split(int m, int n, int k) {
    const int groups = k_groups(k), rowblocks = (n / kTileRows + kWarps - 1) / kWarps;
    const int token_tiles = token_tiles_for(m), sms = multiprocessors();
    WgmmaSplit best{token_tiles, 1, groups, rowblocks * token_tiles};
    double best_cost = static_cast<double>((best.blocks + sms - 1) / sms) * (groups + 1.0);
    for (int slices = 2; slices <= groups; slices *= 2) {
        const int slice_tiles = (groups + slices - 1) / slices;
        const int used = (groups + slice_tiles - 1) / slice_tiles;
        const int blocks = rowblocks * token_tiles * used;
        if (blocks > sms) break;
        const double cost = slice_tiles + 1.0;
        if (cost < best_cost) best = {token_tiles, used, slice_tiles, blocks}, best_cost = cost;
    }
    return best;
}

// The workspace: the operand images of x, then (with K-slices) the slices' fp32 sums, then the codebook.
size_t x_image_bytes(int m, int k) {
    return static_cast<size_t>(token_tiles_for(m)) * k_groups(k) * operand_bytes(tokens_for(m));
}

long long partial_bytes(const WgmmaSplit& split, int m, int n) {
    return split.slices > 1 ? static_cast<long long>(split.slices) * m * n * 4 : 0;
}

template <int BITS, typename T, int TOKENS>
void launch_wgmma(const WgmmaParams& p, int blocks, cudaStream_t stream) {
    constexpr size_t smem = wgmma_smem(Lut<BITS>::kBytes, TOKENS);
    allow_dynamic_smem<wgmma_kernel<BITS, T, TOKENS>>(smem, "cudaFuncSetAttribute(wgmma_kernel)");
    launch_kernel<wgmma_kernel<BITS, T, TOKENS>>(true, blocks, kThreads, smem, stream, "wgmma kernel launch", p);
    if (p.slices > 1) {
        const long long quads = static_cast<long long>(p.m) * p.n / 4;
        constexpr int kSumThreads = 256;
        sum_slices_kernel<T><<<static_cast<unsigned>((quads + kSumThreads - 1) / kSumThreads), kSumThreads, 0,
                               stream>>>(p.out, reinterpret_cast<const float4*>(p.partial), quads, p.slices);
        check_cuda(cudaGetLastError(), "wgmma sum launch");
    }
}

}  // namespace

long long wgmma_workspace_bytes(int m, int n, int k) {
    return static_cast<long long>(x_image_bytes(m, k)) + partial_bytes(wgmma_split(m, n, k), m, n) +
           kMaxCodebook * static_cast<long long>(sizeof(float));
}

void wgmma(void* out, const void* x, const KernelWeight& w, int m, DType dtype, void* workspace,
           cudaStream_t stream) {
    if (m < 1 || m > std::numeric_limits<int>::max() - kMaxTokens) {
        throw std::invalid_argument("vllm_kbit.wgmma: M must be in 1..2^31 - 129");
    }
    const WgmmaSplit split = wgmma_split(m, w.n, w.k);
    auto* x_image = static_cast<uint8_t*>(workspace);
    uint8_t* after_x = x_image + x_image_bytes(m, w.k);
    float* partial = split.slices > 1 ? reinterpret_cast<float*>(after_x) : nullptr;
    auto* codebook = reinterpret_cast<float*>(after_x + partial_bytes(split, m, w.n));
    const long long padded_blocks =
        static_cast<long long>(split.token_tiles) * tokens_for(m) * k_groups(w.k) * kTileBlocks;
    constexpr int kImageThreads = 256;
    mma_image_kernel<<<static_cast<unsigned>((padded_blocks + kImageThreads - 1) / kImageThreads), kImageThreads, 0,
                       stream>>>(reinterpret_cast<uint4*>(x_image), static_cast<const uint4*>(x), m, w.k,
                                 tokens_for(m), padded_blocks, codebook, w.codebook);
    check_cuda(cudaGetLastError(), "wgmma input image launch");
    const WgmmaParams p{static_cast<const uint4*>(w.qweight), static_cast<const uint4*>(w.absmax), w.scale,
                        codebook, x_image, out, partial, m, w.n, w.k, k_groups(w.k), w.n / kTileRows,
                        split.token_tiles, split.slices, split.slice_tiles};
    with_bits_and_dtype(w.bits, dtype, [&](auto bits_constant, auto act) {
        constexpr int B = decltype(bits_constant)::value;
        using T = decltype(act);
        if (tokens_for(m) == kFewTokens) {
            launch_wgmma<B, T, kFewTokens>(p, split.blocks, stream);
        } else {
            launch_wgmma<B, T, kMaxTokens>(p, split.blocks, stream);
        }
    });
}

}  // namespace kbit
