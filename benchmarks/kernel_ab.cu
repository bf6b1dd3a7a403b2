// Standalone timing of the dense MMA tier (kbit::mma, no torch, no vLLM) against fp16 cuBLAS, of the Hopper tier
// (kbit::wgmma, and dequantize + cuBLAS beside it), or of the grouped MoE experts (kbit::moe_experts), for A/B tests
// of kernel variants: benchmarks/kernel_ab.py builds this against patched copies of kernels/ and compares them.
// Timing only (tests/test_kernels_gpu.py and test_moe_gpu.py check results):
// random kernel-layout weights (random index bits, absmax codes of moderate values); dense weights in copies that
// rotate over 256 MB, so that every call reads its weight from HBM; MoE calls rotate over 16 random routings
// (distinct experts per token) of one copy of the experts, so that consecutive calls mostly read other experts (as
// bench_moe.py; at M = 1 some of the last calls' experts may still be in L2); the median over CUDA-graph replays.
//   kernel_ab LABEL [interleave | moe | wgmma]
// interleave: a small kernel (as a norm before a GEMM in a model) runs before every dense call, in both columns.
// moe: the expert layers of Qwen3-30B-A3B and Qwen3-Next, bf16 activations, no baseline (fp16_us is nan).
// wgmma (built with kernels/wgmma.cu, sm_90a): the dense shapes at M = 64..1024 on the Hopper tier; each case also
// prints a row for dequantize + cuBLAS (shape name + " dq"), the tier it competes with, which no wgmma variant changes
// (so its ratio between two builds shows the run's noise).
// Prints tab-separated rows: label shape k M kbit_us fp16_us. KBIT_AB_SHAPE (a dense shape's name), KBIT_AB_M (token
// counts, e.g. "1,16") and KBIT_AB_BITS (e.g. "4") time a subset, for profilers and quick A/B runs.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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
constexpr int kWarmupReplays = 3;

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
    for (int r = 0; r < kWarmupReplays; ++r) check(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
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

// Random kernel-layout bytes of `rowtiles` row tiles over K = k: index bit-planes and absmax codes.
struct RandomTiles {
    std::vector<uint8_t> qweight, absmax;
};

RandomTiles random_tiles(std::mt19937& rng, long long rowtiles, int k, int bits) {
    const int groups = kbit::k_groups(k);
    RandomTiles tiles{std::vector<uint8_t>(rowtiles * groups * bits * 512),
                      std::vector<uint8_t>(rowtiles * groups * 128)};
    for (auto& v : tiles.qweight) v = rng() & 0xff;
    for (auto& v : tiles.absmax) v = 0x50 + rng() % 48;
    return tiles;
}

kbit::Codebook linear_codebook(int bits) {
    kbit::Codebook codebook{};
    for (int i = 0; i < (1 << bits); ++i) codebook.value[i] = -1.f + 2.f * i / ((1 << bits) - 1);
    return codebook;
}

void free_weight(const kbit::KernelWeight& w) {
    check(cudaFree(const_cast<void*>(w.qweight)), "cudaFree");
    check(cudaFree(const_cast<void*>(w.absmax)), "cudaFree");
}

constexpr int kBitWidths[] = {4, 2};

// Whether `value` is to be timed: always, or if the environment variable `name` lists it (e.g. "1,16").
bool listed(const char* name, int value) {
    const char* only = std::getenv(name);
    return only == nullptr ||
           ("," + std::string(only) + ",").find("," + std::to_string(value) + ",") != std::string::npos;
}
bool timed(int m) { return listed("KBIT_AB_M", m); }

enum class DenseTier { kMma, kWgmma };

void time_dense(const std::string& label, bool interleave, DenseTier tier, std::mt19937& rng, cudaStream_t stream) {
    const Shape shapes[] = {{"Llama-3-8B qkv", 4096, 6144},     {"Llama-3-8B o", 4096, 4096},
                            {"Llama-3-8B gate_up", 4096, 28672}, {"Llama-3-8B down", 14336, 4096},
                            {"Qwen3-Next q", 2048, 4096},        {"Qwen3-Next kv", 2048, 512},
                            {"Qwen3-Next o", 4096, 2048},        {"Qwen3-Next down", 5120, 2048},
                            {"Llama-3-70B gate_up", 8192, 57344}};
    const std::vector<int> token_counts = tier == DenseTier::kWgmma ? std::vector<int>{64, 128, 256, 384, 512, 768, 1024}
                                                                     : std::vector<int>{1, 2, 8, 16, 32, 64};
    const int max_m = token_counts.back();
    cublasHandle_t cublas;
    check(cublasCreate(&cublas), "cublasCreate");
    check(cublasSetStream(cublas, stream), "cublasSetStream");
    const auto random_half = [&] { return static_cast<uint16_t>(0x3000 + (rng() & 0x7ff) + ((rng() & 1) << 15)); };
    const char* only_shape = std::getenv("KBIT_AB_SHAPE");

    for (const Shape& shape : shapes) {
        if (only_shape != nullptr && only_shape != std::string(shape.name)) continue;
        std::vector<uint16_t> halves(static_cast<size_t>(shape.n) * shape.k);
        std::generate(halves.begin(), halves.end(), random_half);
        std::vector<__half*> dense(copies_for(halves.size() * 2));
        for (auto& ptr : dense) ptr = reinterpret_cast<__half*>(device_copy(halves));
        halves.resize(static_cast<size_t>(max_m) * shape.k);
        auto* x = reinterpret_cast<__half*>(device_copy(halves));
        __half *y = nullptr, *out = nullptr;
        check(cudaMalloc(&y, halves.size() * 2), "cudaMalloc");
        check(cudaMalloc(&out, static_cast<size_t>(max_m) * shape.n * 2), "cudaMalloc");
        // wgmma: its workspace (the largest over M), and the dense weight that dequantize + cuBLAS writes
        void* workspace = nullptr;
        __half* decoded = nullptr;
        if (tier == DenseTier::kWgmma) {
#ifdef KBIT_WGMMA
            long long bytes = 0;
            for (int m : token_counts) bytes = std::max(bytes, kbit::wgmma_workspace_bytes(m, shape.n, shape.k));
            check(cudaMalloc(&workspace, bytes), "cudaMalloc");
#else
            throw std::runtime_error("built without the Hopper tier (kernel_ab.py --wgmma builds it)");
#endif
            check(cudaMalloc(&decoded, static_cast<size_t>(shape.n) * shape.k * 2), "cudaMalloc");
        }
        const auto before_call = [&](int m) {
            if (interleave) preceding_kernel<<<(m * shape.k + 255) / 256, 256, 0, stream>>>(x, y, m * shape.k);
        };
        for (int bits : kBitWidths) {
            if (!listed("KBIT_AB_BITS", bits)) continue;
            const RandomTiles tiles = random_tiles(rng, shape.n / kbit::kTileRows, shape.k, bits);
            const int copies = copies_for(tiles.qweight.size() + tiles.absmax.size());
            std::vector<kbit::KernelWeight> weights;
            const kbit::Codebook codebook = linear_codebook(bits);
            float* scale_d = device_copy(std::vector<float>(shape.n, 0.01f));
            for (int c = 0; c < copies; ++c) {
                weights.push_back({device_copy(tiles.qweight), device_copy(tiles.absmax), scale_d, codebook,
                                   shape.n, shape.k, bits});
            }
            for (int m : token_counts) {
                if (!timed(m)) continue;
                const float alpha = 1.f, beta = 0.f;
                const auto cublas_fp16 = [&](const __half* w) {
                    check(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, shape.n, m, shape.k, &alpha, w, CUDA_R_16F,
                                       shape.k, x, CUDA_R_16F, shape.k, &beta, out, CUDA_R_16F, shape.n,
                                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                          "cublasGemmEx");
                };
                const float kbit_us = time_graph([&] {
                    for (const auto& w : weights) {
                        before_call(m);
#ifdef KBIT_WGMMA
                        if (tier == DenseTier::kWgmma) {
                            kbit::wgmma(out, x, w, m, kbit::DType::kFloat16, workspace, stream);
                            continue;
                        }
#endif
                        kbit::mma(out, x, w, m, kbit::DType::kFloat16, stream);
                    }
                }, copies, stream);
                const float fp16_us = time_graph([&] {
                    for (const __half* w : dense) {
                        before_call(m);
                        cublas_fp16(w);
                    }
                }, static_cast<int>(dense.size()), stream);
                printf("%s\t%s\t%d\t%d\t%.2f\t%.2f\n", label.c_str(), shape.name, bits, m, kbit_us, fp16_us);
                if (tier == DenseTier::kWgmma) {
                    const float dequant_us = time_graph([&] {
                        for (const auto& w : weights) {
                            kbit::dequantize(decoded, w, kbit::DType::kFloat16, stream);
                            cublas_fp16(decoded);
                        }
                    }, copies, stream);
                    printf("%s\t%s dq\t%d\t%d\t%.2f\t%.2f\n", label.c_str(), shape.name, bits, m, dequant_us,
                           fp16_us);
                }
                fflush(stdout);
            }
            for (const auto& w : weights) free_weight(w);
            check(cudaFree(scale_d), "cudaFree");
        }
        for (auto* ptr : dense) check(cudaFree(ptr), "cudaFree");
        if (workspace != nullptr) check(cudaFree(workspace), "cudaFree");
        if (decoded != nullptr) check(cudaFree(decoded), "cudaFree");
        check(cudaFree(x), "cudaFree");
        check(cudaFree(y), "cudaFree");
        check(cudaFree(out), "cudaFree");
    }
    check(cublasDestroy(cublas), "cublasDestroy");
}

constexpr int kMaxM = 64;  // MoE tokens

struct MoeModel {
    const char* name;
    int experts, top_k, hidden, intermediate;
};

void time_moe(const std::string& label, std::mt19937& rng, cudaStream_t stream) {
    const MoeModel models[] = {{"Qwen3-30B-A3B", 128, 8, 2048, 768}, {"Qwen3-Next", 512, 10, 2048, 512}};
    const int token_counts[] = {1, 2, 4, 8, 16, 32, 64};
    constexpr int kRoutings = 16;
    for (const MoeModel& model : models) {
        const int h = model.hidden, inter = model.intermediate, e = model.experts, top_k = model.top_k;
        // bf16 activations of 0.125..2 in magnitude
        std::vector<uint16_t> xs(static_cast<size_t>(kMaxM) * h);
        for (auto& v : xs) v = static_cast<uint16_t>(0x3e00 + (rng() & 0x1ff) + ((rng() & 1) << 15));
        void* x = device_copy(xs);
        void *hidden = nullptr, *out = nullptr;
        float* pair_out = nullptr;
        check(cudaMalloc(&hidden, static_cast<size_t>(kMaxM) * top_k * inter * 2), "cudaMalloc");
        check(cudaMalloc(&pair_out, static_cast<size_t>(kMaxM) * top_k * h * 4), "cudaMalloc");
        check(cudaMalloc(&out, static_cast<size_t>(kMaxM) * h * 2), "cudaMalloc");
        for (int bits : kBitWidths) {
            const kbit::Codebook codebook = linear_codebook(bits);
            const auto stacked = [&](int n, int k) {  // e experts' [n, k] weights
                const RandomTiles tiles = random_tiles(rng, static_cast<long long>(e) * n / kbit::kTileRows, k, bits);
                return kbit::KernelWeight{device_copy(tiles.qweight), device_copy(tiles.absmax),
                                          device_copy(std::vector<float>(static_cast<size_t>(e) * n, 0.01f)),
                                          codebook, n, k, bits};
            };
            const kbit::KernelWeight w13 = stacked(2 * inter, h), w2 = stacked(h, inter);
            for (int m : token_counts) {
                if (!timed(m)) continue;
                std::vector<kbit::MoeRouting> routings;
                std::vector<int> order(e);
                for (int r = 0; r < kRoutings; ++r) {
                    std::vector<int32_t> ids(static_cast<size_t>(m) * top_k);
                    std::vector<float> weights(ids.size());
                    for (int t = 0; t < m; ++t) {
                        for (int i = 0; i < e; ++i) order[i] = i;
                        std::shuffle(order.begin(), order.end(), rng);
                        for (int j = 0; j < top_k; ++j) {
                            ids[t * top_k + j] = order[j];
                            weights[t * top_k + j] = 0.05f + static_cast<float>(rng() % 100) / 1000.f;
                        }
                    }
                    routings.push_back({device_copy(ids), device_copy(weights), m, top_k, e});
                }
                const float kbit_us = time_graph([&] {
                    for (const auto& r : routings) {
                        kbit::moe_experts(out, x, hidden, pair_out, r, w13, w2, kbit::kMoeSilu,
                                          kbit::DType::kBFloat16, stream);
                    }
                }, kRoutings, stream);
                printf("%s\t%s\t%d\t%d\t%.2f\tnan\n", label.c_str(), model.name, bits, m, kbit_us);
                fflush(stdout);
                for (const auto& r : routings) {
                    check(cudaFree(const_cast<int32_t*>(r.topk_ids)), "cudaFree");
                    check(cudaFree(const_cast<float*>(r.topk_weights)), "cudaFree");
                }
            }
            for (const auto* w : {&w13, &w2}) {
                free_weight(*w);
                check(cudaFree(const_cast<float*>(w->scale)), "cudaFree");
            }
        }
        check(cudaFree(x), "cudaFree");
        check(cudaFree(hidden), "cudaFree");
        check(cudaFree(pair_out), "cudaFree");
        check(cudaFree(out), "cudaFree");
    }
}

}  // namespace

int main(int argc, char** argv) {
    const std::string label = argc > 1 ? argv[1] : "base";
    const std::string mode = argc > 2 ? argv[2] : "";
    cudaStream_t stream;
    std::mt19937 rng(1234);
    try {
        check(cudaStreamCreate(&stream), "cudaStreamCreate");
        if (mode == "moe") {
            time_moe(label, rng, stream);
        } else {
            time_dense(label, mode == "interleave", mode == "wgmma" ? DenseTier::kWgmma : DenseTier::kMma, rng, stream);
        }
    } catch (const std::exception& e) {
        fprintf(stderr, "kernel_ab: %s\n", e.what());
        return 1;
    }
    return 0;
}
