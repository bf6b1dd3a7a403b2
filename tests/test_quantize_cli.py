"""kbit-quantize on small checkpoints built by the project (CPU)."""

import json
import re
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vllm_kbit import format as kfmt
from vllm_kbit.quantize_cli import main
from vllm_kbit.random_checkpoint import TINY_LLAMA, write_random_llama


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    src = write_random_llama(tmp_path_factory.mktemp("tiny") / "bf16")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "generation_config.json").write_text('{"do_sample": false}')
    return src


def _read_all(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_quantizes_linear_layers_and_keeps_the_rest(tiny_src, tmp_path):
    dst = tmp_path / "k4"
    assert main([str(tiny_src), str(dst), "--bits", "4", "--quiet"]) == 0
    src, out = load_file(tiny_src / "model.safetensors"), _read_all(dst)
    for name, w in src.items():
        module = name.removesuffix(".weight")
        if "proj" in name:
            t = kfmt.KbitTensor(out[f"{module}.qweight"], out[f"{module}.qweight_absmax"],
                                out[f"{module}.weight_scale"], 4)
            assert f"{module}.weight" not in out
            assert torch.equal(t.qweight, kfmt.quantize(w, 4).qweight)
            rel = (kfmt.dequantize(t) - w.float()).norm() / w.float().norm()
            assert rel < 0.12  # k=4 on Gaussian weights: SQNR ~20 dB
        else:  # embeddings, norms, lm_head: copied bit for bit
            assert torch.equal(out[name], w)
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "kbit" and qc["bits"] == 4 and qc["block_size"] == 32 and qc["packed"]
    assert qc["codebooks"]["4"] == kfmt.normal_float_codebook(4).tolist()
    assert "lm_head" in qc["modules_to_not_convert"] and "model.embed_tokens" in qc["modules_to_not_convert"]
    assert qc["lm_head"] is False
    assert config["num_hidden_layers"] == TINY_LLAMA.num_hidden_layers
    assert (dst / "tokenizer_config.json").is_file() and (dst / "generation_config.json").is_file()


def test_quantize_lm_head(tiny_src, tmp_path, capsys):
    dst = tmp_path / "k4-head"
    assert main([str(tiny_src), str(dst), "--bits", "4", "--quantize-lm-head", "--quiet"]) == 0
    src, out = load_file(tiny_src / "model.safetensors"), _read_all(dst)
    head = kfmt.KbitTensor(out["lm_head.qweight"], out["lm_head.qweight_absmax"], out["lm_head.weight_scale"], 4)
    assert "lm_head.weight" not in out and torch.equal(head.qweight, kfmt.quantize(src["lm_head.weight"], 4).qweight)
    assert torch.equal(out["model.embed_tokens.weight"], src["model.embed_tokens.weight"])
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["lm_head"] is True and "lm_head" not in qc["modules_to_not_convert"]

    # A model that ties its lm_head to the embeddings has no lm_head weight to quantize, or one that vLLM ignores.
    tied = write_random_llama(tmp_path / "tied", replace(TINY_LLAMA, tie_word_embeddings=True))
    assert "ties its lm_head" in _error(capsys, [str(tied), str(tmp_path / "t4"), "--quantize-lm-head"])
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert "has no lm_head weight" in _error(capsys, [str(tied), str(tmp_path / "t5"), "--quantize-lm-head"])
    assert not (tmp_path / "t4").exists() and not (tmp_path / "t5").exists()


def test_bits_map_and_skip(tiny_src, tmp_path):
    dst = tmp_path / "mixed"
    assert main([str(tiny_src), str(dst), "--bits", "3", "--bits-map", r"layers\.1\..*down_proj=5",
                 "--skip", r".*layers\.0\.self_attn\.o_proj", "--quiet"]) == 0
    out = _read_all(dst)
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["module_bits"] == {"model.layers.1.mlp.down_proj": 5}
    assert "model.layers.0.self_attn.o_proj" in qc["modules_to_not_convert"]
    assert out["model.layers.1.mlp.down_proj.qweight"].shape[-1] == TINY_LLAMA.intermediate_size // 32 * 5
    assert out["model.layers.0.mlp.down_proj.qweight"].shape[-1] == TINY_LLAMA.intermediate_size // 32 * 3
    assert out["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16


def test_sharded_input(tiny_src, tmp_path):
    src = tmp_path / "sharded"
    src.mkdir()
    tensors = load_file(tiny_src / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, str(src / file))
    weight_map = {n: f for f, part in halves.items() for n in part}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (src / "config.json").write_text((tiny_src / "config.json").read_text())
    dst = tmp_path / "sharded-k2"
    assert main([str(src), str(dst), "--bits", "2", "--quiet"]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    out = _read_all(dst)
    assert set(index["weight_map"]) == set(out)
    for name, file in index["weight_map"].items():
        with safe_open(dst / file, "pt") as f:
            assert name in f.keys()


def _error(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs(tiny_src, tmp_path, capsys):
    missing = tmp_path / "nothing"
    assert "is not a directory" in _error(capsys, [str(missing), str(tmp_path / "o1")])

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    assert "no config.json" in _error(capsys, [str(no_config), str(tmp_path / "o2")])

    assert "already exists" in _error(capsys, [str(tiny_src), str(tiny_src)])
    assert "supports bits in" in _error(capsys, [str(tiny_src), str(tmp_path / "o3"), "--bits", "6"])
    assert "REGEX=K" in _error(capsys, [str(tiny_src), str(tmp_path / "o4"), "--bits-map", "down_proj"])

    int8 = tmp_path / "int8"
    int8.mkdir()
    (int8 / "config.json").write_text("{}")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.ones(64, 64, dtype=torch.int8)},
              str(int8 / "model.safetensors"))
    assert "dtype int8" in _error(capsys, [str(int8), str(tmp_path / "o5")])

    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text("{}")
    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(64, 48).bfloat16()}, str(odd / "model.safetensors"))
    assert "not a multiple of 32" in _error(capsys, [str(odd), str(tmp_path / "o6")])

    mixed = ["--bits-map", r".*q_proj=5"]
    assert "need the same treatment" in _error(capsys, [str(tiny_src), str(tmp_path / "o7"), *mixed])

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{}")
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert "cannot read" in _error(capsys, [str(corrupt), str(tmp_path / "o8")])

    # nothing half-written anywhere
    leftovers = [p.name for p in tmp_path.iterdir() if re.match(r"\.?o\d", p.name)]
    assert leftovers == []


def test_console_script_is_installed(tiny_src, tmp_path):
    result = subprocess.run([sys.executable, "-m", "vllm_kbit.quantize_cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--bits-map" in result.stdout
