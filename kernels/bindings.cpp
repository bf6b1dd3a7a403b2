// vllm_kbit._C: the kbit kernels behind a torch-free Python interface. Tensors come in as raw device pointers
// (Python ints, e.g. tensor.data_ptr()), the CUDA stream as an int (torch.cuda.current_stream().cuda_stream), the
// activation dtype as a code (0 = fp16, 1 = bf16), so one build serves any torch version. qweight / absmax are in
// the kernel layout (vllm_kbit.format.to_kernel_layout). The codebook (fp32 [2^bits]) is the one host pointer: its
// values are read at the call and passed to the kernels by value (kbit_ops.h Codebook). Arguments are validated
// here; invalid ones raise ValueError, CUDA failures RuntimeError. No call synchronizes or allocates, so all can be
// captured in CUDA graphs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

#include "kbit_ops.h"

namespace py = pybind11;

namespace {

using kbit::DType;

[[noreturn]] void fail(const std::string& fn, const std::string& what) {
    throw std::invalid_argument("vllm_kbit._C." + fn + ": " + what);
}

void check_pointer(const std::string& fn, const char* name, uintptr_t ptr, uintptr_t alignment) {
    if (ptr == 0) fail(fn, std::string(name) + " is a null pointer");
    if (ptr % alignment) {
        fail(fn, std::string(name) + " must be " + std::to_string(alignment) + "-byte aligned (got address " +
                     std::to_string(ptr) + "); pass a contiguous tensor that is not an offset view");
    }
}

DType check_dtype(const std::string& fn, int dtype) {
    if (dtype != 0 && dtype != 1) fail(fn, "dtype must be 0 (float16) or 1 (bfloat16), got " + std::to_string(dtype));
    return static_cast<DType>(dtype);
}

// The 2^bits values at host address `codebook` (a CPU tensor's data_ptr()).
kbit::Codebook host_codebook(const std::string& fn, uintptr_t codebook, int bits) {
    check_pointer(fn, "codebook", codebook, 4);
    cudaPointerAttributes attr{};
    kbit::check_cuda(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(codebook)),
                     "cudaPointerGetAttributes");
    if (attr.type == cudaMemoryTypeDevice) {
        fail(fn, "codebook must be in host memory (a CPU tensor): its values are passed to the kernels by value");
    }
    kbit::Codebook values{};
    std::memcpy(values.value, reinterpret_cast<const void*>(codebook), sizeof(float) << bits);
    return values;
}

kbit::KernelWeight check_weight(const std::string& fn, uintptr_t qweight, uintptr_t absmax, uintptr_t scale,
                                uintptr_t codebook, int64_t n, int64_t k, int bits) {
    if (bits < 2 || bits > 5) fail(fn, "bits must be 2, 3, 4 or 5, got " + std::to_string(bits));
    if (n <= 0 || n % 32) fail(fn, "N (out_features) must be a positive multiple of 32, got " + std::to_string(n));
    if (k <= 0 || k % 32) fail(fn, "K (in_features) must be a positive multiple of 32, got " + std::to_string(k));
    if (n > (int64_t{1} << 30) || k > (int64_t{1} << 24)) {
        fail(fn, "N = " + std::to_string(n) + ", K = " + std::to_string(k) + " is larger than supported");
    }
    check_pointer(fn, "qweight", qweight, 16);
    check_pointer(fn, "absmax", absmax, 4);
    check_pointer(fn, "scale", scale, 4);
    return {reinterpret_cast<const void*>(qweight), reinterpret_cast<const void*>(absmax),
            reinterpret_cast<const float*>(scale), host_codebook(fn, codebook, bits), static_cast<int>(n),
            static_cast<int>(k), bits};
}

// Makes the device that owns `ptr` current for this thread's (statically linked) CUDA runtime, which keeps its own
// current device apart from torch's.
void use_device_of(const std::string& fn, uintptr_t ptr) {
    cudaPointerAttributes attr{};
    kbit::check_cuda(cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr)),
                     "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
        fail(fn, "out is not CUDA device memory");
    }
    int current = -1;
    kbit::check_cuda(cudaGetDevice(&current), "cudaGetDevice");
    if (current != attr.device) kbit::check_cuda(cudaSetDevice(attr.device), "cudaSetDevice");
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

void dequantize(uintptr_t out, uintptr_t qweight, uintptr_t absmax, uintptr_t scale, uintptr_t codebook, int64_t n,
                int64_t k, int bits, int dtype, uintptr_t stream) {
    const std::string fn = "dequantize";
    const kbit::KernelWeight w = check_weight(fn, qweight, absmax, scale, codebook, n, k, bits);
    const DType dt = check_dtype(fn, dtype);
    check_pointer(fn, "out", out, 16);
    use_device_of(fn, out);
    kbit::dequantize(reinterpret_cast<void*>(out), w, dt, as_stream(stream));
}

