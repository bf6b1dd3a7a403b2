"""Registration, config parsing and per-layer method choice, with real vLLM layers (no engine)."""

import logging

import pytest
import torch

import vllm_kbit
from vllm_kbit import format as kfmt

vllm = pytest.importorskip("vllm")
from vllm.model_executor.layers import quantization as vq  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from vllm_kbit.config import KbitConfig, KbitLinearMethod, KbitOnlineLinearMethod  # noqa: E402

QKV = "model.layers.0.self_attn.qkv_proj"


@pytest.fixture(scope="module", autouse=True)
def _vllm(vllm_context):
    yield


def _config(**kw):
    cfg = KbitConfig.from_config({"quant_method": "kbit", **kw})
    cfg.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    return cfg


def test_register_is_idempotent():
    vllm_kbit.register()
    vllm_kbit.register()
    assert vq.get_quantization_config("kbit") is KbitConfig
    assert vq.QUANTIZATION_METHODS.count("kbit") == 1
    assert hasattr(torch.ops.kbit, "gemm")


def test_register_leaves_a_foreign_kbit_alone(caplog):
    class OtherKbit(KbitConfig):
        pass

    vllm_kbit.register()
    vq._CUSTOMIZED_METHOD_TO_QUANT_CONFIG["kbit"] = OtherKbit
    try:
        with caplog.at_level(logging.WARNING):
            vllm_kbit.register()
        assert vq._CUSTOMIZED_METHOD_TO_QUANT_CONFIG["kbit"] is OtherKbit
    finally:
        vq._CUSTOMIZED_METHOD_TO_QUANT_CONFIG["kbit"] = KbitConfig


def test_vllm_version_range():
    assert vllm_kbit.check_vllm_version("0.26.0") is None
    assert vllm_kbit.check_vllm_version("0.32.0") is None
    assert "untested" in vllm_kbit.check_vllm_version("0.40.1")
    with pytest.raises(RuntimeError, match="needs vLLM >= 0.26"):
        vllm_kbit.check_vllm_version("0.25.2")


def test_config_parsing_and_defaults():
    default = KbitConfig()
    assert default.bits == 4 and not default.packed and default.get_name() == "kbit"
    cfg = _config(bits=3, packed=True, module_bits={"model.layers.1.mlp.down_proj": 5})
    assert cfg.bits == 3 and cfg.packed and cfg.get_min_capability() == 80
    assert torch.bfloat16 in cfg.get_supported_act_dtypes()
    with pytest.raises(kfmt.KbitFormatError, match="supports bits in"):
        KbitConfig.from_config({"bits": 6})
    with pytest.raises(kfmt.KbitFormatError, match="blocks of 32"):
        KbitConfig.from_config({"bits": 4, "block_size": 64})
    with pytest.raises(kfmt.KbitFormatError, match="format version 2"):
        KbitConfig.from_config({"bits": 4, "format_version": 2})
    with pytest.raises(kfmt.KbitFormatError, match="codebook"):
        KbitConfig.from_config({"bits": 2, "codebooks": {"2": [0.0, 1.0]}})


