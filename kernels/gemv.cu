// GEMV tier (M = 1..4): out [M, n] = x [M, k] @ W^T with W in the kernel layout, read once from HBM.
//
// Decode. The two indices of adjacent weights 2p, 2p+1 are one 2*bits-bit field of the row's index stream
// (kernel layout), and a shared-memory table maps that field to half2(codebook[lo], codebook[hi]): per pair of
// weights one shift + one mask (stream_field) and one 32-bit LDS, then one HFMA2 per activation row. The table is
// replicated once per lane (entry e of lane l at word 32 e + l), so every lane reads its own bank and lookups
// never conflict; 2^(2 bits) entries: 2 KB (k=2) .. 32 KB (k=4). For k=5 a pair table would take 128 KB, so
// the table holds single weights (half2(c, c), 4 KB) and two lookups are merged with one byte permute.
//
// Scaling. Per 32-weight block the HFMA2 products accumulate into two half2 chains (8 terms per half each, two
// chains for instruction-level parallelism), which are added, converted to fp32 once and multiplied by the block's
// E4M4 absmax (one FFMA); the row scale is applied once per output.
// Activations are staged in shared memory as fp16, each group of 128 scaled by a power of two so its max |x|
// lies in [128, 256): exact for fp16 and bf16 inputs (bf16's 8-bit significand fits fp16's 11 bits; only values
// 2^-21 below the group max leave the normal range), and a 16-term partial sum of |x| * |codebook| <= 256 * 16
// cannot overflow fp16 whatever the activation range. The inverse scale is applied in fp32 per group.
//
// Work split. The unit of work is a row block: `rows` (8, 16 or 32) output rows over all of K, so a unit ends
// in finished outputs: no workspace, no atomics, deterministic. Blocks are persistent (a few per multiprocessor,
// as many as fit) and take row blocks blockIdx.x, blockIdx.x + gridDim.x, ...: x is staged and the table built
// once per block, and the row blocks spread evenly over the multiprocessors. In a block, warp lanes are (row,
// k-slice) pairs; k-slice s handles column tiles s, s + S, s + 2S, ... of each row block (S slices per block).
// Each lane streams its tiles, row block after row block, through a ring of kRing tiles held in registers: the
// ring is filled before the block builds its table and stages x, and a slot is refilled with the lane's next tile
// (also one of the next row block) as soon as it is decoded, so loads stay in flight across row-block ends.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <map>
#include <mutex>
#include <utility>

#include "kbit_format.cuh"
#include "kbit_ops.h"

namespace kbit {
namespace {

constexpr int kMaxWarps = 8;
// Resident 256-thread blocks per multiprocessor the register budget is set for (launch bounds): as many as fit
// without spilling (4 = 64 registers), fewer for the x fragments of larger M and k=5's wider tiles.
__host__ __device__ constexpr int min_blocks_per_sm(int bits, int m) {
    return m >= 3 ? 2 : (m == 2 || bits == 5) ? 3 : 4;
}
constexpr int kXGroupPad = 16;  // bytes after each x group: lanes of one warp reading different groups hit
                                // different banks

template <int BITS>
struct GemvTable {
    static constexpr bool kPairs = BITS <= 4;
    static constexpr int kKeyBits = kPairs ? 2 * BITS : BITS;
    static constexpr int kEntries = 1 << kKeyBits;
    static constexpr int kWords = kEntries * 32;
};

// Tiles each lane keeps in flight (registers: 4 * BITS words each).
constexpr int kRing = 2;

struct GemvParams {
    void* out;
    const void* x;
    const uint4* qweight;
    const uint32_t* absmax;
    const float* scale;
    const float* codebook;
    int n, k, groups;
    int rows_log2;  // rows per row block = 1 << rows_log2 (3..5)
    DType dtype;
};

template <int M>
__host__ __device__ constexpr int x_group_bytes() { return M * kTileK * 2 + kXGroupPad; }

template <int M>
size_t gemv_dynamic_smem(int groups) {
    return static_cast<size_t>(groups) * (x_group_bytes<M>() + M * sizeof(float));
}

template <int BITS, int M>
constexpr size_t gemv_static_smem() {
    return GemvTable<BITS>::kWords * sizeof(uint32_t) + 2 * kMaxWarps * M * kTileRows * sizeof(float);
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
        const uint4 q = load_streaming(src + v * kTileRows);
        w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
    }
}

__device__ __forceinline__ __half2 as_half2(uint32_t bits) { return *reinterpret_cast<const __half2*>(&bits); }

// Table word at 32-bit shared-window address table_base + offset. Written as PTX so that the compiler addresses
// it as [register + uniform base] instead of adding the base with one more instruction per lookup.
__device__ __forceinline__ uint32_t table_word(uint32_t table_base, uint32_t offset) {
    uint32_t v;
    asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(table_base + offset));
    return v;
}

