// Grouped MoE experts: out [M, H] = sum_j w[m, j] * expert_{id[m, j]}(x[m]), with expert_e(x) = W2_e (act(W1_e x)
// * (W3_e x)), for each chunk of tokens (as many as one launch takes: 64, fewer on GPUs with less shared memory or
// for top_k > 8) in two launches, then one sum, and no host synchronization (so a CUDA graph can hold it whatever
// the routing):
//   1. gate/up: the MMA kernel of mma_core.cuh over the stacked W13 [E * 2I, H]; a unit is one used expert x some
//      gate row tiles and their up row tiles (rows I further), so the activation is applied where the sums are
//      finished, and act(gate) * up goes to hidden [pair, I] (pair = m * top_k + j, in the activation dtype, as
//      vLLM's fused MoE rounds it);
//   2. down: the MMA kernel over the stacked W2 [E * H, I]; a unit is one used expert x row tiles, its tokens read
//      their pair's hidden row, and w[m, j] * (W2_e h) goes to pair_out [pair, H] (fp32);
//   3. moe_sum: out [m] = sum over the top-k pairs of pair_out, rounded once.
// A single token (M = 1, top_k <= 16) skips pair_out and the sum: its down launch (MoeTokenDownProblem) adds the
// experts' outputs itself.
// Every block finds the used experts itself from topk_ids (a bitmap in shared memory, then a prefix count), so
// experts without tokens cost nothing and each used expert's weights are read once per launch, for all of its
// tokens (its token slots are the pairs that chose it, found with a warp ballot when a unit starts). Pairs whose
// id is outside [0, E) contribute nothing.
#include <algorithm>
#include <cmath>

#include "mma_core.cuh"

namespace kbit {
namespace {

using namespace mma_core;

constexpr int kMostWarps = block_warps(1);  // of any launch

struct MoeShared {
    uint32_t used_bits[kMoeMaxExperts / 32];  // bit e: some pair chose expert e
    int16_t pair_expert[kMoeMaxPairs];        // expert of pair q, -1 for an id outside [0, E)
    int16_t used_expert[kMoeMaxPairs];        // the used experts, ascending
    int num_used;
    uint16_t slot_pair[kMostWarps][kMaxLaunchTokens];  // per warp: the pair of each token slot of its current unit
    int slot_count[kMostWarps];
};

__device__ __forceinline__ float activate(int activation, float g) {
    switch (activation) {
        case kMoeSilu: return g / (1.f + __expf(-g));
        case kMoeGelu: return 0.5f * g * (1.f + erff(g * 0.70710678118654752f));
        default: return 0.5f * g * (1.f + tanhf(0.79788456080286536f * (g + 0.044715f * g * g * g)));  // gelu_tanh
    }
}

// GATED: the gate/up launch (weights W13, activations x, output hidden); otherwise the down launch (weights W2,
// activations hidden, output pair_out).
template <bool GATED>
struct MoeProblem {
    using Shared = MoeShared;
    const int32_t* topk_ids;
    const float* topk_weights;
    const void* x;
    void* out;
    int pairs, top_k, experts;
    int rowtiles;       // row tiles per expert (N / 32)
    int unit_outputs;   // row tiles of output per unit (GATED: the unit decodes as many up row tiles too)
    int units_per_expert;
    int activation;

    // Row tiles of output per expert: GATED, the gate half.
    __device__ int out_rowtiles() const { return GATED ? rowtiles / 2 : rowtiles; }

    __device__ void setup(Shared& s) const {
        // The gate/up launch waits for the kernel before it (which may have written the routing). The down launch
        // starts only once the gate/up launch of its chunk has passed that wait, so the routing is complete: it
        // reads it at once, and its weight loads and table build overlap the gate/up launch's tail (mma_kernel
        // waits before it reads hidden).
        if (GATED) wait_for_prior_grid();
        for (int i = threadIdx.x; i < kMoeMaxExperts / 32; i += blockDim.x) s.used_bits[i] = 0;
        for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
            const int id = topk_ids[q];
            s.pair_expert[q] = static_cast<int16_t>(id >= 0 && id < experts ? id : -1);
        }
        __syncthreads();
        for (int q = threadIdx.x; q < pairs; q += blockDim.x) {
            const int e = s.pair_expert[q];
            if (e >= 0) atomicOr(&s.used_bits[e >> 5], 1u << (e & 31));
        }
        __syncthreads();
        if (threadIdx.x < 32) {  // one word of the bitmap per lane (kMoeMaxExperts <= 1024)
            const int lane = threadIdx.x;
            uint32_t bits = s.used_bits[lane];
            const int count = __popc(bits);
            int inclusive = count;
#pragma unroll
            for (int d = 1; d < 32; d *= 2) {
                const int v = __shfl_up_sync(~0u, inclusive, d);
                if (lane >= d) inclusive += v;
            }
            for (int at = inclusive - count; bits != 0; bits &= bits - 1) {
                s.used_expert[at++] = static_cast<int16_t>(32 * lane + __ffs(bits) - 1);
            }
            if (lane == 31) s.num_used = inclusive;
        }
        __syncthreads();
    }

