"""Kernel benchmark: the kbit GEMM (torch.ops.kbit.gemm) against cuBLAS, vLLM's GPTQ Marlin int4 and
bitsandbytes NF4 on the linear layers of Llama-3-8B, Llama-3-70B, Qwen3-8B and Qwen3-Next.

    python benchmarks/bench_kernels.py [--quick] [--out benchmarks/results] [--only-shapes PAT ...] [--only-k K ...]

Method (shared reference kernel-anchors.md, sections 8 and 10): GPU time per call from CUDA-graph replays. One
graph calls the op R times, rotating over copies of the weight whose total size exceeds twice the L2 cache, so
every call streams its weight from HBM (as in decoding, where each layer's weight is read once per step); the
per-call time is the median over REPEATS replays of elapsed / R, after WARMUP_MS of untimed replays. Inputs
are torch.randn. The sweep makes one pass over the layers per range of PASS_RANGES (M <= 64 first), so that no
configuration follows a much heavier one (see PASS_RANGES). Every kbit configuration (and every Marlin / bnb one)
is checked against an fp32 reference before it is timed; a wrong kbit result aborts the run. Also measures the eager
host time of one call at M=1, three ways: as a layer runs it in eager mode (``kbit_layer_eager_host``:
ops.layer_gemm, which skips the dispatcher), through the op (``kbit_eager_host``: torch.ops.kbit.gemm, as compiled
code calls it) and the binding's launch alone (``kbit_launch_eager_host``: _C.mma with ready pointers, the floor
under both), next to F.linear's (``fp16_eager_host``).

Impls: ``kbit`` (k = 2..5, random weights quantized with vllm_kbit.format.quantize), ``fp16`` (cuBLAS via
F.linear, in fp16 or bf16: the record's dtype says which), ``marlin_int4`` (vLLM GPTQ Marlin, uint4b8, group
128, no act-order), ``bnb_nf4`` (bitsandbytes NF4, blocksize 64, nested absmax). A baseline whose package is
missing or that fails is skipped with the reason printed.

Writes, under --out, kernels-<gpu>.json (records, rewritten after every case, so a killed run keeps what it
measured), kernels-<gpu>.png and kernels-<gpu>.md (rendered by benchmarks/plot.py, which can re-render them from
the JSON), and prints the summary with the targets.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
from vllm_kbit import capabilities
from vllm_kbit import format as kfmt
from vllm_kbit import ops as kops

import plot  # benchmarks/plot.py, next to this script


@dataclass(frozen=True)
class Shape:
    family: str
    layer: str
    k: int  # in_features
    n: int  # out_features

    @property
    def label(self) -> str:  # plot.py reads the family back from "<family> <layer>"
        return f"{self.family} {self.layer}"


SHAPES = (
    Shape("Llama-3-8B", "qkv", 4096, 6144),
    Shape("Llama-3-8B", "o", 4096, 4096),
    Shape("Llama-3-8B", "gate_up", 4096, 28672),
    Shape("Llama-3-8B", "down", 14336, 4096),
    Shape("Llama-3-70B", "gate_up", 8192, 57344),
    Shape("Llama-3-70B", "down", 28672, 8192),
    Shape("Qwen3-8B", "qkv", 4096, 6144),
    Shape("Qwen3-8B", "gate_up", 4096, 24576),
    Shape("Qwen3-8B", "down", 12288, 4096),
    Shape("Qwen3-Next", "gate_up", 2048, 5120),
    Shape("Qwen3-Next", "down", 5120, 2048),
    Shape("Qwen3-Next", "q", 2048, 4096),
    Shape("Qwen3-Next", "o", 4096, 2048),
    Shape("Qwen3-Next", "kv", 2048, 512),
)
QUICK_FAMILIES = ("Llama-3-8B", "Qwen3-Next")
M_FULL = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)
M_QUICK = (1, 4, 16, 64, 256)
# The sweep's passes over the layers: (lowest, highest M) of each. After a compute-heavy configuration the next ones
# run slower for a while, as if at lower clocks, and the kbit kernels (bound by instruction issue, not by HBM) more
# than cuBLAS. On an H100, with one pass per layer (M ascending, fp16 then bf16), a kbit M = 1 run right after an
# M = 1024 one took 75.9 µs, the same run two configurations later 64.0 µs (Llama-3-70B gate_up, k = 2); bf16 at M = 1
# (after fp16 at M = 1024) read up to 1.28x slower than at M = 2 on the largest layers. With two passes (M <= 64,
# then the rest), bf16 at M = 128 still read up to 1.25x slower than fp16 (after M = 1024 of the layer before).
PASS_RANGES = ((1, 64), (65, 256), (257, 1 << 62))
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EAGER_SHAPE = "Llama-3-8B o"  # where the eager host overhead is measured (else the first selected shape)

MIN_CALLS_PER_GRAPH = 16  # R >= this; a multiple of the number of weight copies
REPEATS = 7  # timed graph replays per configuration (median)
WARMUP_MS = 20.0  # untimed GPU work per configuration before its timed replays
TOLERANCE = 2e-2  # ||out - ref|| / ||ref|| against the fp32 reference
EAGER_CALLS = 200  # queued eager calls per sample: well below the launch queue depth, so none blocks
EAGER_REPEATS = 5
GPU_BUSY_CYCLES = 200_000_000  # ~0.1 s of torch.cuda._sleep: covers EAGER_CALLS calls of up to ~500 µs host time
MARLIN_GROUP = 128
BNB_BLOCKSIZE = 64


class WrongResult(RuntimeError):
    """An implementation's output differs from the fp32 reference."""


