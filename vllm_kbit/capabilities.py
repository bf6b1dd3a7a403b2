"""What kbit supports, in one table that both kernel dispatch and error messages read.

A GPU layer runs one of several kernel tiers chosen by M (tokens in the batch) and the GPU
architecture; the choice happens inside the ``torch.ops.kbit.gemm`` op (never in traced Python).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_kbit.format import BLOCK_SIZE, SUPPORTED_BITS

MIN_CUDA_CAPABILITY = 80  # sm_80: mma.sync m16n8k16 with bf16, cp.async
GPU_ACT_DTYPES = (torch.float16, torch.bfloat16)
CPU_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Input features per tensor-parallel rank must be whole blocks.
K_ALIGN = BLOCK_SIZE
# Output features per rank: the GPU kernel layout tiles rows in groups of N_ALIGN.
N_ALIGN = BLOCK_SIZE


@dataclass(frozen=True)
class Tier:
    """One GPU kernel tier: runs for min_m <= M <= max_m on GPUs of capability min_capability..max_capability."""

    name: str
    min_m: int
    max_m: int
    min_capability: int
    what: str
    max_capability: int = 1 << 30
    min_weight: int = 0  # smallest weight N x K (elements, per rank) it takes
    bits: tuple[int, ...] = SUPPORTED_BITS  # the k it takes

    def runs_on(self, capability: int) -> bool:
        return self.min_capability <= capability <= self.max_capability

    @property
    def takes_any_weight(self) -> bool:
        return self.min_weight == 0 and self.bits == SUPPORTED_BITS

    def takes(self, n: int, k: int, bits: int) -> bool:
        return n * k >= self.min_weight and bits in self.bits


# In priority order: for each M, the first tier that covers it and is usable (compiled, on this GPU, for this
# weight) runs; dequant_cublas, last, covers every M. Measured on an H100 (benchmarks/kernel_experiments.md).
GPU_TIERS = (
    # Hopper only (wgmma is an sm_90a instruction, gone on Blackwell). Its cost is that of 64 tokens up to M = 64,
    # then of 128 per 128 tokens. At M = 33..64 (where mma runs 8 token tiles) it wins from Llama-3-8B qkv (6144 x
    # 4096 = 24Mi elements) up: one standalone A/B run on an H100, k = 4, M = 33 / 48 / 64, speedup over fp16 (mma's
    # in brackets): qkv 1.06 / 1.02 / 0.94x (0.93 / 0.88 / 0.80x), down 1.52 / 1.46 / 1.46x (1.32 / 1.22 / 1.08x),
    # Llama-3-70B gate_up 1.76 / 1.73 / 1.70x (1.28 / 1.20 / 1.13x); on 4096 x 4096 and smaller it is even or
    # slower. At M = 65..256 it beats dequantize + cuBLAS on the MLP layers (bench_kernels, session 14, M = 128:
    # 1.13-1.52x fp16 where that reaches 0.43-0.52x) and is about even with it on 4096 x 4096; below that, K-slices
    # get too short for its fixed cost. Above 256 the larger the weight, the longer it stays ahead (kernel_ab.py
    # --wgmma, one H100, the kernel of session 14, k = 4, wgmma / dequantize + cuBLAS in µs): Llama-3-8B down (56Mi)
    # 114 / 133 at M = 384, 120 / 132 at 512, 226 / 171 at 768; Llama-3-8B gate_up (112Mi) 169 / 240, 223 / 266,
    # 359 / 363, and at 1024 393 / 425; Llama-3-70B gate_up ahead up to 1024 (1493 / 1688); qkv (24Mi)
    # and smaller behind from M = 384 (qkv 57 / 50); k = 2 alike. k = 5, whose wgmma runs 1.25-1.40x k = 4's time at
    # M = 256 on the MLP layers (bench_kernels), is left to dequantize + cuBLAS above 256, and so is k = 3 above
    # 512: at M = 1024 on the layers of >= 96Mi elements, a bench_kernels run with wgmma there for every k timed it
    # at 0.93-1.05x of session 13's dequantize + cuBLAS (another H100, cuBLAS within 3%) for k = 3 and 0.79-0.87x
    # for k = 5, against 1.00-1.08x (k = 4; 1.00x on Llama-3-70B down) and 1.10-1.15x (k = 2). k = 3 at M = 257..512
    # was not timed: its wgmma runs within 4% of k = 4's at M = 256 on those layers
    # (benchmarks/kernel_experiments.md, session 14).
    Tier("wgmma", 33, 64, 90, "fused dequant + Hopper warpgroup MMA", max_capability=90, min_weight=24 << 20),
    Tier("wgmma", 65, 256, 90, "fused dequant + Hopper warpgroup MMA", max_capability=90, min_weight=16 << 20),
    Tier("wgmma", 257, 512, 90, "fused dequant + Hopper warpgroup MMA", max_capability=90, min_weight=48 << 20,
         bits=(2, 3, 4)),
    Tier("wgmma", 513, 1024, 90, "fused dequant + Hopper warpgroup MMA", max_capability=90, min_weight=96 << 20,
         bits=(2, 4)),
    # The MMA kernel reads the weight once per launch of 64 tokens (16 for k = 2 and 4 on sm_86 / sm_89: less shared
    # memory); on an H100 two launches (M = 128) already lose to writing the dense weight once for cuBLAS.
    Tier("mma", 1, 64, 80, "fused dequant + tensor-core MMA"),
    Tier("dequant_cublas", 1, 1 << 62, 80, "dequantize + cuBLAS"),
)
CPU_TIER = Tier("cpu_dequant_matmul", 1, 1 << 62, 0, "dequantize + torch matmul (CPU)")

# MoE experts (torch.ops.kbit.moe_experts). The grouped kernel reads each used expert once per launch for all of its
# tokens (a launch takes up to 64 tokens and 512 (token, expert) pairs); it needs the limits below
# (kernels/kbit_ops.h), otherwise every expert is decoded and vLLM's fused MoE runs.
MOE_GPU_TIERS = (
    Tier("moe_grouped_mma", 1, 64, 80, "grouped fused dequant + MMA over the used experts"),
    Tier("moe_dequant_fused", 1, 1 << 62, 80, "dequantize all experts + vLLM fused_experts"),
)
MOE_CPU_TIER = Tier("moe_cpu_dequant_matmul", 1, 1 << 62, 0, "used experts dequantized + torch matmul (CPU)")
MOE_MAX_PAIRS = 512          # tokens * top_k per launch, so the most top_k
MOE_MAX_EXPERTS = 1024       # local experts per layer
MOE_INTERMEDIATE_ALIGN = 32  # intermediate size per rank: gate and up row tiles pair up


def moe_grouped_limits(top_k: int, experts: int, intermediate: int) -> str | None:
    """Why the grouped MoE kernel cannot run this layer at any M (None: it can, for M <= its max_m)."""
    if experts > MOE_MAX_EXPERTS:
        return f"{experts} local experts (> {MOE_MAX_EXPERTS})"
    if intermediate % MOE_INTERMEDIATE_ALIGN:
        return f"intermediate size per rank {intermediate} is not a multiple of {MOE_INTERMEDIATE_ALIGN}"
    if top_k > MOE_MAX_PAIRS:
        return f"top_k {top_k} > {MOE_MAX_PAIRS}"
    return None


def moe_tier(m: int, top_k: int, experts: int, intermediate: int) -> Tier:
    grouped, fallback = MOE_GPU_TIERS
    if m <= grouped.max_m and moe_grouped_limits(top_k, experts, intermediate) is None:
        return grouped
    return fallback


def describe_moe_plan(top_k: int, experts: int, intermediate: int) -> str:
    grouped, fallback = MOE_GPU_TIERS
    why_not = moe_grouped_limits(top_k, experts, intermediate)
    if why_not is not None:
        return f"every M: {fallback.name} ({fallback.what}; the grouped kernel cannot: {why_not})"
    last = grouped.max_m
    return f"M=1..{last}: {grouped.name}, M={last + 1}..: {fallback.name} ({fallback.what})"


def available_tiers(capability: int, compiled: frozenset[str], n: int | None = None, k: int | None = None,
                    bits: int | None = None) -> tuple[Tier, ...]:
    """The plan on a GPU of this capability, given the kernel entry points compiled into _C: for each M the first
    usable tier of GPU_TIERS that covers it. Given a weight's N, K and bits, tiers that do not take it are skipped;
    without, so are all tiers limited to some weights. Returns tiers with the M ranges they serve, sorted by M,
    together covering every M >= 1 once.
    """
    layer = (n, k, bits)
    usable = [t for t in GPU_TIERS
              if (t.name == "dequant_cublas" or t.name in compiled) and t.runs_on(capability)
              and (t.takes(n, k, bits) if None not in layer else t.takes_any_weight)]
    last = usable[-1].max_m  # dequant_cublas
    starts = sorted({1} | {t.min_m for t in usable} | {t.max_m + 1 for t in usable if t.max_m < last})
    plan: list[Tier] = []
    for lo, next_lo in zip(starts, starts[1:] + [last + 1]):
        winner = next(t for t in usable if t.min_m <= lo <= t.max_m)
        if plan and plan[-1].name == winner.name:
            plan[-1] = replace(plan[-1], max_m=next_lo - 1)
        else:
            plan.append(replace(winner, min_m=lo, max_m=next_lo - 1))
    return tuple(plan)


def describe_tiers(tiers: tuple[Tier, ...]) -> str:
    parts = []
    for t in tiers:
        upper = "" if t.max_m >= 1 << 40 else f"{t.max_m}"
        span = f"M={t.min_m}" if t.min_m == t.max_m else f"M={t.min_m}..{upper}"
        parts.append(f"{span}: {t.name}")
    return ", ".join(parts)


def check_gpu_capability(capability: int, device_name: str) -> None:
    if capability < MIN_CUDA_CAPABILITY:
        raise RuntimeError(
            f"kbit needs a GPU of compute capability >= {MIN_CUDA_CAPABILITY // 10}.{MIN_CUDA_CAPABILITY % 10} "
            f"(Ampere or newer); {device_name} is {capability // 10}.{capability % 10}. "
            "Serve this model on a newer GPU or use another quantization."
        )


def check_act_dtype(dtype: torch.dtype, on_gpu: bool) -> None:
    allowed = GPU_ACT_DTYPES if on_gpu else CPU_ACT_DTYPES
    if dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"kbit on {'GPU' if on_gpu else 'CPU'} supports activation dtypes {names}; "
                         f"got {dtype}. Pass --dtype bfloat16 or --dtype float16.")


LEAVE_UNQUANTIZED = ("leave this module unquantized (kbit-quantize --skip REGEX / "
                     "quantization_config.modules_to_not_convert)")


def check_partition(in_features: int, out_features: int, layer: str, tp_size: int,
                    other_fix: str = LEAVE_UNQUANTIZED) -> None:
    """Per-rank shape checks, with the fix in the message (a tensor-parallel size that fits, or other_fix)."""
    problems = []
    if in_features % K_ALIGN:
        problems.append(f"input size per rank {in_features} is not a multiple of {K_ALIGN}")
    if out_features % N_ALIGN:
        problems.append(f"output size per rank {out_features} is not a multiple of {N_ALIGN}")
    if problems:
        raise ValueError(
            f"kbit cannot quantize {layer} at tensor-parallel size {tp_size}: {'; '.join(problems)}. "
            f"Use a tensor-parallel size that divides it into such pieces, or {other_fix}."
        )


__all__ = ["SUPPORTED_BITS", "GPU_TIERS", "CPU_TIER", "MOE_GPU_TIERS", "MOE_CPU_TIER", "Tier", "moe_tier",
           "describe_moe_plan", "available_tiers", "describe_tiers",
           "check_gpu_capability", "check_act_dtype", "check_partition", "MIN_CUDA_CAPABILITY"]