def test_method_per_layer():
    cfg = _config(bits=4, packed=True, module_bits={"model.layers.0.mlp.down_proj": 5},
                  modules_to_not_convert=["model.layers.0.self_attn.o_proj"])
    qkv = QKVParallelLinear(256, 64, 4, 2, bias=False, quant_config=cfg, prefix=QKV)
    assert isinstance(qkv.quant_method, KbitLinearMethod) and qkv.quant_method.bits == 4
    assert qkv.qweight.shape == (512, 256 // 32 * 4) and qkv.qweight.dtype == torch.int32
    assert qkv.qweight_absmax.shape == (512, 8) and qkv.weight_scale.shape == (512,)
    assert torch.isnan(qkv.weight_scale).all()  # sentinel until loaded
    down = RowParallelLinear(512, 256, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    assert down.quant_method.bits == 5 and down.qweight.shape == (256, 512 // 32 * 5)
    o = RowParallelLinear(256, 256, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert isinstance(o.quant_method, UnquantizedLinearMethod)
    gate = ReplicatedLinear(256, 8, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.gate")
    assert isinstance(gate.quant_method, UnquantizedLinearMethod)  # router gates stay 16-bit


def test_load_time_method_and_bits_map():
    cfg = _config(bits=3, bits_map={r"layers\.0\..*gate_up_proj|layers\.0\..*(gate|up)_proj": 5})
    gate_up = MergedColumnParallelLinear(256, [512, 512], bias=False, quant_config=cfg,
                                         prefix="model.layers.0.mlp.gate_up_proj")
    assert isinstance(gate_up.quant_method, KbitOnlineLinearMethod) and gate_up.quant_method.bits == 5
    assert gate_up.weight.device.type == "meta"  # materialized only when the layer's weights arrive


def test_fused_groups_must_agree():
    partly_skipped = _config(packed=True, modules_to_not_convert=["model.layers.0.self_attn.q_proj"])
    with pytest.raises(kfmt.KbitFormatError, match="only some of them are unquantized"):
        QKVParallelLinear(256, 64, 4, 2, bias=False, quant_config=partly_skipped, prefix=QKV)
    mixed_bits = _config(packed=True, module_bits={"model.layers.0.self_attn.k_proj": 5})
    with pytest.raises(kfmt.KbitFormatError, match="different bits"):
        QKVParallelLinear(256, 64, 4, 2, bias=False, quant_config=mixed_bits, prefix=QKV)


def test_misaligned_shapes_name_the_fix():
    cfg = _config(packed=True)
    with pytest.raises(ValueError, match=r"input size per rank 48 is not a multiple of 32.*--skip"):
        RowParallelLinear(48, 64, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"output size per rank 40 is not a multiple"):
        RowParallelLinear(64, 40, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")


def test_lm_head_method():
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    head = ParallelLMHead(1000, 256, quant_config=_config(bits=4, packed=True, lm_head=True), prefix="lm_head")
    assert isinstance(head.quant_method, KbitLinearMethod)
    assert head.qweight.shape == (1024, 256 // 32 * 4)  # the vocabulary padded to 64 rows
    # Off by default, and off where modules_to_not_convert names it.
    for cfg in (_config(packed=True), _config(packed=True, lm_head=True, modules_to_not_convert=["lm_head"])):
        quant_method = ParallelLMHead(1000, 256, quant_config=cfg, prefix="lm_head").quant_method
        assert not isinstance(quant_method, KbitLinearMethod)
    with pytest.raises(ValueError, match=r"input size per rank 48 .*quantization_config.lm_head: false"):
        ParallelLMHead(1000, 48, quant_config=_config(packed=True, lm_head=True), prefix="lm_head")


def test_process_weights_is_idempotent_and_checks_loading():
    cfg = _config(bits=4, packed=True)
    layer = RowParallelLinear(256, 128, bias=False, quant_config=cfg, prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(RuntimeError, match="was never loaded"):
        layer.quant_method.process_weights_after_loading(layer)
    weight = torch.randn(128, 256)
    packed = kfmt.quantize(weight, 4)
    for name, tensor in (("qweight", packed.qweight), ("qweight_absmax", packed.absmax), ("weight_scale", packed.scale)):
        param = getattr(layer, name)
        param.weight_loader(param, tensor)
    layer.quant_method.process_weights_after_loading(layer)
    first = layer.qweight.data.clone()
    layer.quant_method.process_weights_after_loading(layer)  # vLLM may call it again
    assert torch.equal(first, layer.qweight.data)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    expected = x.float() @ kfmt.dequantize(packed).to(torch.bfloat16).float().t()
    out = layer.quant_method.apply(layer, x)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 128)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
