"""Random-weight Hugging Face checkpoints of real architectures, written tensor by tensor.

No model hub is reachable from the test and benchmark machines, so tests and benchmarks build their
models here: tiny ones for CPU tests, full-size Llama-3 shapes for GPU benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_kbit.safetensors_stream import StreamingWriter


@dataclass
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False


# Shapes from the public configs (see shared/reference/test-models.md).
LLAMA3_8B = LlamaShape(4096, 14336, 32, 32, 8, 128256)
TINY_LLAMA = LlamaShape(256, 512, 2, 4, 2, 1024, max_position_embeddings=512, rope_theta=10000.0)


def llama_tensors(shape: LlamaShape, dtype: torch.dtype) -> list[tuple[str, torch.dtype, list[int]]]:
    h, i = shape.hidden_size, shape.intermediate_size
    hd = shape.head_dim or h // shape.num_attention_heads
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    plan = [("model.embed_tokens.weight", dtype, [shape.vocab_size, h])]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        plan += [(p + "input_layernorm.weight", dtype, [h]), (p + "post_attention_layernorm.weight", dtype, [h]),
                 (p + "self_attn.q_proj.weight", dtype, [q, h]), (p + "self_attn.k_proj.weight", dtype, [kv, h]),
                 (p + "self_attn.v_proj.weight", dtype, [kv, h]), (p + "self_attn.o_proj.weight", dtype, [h, q]),
                 (p + "mlp.gate_proj.weight", dtype, [i, h]), (p + "mlp.up_proj.weight", dtype, [i, h]),
                 (p + "mlp.down_proj.weight", dtype, [h, i])]
    plan.append(("model.norm.weight", dtype, [h]))
    if not shape.tie_word_embeddings:
        plan.append(("lm_head.weight", dtype, [shape.vocab_size, h]))
    return plan


def _random_tensor(name: str, dtype: torch.dtype, size: list[int], gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(size, dtype=dtype)
    if "embed_tokens" in name:
        return torch.randn(size, generator=gen).to(dtype)
    # Kaiming-like scale keeps activations O(1) through the layers, as in a trained model.
    return (torch.randn(size, generator=gen) / size[-1] ** 0.5).to(dtype)


def write_random_llama(out_dir: Path, shape: LlamaShape = TINY_LLAMA, dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A LlamaForCausalLM checkpoint with random weights; copies tokenizer files if given."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    plan = llama_tensors(shape, dtype)
    with StreamingWriter(out_dir / "model.safetensors", plan) as writer:
        for name, dt, size in plan:
            writer.write(name, _random_tensor(name, dt, size, gen))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2,
              **{k: v for k, v in asdict(shape).items() if v is not None}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        for f in tokenizer_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir
