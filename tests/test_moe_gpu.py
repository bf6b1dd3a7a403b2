"""The grouped MoE kernel (vllm_kbit._C.moe_experts) and torch.ops.kbit.moe_experts on a GPU, against an fp64
reference per (token, expert) built from vllm_kbit.format's fp32 decode."""

import functools

import pytest
import torch

from gpu_kernels import DTYPE_CODES, kernels_or_skip
from vllm_kbit import format as kf, ops

_C = kernels_or_skip()
pytestmark = pytest.mark.gpu

ACTIVATION_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
# ||out - ref|| / ||ref||. On top of the dense MMA's error sources (tests/test_kernels_gpu.py: codebook and output
# rounding, ~u/sqrt(3) each), the hidden activations are rounded to the dtype between the two GEMMs (as vLLM's
# fused MoE does) and the down GEMM's codebook is rounded too: ~sqrt(4) u/sqrt(3) in all, 5.7e-4 for fp16 and
# 2.3e-3 for bf16. The bounds leave >= 4x headroom; a wrong expert, token, row or routing weight gives errors of
# order 1.
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 1e-2}


@functools.lru_cache(maxsize=None)
def experts(num_experts, hidden, intermediate, bits):
    """Random stacked experts (w13 [E, 2I, H] = gate rows then up rows, w2 [E, H, I]) in the kernel layout, plus
    their fp32 reference decode."""
    gen = torch.Generator().manual_seed(7919 * bits + num_experts + hidden + intermediate)
    result = {}
    for stem, (n, k) in {"w13": (2 * intermediate, hidden), "w2": (hidden, intermediate)}.items():
        w = torch.randn(num_experts, n, k, generator=gen) / k**0.5
        t = kf.quantize(w.cuda(), bits)
        qweight, absmax = kf.to_kernel_layout(t)
        result[stem] = (qweight, absmax, t.scale.contiguous(), kf.dequantize(t))
    return result, kf.normal_float_codebook(bits)  # on the CPU, as the op takes it


def reference(x, topk_weights, topk_ids, weights, activation):
    act = ops.MOE_ACTIVATIONS[activation]
    w13, w2 = weights["w13"][3].double(), weights["w2"][3].double()
    out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for m in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[m, j])
            if not 0 <= e < w13.shape[0]:
                continue
            gate, up = (w13[e] @ x[m].double()).chunk(2)
            out[m] += float(topk_weights[m, j]) * (w2[e] @ (act(gate) * up))
    return out


def random_routing(m, num_experts, top_k, gen):
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(m)]).to(torch.int32)
    weights = torch.rand(m, top_k, generator=gen) + 0.1
    return (weights / weights.sum(-1, keepdim=True)).cuda(), ids.cuda()


def run_kernel(x, topk_weights, topk_ids, weights, codebook, bits, activation, out=None):
    m, hidden = x.shape
    num_experts, intermediate, top_k = weights["w13"][2].shape[0], weights["w2"][3].shape[-1], topk_ids.shape[1]
    poison = float("nan")
    out = torch.full_like(x, poison) if out is None else out
    hidden_ws = torch.full((m * top_k, intermediate), poison, dtype=x.dtype, device="cuda")
    pair_out = torch.full((m * top_k, hidden), poison, dtype=torch.float32, device="cuda")
    (q13, a13, s13, _), (q2, a2, s2, _) = weights["w13"], weights["w2"]
    _C.moe_experts(out.data_ptr(), x.data_ptr(), hidden_ws.data_ptr(), pair_out.data_ptr(), topk_ids.data_ptr(),
                   topk_weights.data_ptr(), q13.data_ptr(), a13.data_ptr(), s13.data_ptr(), q2.data_ptr(),
                   a2.data_ptr(), s2.data_ptr(), codebook.data_ptr(), m, top_k, num_experts, hidden, intermediate,
                   bits, ACTIVATION_CODES[activation], DTYPE_CODES[x.dtype], torch.cuda.current_stream().cuda_stream)
    return out


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def check(x, topk_weights, topk_ids, bits, dtype, activation="silu", num_experts=64, hidden=576, intermediate=96):
    weights, codebook = experts(num_experts, hidden, intermediate, bits)
    out = run_kernel(x, topk_weights, topk_ids, weights, codebook, bits, activation)
    torch.cuda.synchronize()
    assert not out.isnan().any(), "unwritten or non-finite outputs"
    err = relative_error(out, reference(x, topk_weights, topk_ids, weights, activation))
    assert err < TOLERANCE[dtype], f"relative error {err:.2e}"
    return out


