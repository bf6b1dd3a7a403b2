"""Quick timing of the kbit GEMV (vllm_kbit._C.gemv) against fp16 torch.nn.functional.linear (cuBLAS).

For kernel iteration, not the full benchmark: per shape and M, each kernel runs as a CUDA graph of many calls that
rotate over copies of the weight whose total exceeds the L2 cache (so every call streams its weight from HBM);
the per-call time is the median over graph replays. kbit weights are random bits in the kernel layout (timing
does not depend on the values; correctness is tests/test_kernels_gpu.py). Prints µs per call, the speedup over
fp16 in the same run, and effective bandwidth (weight bytes / time).

    python benchmarks/bench_kernels_quick.py [--bits 2 4] [--m 1 4] [--shapes llama8b qwen3next llama70b]
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


def bench_fp16(k: int, n: int, m: int) -> float:
    copies = max(2, math.ceil(ROTATE_BYTES / (2 * n * k)))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    us = time_per_call([lambda w=weights[i]: torch.nn.functional.linear(x, w) for i in rotation(copies)])
    del weights
    return us


def bench_kbit(k: int, n: int, m: int, bits: int) -> float:
    groups = kf.kernel_k_groups(k)
    copies = max(2, math.ceil(ROTATE_BYTES / kf.packed_bytes(n, k, bits)))
    qweights = [torch.randint(-2**31, 2**31 - 1, (n // 32, groups, bits, 32, 4), device="cuda", dtype=torch.int32)
                for _ in range(copies)]
    absmax = [torch.randint(100, 180, (n // 32, groups, 32, 4), device="cuda", dtype=torch.uint8)
              for _ in range(copies)]
    scale = torch.rand(n, device="cuda") + 0.5
    codebook = kf.normal_float_codebook(bits).cuda()
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    out = torch.empty(m, n, device="cuda", dtype=torch.float16)

    def call(i):
        _C.gemv(out.data_ptr(), x.data_ptr(), qweights[i].data_ptr(), absmax[i].data_ptr(), scale.data_ptr(),
                codebook.data_ptr(), m, n, k, bits, 0, torch.cuda.current_stream().cuda_stream)

    us = time_per_call([lambda i=i: call(i) for i in rotation(copies)])
    del qweights, absmax
    return us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()

    print(f"device: {torch.cuda.get_device_name()}; µs per call, (speedup vs fp16), [TB/s]")
    header = f"{'shape':<20}{'K':>6}{'N':>7}{'M':>3}{'fp16 µs':>16}" + "".join(f"{f'k={b}':>24}" for b in args.bits)
    speedups: dict[tuple[str, int, int], list[float]] = {}
    for family in args.shapes:
        print(header)
        for name, k, n in SHAPES[family]:
            for m in args.m:
                fp16 = bench_fp16(k, n, m)
                line = f"{family + ' ' + name:<20}{k:>6}{n:>7}{m:>3}{fp16:>8.2f} [{2 * n * k / fp16 / 1e6:4.2f}]"
                for bits in args.bits:
                    us = bench_kbit(k, n, m, bits)
                    speedups.setdefault((family, bits, m), []).append(fp16 / us)
                    tbs = kf.packed_bytes(n, k, bits) / us / 1e6
                    line += f"{us:>9.2f} ({fp16 / us:4.2f}x) [{tbs:4.2f}]"
                print(line, flush=True)
    print("geomean speedup vs fp16:")
    for (family, bits, m), values in speedups.items():
        geomean = math.exp(sum(map(math.log, values)) / len(values))
        print(f"  {family:<10} k={bits} M={m}: {geomean:.2f}x")


if __name__ == "__main__":
    main()