// The checks of a product out [M, N] = x [M, K] @ W^T (mma, wgmma); makes out's device current.
kbit::KernelWeight check_product(const std::string& fn, uintptr_t out, uintptr_t x, uintptr_t qweight,
                                 uintptr_t absmax, uintptr_t scale, uintptr_t codebook, int64_t m, int64_t n,
                                 int64_t k, int bits) {
    const kbit::KernelWeight w = check_weight(fn, qweight, absmax, scale, codebook, n, k, bits);
    if (m < 1 || m > std::numeric_limits<int>::max()) {
        fail(fn, "M (rows of x) must be in 1..2^31-1, got " + std::to_string(m));
    }
    check_pointer(fn, "x", x, 16);
    check_pointer(fn, "out", out, 2);
    use_device_of(fn, out);
    return w;
}

void mma(uintptr_t out, uintptr_t x, uintptr_t qweight, uintptr_t absmax, uintptr_t scale, uintptr_t codebook,
         int64_t m, int64_t n, int64_t k, int bits, int dtype, uintptr_t stream) {
    const std::string fn = "mma";
    const DType dt = check_dtype(fn, dtype);
    const kbit::KernelWeight w = check_product(fn, out, x, qweight, absmax, scale, codebook, m, n, k, bits);
    kbit::mma(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x), w, static_cast<int>(m), dt,
              as_stream(stream));
}

#ifdef KBIT_WGMMA
// Bytes of the workspace that wgmma needs for this product on out's device.
int64_t wgmma_workspace(uintptr_t out, int64_t m, int64_t n, int64_t k) {
    const std::string fn = "wgmma_workspace";
    if (m < 1 || m > std::numeric_limits<int>::max() || n < 1 || n > (int64_t{1} << 30) || k < 1 ||
        k > (int64_t{1} << 24)) {
        fail(fn, "M, N, K out of range");
    }
    check_pointer(fn, "out", out, 2);
    use_device_of(fn, out);
    return kbit::wgmma_workspace_bytes(static_cast<int>(m), static_cast<int>(n), static_cast<int>(k));
}

void wgmma(uintptr_t out, uintptr_t x, uintptr_t qweight, uintptr_t absmax, uintptr_t scale, uintptr_t codebook,
           uintptr_t workspace, int64_t m, int64_t n, int64_t k, int bits, int dtype, uintptr_t stream) {
    const std::string fn = "wgmma";
    const DType dt = check_dtype(fn, dtype);
    const kbit::KernelWeight w = check_product(fn, out, x, qweight, absmax, scale, codebook, m, n, k, bits);
    check_pointer(fn, "out", out, 16);  // 8 outputs at a time (the K-slice sum stores 4)
    check_pointer(fn, "workspace", workspace, 16);
    kbit::wgmma(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x), w, static_cast<int>(m), dt,
                reinterpret_cast<void*>(workspace), as_stream(stream));
}
#endif

void moe_experts(uintptr_t out, uintptr_t x, uintptr_t hidden, uintptr_t pair_out, uintptr_t topk_ids,
                 uintptr_t topk_weights, uintptr_t w13_qweight, uintptr_t w13_absmax, uintptr_t w13_scale,
                 uintptr_t w2_qweight, uintptr_t w2_absmax, uintptr_t w2_scale, uintptr_t codebook, int64_t m,
                 int64_t top_k, int64_t experts, int64_t hidden_size, int64_t intermediate, int bits, int activation,
                 int dtype, uintptr_t stream) {
    const std::string fn = "moe_experts";
    if (experts < 1 || experts > kbit::kMoeMaxExperts) {
        fail(fn, "the number of experts must be in 1.." + std::to_string(kbit::kMoeMaxExperts) + ", got " +
                     std::to_string(experts));
    }
    if (intermediate <= 0 || intermediate % 32) {
        fail(fn, "the intermediate size must be a positive multiple of 32, got " + std::to_string(intermediate));
    }
    // The stacked experts are checked as one [E * N, K] weight each.
    const kbit::KernelWeight w13 = check_weight(fn, w13_qweight, w13_absmax, w13_scale, codebook,
                                                experts * 2 * intermediate, hidden_size, bits);
    const kbit::KernelWeight w2 =
        check_weight(fn, w2_qweight, w2_absmax, w2_scale, codebook, experts * hidden_size, intermediate, bits);
    const DType dt = check_dtype(fn, dtype);
    if (m < 1 || m > std::numeric_limits<int>::max()) {
        fail(fn, "M (tokens) must be in 1..2^31-1, got " + std::to_string(m));
    }
    if (top_k < 1 || top_k > kbit::kMoeMaxPairs) {
        fail(fn, "top_k must be in 1.." + std::to_string(kbit::kMoeMaxPairs) + ", got " + std::to_string(top_k));
    }
    if (activation < kbit::kMoeSilu || activation > kbit::kMoeGeluTanh) {
        fail(fn, "activation must be 0 (silu), 1 (gelu) or 2 (gelu_tanh), got " + std::to_string(activation));
    }
    check_pointer(fn, "x", x, 16);
    check_pointer(fn, "hidden", hidden, 16);
    check_pointer(fn, "pair_out", pair_out, 4);
    check_pointer(fn, "topk_ids", topk_ids, 4);
    check_pointer(fn, "topk_weights", topk_weights, 4);
    check_pointer(fn, "out", out, 2);
    use_device_of(fn, out);
    const kbit::MoeRouting routing{reinterpret_cast<const int32_t*>(topk_ids),
                                   reinterpret_cast<const float*>(topk_weights), static_cast<int>(m),
                                   static_cast<int>(top_k), static_cast<int>(experts)};
    // Per expert from here on.
    kbit::KernelWeight w13_expert = w13, w2_expert = w2;
    w13_expert.n = static_cast<int>(2 * intermediate);
    w2_expert.n = static_cast<int>(hidden_size);
    kbit::moe_experts(reinterpret_cast<void*>(out), reinterpret_cast<const void*>(x), reinterpret_cast<void*>(hidden),
                      reinterpret_cast<float*>(pair_out), routing, w13_expert, w2_expert, activation, dt,
                      as_stream(stream));
}

}  // namespace

