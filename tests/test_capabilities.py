"""The capability table that both kernel dispatch and error messages read (pure Python: runs on the CPU)."""

import pytest

from vllm_kbit import capabilities as caps

COMPILED = frozenset(t.name for t in caps.GPU_TIERS)


@pytest.mark.parametrize("capability", [80, 89, 90, 100])
@pytest.mark.parametrize("shape", [None, (4096, 4096), (512, 2048)])
@pytest.mark.parametrize("compiled", [COMPILED, frozenset({"dequant_cublas", "wgmma"}), frozenset()])
def test_dense_tiers_cover_every_m_once(compiled, shape, capability):
    tiers = caps.available_tiers(capability, compiled, *(shape or (None, None)))
    for m in list(range(1, 300)) + [1 << 20]:
        assert sum(t.min_m <= m <= t.max_m for t in tiers) == 1, f"M={m}"
    if "mma" not in compiled and (capability != 90 or "wgmma" not in compiled or shape == (512, 2048)):
        assert [t.name for t in tiers] == ["dequant_cublas"]


def test_dense_plan_for_hopper():
    tiers = caps.available_tiers(90, COMPILED)
    assert caps.describe_tiers(tiers) == ("M=1..64: mma, M=65..256: wgmma (N >= 4096, K >= 4096; else dequant_cublas), "
                                          "M=257..: dequant_cublas")
    assert caps.describe_tiers(caps.available_tiers(90, COMPILED, 6144, 4096)) == (
        "M=1..64: mma, M=65..256: wgmma (N >= 4096, K >= 4096; else dequant_cublas), M=257..: dequant_cublas")
    # a small layer (Qwen3-Next kv), or a GPU other than Hopper: no wgmma
    assert caps.describe_tiers(caps.available_tiers(90, COMPILED, 512, 2048)) == "M=1..64: mma, M=65..: dequant_cublas"
    for capability in (80, 89, 100):
        assert caps.describe_tiers(caps.available_tiers(capability, COMPILED, 6144, 4096)) == (
            "M=1..64: mma, M=65..: dequant_cublas")


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
