"""End to end with the real vLLM (the CPU build in CI): load, quantize at load time, TP=2, bad input.

Tiny random Llama models built here are enough for exactness checks: the CPU kernel dequantizes to
exactly the bf16 weights of the "twin" checkpoint, so greedy tokens must be identical.
"""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from e2e import EngineFailed, copy_without_tensor, run_engine, write_dequantized_twin
from safetensors.torch import load_file

from vllm_kbit.quantize_cli import main as kbit_quantize
from vllm_kbit.random_checkpoint import LlamaShape, write_random_llama

# On a GPU the kernels accumulate in a different order than the bf16 twin's matmul, so exact token
# equality is a CPU-build property; the GPU runs tests/test_smollm2_vllm.py and the kernel tests.
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(torch.cuda.is_available(), reason="exactness checks for the CPU build")]

PROMPTS = [[1, 5, 9, 100, 200, 7], [1, 17, 300], [1, 42, 43, 44, 45, 46, 47, 48, 49]]
MAX_TOKENS = 12
# Heads and sizes chosen so TP=2 splits every layer into whole 32-wide blocks.
SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512, rope_theta=10000.0)


def _spec(model, **kw):
    return {"model": str(model), "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "skip_tokenizer_init": True, **kw}


def _tokens(result):
    return [o["token_ids"] for o in result["outputs"]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    bf16 = write_random_llama(root / "bf16", SHAPE, seed=1)
    paths = {"bf16": bf16}
    for bits in (4, 2):
        paths[f"k{bits}"] = root / f"k{bits}"
        assert kbit_quantize([str(bf16), str(paths[f"k{bits}"]), "--bits", str(bits), "--quiet"]) == 0
        paths[f"twin{bits}"] = write_dequantized_twin(paths[f"k{bits}"], root / f"twin{bits}")
    return paths


@pytest.fixture(scope="module")
def k4_result(models):
    return run_engine(_spec(models["k4"]))


def test_prequantized_matches_dequantized_twin(models, k4_result):
    twin = run_engine(_spec(models["twin4"]))
    assert _tokens(k4_result) == _tokens(twin)
    for a, b in zip(k4_result["outputs"], twin["outputs"]):
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3


def test_load_time_quantization_equals_prequantized(models, k4_result):
    online = run_engine(_spec(models["bf16"], quantization="kbit"))
    assert _tokens(online) == _tokens(k4_result)


def test_load_time_bits_from_hf_overrides(models):
    overrides = {"quantization_config": {"quant_method": "kbit", "bits": 2}}
    online = run_engine(_spec(models["bf16"], hf_overrides=overrides))
    twin = run_engine(_spec(models["twin2"]))
    assert _tokens(online) == _tokens(twin)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP=2 on the CPU build needs two cores")
def test_tensor_parallel_2(models):
    # The CPU build binds each rank's threads to NUMA nodes and refuses 2 ranks on one node unless
    # told which cores to use.
    bind = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    kbit = run_engine(_spec(models["k4"], tp=2), env=bind)
    twin = run_engine(_spec(models["twin4"], tp=2), env=bind)
    assert _tokens(kbit) == _tokens(twin)


def test_quantized_lm_head_matches_dequantized_twin(models, tmp_path):
    head = tmp_path / "k4-head"
    assert kbit_quantize([str(models["bf16"]), str(head), "--bits", "4", "--quantize-lm-head", "--quiet"]) == 0
    twin = write_dequantized_twin(head, tmp_path / "k4-head-twin")
    kbit = run_engine(_spec(head))
    assert _tokens(kbit) == _tokens(run_engine(_spec(twin)))
    # At load time: quantization_config.lm_head through --hf-overrides gives the same model.
    overrides = {"quantization_config": {"quant_method": "kbit", "bits": 4, "lm_head": True}}
    assert _tokens(run_engine(_spec(models["bf16"], hf_overrides=overrides))) == _tokens(kbit)


def test_lm_head_of_a_tied_model_is_a_clear_error(tmp_path):
    tied = write_random_llama(tmp_path / "tied", replace(SHAPE, tie_word_embeddings=True), seed=1)
    overrides = {"quantization_config": {"quant_method": "kbit", "bits": 4, "lm_head": True}}
    with pytest.raises(EngineFailed) as info:
        run_engine(_spec(tied, hf_overrides=overrides, max_tokens=1))
    assert "ties lm_head to its input embeddings" in info.value.stderr


def test_skipped_modules_stay_unquantized(models, tmp_path):
    skipped = tmp_path / "skip"
    assert kbit_quantize([str(models["bf16"]), str(skipped), "--skip", r".*o_proj", "--quiet"]) == 0
    assert "model.layers.0.self_attn.o_proj.weight" in load_file(skipped / "model.safetensors")
    twin = write_dequantized_twin(skipped, tmp_path / "skip-twin")
    assert _tokens(run_engine(_spec(skipped))) == _tokens(run_engine(_spec(twin)))


def test_missing_tensor_is_a_clear_error(models, tmp_path):
    broken = copy_without_tensor(models["k4"], tmp_path / "broken", "model.layers.1.mlp.down_proj.qweight")
    with pytest.raises(EngineFailed) as info:
        run_engine(_spec(broken, max_tokens=1))
    assert "model.layers.1.mlp.down_proj.qweight was never loaded" in info.value.stderr


def test_wrong_bits_is_a_clear_error(models, tmp_path):
    bad = tmp_path / "bad-bits"
    shutil.copytree(models["k4"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["bits"] = 7
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineFailed) as info:
        run_engine(_spec(bad, max_tokens=1))
    assert "kbit supports bits in (2, 3, 4, 5), got 7" in info.value.stderr
