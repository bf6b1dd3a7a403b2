"""The capability table that both kernel dispatch and error messages read (pure Python: runs on the CPU)."""

import pytest

from vllm_kbit import capabilities as caps

COMPILED = frozenset(t.name for t in caps.GPU_TIERS)


@pytest.mark.parametrize("capability", [80, 89, 90, 100])
@pytest.mark.parametrize("layer", [None, (28672, 4096, 4), (28672, 4096, 5), (4096, 4096, 2), (512, 2048, 3)])
@pytest.mark.parametrize("compiled", [COMPILED, frozenset({"wgmma"}), frozenset()])
def test_dense_tiers_cover_every_m_once(compiled, layer, capability):
    tiers = caps.available_tiers(capability, compiled, *(layer or (None, None, None)))
    for m in list(range(1, 1100)) + [1 << 20]:
        assert sum(t.min_m <= m <= t.max_m for t in tiers) == 1, f"M={m}"
    assert [t.min_m for t in tiers] == sorted(t.min_m for t in tiers)
    wgmma_runs = capability == 90 and "wgmma" in compiled and layer is not None and layer[0] >= 4096
    if "mma" not in compiled and not wgmma_runs:
        assert [t.name for t in tiers] == ["dequant_cublas"]


def test_dense_plan_for_hopper():
    def plan(capability, n=None, k=None, bits=None):
        return caps.describe_tiers(caps.available_tiers(capability, COMPILED, n, k, bits))

    # Llama-3-8B gate_up (112Mi elements): the larger M, the fewer k take wgmma
    assert plan(90, 28672, 4096, 4) == "M=1..32: mma, M=33..1024: wgmma, M=1025..: dequant_cublas"
    assert plan(90, 28672, 4096, 2) == "M=1..32: mma, M=33..1024: wgmma, M=1025..: dequant_cublas"
    assert plan(90, 28672, 4096, 3) == "M=1..32: mma, M=33..512: wgmma, M=513..: dequant_cublas"
    assert plan(90, 28672, 4096, 5) == "M=1..32: mma, M=33..256: wgmma, M=257..: dequant_cublas"
    assert plan(90, 14336, 4096, 4) == "M=1..32: mma, M=33..512: wgmma, M=513..: dequant_cublas"    # down: 56Mi
    assert plan(90, 6144, 4096, 4) == "M=1..32: mma, M=33..256: wgmma, M=257..: dequant_cublas"     # qkv: 24Mi
    assert plan(90, 4096, 4096, 4) == "M=1..64: mma, M=65..256: wgmma, M=257..: dequant_cublas"     # o: 16Mi
    # a small layer (Qwen3-Next kv), no weight given, or a GPU other than Hopper: no wgmma
    for args in ((90, 512, 2048, 4), (90,), (80, 28672, 4096, 4), (89, 28672, 4096, 4), (100, 28672, 4096, 4)):
        assert plan(*args) == "M=1..64: mma, M=65..: dequant_cublas", args
    assert caps.describe_tiers(caps.available_tiers(90, frozenset(), 28672, 4096, 4)) == "M=1..: dequant_cublas"
@pytest.mark.parametrize("m,top_k,experts,intermediate,tier", [
    (1, 8, 128, 768, "moe_grouped_mma"),
    (64, 8, 128, 768, "moe_grouped_mma"),
    (64, 10, 512, 512, "moe_grouped_mma"),           # 640 pairs: two launches
    (65, 4, 128, 768, "moe_dequant_fused"),          # past the tier's M
    (1, 513, 1024, 512, "moe_dequant_fused"),        # more pairs than one launch takes for one token
    (4, 8, 2048, 768, "moe_dequant_fused"),          # more experts than the used-expert bitmap holds
    (4, 8, 128, 48, "moe_dequant_fused"),            # gate and up row tiles would not pair up
])
def test_moe_tier(m, top_k, experts, intermediate, tier):
    assert caps.moe_tier(m, top_k, experts, intermediate).name == tier


def test_moe_plan_names_the_limits():
    assert caps.describe_moe_plan(10, 512, 512).startswith("M=1..64: moe_grouped_mma, M=65..: moe_dequant_fused")
    plan = caps.describe_moe_plan(8, 128, 48)
    assert plan.startswith("every M: moe_dequant_fused") and "not a multiple of 32" in plan


def test_old_gpu_is_refused_with_the_fix():
    with pytest.raises(RuntimeError, match="compute capability >= 8.0.*Tesla T4 is 7.5.*newer GPU"):
        caps.check_gpu_capability(75, "Tesla T4")
