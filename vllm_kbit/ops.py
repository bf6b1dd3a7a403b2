"""The ``torch.ops.kbit`` custom ops, and the entry points through which layers run them: ``layer_gemm`` and
``layer_moe_experts`` call the op under torch.compile and its implementation directly in plain eager mode.

Every choice that depends on M (tokens in the batch) happens inside the op, where torch.compile
cannot freeze it; the fake implementation gives Dynamo shapes only. The op works on the layer's
*kernel layout*, made once at load time by :func:`prepare_weight` for the device the layer lives on,
and on the codebook as a CPU tensor whatever the device (on a GPU its values go into the kernels'
launch parameters).
This module does not import vLLM, so kernels can be tested and benchmarked without it.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd import profiler as _autograd_profiler

from vllm_kbit import capabilities, format as kfmt

try:  # built from kernels/ when the CUDA toolkit was present at install time
    from vllm_kbit import _C
except ImportError:  # CPU-only install
    _C = None

NO_KERNELS_MESSAGE = (
    "vllm-kbit was installed without its CUDA kernels (no CUDA compiler was found when it was built), "
    "so it cannot run on this GPU. Reinstall it on a machine with the CUDA toolkit (nvcc on PATH): "
    "`pip install --no-build-isolation --force-reinstall --no-deps vllm-kbit` (or `pip install .` "
    "in a checkout)."
)

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}


def kernels_available() -> bool:
    return _C is not None


def require_kernels() -> None:
    if _C is None:
        raise RuntimeError(NO_KERNELS_MESSAGE)


@functools.cache
def tiers_for_device(device_index: int, n: int | None = None, k: int | None = None,
                     bits: int | None = None) -> tuple[capabilities.Tier, ...]:
    """The device's tiers; given a weight's N, K and bits, those that take it (the plan of that layer)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    capability = major * 10 + minor
    capabilities.check_gpu_capability(capability, torch.cuda.get_device_name(device_index))
    compiled = frozenset(tier.name for tier in capabilities.GPU_TIERS if hasattr(_C, tier.name))
    return capabilities.available_tiers(capability, compiled, n, k, bits)


@functools.cache
def _tier_by_m(device_index: int, n: int, k: int, bits: int) -> tuple[str, ...]:
    """Tier name for M = 0.. (index = M) up to where the last tier starts, so the hot path is one tuple lookup."""
    tiers = tiers_for_device(device_index, n, k, bits)
    last_start = max(t.min_m for t in tiers)
    return tuple(next(t.name for t in tiers if t.min_m <= max(m, 1) <= t.max_m) for m in range(last_start + 1))


def tier_name(device_index: int, m: int, n: int, k: int, bits: int) -> str:
    table = _tier_by_m(device_index, n, k, bits)
    return table[min(m, len(table) - 1)]


# ---------------------------------------------------------------------------------------------------
# Load time: the layout each device's kernels read
# ---------------------------------------------------------------------------------------------------


def prepare_weight(t: kfmt.KbitTensor, device: torch.device) -> dict[str, torch.Tensor]:
    """Re-pack an on-disk kbit tensor into the layout the op reads on ``device``.

    Returns tensors named like the layer parameters: qweight, qweight_absmax, weight_scale.
    GPU: the tiled kernel layout of format.to_kernel_layout. CPU: one uint8 index per weight and
    fp32 block scales (absmax * row scale) -- compact enough, and a cheap gather per call.
    """
    if device.type == "cuda":
        require_kernels()
        qweight, absmax = kfmt.to_kernel_layout(t)
        return {"qweight": qweight.to(device), "qweight_absmax": absmax.to(device),
                "weight_scale": t.scale.to(device, torch.float32).contiguous()}
    indices = kfmt.unpack_bitplanes(t.qweight, t.bits)
    block_scale = kfmt.e4m4_decode(t.absmax) * t.scale.float().unsqueeze(-1)
    return {"qweight": indices.to(device), "qweight_absmax": block_scale.to(device),
            "weight_scale": t.scale.to(device, torch.float32).contiguous()}


# ---------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------