// half2(codebook[index 2p], codebook[index 2p + 1]) of the row whose index stream is w. lane_bytes = 4 * lane.
template <int BITS>
__device__ __forceinline__ __half2 lookup_pair(const uint32_t (&w)[4 * BITS], int p, uint32_t table_base,
                                               uint32_t lane_bytes) {
    if constexpr (GemvTable<BITS>::kPairs) {
        return as_half2(table_word(table_base, stream_field(w, 2 * BITS * p, 2 * BITS, 7) | lane_bytes));
    } else {
        const uint32_t lo = table_word(table_base, stream_field(w, BITS * 2 * p, BITS, 7) | lane_bytes);
        const uint32_t hi = table_word(table_base, stream_field(w, BITS * (2 * p + 1), BITS, 7) | lane_bytes);
        return as_half2(__byte_perm(lo, hi, 0x7610));
    }
}

// codebook_value: lane l of every warp holds codebook[l mod 2^BITS] (one global load per thread, spread by
// shuffles instead of one dependent load per table entry).
template <int BITS>
__device__ void build_table(uint32_t* table, float codebook_value) {
    constexpr int kMask = (1 << BITS) - 1;
    uint4* table4 = reinterpret_cast<uint4*>(table);
    // whole warps iterate together (shuffles); 8 uint4 = the 32 lane copies of one entry
#pragma unroll 4
    for (int base = threadIdx.x & ~31; base < GemvTable<BITS>::kWords / 4; base += blockDim.x) {
        const int i = base + (threadIdx.x & 31);
        const int entry = i >> 3;
        const float lo = __shfl_sync(~0u, codebook_value, entry & kMask);
        const float hi = GemvTable<BITS>::kPairs ? __shfl_sync(~0u, codebook_value, (entry >> BITS) & kMask) : lo;
        const __half2 h = __floats2half2_rn(lo, hi);
        const uint32_t v = *reinterpret_cast<const uint32_t*>(&h);
        if (i < GemvTable<BITS>::kWords / 4) table4[i] = make_uint4(v, v, v, v);
    }
}

__device__ __forceinline__ void unpack8(uint4 raw, DType dtype, float (&v)[8]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        if (dtype == DType::kFloat16) {
            const float2 f = __half22float2(as_half2(words[t]));
            v[2 * t] = f.x, v[2 * t + 1] = f.y;
        } else {
            v[2 * t] = __uint_as_float(words[t] << 16);
            v[2 * t + 1] = __uint_as_float(words[t] & 0xFFFF0000u);
        }
    }
}

// x [M, k] -> shared memory, in two steps so that the copies go out before the weight loads and the
// conversion runs after them: group (g, m) = x[m, 128 g : 128 g + 128] lands at byte g * x_group_bytes + m * 256,
// as 16 items of 8 inputs; thread t owns items t, t + blockDim, ... in both steps. Inputs past k are zeros.
template <int M>
__device__ __forceinline__ int x_items(const GemvParams& p) { return M * p.groups * 16; }

template <int M>
__device__ __forceinline__ unsigned char* x_item_address(unsigned char* xs, int item) {
    const int group = item >> 4, g = group / M, m = group - g * M;
    return xs + g * x_group_bytes<M>() + m * kTileK * 2 + (item & 15) * 16;
}

