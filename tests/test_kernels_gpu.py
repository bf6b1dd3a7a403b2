"""The CUDA kernels of vllm_kbit._C against the fp32 reference of vllm_kbit.format (needs a GPU and the build)."""

import functools

import pytest
import torch

from gpu_kernels import DTYPE_CODES, kernels_or_skip
from vllm_kbit import format as kf
from vllm_kbit import ops  # also registers torch.ops.kbit

_C = kernels_or_skip()
pytestmark = pytest.mark.gpu
# (N, K): SmolLM2 (K padded, several row tiles per unit), Qwen3-Next kv, Llama-3-8B qkv (several units per block),
# K with one block in its last column tile
SHAPES = [(192, 576), (512, 2048), (6144, 4096), (224, 1056)]
# 1, 2, 4 and 8 n8 token tiles, full and partly filled; more than one launch of 64 tokens (32 on sm_86 / sm_89)
MMA_MS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 130]

# Tolerance on ||out - ref|| / ||ref||, ref = fp64 matmul of the same (fp16/bf16) x with the fp32 reference
# weight. Unit roundoff u: fp16 2^-11 = 4.9e-4, bf16 2^-9 = 2.0e-3. Error sources, each relative to the norm:
# output rounding to the dtype (rms ~ u/sqrt(3)); codebook values rounded to the activation dtype in the kernel's
# lookup table (rms ~ u/sqrt(3)); for M > 8, those values times their block's absmax rounded again (rms ~
# u/sqrt(3)); products and sums are fp32 in the tensor cores and across blocks (negligible). Sum for fp16 ~ 5e-4,
# for bf16 ~ 2e-3; the bounds leave >= 3x headroom and still catch any wrong index, absmax, scale or row (those
# give errors of order 1).
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 6e-3}