def _decode_cpu_layout(qweight: torch.Tensor, block_scale: torch.Tensor, codebook: torch.Tensor,
                       dtype: torch.dtype) -> torch.Tensor:
    """The CPU layout (uint8 indices [..., N, K], fp32 block scales [..., N, K/32]) decoded to ``dtype``.

    Rounded to ``dtype`` from the fp32 product, exactly as format.dequantize(..., dtype) does.
    """
    *lead, n, k = qweight.shape
    values = codebook[qweight.long()].view(*lead, n, k // kfmt.BLOCK_SIZE, kfmt.BLOCK_SIZE)
    return (values * block_scale.unsqueeze(-1)).view(*lead, n, k).to(dtype)


def _gemm_cpu(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
              codebook: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.nn.functional.linear(x, _decode_cpu_layout(qweight, absmax, codebook, x.dtype))


def _host_codebook(codebook: torch.Tensor, bits: int) -> int:
    """The address of a CPU codebook: the kernels get its values by value, in their launch parameters."""
    if (not codebook.is_cpu or codebook.dtype != torch.float32 or not codebook.is_contiguous()
            or codebook.numel() != 1 << bits):
        raise ValueError(
            f"kbit: the codebook must be a contiguous float32 CPU tensor of 2^bits = {1 << bits} values (they are "
            f"passed to the GPU kernels by value; pass codebook.cpu()), got {codebook.dtype} "
            f"{list(codebook.shape)} on {codebook.device}"
        )
    return codebook.data_ptr()


def _current_stream(device_index: int) -> int:
    """The device's current CUDA stream as the raw handle the bindings take (no torch.cuda.Stream object)."""
    return torch._C._cuda_getCurrentRawStream(device_index)


# Workspace bytes of _C.wgmma per (device, M, N, K).
_WGMMA_WORKSPACE_BYTES: dict[tuple[int, int, int, int], int] = {}


def _gemm_cuda(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
               codebook: torch.Tensor, bits: int) -> torch.Tensor:
    # The host path of every eager call: attribute reads that make no Python objects (get_device, not x.device;
    # the raw stream handle, not a torch.cuda.Stream) and a cached tuple for the tier.
    m, k = x.shape
    n = scale.shape[0]
    out = x.new_empty((m, n))
    if m == 0:
        return out
    x = x.contiguous()
    dtype_code = _DTYPE_CODE[x.dtype]
    codebook_ptr = _host_codebook(codebook, bits)
    device = x.get_device()
    stream = _current_stream(device)
    tier = tier_name(device, m, n, k, bits)
    if tier == "dequant_cublas":
        weight = x.new_empty((n, k))
        _C.dequantize(weight.data_ptr(), qweight.data_ptr(), absmax.data_ptr(), scale.data_ptr(),
                      codebook_ptr, n, k, bits, dtype_code, stream)
        torch.mm(x, weight.t(), out=out)
    elif tier == "wgmma":
        key = (device, m, n, k)
        size = _WGMMA_WORKSPACE_BYTES.get(key)
        if size is None:  # depends on the device and the product only: asked once, not per call
            size = _WGMMA_WORKSPACE_BYTES[key] = _C.wgmma_workspace(out.data_ptr(), m, n, k)
        workspace = x.new_empty(size, dtype=torch.uint8)
        _C.wgmma(out.data_ptr(), x.data_ptr(), qweight.data_ptr(), absmax.data_ptr(), scale.data_ptr(),
                 codebook_ptr, workspace.data_ptr(), m, n, k, bits, dtype_code, stream)
    else:
        getattr(_C, tier)(out.data_ptr(), x.data_ptr(), qweight.data_ptr(), absmax.data_ptr(),
                          scale.data_ptr(), codebook_ptr, m, n, k, bits, dtype_code, stream)
    return out


def gemm(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
         codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T for a kbit weight W [N, K] in the device's kernel layout (codebook on the CPU)."""
    if x.is_cuda:
        return _gemm_cuda(x, qweight, absmax, scale, codebook, bits)
    return _gemm_cpu(x, qweight, absmax, scale, codebook, bits)


def _gemm_fake(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
               codebook: torch.Tensor, bits: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], scale.shape[0]))


# Every op of the namespace, defined on one Library kept alive for the process (ops live as long as it).
_LIBRARY = torch.library.Library("kbit", "FRAGMENT")


def _define_op(name: str, impl, fake):
    """Defines torch.ops.kbit.<name> (one Python impl for CPU and CUDA, which branches on the device, and a
    shape-only fake) and returns how layers call it: a plain eager call goes straight to ``impl``, since the
    dispatcher's round trip into Python adds about 5 µs of host time to every call and buys it nothing; the op is
    called while torch.compile traces (Dynamo must record it), for fake and meta tensors (they need the fake), and
    under the profiler (its trace names each op call). A TorchDispatchMode over real tensors sees the
    implementation's own calls, not the op.
    """
    if not hasattr(torch.ops.kbit, name):  # else defined by an earlier import of this module (with the same impl)
        _LIBRARY.define(name + torch.library.infer_schema(impl, mutates_args=()))
        for key in ("CPU", "CUDA"):
            _LIBRARY.impl(name, impl, key)
        _LIBRARY._register_fake(name, fake)
    op = getattr(torch.ops.kbit, name)

    def layer_call(x: torch.Tensor, *args):
        if (type(x) is torch.Tensor and not x.is_meta and not torch.compiler.is_compiling()
                and not _autograd_profiler._is_profiler_enabled):
            return impl(x, *args)
        return op(x, *args)

    return layer_call


layer_gemm = _define_op("gemm", gemm, _gemm_fake)


# ===================================================================================================
# MoE experts: torch.ops.kbit.moe_experts (used by vllm_kbit/moe.py)
# ===================================================================================================
# One call computes all routed experts of one MoE layer on the layer's kernel-layout tensors (made by
# prepare_weight, stacked over experts: w13 [E, 2I, H] = gate rows then up rows, w2 [E, H, I]).

# Gated activations: act(gate) * up, gate = first half of the w13 output. Same functions as vLLM's
# SiluAndMul / GeluAndMul (exact erf) / GeluAndMul(approximate="tanh").
MOE_ACTIVATIONS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": functools.partial(torch.nn.functional.gelu, approximate="tanh"),
}