    __device__ int units(const Shared& s) const { return s.num_used * units_per_expert; }

    __device__ int rowtile(const Shared& s, int unit, int sub) const {
        if (unit >= units(s)) return -1;
        const int expert = s.used_expert[unit / units_per_expert];
        const int first = unit % units_per_expert * unit_outputs;
        int local;
        if (GATED) {  // warps 2 g decode gate row tile first + g, warps 2 g + 1 its up row tile
            if (first + sub / 2 >= out_rowtiles()) return -1;
            local = first + sub / 2 + (sub % 2) * out_rowtiles();
        } else {
            if (first + sub >= rowtiles) return -1;
            local = first + sub;
        }
        return expert * rowtiles + local;
    }

    template <int NT>
    __device__ void begin_unit(Shared& s, const MmaParams& p, int unit, int warp, int lane,
                               const uint4* (&x_lane)[NT], float& slot_factor) const {
        const int expert = s.used_expert[unit / units_per_expert];
        int count = 0;
        for (int base = 0; base < pairs; base += 32) {
            const int q = base + lane;
            const bool hit = q < pairs && s.pair_expert[q] == expert;
            const uint32_t mask = __ballot_sync(~0u, hit);
            const int slot = count + __popc(mask & ((1u << lane) - 1u));
            if (hit && slot < kMaxLaunchTokens) s.slot_pair[warp][slot] = static_cast<uint16_t>(q);
            count += __popc(mask);
        }
        count = min(count, p.m);  // a token chooses an expert at most once, so count <= M
        __syncwarp();
        const int row_divisor = GATED ? top_k : 1;  // x holds tokens (GATED) or pairs
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int slot = (lane >> 2) + 8 * nt;
            x_lane[nt] = lane_activations(x, p.k, slot < count ? s.slot_pair[warp][slot] / row_divisor : -1,
                                          lane & 3);
        }
        if (lane == 0) s.slot_count[warp] = count;
        // the down GEMM's outputs carry their routing weight (loaded now, used at the unit's end)
        slot_factor = GATED || lane >= count ? 1.f : __ldg(topk_weights + s.slot_pair[warp][lane]);
    }

    template <typename T>
    __device__ void store(const Shared& s, const float* partial, const MmaParams& p, int unit) const {
        const int count = s.slot_count[0];
        const int first = unit % units_per_expert * unit_outputs;
        const int out_rows = out_rowtiles() * kTileRows;  // I (GATED) or H
        for (int o = threadIdx.x; o < unit_outputs * count * kTileRows; o += blockDim.x) {
            const int row = o % kTileRows, slot = o / kTileRows % count, t = o / kTileRows / count;
            const int local = first + t;
            if (local >= out_rowtiles()) continue;
            const int pair = s.slot_pair[0][slot];
            const long long at = static_cast<long long>(pair) * out_rows + local * kTileRows + row;
            if (GATED) {
                const float gate = slice_sum(partial, p, 2 * t, slot, row);
                Act<T>::store(out, at, activate(activation, gate) * slice_sum(partial, p, 2 * t + 1, slot, row));
            } else {
                static_cast<float*>(out)[at] = slice_sum(partial, p, t, slot, row);
            }
        }
    }
};

