// Standalone timing of the dense MMA tier (kbit::mma, no torch, no vLLM) against fp16 cuBLAS, for A/B tests of kernel
// variants: benchmarks/kernel_ab.py builds this against patched copies of kernels/ and compares them. Timing only
// (tests/test_kernels_gpu.py checks results): random kernel-layout weights (random index bits, absmax codes of
// moderate values) in copies that rotate over 256 MB, so that every call reads its weight from HBM; the median over
// CUDA-graph replays of one call per copy.
//   kernel_ab LABEL [interleave]
// interleave: a small kernel (as a norm before a GEMM in a model) runs before every call, in both columns.
// Prints tab-separated rows: label shape k M kbit_us fp16_us.
#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "kbit_format.cuh"
#include "kbit_ops.h"

namespace {

void check(cudaError_t err, const char* what) { kbit::check_cuda(err, what); }

void check(cublasStatus_t status, const char* what) {
    if (status != CUBLAS_STATUS_SUCCESS) throw std::runtime_error(std::string(what) + ": cuBLAS error");
}

__global__ void preceding_kernel(const __half* x, __half* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __hadd(x[i], x[i]);
}

struct Shape {
    const char* name;
    int k, n;
};

constexpr size_t kRotateBytes = 256u << 20;
constexpr int kReplays = 9;

// Median µs per call of `one_pass` (which makes `calls` calls on `stream`), from replays of a CUDA graph of it.
template <class F>
float time_graph(F&& one_pass, int calls, cudaStream_t stream) {
    one_pass();  // warm-up: module load, cuBLAS heuristics
    check(cudaStreamSynchronize(stream), "warm-up");
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    check(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
    one_pass();
    check(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    cudaEvent_t start, end;
    check(cudaEventCreate(&start), "cudaEventCreate");
    check(cudaEventCreate(&end), "cudaEventCreate");
    std::vector<float> us;
    for (int r = 0; r < kReplays; ++r) {
        check(cudaEventRecord(start, stream), "cudaEventRecord");
        check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
        check(cudaEventRecord(end, stream), "cudaEventRecord");
        check(cudaEventSynchronize(end), "cudaEventSynchronize");
        float ms = 0.f;
        check(cudaEventElapsedTime(&ms, start, end), "cudaEventElapsedTime");
        us.push_back(ms * 1e3f / calls);
    }
    check(cudaEventDestroy(start), "cudaEventDestroy");
    check(cudaEventDestroy(end), "cudaEventDestroy");
    check(cudaGraphExecDestroy(exec), "cudaGraphExecDestroy");
    check(cudaGraphDestroy(graph), "cudaGraphDestroy");
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
}

template <typename T>
T* device_copy(const std::vector<T>& host) {
    T* ptr = nullptr;
    check(cudaMalloc(&ptr, host.size() * sizeof(T)), "cudaMalloc");
    check(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    return ptr;
}

int copies_for(size_t bytes) { return static_cast<int>(std::max<size_t>(2, (kRotateBytes + bytes - 1) / bytes)); }

}  // namespace

int main(int argc, char** argv) {
    const std::string label = argc > 1 ? argv[1] : "base";
    const bool interleave = argc > 2 && std::string(argv[2]) == "interleave";
    const Shape shapes[] = {{"Llama-3-8B qkv", 4096, 6144},     {"Llama-3-8B o", 4096, 4096},
                            {"Llama-3-8B gate_up", 4096, 28672}, {"Llama-3-8B down", 14336, 4096},
                            {"Qwen3-Next q", 2048, 4096},        {"Qwen3-Next kv", 2048, 512},
                            {"Llama-3-70B gate_up", 8192, 57344}};
    const int token_counts[] = {1, 8, 16, 32, 64};
    const int bit_widths[] = {4, 2};
    constexpr int kMaxM = 64;
    cudaStream_t stream;
    check(cudaStreamCreate(&stream), "cudaStreamCreate");
    cublasHandle_t cublas;
    check(cublasCreate(&cublas), "cublasCreate");
    check(cublasSetStream(cublas, stream), "cublasSetStream");
    std::mt19937 rng(1234);
    const auto random_half = [&] { return static_cast<uint16_t>(0x3000 + (rng() & 0x7ff) + ((rng() & 1) << 15)); };
    try {
        for (const Shape& shape : shapes) {
            const int rowtiles = shape.n / kbit::kTileRows, groups = kbit::k_groups(shape.k);
            std::vector<uint16_t> halves(static_cast<size_t>(shape.n) * shape.k);
            std::generate(halves.begin(), halves.end(), random_half);
            std::vector<__half*> dense(copies_for(halves.size() * 2));
            for (auto& ptr : dense) ptr = reinterpret_cast<__half*>(device_copy(halves));
            halves.resize(static_cast<size_t>(kMaxM) * shape.k);
            auto* x = reinterpret_cast<__half*>(device_copy(halves));
            __half *y = nullptr, *out = nullptr;
            check(cudaMalloc(&y, halves.size() * 2), "cudaMalloc");
            check(cudaMalloc(&out, static_cast<size_t>(kMaxM) * shape.n * 2), "cudaMalloc");
            const auto before_call = [&](int m) {
                if (interleave) preceding_kernel<<<(m * shape.k + 255) / 256, 256, 0, stream>>>(x, y, m * shape.k);
            };
            for (int bits : bit_widths) {
                std::vector<uint8_t> qweight(static_cast<size_t>(rowtiles) * groups * bits * 512);
                std::vector<uint8_t> absmax(static_cast<size_t>(rowtiles) * groups * 128);
                for (auto& v : qweight) v = rng() & 0xff;
                for (auto& v : absmax) v = 0x50 + rng() % 48;
                const int copies = copies_for(qweight.size() + absmax.size());
                std::vector<kbit::KernelWeight> weights;
                std::vector<float> codebook(1 << bits);
                for (int i = 0; i < (1 << bits); ++i) codebook[i] = -1.f + 2.f * i / ((1 << bits) - 1);
                float* codebook_d = device_copy(codebook);
                float* scale_d = device_copy(std::vector<float>(shape.n, 0.01f));
                for (int c = 0; c < copies; ++c) {
                    weights.push_back({device_copy(qweight), device_copy(absmax), scale_d, codebook_d, shape.n,
                                       shape.k, bits});
                }
                for (int m : token_counts) {
                    const float kbit_us = time_graph([&] {
                        for (const auto& w : weights) {
                            before_call(m);
                            kbit::mma(out, x, w, m, kbit::DType::kFloat16, stream);
                        }
                    }, copies, stream);
                    const float alpha = 1.f, beta = 0.f;
                    const float fp16_us = time_graph([&] {
                        for (const __half* w : dense) {
                            before_call(m);
                            check(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, shape.n, m, shape.k, &alpha, w,
                                               CUDA_R_16F, shape.k, x, CUDA_R_16F, shape.k, &beta, out, CUDA_R_16F,
                                               shape.n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                  "cublasGemmEx");
                        }
                    }, static_cast<int>(dense.size()), stream);
                    printf("%s\t%s\t%d\t%d\t%.2f\t%.2f\n", label.c_str(), shape.name, bits, m, kbit_us, fp16_us);
                    fflush(stdout);
                }
                for (const auto& w : weights) {
                    check(cudaFree(const_cast<void*>(w.qweight)), "cudaFree");
                    check(cudaFree(const_cast<void*>(w.absmax)), "cudaFree");
                }
                check(cudaFree(codebook_d), "cudaFree");
                check(cudaFree(scale_d), "cudaFree");
            }
            for (auto* ptr : dense) check(cudaFree(ptr), "cudaFree");
            check(cudaFree(x), "cudaFree");
            check(cudaFree(y), "cudaFree");
            check(cudaFree(out), "cudaFree");
        }
    } catch (const std::exception& e) {
        fprintf(stderr, "kernel_ab: %s\n", e.what());
        return 1;
    }
    return 0;
}
