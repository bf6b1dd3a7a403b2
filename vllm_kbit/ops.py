"""The ``torch.ops.kbit`` custom ops: the only way model code reaches kbit kernels.

Every choice that depends on M (tokens in the batch) happens inside the op, where torch.compile
cannot freeze it; the fake implementation gives Dynamo shapes only. The op works on the layer's
*kernel layout*, made once at load time by :func:`prepare_weight` for the device the layer lives on.
This module does not import vLLM, so kernels can be tested and benchmarked without it.
"""

from __future__ import annotations

import functools

import torch

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
def tiers_for_device(device_index: int) -> tuple[capabilities.Tier, ...]:
    major, minor = torch.cuda.get_device_capability(device_index)
    capability = major * 10 + minor
    capabilities.check_gpu_capability(capability, torch.cuda.get_device_name(device_index))
    compiled = frozenset(tier.name for tier in capabilities.GPU_TIERS if hasattr(_C, tier.name))
    return capabilities.available_tiers(capability, compiled)


@functools.cache
def _tier_by_m(device_index: int, max_m: int = 64) -> tuple[str, ...]:
    """Tier name for M = 0..max_m (index = M), so the hot path is one tuple lookup."""
    tiers = tiers_for_device(device_index)
    return tuple(next(t.name for t in tiers if t.min_m <= max(m, 1) <= t.max_m) for m in range(max_m + 1))


def tier_name(device_index: int, m: int) -> str:
    table = _tier_by_m(device_index)
    return table[m] if m < len(table) else table[-1]


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


def _gemm_cpu(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
              codebook: torch.Tensor, bits: int) -> torch.Tensor:
    n, k = qweight.shape
    values = codebook[qweight.long()].view(n, k // kfmt.BLOCK_SIZE, kfmt.BLOCK_SIZE)
    weight = (values * absmax.unsqueeze(-1)).view(n, k).to(x.dtype)
    return torch.nn.functional.linear(x, weight)


def _gemm_cuda(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
               codebook: torch.Tensor, bits: int) -> torch.Tensor:
    m, k = x.shape
    n = scale.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x.contiguous()
    dtype_code = _DTYPE_CODE[x.dtype]
    stream = torch.cuda.current_stream(x.device).cuda_stream
    tier = tier_name(x.device.index, m)
    if tier == "dequant_cublas":
        weight = torch.empty((n, k), dtype=x.dtype, device=x.device)
        _C.dequantize(weight.data_ptr(), qweight.data_ptr(), absmax.data_ptr(), scale.data_ptr(),
                      codebook.data_ptr(), n, k, bits, dtype_code, stream)
        torch.mm(x, weight.t(), out=out)
    else:
        getattr(_C, tier)(out.data_ptr(), x.data_ptr(), qweight.data_ptr(), absmax.data_ptr(),
                          scale.data_ptr(), codebook.data_ptr(), m, n, k, bits, dtype_code, stream)
    return out


def gemm(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
         codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """y[M, N] = x[M, K] @ W^T for a kbit weight W [N, K] in the device's kernel layout."""
    if x.is_cuda:
        return _gemm_cuda(x, qweight, absmax, scale, codebook, bits)
    return _gemm_cpu(x, qweight, absmax, scale, codebook, bits)


def _gemm_fake(x: torch.Tensor, qweight: torch.Tensor, absmax: torch.Tensor, scale: torch.Tensor,
               codebook: torch.Tensor, bits: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], scale.shape[0]))


def _register() -> torch.library.Library:
    lib = torch.library.Library("kbit", "FRAGMENT")
    lib.define("gemm" + torch.library.infer_schema(gemm, mutates_args=()))
    for key in ("CPU", "CUDA"):
        lib.impl("gemm", gemm, key)
    lib._register_fake("gemm", _gemm_fake)
    return lib


# Kept alive for the process: the ops live as long as this Library object.
_LIBRARY = _register() if not hasattr(torch.ops.kbit, "gemm") else None