# H = 576: K padded in the gate/up GEMM (5 column tiles); I = 96: 3 gate row tiles (units of 2 and 4 leave one
# partial), the down GEMM has one padded column tile.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
@pytest.mark.parametrize("m,top_k", [(1, 8), (3, 8), (7, 8), (16, 8), (17, 8), (32, 8), (64, 8), (64, 10), (100, 4)])
def test_random_routing(m, top_k, bits, dtype):
    # top-10 of 64 tokens and 100 tokens: more than one launch (at most 512 pairs and 64 tokens each)
    gen = torch.Generator().manual_seed(m * 10 + bits)
    topk_weights, topk_ids = random_routing(m, 64, top_k, gen)
    x = torch.randn(m, 576, generator=gen).to(dtype).cuda()
    check(x, topk_weights, topk_ids, bits, dtype)


# One token and top_k <= 16: the down launch adds the experts' sums itself, one group of warps per expert whose
# warps are its K-slices. I = 2016 (16 column tiles, the last padded): 16 K-slices at top-1, 4 at top-3, 1 at top-10
# and top-16; top-17 takes the general path.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", kf.SUPPORTED_BITS)
@pytest.mark.parametrize("top_k", [1, 3, 10, 16, 17])
def test_one_token(top_k, bits, dtype):
    gen = torch.Generator().manual_seed(100 + top_k * 10 + bits)
    topk_weights, topk_ids = random_routing(1, 32, top_k, gen)
    x = torch.randn(1, 576, generator=gen).to(dtype).cuda()
    check(x, topk_weights, topk_ids, bits, dtype, num_experts=32, intermediate=2016)


def test_one_token_ids_outside_the_experts_contribute_nothing():
    # whatever their routing weight, as in the sum of the general path
    gen = torch.Generator().manual_seed(29)
    topk_weights, topk_ids = random_routing(1, 64, 8, gen)
    topk_ids[0, 0], topk_ids[0, 5] = -1, 64
    topk_weights[0, 0] = float("inf")
    x = torch.randn(1, 576, generator=gen).bfloat16().cuda()
    check(x, topk_weights, topk_ids, 4, torch.bfloat16)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_other_activations(activation):
    gen = torch.Generator().manual_seed(5)
    topk_weights, topk_ids = random_routing(5, 64, 4, gen)
    x = torch.randn(5, 576, generator=gen).bfloat16().cuda()
    check(x, topk_weights, topk_ids, 4, torch.bfloat16, activation)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_token_on_the_same_experts(dtype):
    # 16 tokens on the same 8 experts (in different top-k positions): each expert has a full 16-token unit, and 56
    # experts have none.
    gen = torch.Generator().manual_seed(11)
    chosen = torch.randperm(64, generator=gen)[:8]
    topk_ids = torch.stack([chosen[torch.randperm(8, generator=gen)] for _ in range(16)]).to(torch.int32).cuda()
    topk_weights = torch.rand(16, 8, generator=gen).cuda()
    x = torch.randn(16, 576, generator=gen).to(dtype).cuda()
    check(x, topk_weights, topk_ids, 3, dtype)


def test_ids_outside_the_experts_contribute_nothing():
    gen = torch.Generator().manual_seed(13)
    topk_weights, topk_ids = random_routing(6, 64, 4, gen)
    topk_ids[0, 1], topk_ids[3, 0], topk_ids[5, 3] = -1, 64, 1000
    x = torch.randn(6, 576, generator=gen).half().cuda()
    check(x, topk_weights, topk_ids, 4, torch.float16)