@dataclass
class Case:
    """One weight of one implementation, ready to time: ``run(x, i)`` is x @ W^T with weight copy i."""

    impl: str
    bits: int | None
    copies: int
    run: Callable[[torch.Tensor, int], torch.Tensor]
    reference: Callable[[torch.Tensor], torch.Tensor] | None  # fp32 x @ W^T; None: not checked (the cuBLAS ruler)
    # impl name -> x -> a call with weight copy 0, as an eager caller makes it (the eager host overhead records)
    eager: dict[str, Callable[[torch.Tensor], Callable[[], object]]] = field(default_factory=dict)


def copies_for(bytes_per_copy: int, l2_bytes: int) -> int:
    """Weight copies whose total exceeds 2x L2: a copy is evicted before the rotation comes back to it."""
    return max(2, 2 * l2_bytes // bytes_per_copy + 1)


# ---------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------


def fp16_case(shape: Shape, dtype: torch.dtype, l2_bytes: int, device: torch.device) -> Case:
    first = torch.randn(shape.n, shape.k, device=device, dtype=dtype)
    weights = [first] + [torch.randn_like(first) for _ in range(copies_for(first.nbytes, l2_bytes) - 1)]
    return Case("fp16", None, len(weights), lambda x, i: torch.nn.functional.linear(x, weights[i]), None,
                {"fp16_eager_host": lambda x: functools.partial(torch.nn.functional.linear, x, first)})


def dequantize_rows(t: kfmt.KbitTensor, codebook: torch.Tensor) -> torch.Tensor:
    """format.dequantize of ``t`` (fp32 [N, K]) in row chunks: its int64 bit tensors would not fit in one go."""
    n, k = t.absmax.shape[0], t.in_features
    out = torch.empty(n, k, dtype=torch.float32, device=t.qweight.device)
    step = max(1, (1 << 26) // (k * t.bits))  # unpack_bitplanes holds rows * K * bits int64 values
    for r0 in range(0, n, step):
        rows = slice(r0, r0 + step)
        out[rows] = kfmt.dequantize(kfmt.KbitTensor(t.qweight[rows], t.absmax[rows], t.scale[rows], t.bits), codebook)
    return out


def kbit_case(shape: Shape, bits: int, l2_bytes: int, device: torch.device) -> Case:
    codebook = kfmt.normal_float_codebook(bits)  # on the CPU, as the op takes it
    packed = kfmt.quantize(torch.randn(shape.n, shape.k, device=device), bits, codebook)
    first = kops.prepare_weight(packed, device)
    size = sum(t.nbytes for t in first.values())
    weights = [first] + [{name: t.clone() for name, t in first.items()}
                         for _ in range(copies_for(size, l2_bytes) - 1)]
    reference_weight = dequantize_rows(packed, codebook)

    def run(x: torch.Tensor, i: int) -> torch.Tensor:
        w = weights[i]
        return torch.ops.kbit.gemm(x, w["qweight"], w["qweight_absmax"], w["weight_scale"], codebook, bits)

    args = (first["qweight"], first["qweight_absmax"], first["weight_scale"], codebook, bits)

    def launch_only(x: torch.Tensor) -> Callable[[], object]:
        """The M = 1 tier's launch through the binding, every pointer ready: what no Python wrapper can go below."""
        assert kops.tier_name(x.get_device(), x.shape[0], shape.n, shape.k, bits) == "mma"
        out = torch.empty(x.shape[0], shape.n, dtype=x.dtype, device=x.device)
        ptrs = (out.data_ptr(), x.data_ptr(), *(t.data_ptr() for t in args[:4]))
        rest = (x.shape[0], shape.n, shape.k, bits, kops._DTYPE_CODE[x.dtype], torch.cuda.current_stream().cuda_stream)
        return functools.partial(kops._C.mma, *ptrs, *rest)

    eager = {"kbit_layer_eager_host": lambda x: functools.partial(kops.layer_gemm, x, *args),
             "kbit_eager_host": lambda x: functools.partial(torch.ops.kbit.gemm, x, *args),
             "kbit_launch_eager_host": launch_only}
    return Case("kbit", bits, len(weights), run, lambda x: x.float() @ reference_weight.T, eager)


def unpack_gptq_int4(packed: torch.Tensor) -> torch.Tensor:
    """GPTQ int4 layout int32 [K/8, N] (nibble j of word [r, c] is q[8r + j, c]) -> int32 q [K, N] in 0..15."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32).view(1, 8, 1)
    return ((packed.unsqueeze(1) >> shifts) & 15).reshape(-1, packed.shape[1])


def marlin_case(shape: Shape, dtype: torch.dtype, l2_bytes: int, device: torch.device, marlin) -> Case:
    k, n = shape.k, shape.n
    # A random GPTQ checkpoint (uint4b8: w = (q - 8) * scale, symmetric, group 128, no act-order), made ready
    # for Marlin the way vLLM's MarlinLinearKernel.process_weights_after_loading does.
    packed = torch.randint(-2**31, 2**31, (k // 8, n), dtype=torch.int32, device=device)
    scales = (torch.rand(k // MARLIN_GROUP, n, device=device) * 0.02 + 0.01).to(dtype)
    empty = marlin.utils.marlin_make_empty_g_idx(device)  # no act-order: empty g_idx and sort indices
    qweight = marlin.ops.gptq_marlin_repack(packed, perm=empty, size_k=k, size_n=n, num_bits=4)
    marlin_scales = marlin.utils.marlin_permute_scales(scales, size_k=k, size_n=n, group_size=MARLIN_GROUP)
    copies = copies_for(qweight.nbytes + marlin_scales.nbytes, l2_bytes)
    # one workspace per copy, as vLLM keeps one per layer
    weights = [(qweight, marlin_scales, marlin.utils.marlin_make_workspace_new(device))]
    weights += [(qweight.clone(), marlin_scales.clone(), marlin.utils.marlin_make_workspace_new(device))
                for _ in range(copies - 1)]
    reference_weight = ((unpack_gptq_int4(packed) - 8).float()
                        * scales.float().repeat_interleave(MARLIN_GROUP, dim=0))  # [K, N]

    def run(x: torch.Tensor, i: int) -> torch.Tensor:
        q, s, workspace = weights[i]
        return marlin.utils.apply_gptq_marlin_linear(
            input=x, weight=q, weight_scale=s, weight_zp=empty, g_idx=empty, g_idx_sort_indices=empty,
            workspace=workspace, wtype=marlin.uint4b8, output_size_per_partition=n, input_size_per_partition=k,
            is_k_full=True)

    return Case("marlin_int4", None, copies, run, lambda x: x.float() @ reference_weight)


def bnb_case(shape: Shape, dtype: torch.dtype, l2_bytes: int, device: torch.device, bnb) -> Case:
    weight = torch.randn(shape.n, shape.k, device=device, dtype=dtype)

    def quantize():
        return bnb.functional.quantize_4bit(weight, blocksize=BNB_BLOCKSIZE, compress_statistics=True,
                                            quant_type="nf4")

    first = quantize()
    copies = copies_for(first[0].nbytes + first[1].absmax.nbytes, l2_bytes)
    weights = [first] + [quantize() for _ in range(copies - 1)]  # each call allocates a fresh copy
    reference_weight = bnb.functional.dequantize_4bit(*first)  # [N, K] in dtype

    def run(x: torch.Tensor, i: int) -> torch.Tensor:
        packed, state = weights[i]
        return bnb.matmul_4bit(x, packed.t(), quant_state=state)

    return Case("bnb_nf4", None, copies, run, lambda x: x.float() @ reference_weight.float().T)


def load_marlin():
    """(vLLM's GPTQ Marlin entry points, "") or (None, why they cannot be used)."""
    try:
        from vllm import _custom_ops as vllm_ops
        from vllm.model_executor.layers.quantization.utils import marlin_utils
        from vllm.scalar_type import scalar_types
    except Exception as e:  # whatever breaks the vLLM import only disables this baseline
        return None, f"cannot import vLLM's Marlin path: {e!r}"
    missing = [op for op in ("gptq_marlin_repack", "marlin_gemm") if not hasattr(torch.ops._C, op)]
    if missing:
        return None, f"vLLM's compiled ops lack {missing} (a CPU or partial build of vLLM?)"
    return SimpleNamespace(ops=vllm_ops, utils=marlin_utils, uint4b8=scalar_types.uint4b8), ""


def load_bnb():
    """(the bitsandbytes module, "") or (None, why it cannot be used)."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (quantize_4bit / dequantize_4bit)
    except Exception as e:
        return None, f"cannot import bitsandbytes: {e!r}"
    return bitsandbytes, ""


BASELINES = {"marlin_int4": (load_marlin, marlin_case), "bnb_nf4": (load_bnb, bnb_case)}


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------


def calls_per_graph(copies: int) -> int:
    # a multiple of the copies, so that the copy used last in a replay is not the first of the next one
    return copies * math.ceil(MIN_CALLS_PER_GRAPH / copies)


def graph_us(case: Case, x: torch.Tensor) -> float:
    """Median GPU µs per call: R calls captured in one CUDA graph, REPEATS replays timed with CUDA events."""
    n_calls = calls_per_graph(case.copies)

    def launch_all():
        for i in range(n_calls):
            case.run(x, i % case.copies)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: lazy setup (cuBLAS workspaces) must not be captured
        launch_all()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch_all()
    graph.replay()  # the first replay also uploads the graph
    # Untimed replays first, WARMUP_MS of GPU work: a sweep's first M follows host-side setup (weight copies, the
    # result check) during which the GPU idles; without this, one H100 run timed M = 1 up to 14% slower than M = 2,
    # which runs the same kernel.
    first_start, first_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first_start.record()
    graph.replay()
    first_end.record()
    torch.cuda.synchronize()
    for _ in range(math.ceil(WARMUP_MS / max(first_start.elapsed_time(first_end), 1e-3))):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPEATS)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1e3 / n_calls for start, end in events)


def eager_host_us(call: Callable[[], torch.Tensor]) -> float:
    """Median host µs per eager call. The calls are queued behind a GPU sleep, so none waits for the GPU and
    perf_counter sees only the host side: Python, torch dispatch and the launch."""
    call()
    torch.cuda.synchronize()
    samples = []
    for _ in range(EAGER_REPEATS):
        torch.cuda._sleep(GPU_BUSY_CYCLES)
        start = time.perf_counter()
        for _ in range(EAGER_CALLS):
            call()
        samples.append((time.perf_counter() - start) * 1e6 / EAGER_CALLS)
        torch.cuda.synchronize()
    return statistics.median(samples)


def add_eager_host(case: Case, shape: Shape, bits: int | None, device: torch.device, writer: RecordWriter) -> None:
    x = torch.randn(1, shape.k, device=device, dtype=torch.float16)
    for impl, make_call in case.eager.items():
        writer.add(shape, 1, bits, "fp16", impl, eager_host_us(make_call(x)))


def check(case: Case, x: torch.Tensor, what: str) -> None:
    out = case.run(x, 0).float()
    ref = case.reference(x)
    err = ((out - ref).norm() / ref.norm()).item()
    if not err < TOLERANCE:  # NaN fails too
        raise WrongResult(f"{what}: relative error {err:.3g} of the output norm (tolerance {TOLERANCE})")


class RecordWriter:
    """Collects records; flush() rewrites the JSON file atomically, so a killed run keeps what it measured."""

    def __init__(self, path: Path, gpu: str):
        self.path, self.gpu = path, gpu
        self.records: list[dict] = []
        self._us: dict[tuple, float] = {}

    def add(self, shape: Shape, m: int, bits: int | None, dtype: str, impl: str, us: float) -> None:
        self.records.append({"gpu": self.gpu, "shape": shape.label, "K": shape.k, "N": shape.n, "M": m, "k": bits,
                             "dtype": dtype, "impl": impl, "us": round(us, 3)})
        self._us[impl, bits, shape.label, dtype, m] = us

    def time(self, impl: str, bits: int | None, shape: Shape, dtype: str, m: int) -> float | None:
        return self._us.get((impl, bits, shape.label, dtype, m))

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.records, indent=1))
        os.replace(tmp, self.path)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    ms: tuple[int, ...]
    bits: tuple[int, ...]
    dtypes: tuple[str, ...]
    l2_bytes: int
    device: torch.device
    eager_shape: str


def bench_case(case: Case, shape: Shape, dtype: str, ms: tuple[int, ...], device: torch.device,
               writer: RecordWriter) -> None:
    """Check (unless the case is the cuBLAS ruler) and time one case at each of `ms`; one progress line."""
    name = case.impl + (f" k={case.bits}" if case.bits else "")
    print(f"  {shape.label:<20} {dtype} {name:<12} R={calls_per_graph(case.copies):<4}", end="", flush=True)
    try:
        for m in ms:
            x = torch.randn(m, shape.k, device=device, dtype=DTYPES[dtype])
            if case.reference is not None:
                check(case, x, f"{shape.label} {dtype} {name} M={m}")
            us = graph_us(case, x)
            writer.add(shape, m, case.bits, dtype, case.impl, us)
            base = writer.time("fp16", None, shape, dtype, m)
            speedup = f" ({base / us:.2f}x)" if base is not None and case.impl != "fp16" else ""
            print(f" M{m}: {us:.1f}{speedup}", end="", flush=True)
    finally:
        print(flush=True)
        writer.flush()


def bench_shape(shape: Shape, settings: Settings, ms: tuple[int, ...], baselines: dict,
                writer: RecordWriter) -> None:
    """Every impl, k and dtype of one layer at each of `ms` (and the eager host overhead, in the pass with M = 1)."""
    device, l2 = settings.device, settings.l2_bytes
    eager = shape.label == settings.eager_shape and 1 in ms
    for dtype in settings.dtypes:  # first: the speedups printed for the others need it
        case = fp16_case(shape, DTYPES[dtype], l2, device)
        bench_case(case, shape, dtype, ms, device, writer)
        if eager and dtype == "fp16":
            add_eager_host(case, shape, None, device, writer)
        del case
    for bits in settings.bits:
        case = kbit_case(shape, bits, l2, device)
        for dtype in settings.dtypes:
            bench_case(case, shape, dtype, ms, device, writer)  # WrongResult propagates: the run aborts
        if eager:
            add_eager_host(case, shape, bits, device, writer)
        del case
    for impl, handle in baselines.items():
        build = BASELINES[impl][1]
        for dtype in settings.dtypes:
            try:
                case = build(shape, DTYPES[dtype], l2, device, handle)
                bench_case(case, shape, dtype, ms, device, writer)
            except Exception as e:  # a broken baseline must not cost the kbit numbers of a one-shot run
                print(f"  !!! SKIPPED {impl} {shape.label} {dtype}: {e!r}", flush=True)
            case = None  # free its weights before the next one is built
    writer.flush()
    torch.cuda.empty_cache()


def select_shapes(quick: bool, patterns: list[str] | None) -> list[Shape]:
    shapes = [s for s in SHAPES if not quick or s.family in QUICK_FAMILIES]
    if patterns:
        shapes = [s for s in shapes if any(p.lower() in s.label.lower() for p in patterns)]
    return shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"{' and '.join(QUICK_FAMILIES)} shapes, M in {M_QUICK}, fp16 only, all k")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    parser.add_argument("--only-shapes", nargs="+", metavar="PAT",
                        help="keep layers whose '<family> <layer>' label contains one of these (case-insensitive), "
                             "e.g. 'Llama-3-8B' 'Qwen3-Next kv'")
    parser.add_argument("--only-k", nargs="+", type=int, choices=kfmt.SUPPORTED_BITS, metavar="K",
                        help="kbit bit widths to run (default: 2 3 4 5)")
    args = parser.parse_args(argv)
    args.shapes = select_shapes(args.quick, args.only_shapes)
    if not args.shapes:
        parser.error(f"--only-shapes {args.only_shapes} matches none of: "
                     + ", ".join(s.label for s in select_shapes(args.quick, None)))
    return args


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    kops.require_kernels()
    torch.manual_seed(0)
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    labels = [s.label for s in args.shapes]
    settings = Settings(
        ms=M_QUICK if args.quick else M_FULL,
        bits=tuple(args.only_k or kfmt.SUPPORTED_BITS),
        dtypes=("fp16",) if args.quick else tuple(DTYPES),
        l2_bytes=torch.cuda.get_device_properties(device).L2_cache_size,
        device=device,
        eager_shape=EAGER_SHAPE if EAGER_SHAPE in labels else labels[0],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"kernels-{gpu.lower().replace(' ', '-')}.json"
    writer = RecordWriter(json_path, gpu)

    baselines = {}
    for impl, (load, _) in BASELINES.items():
        handle, reason = load()
        if handle is None:
            print(f"!!! baseline {impl} SKIPPED: {reason}", flush=True)
        else:
            baselines[impl] = handle
    print(f"{gpu}: L2 {settings.l2_bytes / 2**20:.0f} MiB; kbit tiers for any weight "
          f"{capabilities.describe_tiers(kops.tiers_for_device(device.index))} (per layer below)\n"
          f"{len(args.shapes)} layers, M {settings.ms}, k {settings.bits}, {settings.dtypes}, "
          f"impls fp16 kbit {' '.join(baselines)}; records -> {json_path}", flush=True)

    started = time.perf_counter()
    passes = [tuple(m for m in settings.ms if low <= m <= high) for low, high in PASS_RANGES]
    with torch.no_grad():
        for ms in filter(None, passes):
            for i, shape in enumerate(args.shapes):
                plans = "; ".join(f"k={bits} " + capabilities.describe_tiers(
                    kops.tiers_for_device(device.index, shape.n, shape.k, bits)) for bits in settings.bits)
                print(f"[{time.perf_counter() - started:6.1f} s] {shape.label} (K={shape.k}, N={shape.n}), "
                      f"layer {i + 1}/{len(args.shapes)}, M {ms}; kbit tiers {plans}", flush=True)
                try:
                    bench_shape(shape, settings, ms, baselines, writer)
                except WrongResult as e:
                    sys.exit(f"\n!!! KBIT RESULT WRONG, run aborted: {e}\n"
                             f"!!! records so far are in {json_path}")
    print(f"[{time.perf_counter() - started:6.1f} s] done\n", flush=True)
    print(plot.render(writer.records, json_path), flush=True)


if __name__ == "__main__":
    main()