// The down launch of a single token (M = 1) with top_k <= kMostWarps: a unit is one output row tile; warps `sub` =
// j (0 .. top_k - 1) decode that row tile of expert topk_ids[j] (the K-slices of each j are the other warps), read
// pair j's hidden row and carry its routing weight, and the unit's store adds the experts' sums in the order of j.
// So the outputs are final in this launch: no pair_out, no sum launch (which took 1.8-2.1 us of the 20 us of a
// Qwen3-30B-A3B or Qwen3-Next layer at M = 1 on an H100). The same sums as moe_sum's, in the same order of j; only
// the K-split differs. Only 64 blocks have a unit at H = 2048, yet the layer ran 1.07x (Qwen3-30B-A3B) and 1.14x
// (Qwen3-Next) faster than with the general down launch and the sum (kernel_ab --moe, H100).
struct MoeTokenDownProblem {
    struct Shared {};
    const int32_t* topk_ids;
    const float* topk_weights;
    const void* hidden;  // [top_k, I]
    void* out;           // [1, H]
    int top_k, experts;
    int rowtiles;        // H / 32

    __device__ void setup(Shared&) const {}
    __device__ int units(const Shared&) const { return rowtiles; }
    __device__ int rowtile(const Shared&, int unit, int sub) const {
        if (unit >= rowtiles || sub >= top_k) return -1;
        const int expert = __ldg(topk_ids + sub);
        return expert >= 0 && expert < experts ? expert * rowtiles + unit : -1;
    }
    template <int NT>
    __device__ void begin_unit(Shared&, const MmaParams& p, int, int warp, int lane, const uint4* (&x_lane)[NT],
                               float& slot_factor) const {
        const int j = warp >> p.slices_log2;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            x_lane[nt] = lane_activations(hidden, p.k, nt == 0 && lane < 4 && j < top_k ? j : -1, lane & 3);
        }
        slot_factor = lane == 0 && j < top_k ? __ldg(topk_weights + j) : 1.f;
    }
    template <typename T>
    __device__ void store(const Shared&, const float* partial, const MmaParams& p, int unit) const {
        for (int row = threadIdx.x; row < kTileRows; row += blockDim.x) {
            float sum = 0.f;
            for (int j = 0; j < top_k; ++j) {  // as moe_sum: ids outside [0, E) (and their weights) count for nothing
                const int expert = __ldg(topk_ids + j);
                if (expert >= 0 && expert < experts) sum += slice_sum(partial, p, j, 0, row);
            }
            Act<T>::store(out, static_cast<long long>(unit) * kTileRows + row, sum);
        }
    }
};

template <typename T>
__global__ void moe_sum_kernel(void* out, const float* pair_out, const int32_t* topk_ids, int m, int top_k, int h,
                               int experts) {
    wait_for_prior_grid();  // pair_out of the down launch
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m * h) return;
    const int token = i / h, col = i % h;
    float sum = 0.f;
    for (int j = 0; j < top_k; ++j) {
        const int pair = token * top_k + j, id = topk_ids[pair];
        if (id >= 0 && id < experts) sum += pair_out[static_cast<long long>(pair) * h + col];
    }
    Act<T>::store(out, i, sum);
}

template <bool GATED>
MoeProblem<GATED> make_problem(const MoeRouting& r, const MmaParams& p, const KernelWeight& w, const void* x,
                               void* out, int activation) {
    const int rowtiles = w.n / kTileRows;
    const int unit_rowtiles = block_warps(token_tiles(r.m)) >> p.slices_log2;
    const int unit_outputs = GATED ? unit_rowtiles / 2 : unit_rowtiles;
    const int out_rowtiles = GATED ? rowtiles / 2 : rowtiles;
    return {r.topk_ids, r.topk_weights, x, out, r.m * r.top_k, r.top_k, r.experts, rowtiles, unit_outputs,
            (out_rowtiles + unit_outputs - 1) / unit_outputs, activation};
}

// Blocks for a launch: units are not known on the host (they depend on the routing), at most one per pair or
// expert.
int moe_grid(const MoeRouting& r, int units_per_expert) {
    const long long bound = static_cast<long long>(std::min(r.m * r.top_k, r.experts)) * units_per_expert;
    return static_cast<int>(std::min<long long>(bound, multiprocessors()));
}

// The split of one launch by least_cost_split, with rounds from the expected number of used experts under uniform
// routing (one token uses top_k experts, 16 tokens (top-8 of 128) about 82). GATED units hold gate and up row tiles
// in pairs, so they take at most half the warps as K-slices. On an H100, against the rule before (the fewest
// K-slices that still gave every multiprocessor two units): M = 1..2 1.09-1.31x, M = 8..16 1.00-1.06x, M = 32..64
// 0.97-1.01x (benchmarks/kernel_experiments.md).
template <bool GATED>
MmaParams moe_params(const MoeRouting& r, const KernelWeight& w) {
    const double unused = std::pow(1.0 - std::min(1.0, static_cast<double>(r.top_k) / r.experts), r.m);
    const double used = r.experts * (1.0 - unused);
    const int warps = block_warps(token_tiles(r.m));
    return least_cost_split(w, r.m, GATED ? warps / 2 : warps, true, [&](const MmaParams& p) {
        const int units_per_expert = make_problem<GATED>(r, p, w, nullptr, nullptr, 0).units_per_expert;
        return std::ceil(used * units_per_expert / moe_grid(r, units_per_expert));
    });
}

}  // namespace