def check_moe_activation(activation: str) -> None:
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"kbit MoE experts support the activations {', '.join(MOE_ACTIVATIONS)}; got {activation!r}")


def _moe_experts_cpu(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     w13_qweight: torch.Tensor, w13_absmax: torch.Tensor, w2_qweight: torch.Tensor,
                     w2_absmax: torch.Tensor, codebook: torch.Tensor, activation: str) -> torch.Tensor:
    # The rounding follows vLLM's CPU MoE kernel (cpu_fused_moe), so that a bf16 model holding the decoded
    # weights gives the same tokens: fp32 accumulation of both GEMMs, the activation product rounded to x's
    # dtype, the weighted sum over the top-k experts in fp32, rounded once at the end.
    act = MOE_ACTIVATIONS[activation]
    m, top_k = topk_ids.shape
    out = torch.zeros(m, x.shape[1], dtype=torch.float32)
    slot_expert = topk_ids.reshape(-1).long()
    slot_weight = topk_weights.reshape(-1, 1).float()
    slots_by_expert = torch.argsort(slot_expert, stable=True)
    counts = torch.bincount(slot_expert, minlength=w13_qweight.shape[0]).tolist()
    first = 0
    for expert, count in enumerate(counts):
        if count == 0:  # only the experts some token uses are decoded
            continue
        slots = slots_by_expert[first:first + count]
        first += count
        tokens = slots // top_k
        w13 = _decode_cpu_layout(w13_qweight[expert], w13_absmax[expert], codebook, x.dtype).float()
        gate, up = (x[tokens].float() @ w13.t()).chunk(2, dim=-1)
        hidden = (act(gate) * up).to(x.dtype).float()
        w2 = _decode_cpu_layout(w2_qweight[expert], w2_absmax[expert], codebook, x.dtype).float()
        out.index_add_(0, tokens, (hidden @ w2.t()) * slot_weight[slots])
    return out.to(x.dtype)


def _decode_kernel_layout_cuda(qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
                               codebook: torch.Tensor, bits: int, in_features: int,
                               dtype: torch.dtype) -> torch.Tensor:
    """All experts of a kernel-layout weight decoded to a new ``dtype`` tensor [E, N, K] (no host sync).

    The tiled layout of [E, N, K] is that of one [E*N, K] weight, so one dequantize launch decodes all experts.
    """
    out = torch.empty((*scale.shape, in_features), dtype=dtype, device=scale.device)
    _C.dequantize(out.data_ptr(), qweight.data_ptr(), absmax.data_ptr(), scale.data_ptr(),
                  _host_codebook(codebook, bits), scale.numel(), in_features, bits, _DTYPE_CODE[dtype],
                  _current_stream(scale.get_device()))
    return out