template <int M>
__device__ void stage_x_copy(const GemvParams& p, unsigned char* xs) {
    for (int item = threadIdx.x; item < x_items<M>(p); item += blockDim.x) {
        const int group = item >> 4, g = group / M, m = group - g * M;
        const int k0 = g * kTileK + (item & 15) * 8;
        const bool inside = k0 < p.k;
        const void* src = static_cast<const uint16_t*>(p.x) + static_cast<long long>(m) * p.k + (inside ? k0 : 0);
        const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(x_item_address<M>(xs, item)));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(inside ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;");
}

// In place: x -> fp16 x * 2^e per group (see top of file); the inverse scale 2^-e goes to x_inverse[g * M + m].
template <int M>
__device__ void stage_x_convert(const GemvParams& p, unsigned char* xs, float* x_inverse) {
    asm volatile("cp.async.wait_all;" ::: "memory");
    const int items = x_items<M>(p);
    for (int base = threadIdx.x & ~31; base < items; base += blockDim.x) {  // whole warps: shuffles below
        const int item = base + (threadIdx.x & 31);
        uint4* slot = reinterpret_cast<uint4*>(x_item_address<M>(xs, item));
        float v[8] = {};
        if (item < items) unpack8(*slot, p.dtype, v);
        float group_max = 0.f;
#pragma unroll
        for (int t = 0; t < 8; ++t) group_max = fmaxf(group_max, fabsf(v[t]));
#pragma unroll
        for (int off = 1; off < 16; off <<= 1) group_max = fmaxf(group_max, __shfl_xor_sync(~0u, group_max, off));
        // biased fp32 exponent E of the max, clamped so that both 2^(134 - E) and 2^(E - 134) are normal floats
        const uint32_t e = min(max((__float_as_uint(group_max) >> 23) & 0xFFu, 8u), 254u);
        const float scale = __uint_as_float((261u - e) << 23);
        if (item < items) {
            uint32_t packed[4];
#pragma unroll
            for (int t = 0; t < 4; ++t) {
                const __half2 h = __floats2half2_rn(v[2 * t] * scale, v[2 * t + 1] * scale);
                packed[t] = *reinterpret_cast<const uint32_t*>(&h);
            }
            *slot = make_uint4(packed[0], packed[1], packed[2], packed[3]);
            if ((item & 15) == 0) x_inverse[item >> 4] = __uint_as_float((e - 7u) << 23);
        }
    }
}

// acc[m] += (row's 128 weights of this tile) . x[m, tile]
template <int BITS, int M>
__device__ __forceinline__ void accumulate_tile(const uint32_t (&w)[4 * BITS], uint32_t absmax_codes,
                                                const unsigned char* x_group, const float* x_inverse,
                                                uint32_t table_base, uint32_t lane_bytes, float (&acc)[M]) {
    float tile_acc[M] = {};
#pragma unroll
    for (int b = 0; b < kTileBlocks; ++b) {
        const float absmax = e4m4_decode((absmax_codes >> (8 * b)) & 0xFF);
        __half2 part[M][2];  // two independent chains per row of x: shorter HFMA2 dependency chains
#pragma unroll
        for (int m = 0; m < M; ++m) part[m][0] = part[m][1] = __float2half2_rn(0.f);
#pragma unroll
        for (int i = 0; i < kBlockSize / 8; ++i) {
            uint4 xv[M];
#pragma unroll
            for (int m = 0; m < M; ++m) {
                xv[m] = *reinterpret_cast<const uint4*>(x_group + m * kTileK * 2 + b * 64 + i * 16);
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const __half2 c = lookup_pair<BITS>(w, b * 16 + i * 4 + j, table_base, lane_bytes);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    const uint32_t xw = j == 0 ? xv[m].x : j == 1 ? xv[m].y : j == 2 ? xv[m].z : xv[m].w;
                    part[m][i & 1] = __hfma2(c, as_half2(xw), part[m][i & 1]);
                }
            }
        }
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float2 f = __half22float2(__hadd2(part[m][0], part[m][1]));
            tile_acc[m] = fmaf(f.x + f.y, absmax, tile_acc[m]);
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = fmaf(tile_acc[m], x_inverse[m], acc[m]);
}

template <int BITS, int M>
__global__ void __launch_bounds__(kMaxWarps * 32, min_blocks_per_sm(BITS, M)) gemv_kernel(const GemvParams p) {
    __shared__ __align__(16) uint32_t table[GemvTable<BITS>::kWords];
    __shared__ float warp_sums[2][kMaxWarps][M][kTileRows];  // double-buffered by row-block parity
    extern __shared__ __align__(16) unsigned char xs[];
    float* x_inverse = reinterpret_cast<float*>(xs + static_cast<size_t>(p.groups) * x_group_bytes<M>());
    constexpr int R = kRing;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int rows = 1 << p.rows_log2;
    const int r = lane & (rows - 1), q = lane >> p.rows_log2;
    const int slices = warps << (5 - p.rows_log2);
    const int slice = (warp << (5 - p.rows_log2)) + q;
    // The lane's work is a sequence of items (row block, step t): column tile slice + t * slices of that row block,
    // `steps` per row block (lanes whose tile is past K skip it, so every lane walks the same sequence and the
    // block-wide row-block ends line up).
    const int steps = (p.groups + slices - 1) / slices;
    const int row_blocks = p.n >> p.rows_log2;
    const int items = (row_blocks - blockIdx.x + gridDim.x - 1) / gridDim.x * steps;

    uint32_t w[R][4 * BITS];
    uint32_t codes[R];
    int load_block = blockIdx.x, load_step = 0;  // the next item to load
    auto load_next = [&](int i) {
        const int g = slice + load_step * slices;
        if (g < p.groups) {
            const int row = (load_block << p.rows_log2) + r;
            load_tile<BITS>(p.qweight + tile_vector_offset(BITS, p.groups, row / kTileRows, g, row % kTileRows), w[i]);
            codes[i] = __ldg(p.absmax + tile_absmax_offset(p.groups, row / kTileRows, g, row % kTileRows));
        }
        if (++load_step == steps) load_step = 0, load_block += gridDim.x;
    };

    // x copies go out first (needed first), then the ring's loads; both latencies overlap the table build.
    stage_x_copy<M>(p, xs);
#pragma unroll
    for (int i = 0; i < R; ++i) {
        if (i < items) load_next(i);
    }
    build_table<BITS>(table, __ldg(p.codebook + (lane & ((1 << BITS) - 1))));
    stage_x_convert<M>(p, xs, x_inverse);
    __syncthreads();

    float acc[M] = {};
    const uint32_t table_base = static_cast<uint32_t>(__cvta_generic_to_shared(table));
    const uint32_t lane_bytes = lane * 4;
    int block = blockIdx.x, step = 0, parity = 0;  // the item being decoded
    for (int base = 0; base < items; base += R) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
            if (base + i >= items) break;  // uniform across the block
            const int g = slice + step * slices;
            if (g < p.groups) {
                accumulate_tile<BITS, M>(w[i], codes[i], xs + g * x_group_bytes<M>(), x_inverse + g * M,
                                         table_base, lane_bytes, acc);
            }
            if (base + i + R < items) load_next(i);
            if (++step < steps) continue;
            // end of row block `block`: reduce the k-slices (lanes of a warp, then warps) and store
#pragma unroll
            for (int m = 0; m < M; ++m) {
                for (int off = rows; off < 32; off <<= 1) acc[m] += __shfl_xor_sync(~0u, acc[m], off);
                if (q == 0) warp_sums[parity][warp][m][r] = acc[m];
                acc[m] = 0.f;
            }
            __syncthreads();
            for (int t = threadIdx.x; t < M * rows; t += blockDim.x) {
                const int m = t >> p.rows_log2, rr = t & (rows - 1);
                float sum = 0.f;
                for (int j = 0; j < warps; ++j) sum += warp_sums[parity][j][m][rr];
                const int n = (block << p.rows_log2) + rr;
                sum *= p.scale[n];
                const long long o = static_cast<long long>(m) * p.n + n;
                if (p.dtype == DType::kFloat16) {
                    static_cast<__half*>(p.out)[o] = __float2half_rn(sum);
                } else {
                    static_cast<__nv_bfloat16*>(p.out)[o] = __float2bfloat16_rn(sum);
                }
            }
            step = 0, block += gridDim.x, parity ^= 1;
        }
    }
}