PYBIND11_MODULE(_C, mod) {
    mod.doc() = "kbit CUDA kernels (raw device pointers; see kernels/bindings.cpp)";
    mod.attr("MOE_MAX_PAIRS") = kbit::kMoeMaxPairs;
    mod.attr("MOE_MAX_EXPERTS") = kbit::kMoeMaxExperts;
    mod.def("dequantize", &dequantize,
            "out [N, K] (dtype) = dense weight decoded from the kernel layout, equal to format.dequantize rounded "
            "to dtype.",
            py::arg("out"), py::arg("qweight"), py::arg("absmax"), py::arg("scale"), py::arg("codebook"),
            py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("dtype"), py::arg("stream"));
    mod.def("mma", &mma,
            "out [M, N] = x [M, K] @ W^T (dequantization fused into tensor-core MMA; the weight is read once per "
            "64 rows of x, 16 for k = 2 and 4 where a block gets less shared memory, as on sm_86 / sm_89); x and out "
            "row-major contiguous of dtype, fp32 accumulation.",
            py::arg("out"), py::arg("x"), py::arg("qweight"), py::arg("absmax"), py::arg("scale"),
            py::arg("codebook"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("bits"), py::arg("dtype"),
            py::arg("stream"));
#ifdef KBIT_WGMMA
    mod.def("wgmma_workspace", &wgmma_workspace,
            "Bytes of the device workspace that wgmma needs for this product on out's device.",
            py::arg("out"), py::arg("M"), py::arg("N"), py::arg("K"));
    mod.def("wgmma", &wgmma,
            "out [M, N] = x [M, K] @ W^T on the Hopper warpgroup MMA (sm_90 only; dequantization fused, the weight "
            "read once per 128 rows of x); x and out as for mma, out 16-byte aligned; workspace: "
            "wgmma_workspace(out, M, N, K) bytes.",
            py::arg("out"), py::arg("x"), py::arg("qweight"), py::arg("absmax"), py::arg("scale"),
            py::arg("codebook"), py::arg("workspace"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("bits"),
            py::arg("dtype"), py::arg("stream"));
#endif
    mod.def("moe_experts", &moe_experts,
            "out [M, H] = sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m]) for top_k <= MOE_MAX_PAIRS, in "
            "chunks of up to 64 tokens: grouped gate/up with the activation fused (0 silu, 1 gelu, 2 gelu_tanh), "
            "down with the routing weights, sum over top_k. Weights: E stacked experts in the kernel layout (w13 "
            "[E, 2I, H], w2 [E, H, I]); topk_ids int32, topk_weights fp32 [M, top_k]; workspace hidden [M * top_k, "
            "I] of dtype and pair_out fp32 [M * top_k, H].",
            py::arg("out"), py::arg("x"), py::arg("hidden"), py::arg("pair_out"), py::arg("topk_ids"),
            py::arg("topk_weights"), py::arg("w13_qweight"), py::arg("w13_absmax"), py::arg("w13_scale"),
            py::arg("w2_qweight"), py::arg("w2_absmax"), py::arg("w2_scale"), py::arg("codebook"), py::arg("M"),
            py::arg("top_k"), py::arg("experts"), py::arg("hidden_size"), py::arg("intermediate_size"),
            py::arg("bits"), py::arg("activation"), py::arg("dtype"), py::arg("stream"));
}