def _moe_experts_dequant_fused(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                               w13_qweight: torch.Tensor, w13_absmax: torch.Tensor, w13_scale: torch.Tensor,
                               w2_qweight: torch.Tensor, w2_absmax: torch.Tensor, w2_scale: torch.Tensor,
                               codebook: torch.Tensor, bits: int, activation: str) -> torch.Tensor:
    # Large M (or a layer outside the grouped kernel's limits): decode every expert of the layer into a temporary
    # 16-bit copy, then vLLM's own (Triton) fused MoE. With many tokens most experts are used anyway; free of host
    # syncs (CUDA-graph safe), but it writes and reads the layer's 16-bit expert weights on every call.
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    hidden, intermediate = x.shape[1], w13_scale.shape[-1] // 2
    w13 = _decode_kernel_layout_cuda(w13_qweight, w13_absmax, w13_scale, codebook, bits, hidden, x.dtype)
    w2 = _decode_kernel_layout_cuda(w2_qweight, w2_absmax, w2_scale, codebook, bits, intermediate, x.dtype)
    return fused_experts(x, w13, w2, topk_weights, topk_ids, activation=MoEActivation(activation),
                         global_num_experts=w13.shape[0])


_MOE_ACTIVATION_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # kernels/kbit_ops.h MoeActivation


def _moe_experts_grouped(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         w13_qweight: torch.Tensor, w13_absmax: torch.Tensor, w13_scale: torch.Tensor,
                         w2_qweight: torch.Tensor, w2_absmax: torch.Tensor, w2_scale: torch.Tensor,
                         codebook: torch.Tensor, bits: int, activation: str) -> torch.Tensor:
    m, hidden = x.shape
    experts, top_k, intermediate = w13_scale.shape[0], topk_ids.shape[1], w13_scale.shape[1] // 2
    x = x.contiguous()
    topk_ids = topk_ids.to(torch.int32).contiguous()  # no-ops for vLLM's int32 ids and fp32 weights
    topk_weights = topk_weights.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    workspace_hidden = torch.empty((m * top_k, intermediate), dtype=x.dtype, device=x.device)
    pair_out = torch.empty((m * top_k, hidden), dtype=torch.float32, device=x.device)
    _C.moe_experts(out.data_ptr(), x.data_ptr(), workspace_hidden.data_ptr(), pair_out.data_ptr(),
                   topk_ids.data_ptr(), topk_weights.data_ptr(), w13_qweight.data_ptr(), w13_absmax.data_ptr(),
                   w13_scale.data_ptr(), w2_qweight.data_ptr(), w2_absmax.data_ptr(), w2_scale.data_ptr(),
                   _host_codebook(codebook, bits), m, top_k, experts, hidden, intermediate, bits,
                   _MOE_ACTIVATION_CODE[activation], _DTYPE_CODE[x.dtype],
                   _current_stream(x.get_device()))
    return out


_MOE_GPU_IMPLS = {"moe_grouped_mma": _moe_experts_grouped, "moe_dequant_fused": _moe_experts_dequant_fused}


def moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                w13_qweight: torch.Tensor, w13_absmax: torch.Tensor, w13_scale: torch.Tensor,
                w2_qweight: torch.Tensor, w2_absmax: torch.Tensor, w2_scale: torch.Tensor,
                codebook: torch.Tensor, bits: int, activation: str) -> torch.Tensor:
    """out[M, H] = sum_j topk_weights[m, j] * expert_{topk_ids[m, j]}(x[m]) for one MoE layer.

    expert_e(x) = w2_e @ (act(gate) * up), [gate | up] = w13_e @ x; weights in the device's kernel layout.
    topk_ids are local expert ids (no expert parallelism); the result is this tensor-parallel rank's
    partial sum.
    """
    check_moe_activation(activation)
    if x.shape[0] == 0:
        return torch.empty_like(x)
    if x.is_cuda:
        require_kernels()
        tier = capabilities.moe_tier(x.shape[0], topk_ids.shape[1], w13_scale.shape[0], w13_scale.shape[1] // 2)
        return _MOE_GPU_IMPLS[tier.name](x, topk_weights, topk_ids, w13_qweight, w13_absmax, w13_scale,
                                         w2_qweight, w2_absmax, w2_scale, codebook, bits, activation)
    return _moe_experts_cpu(x, topk_weights, topk_ids, w13_qweight, w13_absmax, w2_qweight, w2_absmax,
                            codebook, activation)


def _moe_experts_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      w13_qweight: torch.Tensor, w13_absmax: torch.Tensor, w13_scale: torch.Tensor,
                      w2_qweight: torch.Tensor, w2_absmax: torch.Tensor, w2_scale: torch.Tensor,
                      codebook: torch.Tensor, bits: int, activation: str) -> torch.Tensor:
    return torch.empty_like(x)


layer_moe_experts = _define_op("moe_experts", moe_experts, _moe_experts_fake)