@functools.lru_cache(maxsize=None)
def quantized(n, k, bits, magnitude=1.0):
    """A random weight with some blocks scaled by 1e-3 and some by 30 (exercises E4M4's range), quantized."""
    gen = torch.Generator().manual_seed(1000 * bits + n + k)
    w = torch.randn(n, k // 32, 32, generator=gen) * magnitude
    block_factor = torch.ones(n, k // 32, 1)
    pick = torch.rand(n, k // 32, 1, generator=gen)
    block_factor[pick < 0.1] = 1e-3
    block_factor[pick > 0.9] = 30.0
    t = kf.quantize((w * block_factor).reshape(n, k).cuda(), bits)
    codebook = kf.normal_float_codebook(bits)  # on the CPU: the kernels take its values by value
    qweight_tiled, absmax_tiled = kf.to_kernel_layout(t)
    reference = kf.dequantize(t, codebook)  # fp32 [n, k]
    return t, codebook, qweight_tiled, absmax_tiled, reference


def stream():
    return torch.cuda.current_stream().cuda_stream


def run_mma(x, n, k, bits, magnitude=1.0):
    t, codebook, qweight_tiled, absmax_tiled, _ = quantized(n, k, bits, magnitude)
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype, device="cuda")
    _C.mma(out.data_ptr(), x.data_ptr(), qweight_tiled.data_ptr(), absmax_tiled.data_ptr(), t.scale.data_ptr(),
           codebook.data_ptr(), x.shape[0], n, k, bits, DTYPE_CODES[x.dtype], stream())
    return out


def relative_error(out, x, reference):
    expected = x.double() @ reference.double().T
    return ((out.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_dequantize_exact(n, k, bits, dtype):
    t, codebook, qweight_tiled, absmax_tiled, reference = quantized(n, k, bits)
    out = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
    _C.dequantize(out.data_ptr(), qweight_tiled.data_ptr(), absmax_tiled.data_ptr(), t.scale.data_ptr(),
                  codebook.data_ptr(), n, k, bits, DTYPE_CODES[dtype], stream())
    torch.cuda.synchronize()
    assert torch.equal(out, reference.to(dtype))


@pytest.mark.parametrize("m", MMA_MS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
@pytest.mark.parametrize("n,k", SHAPES)
def test_mma(n, k, bits, dtype, m):
    x = torch.randn(m, k, device="cuda").to(dtype)
    out = run_mma(x, n, k, bits)
    err = relative_error(out, x, quantized(n, k, bits)[4])
    assert not out.isnan().any(), "unwritten or non-finite outputs"
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


def wgmma_or_skip():
    if not hasattr(_C, "wgmma"):
        pytest.skip("the wgmma kernel is built only with 90 among KBIT_CUDA_ARCHS")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("wgmma runs on sm_90 (Hopper) only")


def run_wgmma(x, n, k, bits):
    """_C.wgmma with its output and workspace poisoned (NaN fp16/bf16 outputs, NaN fp32 partial sums)."""
    t, codebook, qweight_tiled, absmax_tiled, _ = quantized(n, k, bits)
    m = x.shape[0]
    out = torch.full((m, n), float("nan"), dtype=x.dtype, device="cuda")
    workspace = torch.full((_C.wgmma_workspace(out.data_ptr(), m, n, k),), 255, dtype=torch.uint8, device="cuda")
    _C.wgmma(out.data_ptr(), x.data_ptr(), qweight_tiled.data_ptr(), absmax_tiled.data_ptr(), t.scale.data_ptr(),
             codebook.data_ptr(), workspace.data_ptr(), m, n, k, bits, DTYPE_CODES[x.dtype], stream())
    return out


# Every shape above (with and without K-slices), a Llama-3-8B down (K-slices of 14 column tiles), and 6240 rows (one
# K-slice: outputs staged in shared memory, the last block with 3 of its 8 row tiles); M: the 64-token operand
# (M <= 64) with one token, partly filled and full, then the 128-token one partly filled, full, and over several
# token tiles.
@pytest.mark.parametrize("m", [1, 40, 64, 65, 128, 129, 300, 700])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
@pytest.mark.parametrize("n,k", SHAPES + [(4096, 14336), (6240, 4096)])
def test_wgmma(n, k, bits, dtype, m):
    wgmma_or_skip()
    x = torch.randn(m, k, device="cuda").to(dtype)
    out = run_wgmma(x, n, k, bits)
    assert not out.isnan().any(), "unwritten or non-finite outputs"
    err = relative_error(out, x, quantized(n, k, bits)[4])
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("m", [40, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wgmma_few_tokens_one_slice(dtype, m):
    # Llama-3-8B gate_up: 112 blocks of 256 rows, so no K-slices at M <= 64 on an H100 or H200 (the shapes above all
    # take K-slices there): the 64-token operand's outputs staged in shared memory
    test_wgmma(28672, 4096, 4, dtype, m)


def test_wgmma_cuda_graph_matches_eager():
    wgmma_or_skip()
    n, k, bits, m = 4096, 4096, 4, 200  # K-slices (a workspace) and two token tiles
    t, codebook, qweight_tiled, absmax_tiled, _ = quantized(n, k, bits)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    eager = run_wgmma(x, n, k, bits)
    out = torch.full_like(eager, float("nan"))
    workspace = torch.empty(_C.wgmma_workspace(out.data_ptr(), m, n, k), dtype=torch.uint8, device="cuda")
    call = functools.partial(_C.wgmma, out.data_ptr(), x.data_ptr(), qweight_tiled.data_ptr(), absmax_tiled.data_ptr(),
                             t.scale.data_ptr(), codebook.data_ptr(), workspace.data_ptr(), m, n, k, bits, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(side.cuda_stream)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(stream())
    for _ in range(3):
        out.fill_(float("nan"))
        workspace.fill_(255)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)
    with pytest.raises(ValueError, match="out must be 16-byte aligned"):  # the outputs go out 8 at a time
        _C.wgmma(out.data_ptr() + 8, x.data_ptr(), qweight_tiled.data_ptr(), absmax_tiled.data_ptr(),
                 t.scale.data_ptr(), codebook.data_ptr(), workspace.data_ptr(), m, n, k, bits, 0, stream())
    with pytest.raises(ValueError, match="workspace is a null pointer"):
        _C.wgmma(out.data_ptr(), x.data_ptr(), qweight_tiled.data_ptr(), absmax_tiled.data_ptr(), t.scale.data_ptr(),
                 codebook.data_ptr(), 0, m, n, k, bits, 0, stream())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_many_units_per_block(dtype):
    # 1024 row tiles in units of 2 (K has 5 column tiles): every block runs several units, the ring carries tiles
    # across unit ends
    n, k, bits = 32768, 576, 3
    x = torch.randn(3, k, device="cuda").to(dtype)
    out = run_mma(x, n, k, bits)
    assert not out.isnan().any()
    assert relative_error(out, x, quantized(n, k, bits)[4]) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_large_activations(dtype):
    """Activations far from 1 (|x| ~ 1e4 / 1e-3 in fp16, 1e-20 / 1e20 in bf16) neither overflow nor lose precision.

    Sums of products of |x| ~ 1e4 with codebook values near 1 overflow fp16 within a block; the kernel must keep
    them in fp32. The weight is small (rms ~ 1e-2, as in LLMs) so that the fp16 outputs themselves stay finite.
    """
    n, k, bits, magnitude = 512, 2048, 4, 1e-3
    x = torch.randn(3, k, device="cuda")
    x[0] *= 1e4
    if dtype == torch.bfloat16:
        x[1] *= 1e-20
        x[2] *= 1e20
    else:
        x[1] *= 1e-3  # outputs stay above fp16's subnormal range, whose rounding the bound does not cover
    x = x.to(dtype)
    out = run_mma(x, n, k, bits, magnitude)
    reference = quantized(n, k, bits, magnitude)[4]
    for row in range(3):
        err = relative_error(out[row:row + 1], x[row:row + 1], reference)
        assert err < TOLERANCE[dtype], f"row {row}: relative error {err:.2e}"


@pytest.mark.parametrize("m", [2, 16, 40, 100])
def test_mma_cuda_graph_matches_eager(m):
    n, k, bits = 512, 2048, 3
    t, codebook, qweight_tiled, absmax_tiled, _ = quantized(n, k, bits)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    eager = run_mma(x, n, k, bits)
    out = torch.full_like(eager, float("nan"))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up call outside capture, as torch recommends
        run_mma(x, n, k, bits)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _C.mma(out.data_ptr(), x.data_ptr(), qweight_tiled.data_ptr(), absmax_tiled.data_ptr(),
               t.scale.data_ptr(), codebook.data_ptr(), m, n, k, bits, 1, stream())
    for _ in range(3):
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


def test_invalid_arguments():
    n, k, bits = 512, 2048, 4
    t, codebook, qweight_tiled, absmax_tiled, _ = quantized(n, k, bits)
    x = torch.randn(1, k, device="cuda", dtype=torch.float16)
    out = torch.empty(1, n, device="cuda", dtype=torch.float16)
    ptrs = (qweight_tiled.data_ptr(), absmax_tiled.data_ptr(), t.scale.data_ptr(), codebook.data_ptr())
    cases = {
        "bits": (1, n, k, 6, 0),
        "K \\(in_features\\)": (1, n, k - 16, bits, 0),
        "N \\(out_features\\)": (1, n - 8, k, bits, 0),
        "dtype": (1, n, k, bits, 2),
        "M \\(rows of x\\)": (0, n, k, bits, 0),
    }
    for message, (m, nn, kk, b, dt) in cases.items():
        with pytest.raises(ValueError, match=message):
            _C.mma(out.data_ptr(), x.data_ptr(), *ptrs, m, nn, kk, b, dt, stream())
    with pytest.raises(ValueError, match="x must be 16-byte aligned"):
        _C.mma(out.data_ptr(), x.data_ptr() + 2, *ptrs, 1, n, k, bits, 0, stream())
    with pytest.raises(ValueError, match="not CUDA device memory"):
        host = torch.empty(1, n, dtype=torch.float16)
        _C.mma(host.data_ptr(), x.data_ptr(), *ptrs, 1, n, k, bits, 0, stream())
    # The codebook's values go into the launch parameters: it must be readable on the host.
    with pytest.raises(ValueError, match="codebook must be in host memory"):
        _C.mma(out.data_ptr(), x.data_ptr(), *ptrs[:3], codebook.cuda().data_ptr(), 1, n, k, bits, 0, stream())
    with pytest.raises(ValueError, match="codebook must be a contiguous float32 CPU tensor"):
        torch.ops.kbit.gemm(x, qweight_tiled, absmax_tiled, t.scale, codebook.cuda(), bits)


@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
def test_quantize_on_gpu_equals_cpu(bits):
    # Load-time quantization runs on the GPU, kbit-quantize on the CPU: both must write the same bits.
    w = (torch.randn(256, 1024, dtype=torch.float32) * torch.rand(256, 1, dtype=torch.float32) * 3).bfloat16()
    on_cpu, on_gpu = kf.quantize(w, bits), kf.quantize(w.cuda(), bits)
    assert torch.equal(on_gpu.scale.cpu(), on_cpu.scale)
    assert torch.equal(on_gpu.absmax.cpu(), on_cpu.absmax)
    assert torch.equal(on_gpu.qweight.cpu(), on_cpu.qweight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 17, 33, 64, 65, 128, 256, 257, 300, 513])
# no wgmma; on Hopper wgmma for M = 65..256; wgmma for M = 33..512 (capabilities.GPU_TIERS)
@pytest.mark.parametrize("n,k", [(512, 2048), (4096, 4096), (12288, 4096)])
def test_op_every_tier(n, k, m, dtype):
    # torch.ops.kbit.gemm picks the tier by M and shape inside the op: every tier must give the reference result.
    bits = 3
    t, codebook, qweight_tiled, absmax_tiled, reference = quantized(n, k, bits)
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    out = torch.ops.kbit.gemm(x, qweight_tiled, absmax_tiled, t.scale, codebook, bits)
    assert out.shape == (m, n) and out.dtype == dtype
    print(f"{n}x{k} M={m}: tier {ops.tier_name(0, m, n, k, bits)}")
    assert relative_error(out, x, reference) < TOLERANCE[dtype]