@pytest.mark.parametrize("m", [1, 16, 64])
def test_qwen3_30b_a3b_layer(m):
    # The real shape: H = 2048, 128 experts, top-8, I = 768 (unit sizes differ from the small shape's).
    gen = torch.Generator().manual_seed(17)
    topk_weights, topk_ids = random_routing(m, 128, 8, gen)
    x = torch.randn(m, 2048, generator=gen).bfloat16().cuda()
    check(x, topk_weights, topk_ids, 4, torch.bfloat16, num_experts=128, hidden=2048, intermediate=768)


@pytest.mark.parametrize("m", [1, 4])
def test_cuda_graph_follows_the_routing(m):
    # Captured once, replayed with new routing and activations written into the captured buffers: the kernel
    # finds the used experts on the device, so the replay must match an eager call on the new routing.
    bits, dtype, top_k = 4, torch.bfloat16, 8
    weights, codebook = experts(64, 576, 96, bits)
    gen = torch.Generator().manual_seed(19)
    topk_weights, topk_ids = random_routing(m, 64, top_k, gen)
    x = torch.randn(m, 576, generator=gen).to(dtype).cuda()
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_kernel(x, topk_weights, topk_ids, weights, codebook, bits, "silu", out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_kernel(x, topk_weights, topk_ids, weights, codebook, bits, "silu", out)
    for _ in range(3):
        new_weights, new_ids = random_routing(m, 64, top_k, gen)
        topk_weights.copy_(new_weights), topk_ids.copy_(new_ids), x.copy_(torch.randn(m, 576, generator=gen))
        out.fill_(float("nan"))
        graph.replay()
        eager = run_kernel(x, topk_weights, topk_ids, weights, codebook, bits, "silu")
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


@pytest.mark.parametrize("m", [2, 40, 80])
def test_op_every_tier(m):
    # torch.ops.kbit.moe_experts: M = 2 and 40 take the grouped kernel, M = 80 the dequantize + vLLM fused MoE path
    # (needs vLLM).
    from vllm_kbit import capabilities

    tier = capabilities.moe_tier(m, 8, 64, 96)
    if tier.name == "moe_dequant_fused":
        pytest.importorskip("vllm")
    bits, dtype = 4, torch.bfloat16
    weights, codebook = experts(64, 576, 96, bits)
    gen = torch.Generator().manual_seed(23 + m)
    topk_weights, topk_ids = random_routing(m, 64, 8, gen)
    x = torch.randn(m, 576, generator=gen).to(dtype).cuda()
    (q13, a13, s13, _), (q2, a2, s2, _) = weights["w13"], weights["w2"]
    out = torch.ops.kbit.moe_experts(x, topk_weights, topk_ids, q13, a13, s13, q2, a2, s2, codebook, bits, "silu")
    print(f"M={m}: {tier.name}")
    err = relative_error(out, reference(x, topk_weights, topk_ids, weights, "silu"))
    assert err < TOLERANCE[dtype], f"{tier.name}: relative error {err:.2e}"


def test_invalid_arguments():
    weights, codebook = experts(64, 576, 96, 4)
    (q13, a13, s13, _), (q2, a2, s2, _) = weights["w13"], weights["w2"]
    x = torch.randn(2, 576, device="cuda", dtype=torch.float16)
    ws = torch.empty(64, 576, device="cuda")
    ids = torch.zeros(2, 8, dtype=torch.int32, device="cuda")
    ptrs = (q13.data_ptr(), a13.data_ptr(), s13.data_ptr(), q2.data_ptr(), a2.data_ptr(), s2.data_ptr(),
            codebook.data_ptr())

    def call(m=2, top_k=8, num_experts=64, intermediate=96, activation=0):
        _C.moe_experts(x.data_ptr(), x.data_ptr(), ws.data_ptr(), ws.data_ptr(), ids.data_ptr(), ws.data_ptr(),
                       *ptrs, m, top_k, num_experts, 576, intermediate, 4, activation, 0,
                       torch.cuda.current_stream().cuda_stream)

    for message, kwargs in {"M \\(tokens\\)": {"m": 0}, "top_k": {"top_k": 600},
                            "number of experts": {"num_experts": 2000},
                            "intermediate size": {"intermediate": 80}, "activation": {"activation": 3}}.items():
        with pytest.raises(ValueError, match=message):
            call(**kwargs)
