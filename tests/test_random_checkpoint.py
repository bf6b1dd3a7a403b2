"""Random checkpoints for tests and benchmarks: the same layout kbit-quantize and GPTQ loaders expect."""

import json

import torch
from safetensors.torch import load_file

from vllm_kbit import format as kfmt
from vllm_kbit.quantize_cli import main as kbit_quantize
from vllm_kbit.random_checkpoint import (
    GPTQ_QUANTIZATION_CONFIG,
    TINY_QWEN3_MOE,
    LlamaShape,
    gptq_dequantize,
    write_random_gptq_llama,
    write_random_kbit_llama,
    write_random_kbit_qwen3_moe,
    write_random_llama,
    write_random_qwen3_moe,
)

# Input sizes that are multiples of the GPTQ group (128) so both formats quantize every projection.
SHAPE = LlamaShape(256, 512, 1, 4, 2, 512, max_position_embeddings=256, rope_theta=10000.0)


def assert_same_layout_as_kbit_quantize(direct, bf16, tmp_path, bits, *options):
    assert kbit_quantize([str(bf16), str(tmp_path / "quantized"), "--bits", str(bits), "--quiet", *options]) == 0
    a, b = load_file(direct / "model.safetensors"), load_file(tmp_path / "quantized" / "model.safetensors")
    assert {n: (t.dtype, t.shape) for n, t in a.items()} == {n: (t.dtype, t.shape) for n, t in b.items()}
    ca = json.loads((direct / "config.json").read_text())
    cb = json.loads((tmp_path / "quantized" / "config.json").read_text())
    assert ca == cb  # the model config and the quantization_config
    return a


def test_random_kbit_checkpoint_matches_kbit_quantize_layout(tmp_path):
    direct = write_random_kbit_llama(tmp_path / "direct", SHAPE, bits=3)
    a = assert_same_layout_as_kbit_quantize(direct, write_random_llama(tmp_path / "bf16", SHAPE), tmp_path, 3)
    # Random codes decode to finite weights of a sane size (rms about 1/sqrt(K), like the 16-bit writer).
    module = "model.layers.0.mlp.down_proj"
    w = kfmt.dequantize(kfmt.KbitTensor(a[f"{module}.qweight"], a[f"{module}.qweight_absmax"],
                                        a[f"{module}.weight_scale"], 3))
    rms = w.pow(2).mean().sqrt().item()
    assert torch.isfinite(w).all() and 0.2 / SHAPE.intermediate_size ** 0.5 < rms < 5 / SHAPE.intermediate_size ** 0.5


def test_random_kbit_checkpoint_with_lm_head_matches_kbit_quantize_layout(tmp_path):
    # The writer of the "kbit4-lmhead" benchmark checkpoint.
    direct = write_random_kbit_llama(tmp_path / "direct", SHAPE, bits=4, quantize_lm_head=True)
    a = assert_same_layout_as_kbit_quantize(direct, write_random_llama(tmp_path / "bf16", SHAPE), tmp_path, 4,
                                            "--quantize-lm-head")
    assert "lm_head.qweight" in a and "lm_head.weight" not in a


def test_random_kbit_moe_checkpoint_matches_kbit_quantize_layout(tmp_path):
    # The writer of the Qwen3-30B-A3B-shaped benchmark checkpoint, on the tiny shape: experts quantized, router
    # gates kept.
    direct = write_random_kbit_qwen3_moe(tmp_path / "direct", TINY_QWEN3_MOE, bits=2)
    a = assert_same_layout_as_kbit_quantize(direct, write_random_qwen3_moe(tmp_path / "bf16", TINY_QWEN3_MOE),
                                            tmp_path, 2)
    assert "model.layers.0.mlp.experts.1.up_proj.qweight" in a and "model.layers.0.mlp.gate.weight" in a


def test_random_gptq_checkpoint_layout(tmp_path):
    out = write_random_gptq_llama(tmp_path / "gptq", SHAPE)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == GPTQ_QUANTIZATION_CONFIG
    tensors = load_file(out / "model.safetensors")
    module = "model.layers.0.self_attn.o_proj"
    k, n = SHAPE.hidden_size, SHAPE.hidden_size
    qweight, qzeros = tensors[f"{module}.qweight"], tensors[f"{module}.qzeros"]
    scales, g_idx = tensors[f"{module}.scales"], tensors[f"{module}.g_idx"]
    assert qweight.dtype == torch.int32 and qweight.shape == (k // 8, n)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (k // 128, n // 8)
    assert scales.dtype == torch.float16 and scales.shape == (k // 128, n)
    assert torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // 128)
    w = gptq_dequantize(qweight, qzeros, scales, g_idx)
    assert w.shape == (n, k) and torch.isfinite(w).all()
    # symmetric int4: codes 0..15 around 8, so each column's weights are (code - 8) * scale
    assert (w.abs() <= 8 * scales.float().abs().max() + 1e-6).all()
    assert "lm_head.weight" in tensors and tensors["lm_head.weight"].dtype == torch.float16