constexpr int kMaxDevices = 64;

int current_device() {
    int dev = 0;
    check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
    return dev;
}

// An attribute of the current device, cached per device (the launch heuristics ask on every call).
template <cudaDeviceAttr kAttribute>
int device_attribute() {
    static std::array<int, kMaxDevices> cached{};
    const int dev = current_device();
    if (dev < kMaxDevices && cached[dev] != 0) return cached[dev];
    int value = 0;
    check_cuda(cudaDeviceGetAttribute(&value, kAttribute, dev), "cudaDeviceGetAttribute");
    if (dev < kMaxDevices) cached[dev] = value;
    return value;
}

// Resident blocks per multiprocessor (cached: the occupancy calculator is asked once per configuration).
template <int BITS, int M>
int resident_blocks(size_t dynamic_smem) {
    static std::mutex mutex;
    static std::map<std::pair<int, size_t>, int> cache;
    const std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::make_pair(current_device(), dynamic_smem);
    auto it = cache.find(key);
    if (it == cache.end()) {
        int blocks = 0;
        check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, gemv_kernel<BITS, M>, kMaxWarps * 32,
                                                                  dynamic_smem),
                   "cudaOccupancyMaxActiveBlocksPerMultiprocessor(gemv_kernel)");
        it = cache.emplace(key, std::max(blocks, 1)).first;
    }
    return it->second;
}

