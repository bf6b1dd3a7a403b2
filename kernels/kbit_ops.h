// Host entry points of the kbit kernels (one per tier), called by bindings.cpp after it has validated the
// arguments and made the pointers' device current. Each throws std::runtime_error when a launch fails.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kbit {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// A weight's codebook by value: it travels in the kernels' launch parameters (the constant bank), so a kernel does
// not wait on a global load before it can build its lookup tables. That load, issued behind the first weight loads,
// cost 0.4-1.0 µs of an M = 1 call on an H100 (benchmarks/kernel_experiments.md).
constexpr int kMaxCodebook = 32;
struct Codebook {
    float value[kMaxCodebook];  // the first 2^bits are the codebook
};

// One quantized weight W [n, k] in the kernel layout (kbit_format.cuh); all pointers on the device.
struct KernelWeight {
    const void* qweight;     // int32 qweight_tiled
    const void* absmax;      // uint8 absmax_tiled
    const float* scale;      // fp32 [n]
    Codebook codebook;
    int n;
    int k;
    int bits;
};

// Grouped MoE kernel limits: (token, expert) pairs per launch (so top_k <= kMoeMaxPairs), experts per layer (local
// experts of a rank).
constexpr int kMoeMaxPairs = 512;
constexpr int kMoeMaxExperts = 1024;
// Gated activations of the MoE experts: act(gate) * up.
enum MoeActivation : int { kMoeSilu = 0, kMoeGelu = 1, kMoeGeluTanh = 2 };

// The router's choice for M tokens, on the device: topk_ids int32 [m, top_k] (local expert ids; ids outside
// [0, experts) contribute nothing), topk_weights fp32 [m, top_k].
struct MoeRouting {
    const int32_t* topk_ids;
    const float* topk_weights;
    int m, top_k, experts;
};

// out [n, k] (dtype) = the dense weight.
void dequantize(void* out, const KernelWeight& w, DType dtype, cudaStream_t stream);

// out [m, n] = x [m, k] @ W^T, x and out of `dtype`, fp32 accumulation; m >= 1.
void mma(void* out, const void* x, const KernelWeight& w, int m, DType dtype, cudaStream_t stream);

// The same product on the Hopper warpgroup MMA (kernels/wgmma.cu; built for sm_90a only, where KBIT_WGMMA is
// defined), with a device workspace of wgmma_workspace_bytes(m, n, k) bytes, 16-byte aligned (the count depends on
// the current device's multiprocessors).
long long wgmma_workspace_bytes(int m, int n, int k);
void wgmma(void* out, const void* x, const KernelWeight& w, int m, DType dtype, void* workspace, cudaStream_t stream);

// out [m, H] = sum_j topk_weights[m, j] * W2_e (act(gate) * up), [gate | up] = W13_e x[m], e = topk_ids[m, j], for
// m >= 1 and top_k <= kMoeMaxPairs. w13: E stacked [2I, H] weights (n = 2I per expert, I a multiple of 32), w2: E
// stacked [H, I]. Workspace: hidden [m * top_k, I] of dtype, pair_out fp32 [m * top_k, H] (not used for one token
// with top_k <= 16).
void moe_experts(void* out, const void* x, void* hidden, float* pair_out, const MoeRouting& routing,
                 const KernelWeight& w13, const KernelWeight& w2, int activation, DType dtype, cudaStream_t stream);

inline void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("vllm_kbit: ") + what + ": " + cudaGetErrorName(err) + " (" +
                                 cudaGetErrorString(err) + ")");
    }
}

}  // namespace kbit
