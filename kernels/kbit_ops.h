// Host entry points of the kbit kernels (one per tier), called by bindings.cpp after it has validated the
// arguments and made the pointers' device current. Each throws std::runtime_error when a launch fails.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kbit {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// One quantized weight W [n, k] in the kernel layout (kbit_format.cuh); all pointers on the device.
struct KernelWeight {
    const void* qweight;     // int32 qweight_tiled
    const void* absmax;      // uint8 absmax_tiled
    const float* scale;      // fp32 [n]
    const float* codebook;   // fp32 [2^bits]
    int n;
    int k;
    int bits;
};

// Largest M the MMA tier handles in one call (M = 1..kMmaMaxM).
constexpr int kMmaMaxM = 16;

// out [n, k] (dtype) = the dense weight.
void dequantize(void* out, const KernelWeight& w, DType dtype, cudaStream_t stream);

// out [m, n] = x [m, k] @ W^T, x and out of `dtype`, fp32 accumulation; 1 <= m <= kMmaMaxM.
void mma(void* out, const void* x, const KernelWeight& w, int m, DType dtype, cudaStream_t stream);

inline void check_cuda(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
        throw std::runtime_error(std::string("vllm_kbit: ") + what + ": " + cudaGetErrorName(err) + " (" +
                                 cudaGetErrorString(err) + ")");
    }
}

}  // namespace kbit
