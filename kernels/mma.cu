// MMA tier: out [M, n] = x [M, k] @ W^T with W in the kernel layout, read from HBM once per launch of up to 64
// tokens and decoded in registers straight into tensor-core operands, so the decode cost per weight does not
// depend on M (a fragment feeds one MMA per 8 tokens). The machinery is mma_core.cuh; here a unit is
// block_warps(NT) >> slices_log2 consecutive row tiles, token m reads row m of x, and the sums are stored as they are.
#include <algorithm>

#include "mma_core.cuh"

namespace kbit {
namespace {

using namespace mma_core;

struct DenseProblem {
    struct Shared {};
    void* out;
    const void* x;
    int n, rowtiles, unit_rowtiles;

    __device__ void setup(Shared&) const {}
    __device__ int units(const Shared&) const { return (rowtiles + unit_rowtiles - 1) >> (__ffs(unit_rowtiles) - 1); }
    __device__ int rowtile(const Shared&, int unit, int sub) const {
        const int r = unit * unit_rowtiles + sub;
        return r < rowtiles ? r : -1;
    }
    template <int NT>
    __device__ void begin_unit(Shared&, const MmaParams& p, int, int, int lane, const uint4* (&x_lane)[NT],
                               float& slot_factor) const {
        slot_factor = 1.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int m = (lane >> 2) + 8 * nt;
            x_lane[nt] = lane_activations(x, p.k, m < p.m ? m : -1, lane & 3);
        }
    }
    template <typename T>
    __device__ void store(const Shared&, const float* partial, const MmaParams& p, int unit) const {
        // A warp per (row tile, token) pair and a lane per row; unit_rowtiles is a power of two, so the pair's row
        // tile and token come from a mask and a shift (no division on the way from the unit's last MMA to its stores).
        const int warp = __shfl_sync(~0u, threadIdx.x >> 5, 0), row = threadIdx.x & 31;
        const int rowtiles_log2 = __ffs(unit_rowtiles) - 1;
        for (int pair = warp; pair < unit_rowtiles * p.m; pair += blockDim.x >> 5) {
            const int rs = pair & (unit_rowtiles - 1), m = pair >> rowtiles_log2;
            const int out_rowtile = unit * unit_rowtiles + rs;
            if (out_rowtile >= rowtiles) continue;
            const int n_index = out_rowtile * kTileRows + row;
            Act<T>::store(out, static_cast<long long>(m) * n + n_index, slice_sum(partial, p, rs, m, row));
        }
    }
};

// The split by least_cost_split, a round being one unit on every multiprocessor. Llama-3-8B gate_up (896 row tiles)
// gets 2 K-slices at 16 warps and 1 at 8 (1.03-1.36x faster on an H100 than the 16 and 8 of the rule before, units
// of two row tiles where that adds no row tile to the busiest block); every other benchmark shape keeps its split.
MmaParams dense_params(const KernelWeight& w, int tokens, int warps, int rowtiles, bool chained) {
    const int blocks = multiprocessors();
    return least_cost_split(w, tokens, warps, chained, [&](const MmaParams& p) {
        const int unit_rowtiles = warps >> p.slices_log2;
        const int units = (rowtiles + unit_rowtiles - 1) / unit_rowtiles;
        return static_cast<double>((units + blocks - 1) / blocks);
    });
}

}  // namespace

void mma(void* out, const void* x, const KernelWeight& w, int m, DType dtype, cudaStream_t stream) {
    if (m < 1) throw std::invalid_argument("vllm_kbit.mma: M must be >= 1");
    const int rowtiles = w.n / kTileRows;
    // Up to max_launch_tokens rows of x per launch; each launch reads the weight once.
    const int per_launch = max_launch_tokens(w.bits, sizeof(DenseProblem::Shared));
    constexpr size_t kElementBytes = 2;  // fp16 / bf16
    for (int first = 0; first < m; first += per_launch) {
        const int tokens = std::min(per_launch, m - first);
        const int warps = block_warps(token_tiles(tokens));
        const MmaParams p = dense_params(w, tokens, warps, rowtiles, first + tokens < m);
        const int unit_rowtiles = warps >> p.slices_log2;
        const DenseProblem prob{static_cast<char*>(out) + first * static_cast<size_t>(w.n) * kElementBytes,
                                static_cast<const char*>(x) + first * static_cast<size_t>(w.k) * kElementBytes, w.n,
                                rowtiles, unit_rowtiles};
        const int units = (rowtiles + unit_rowtiles - 1) / unit_rowtiles;
        const int grid = std::min(units, multiprocessors());  // persistent: one block per multiprocessor
        launch_any<DenseProblem, kMaxTokenTiles>(p, prob, w.bits, dtype, grid, first > 0, stream);
    }
}

}  // namespace kbit
