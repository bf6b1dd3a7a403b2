"""Quick timing of the kbit MMA kernel (vllm_kbit._C.mma) against fp16 torch.nn.functional.linear (cuBLAS).

For kernel iteration, not the full benchmark: per shape and M, each kernel runs as a CUDA graph of many calls that
rotate over copies of the weight whose total exceeds the L2 cache (so every call streams its weight from HBM);
the per-call time is the median over graph replays. kbit weights are random bits in the kernel layout (timing
does not depend on the values; correctness is tests/test_kernels_gpu.py). Prints µs per call and the speedup over
fp16 in the same run, effective bandwidth (weight bytes / time) at M=1, and geometric-mean speedups.

    python benchmarks/bench_kernels_quick.py [--bits 2 3 4 5] [--m 1 4 8 16] [--shapes llama8b qwen3next llama70b]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from vllm_kbit import _C
from vllm_kbit import format as kf

SHAPES = {  # family -> [(name, K, N)]
    "llama8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "qwen3next": [("gate_up", 2048, 5120), ("down", 5120, 2048), ("q", 2048, 4096), ("o", 4096, 2048),
                  ("kv", 2048, 512)],
    "llama70b": [("gate_up", 8192, 57344)],
}
ROTATE_BYTES = 256 << 20  # weight copies per shape: at least this much in total (L2 is 50-60 MB)
CALLS_PER_GRAPH = 40
REPLAYS = 15


def time_per_call(calls) -> float:
    """Median µs per call of `calls` (a list of zero-argument launches) captured into one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def rotation(copies: int) -> list[int]:
    return [i % copies for i in range(max(CALLS_PER_GRAPH, copies))]


def bench_fp16(k: int, n: int, ms: list[int]) -> dict[int, float]:
    copies = max(2, math.ceil(ROTATE_BYTES / (2 * n * k)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
    times = {}
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        times[m] = time_per_call([lambda w=weights[i]: torch.nn.functional.linear(x, w) for i in rotation(copies)])
    return times


def bench_kbit(k: int, n: int, ms: list[int], bits: int) -> dict[int, float]:
    groups = kf.kernel_k_groups(k)
    copies = max(2, math.ceil(ROTATE_BYTES / kf.packed_bytes(n, k, bits)))
    qweights = [torch.randint(-2**31, 2**31 - 1, (n // 32, groups, bits, 32, 4), device="cuda", dtype=torch.int32)
                for _ in range(copies)]
    absmax = [torch.randint(100, 180, (n // 32, groups, 32, 4), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
    scale = torch.rand(n, device="cuda") + 0.5
    codebook = kf.normal_float_codebook(bits)  # on the CPU: _C takes its values by value
    times = {}
    for m in ms:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        out = torch.empty(m, n, device="cuda", dtype=torch.float16)

        def call(i, m=m, x=x, out=out):
            _C.mma(out.data_ptr(), x.data_ptr(), qweights[i].data_ptr(), absmax[i].data_ptr(), scale.data_ptr(),
                   codebook.data_ptr(), m, n, k, bits, 0, torch.cuda.current_stream().cuda_stream)

        times[m] = time_per_call([lambda i=i: call(i) for i in rotation(copies)])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()

    print(f"device: {torch.cuda.get_device_name()}; µs per call (speedup vs fp16); [TB/s of weight bytes] at M=1")
    header = f"{'shape':<18}{'K':>6}{'N':>6}{'M':>3}{'fp16':>7}" + "".join(f"{f'k={b}':>16}" for b in args.bits)
    speedups: dict[tuple[str, int, int], list[float]] = {}
    for family in args.shapes:
        print(header)
        for name, k, n in SHAPES[family]:
            fp16 = bench_fp16(k, n, args.m)
            kbit = {bits: bench_kbit(k, n, args.m, bits) for bits in args.bits}
            for m in args.m:
                line = f"{family + ' ' + name:<18}{k:>6}{n:>6}{m:>3}{fp16[m]:>7.2f}"
                for bits in args.bits:
                    us = kbit[bits][m]
                    speedups.setdefault((family, bits, m), []).append(fp16[m] / us)
                    line += f"{us:>8.2f} ({fp16[m] / us:4.2f}x)"
                if m == args.m[0]:
                    line += "  [" + " ".join(f"{kf.packed_bytes(n, k, b) / kbit[b][m] / 1e6:4.2f}"
                                             for b in args.bits) + "]"
                print(line, flush=True)
    print("geomean speedup vs fp16 (family: k=... per M):")
    for family in args.shapes:
        for m in args.m:
            values = []
            for bits in args.bits:
                v = speedups[(family, bits, m)]
                values.append(f"k={bits} {math.exp(sum(map(math.log, v)) / len(v)):.2f}x")
            print(f"  {family:<10} M={m:<3} " + "  ".join(values))


if __name__ == "__main__":
    main()