template <int BITS, int M>
void launch_gemv(const GemvParams& p, cudaStream_t stream) {
    const size_t smem = gemv_dynamic_smem<M>(p.groups);
    if (gemv_static_smem<BITS, M>() + smem > 48 * 1024) {  // above 48 KB in all a kernel must opt in
        static std::array<size_t, kMaxDevices> opted_in{};
        const int dev = current_device();
        if (dev >= kMaxDevices || opted_in[dev] < smem) {
            check_cuda(cudaFuncSetAttribute(gemv_kernel<BITS, M>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem)),
                       "cudaFuncSetAttribute(gemv_kernel)");
            if (dev < kMaxDevices) opted_in[dev] = smem;
        }
    }
    // persistent blocks: as many as are resident at once, at most one per row block
    const int row_blocks = p.n >> p.rows_log2;
    const int sms = device_attribute<cudaDevAttrMultiProcessorCount>();
    const int grid = std::min(row_blocks, sms * resident_blocks<BITS, M>(smem));
    gemv_kernel<BITS, M><<<grid, kMaxWarps * 32, smem, stream>>>(p);
    check_cuda(cudaGetLastError(), "gemv kernel launch");
}

template <int BITS>
void launch_gemv_bits(const GemvParams& p, int m, cudaStream_t stream) {
    switch (m) {
        case 1: launch_gemv<BITS, 1>(p, stream); break;
        case 2: launch_gemv<BITS, 2>(p, stream); break;
        case 3: launch_gemv<BITS, 3>(p, stream); break;
        case 4: launch_gemv<BITS, 4>(p, stream); break;
        default: throw std::invalid_argument("vllm_kbit.gemv: M must be in 1..4");
    }
}

template <int BITS>
size_t gemv_total_smem(int m, int groups) {
    switch (m) {
        case 1: return gemv_static_smem<BITS, 1>() + gemv_dynamic_smem<1>(groups);
        case 2: return gemv_static_smem<BITS, 2>() + gemv_dynamic_smem<2>(groups);
        case 3: return gemv_static_smem<BITS, 3>() + gemv_dynamic_smem<3>(groups);
        default: return gemv_static_smem<BITS, 4>() + gemv_dynamic_smem<4>(groups);
    }
}

size_t gemv_smem_bytes(int bits, int m, int groups) {
    switch (bits) {
        case 2: return gemv_total_smem<2>(m, groups);
        case 3: return gemv_total_smem<3>(m, groups);
        case 4: return gemv_total_smem<4>(m, groups);
        default: return gemv_total_smem<5>(m, groups);
    }
}

}  // namespace

void gemv(void* out, const void* x, const KernelWeight& w, int m, DType dtype, cudaStream_t stream) {
    const int groups = k_groups(w.k);
    // Rows per row block: the most (32: one lane per row, x broadcast to the warp) that still gives each
    // multiprocessor about 4 or more row blocks (so that they spread evenly), else 16 or 8 rows with 2 or 4
    // k-slices per warp. Blocks always have kMaxWarps warps: where K has fewer column tiles than a block has
    // k-slices the extra lanes idle, but the table build and x staging still spread over the whole block.
    const int sms = device_attribute<cudaDevAttrMultiProcessorCount>();
    int rows_log2 = 5;
    while (rows_log2 > 3 && (w.n >> rows_log2) < 4 * sms) --rows_log2;

    // Activations are staged whole in shared memory; where M rows of them do not fit, run the rows in chunks.
    int m_chunk = m;
    while (m_chunk > 0 && gemv_smem_bytes(w.bits, m_chunk, groups) >
                              static_cast<size_t>(device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>())) {
        --m_chunk;
    }
    if (m_chunk == 0) {
        throw std::invalid_argument("vllm_kbit.gemv: in_features " + std::to_string(w.k) +
                                    " needs more shared memory than this GPU has; use dequantize + matmul");
    }
    const int elem = 2;  // fp16 / bf16 bytes
    for (int m0 = 0; m0 < m; m0 += m_chunk) {
        const int mc = std::min(m_chunk, m - m0);
        const GemvParams p{static_cast<char*>(out) + static_cast<size_t>(m0) * w.n * elem,
                           static_cast<const char*>(x) + static_cast<size_t>(m0) * w.k * elem,
                           static_cast<const uint4*>(w.qweight),
                           static_cast<const uint32_t*>(w.absmax),
                           w.scale,
                           w.codebook,
                           w.n,
                           w.k,
                           groups,
                           rows_log2,
                           dtype};
        switch (w.bits) {
            case 2: launch_gemv_bits<2>(p, mc, stream); break;
            case 3: launch_gemv_bits<3>(p, mc, stream); break;
            case 4: launch_gemv_bits<4>(p, mc, stream); break;
            case 5: launch_gemv_bits<5>(p, mc, stream); break;
            default: throw std::invalid_argument("vllm_kbit.gemv: bits must be 2, 3, 4 or 5");
        }
    }
}

}  // namespace kbit
