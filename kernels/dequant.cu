// Dequantize tier: the dense weight W [n, k] in fp16/bf16, for the cuBLAS path at large M.
// Computes exactly what format.dequantize computes in fp32 (codebook[idx] * (e4m4(absmax) * scale)), then rounds
// to the output dtype, so the result equals the reference bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "kbit_format.cuh"
#include "kbit_ops.h"

namespace kbit {
namespace {

constexpr int kDequantWarps = 8;

struct DequantParams {
    void* out;
    const uint4* qweight;
    const uint4* absmax;
    const float* scale;
    Codebook codebook;
    int n, k, groups;
    DType dtype;
};

__device__ __forceinline__ uint32_t pack2(float lo, float hi, DType dtype) {
    if (dtype == DType::kFloat16) {
        const __half2 h = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const uint32_t*>(&h);
    }
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// One warp per tile (32 rows x 128 inputs): lane 4 G + c writes its 128 weights, 8 consecutive outputs of row
// G + 8 j per block b (kbit_format.cuh).
template <int BITS>
__global__ void __launch_bounds__(kDequantWarps * 32) dequantize_kernel(const DequantParams p) {
    __shared__ float codebook[1 << BITS];
    if (threadIdx.x < (1 << BITS)) codebook[threadIdx.x] = p.codebook.value[threadIdx.x];
    __syncthreads();

    const int lane = threadIdx.x & 31, G = lane >> 2, c = lane & 3;
    const long long tile = static_cast<long long>(blockIdx.x) * kDequantWarps + (threadIdx.x >> 5);
    if (tile >= static_cast<long long>(p.n / kTileRows) * p.groups) return;
    const int rowtile = static_cast<int>(tile / p.groups), g = static_cast<int>(tile % p.groups);

    const uint4* src = p.qweight + tile_vector_offset(BITS, p.groups, rowtile, g, lane);
    uint32_t w[4 * BITS];
#pragma unroll
    for (int v = 0; v < BITS; ++v) {
        const uint4 q = __ldg(src + v * 32);
        w[4 * v] = q.x, w[4 * v + 1] = q.y, w[4 * v + 2] = q.z, w[4 * v + 3] = q.w;
    }
    const uint4 codes4 = __ldg(p.absmax + tile_absmax_offset(p.groups, rowtile, g, G));
    const uint32_t codes[kTileBlocks] = {codes4.x, codes4.y, codes4.z, codes4.w};  // [b], byte j
#pragma unroll
    for (int j = 0; j < kLaneRows; ++j) {
        const int row = rowtile * kTileRows + G + 8 * j;
        const float row_scale = p.scale[row];
        uint4* dst = reinterpret_cast<uint4*>(static_cast<uint16_t*>(p.out) + static_cast<long long>(row) * p.k +
                                              g * kTileK + c * kLaneInputs);
#pragma unroll
        for (int b = 0; b < kTileBlocks; ++b) {
            if (g * kTileK + b * kBlockSize >= p.k) break;  // K padding
            const float block_scale = __fmul_rn(e4m4_decode((codes[b] >> (8 * j)) & 0xFF), row_scale);
            uint32_t packed[4];
#pragma unroll
            for (int t = 0; t < kLaneInputs; t += 2) {
                const float lo = __fmul_rn(codebook[stream_field(w, BITS * stream_index(b, j, t), BITS, 0)],
                                           block_scale);
                const float hi = __fmul_rn(codebook[stream_field(w, BITS * stream_index(b, j, t + 1), BITS, 0)],
                                           block_scale);
                packed[t / 2] = pack2(lo, hi, p.dtype);
            }
            dst[b * kBlockSize / 8] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
}

template <int BITS>
void launch_dequantize(const DequantParams& p, cudaStream_t stream) {
    const long long tiles = static_cast<long long>(p.n / kTileRows) * p.groups;
    const unsigned blocks = static_cast<unsigned>((tiles + kDequantWarps - 1) / kDequantWarps);
    dequantize_kernel<BITS><<<blocks, kDequantWarps * 32, 0, stream>>>(p);
}

}  // namespace

void dequantize(void* out, const KernelWeight& w, DType dtype, cudaStream_t stream) {
    const DequantParams p{out, static_cast<const uint4*>(w.qweight), static_cast<const uint4*>(w.absmax),
                          w.scale, w.codebook, w.n, w.k, k_groups(w.k), dtype};
    switch (w.bits) {
        case 2: launch_dequantize<2>(p, stream); break;
        case 3: launch_dequantize<3>(p, stream); break;
        case 4: launch_dequantize<4>(p, stream); break;
        case 5: launch_dequantize<5>(p, stream); break;
        default: throw std::invalid_argument("vllm_kbit.dequantize: bits must be 2, 3, 4 or 5");
    }
    check_cuda(cudaGetLastError(), "dequantize kernel launch");
}

}  // namespace kbit