void moe_experts(void* out, const void* x, void* hidden, float* pair_out, const MoeRouting& routing,
                 const KernelWeight& w13, const KernelWeight& w2, int activation, DType dtype, cudaStream_t stream) {
    if (routing.m < 1 || routing.top_k < 1 || routing.top_k > kMoeMaxPairs) {
        throw std::invalid_argument("vllm_kbit.moe_experts: M must be >= 1 and top_k in 1..kMoeMaxPairs");
    }
    const int intermediate = w13.n / 2, hidden_size = w2.n;
    constexpr size_t kElementBytes = 2;  // fp16 / bf16
    // Tokens per launch: the token slots and partial sums of one launch, and kMoeMaxPairs pairs.
    const int per_launch = std::min(max_launch_tokens(w13.bits, sizeof(MoeShared)), kMoeMaxPairs / routing.top_k);
    // One token whose top_k experts fit the warps of a block: its down launch sums the experts (MoeTokenDownProblem).
    const bool one_token = routing.m == 1 && routing.top_k <= kMostWarps;
    for (int first = 0; first < routing.m; first += per_launch) {
        const long long first_pair = static_cast<long long>(first) * routing.top_k;
        const MoeRouting r{routing.topk_ids + first_pair, routing.topk_weights + first_pair,
                           std::min(per_launch, routing.m - first), routing.top_k, routing.experts};
        const void* x_chunk = static_cast<const char*>(x) + first * static_cast<size_t>(hidden_size) * kElementBytes;
        void* hidden_chunk = static_cast<char*>(hidden) + first_pair * intermediate * kElementBytes;
        float* pair_out_chunk = pair_out + first_pair * hidden_size;

        // each launch lets the next (down, the next chunk's gate/up, the sum) start early; the one-token down launch
        // is the op's last
        const MmaParams p13 = moe_params<true>(r, w13);
        const auto gate_up = make_problem<true>(r, p13, w13, x_chunk, hidden_chunk, activation);
        launch_any<MoeProblem<true>, kMaxTokenTiles>(p13, gate_up, w13.bits, dtype,
                                                     moe_grid(r, gate_up.units_per_expert), first > 0, stream);

        if (one_token) {  // a power-of-two group of warps per expert j: its K-slices
            int expert_groups = 1;
            while (expert_groups < r.top_k) expert_groups *= 2;
            const MmaParams p2 = make_params(w2, 1, kMostWarps / expert_groups, false);
            const MoeTokenDownProblem down{r.topk_ids, r.topk_weights, hidden_chunk, out, r.top_k, r.experts,
                                           w2.n / kTileRows};
            launch_any<MoeTokenDownProblem, 1>(p2, down, w2.bits, dtype, std::min(down.rowtiles, multiprocessors()),
                                               true, stream);
            return;  // the only chunk, and no sum
        }
        const MmaParams p2 = moe_params<false>(r, w2);
        const auto down = make_problem<false>(r, p2, w2, hidden_chunk, pair_out_chunk, activation);
        launch_any<MoeProblem<false>, kMaxTokenTiles>(p2, down, w2.bits, dtype, moe_grid(r, down.units_per_expert),
                                                      true, stream);
    }

    constexpr int kSumThreads = 256;
    const int blocks = (routing.m * hidden_size + kSumThreads - 1) / kSumThreads;
    const auto sum = [&](auto act) {
        launch_kernel<moe_sum_kernel<decltype(act)>>(true, blocks, kSumThreads, 0, stream, "moe_sum kernel launch",
                                                     out, static_cast<const float*>(pair_out), routing.topk_ids,
                                                     routing.m, routing.top_k, hidden_size, routing.experts);
    };
    if (dtype == DType::kFloat16) {
        sum(__half{});
    } else {
        sum(__nv_bfloat16{});
    }
}

}  // namespace kbit
