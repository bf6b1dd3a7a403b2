"""Random-weight Hugging Face checkpoints of real architectures, written tensor by tensor.

No model hub is reachable from the test and benchmark machines, so tests and benchmarks build their
models here: tiny ones for CPU tests, full-size Llama-3 shapes for GPU benchmarks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vllm_kbit import format as kfmt, quantize_cli
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


def _attention_tensors(p: str, h: int, q: int, kv: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, list[int]]]:
    """The norms and attention projections of decoder layer prefix ``p`` (Llama naming)."""
    return [(p + "input_layernorm.weight", dtype, [h]), (p + "post_attention_layernorm.weight", dtype, [h]),
            (p + "self_attn.q_proj.weight", dtype, [q, h]), (p + "self_attn.k_proj.weight", dtype, [kv, h]),
            (p + "self_attn.v_proj.weight", dtype, [kv, h]), (p + "self_attn.o_proj.weight", dtype, [h, q])]


def llama_tensors(shape: LlamaShape, dtype: torch.dtype) -> list[tuple[str, torch.dtype, list[int]]]:
    h, i = shape.hidden_size, shape.intermediate_size
    hd = shape.head_dim or h // shape.num_attention_heads
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    plan = [("model.embed_tokens.weight", dtype, [shape.vocab_size, h])]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        plan += _attention_tensors(p, h, q, kv, dtype)
        plan += [(p + "mlp.gate_proj.weight", dtype, [i, h]), (p + "mlp.up_proj.weight", dtype, [i, h]),
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
    (out_dir / "config.json").write_text(json.dumps(llama_config(shape, dtype), indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


# ---------------------------------------------------------------------------------------------------
# Mixture-of-experts models: Qwen3-MoE and OLMoE, with per-expert tensors named as in the HF checkpoints
# (model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight, router model.layers.{i}.mlp.gate.weight).
# ---------------------------------------------------------------------------------------------------


@dataclass
class MoeShape:
    hidden_size: int
    moe_intermediate_size: int  # per expert
    num_experts: int
    num_experts_per_tok: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


# Every per-rank size a multiple of 32 at TP=1 and TP=2 (kbit blocks), as in the real models.
TINY_QWEN3_MOE = MoeShape(256, 128, 8, 2, 2, 4, 2, 64, 1024)
TINY_OLMOE = MoeShape(256, 128, 8, 2, 2, 4, 4, 64, 1024, rms_norm_eps=1e-5)
# Qwen3-30B-A3B's config (hidden, expert intermediate, experts, top-k, layers, heads, kv heads, head dim, vocab)
QWEN3_30B_A3B = MoeShape(2048, 768, 128, 8, 48, 32, 4, 128, 151936, max_position_embeddings=40960,
                         rope_theta=1e6)


def moe_tensors(shape: MoeShape, dtype: torch.dtype, qk_norm_per_head: bool) -> list[tuple[str, torch.dtype, list[int]]]:
    """Tensor plan of a Qwen3-MoE (q/k norm per head) or OLMoE (q/k norm over all heads) checkpoint."""
    h, i, hd = shape.hidden_size, shape.moe_intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    plan = [("model.embed_tokens.weight", dtype, [shape.vocab_size, h])]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        plan += _attention_tensors(p, h, q, kv, dtype)
        plan += [(p + "self_attn.q_norm.weight", dtype, [hd if qk_norm_per_head else q]),
                 (p + "self_attn.k_norm.weight", dtype, [hd if qk_norm_per_head else kv]),
                 (p + "mlp.gate.weight", dtype, [shape.num_experts, h])]
        for e in range(shape.num_experts):
            plan += [(p + f"mlp.experts.{e}.gate_proj.weight", dtype, [i, h]),
                     (p + f"mlp.experts.{e}.up_proj.weight", dtype, [i, h]),
                     (p + f"mlp.experts.{e}.down_proj.weight", dtype, [h, i])]
    plan += [("model.norm.weight", dtype, [h]), ("lm_head.weight", dtype, [shape.vocab_size, h])]
    return plan


def _write_random_moe(out_dir: Path, plan: list[tuple[str, torch.dtype, list[int]]], config: dict,
                      seed: int) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    with StreamingWriter(out_dir / "model.safetensors", plan) as writer:
        for name, dt, size in plan:
            writer.write(name, _random_tensor(name, dt, size, gen))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _moe_config(shape: MoeShape, dtype: torch.dtype) -> dict:
    return {"hidden_act": "silu", "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1,
            "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False,
            "hidden_size": shape.hidden_size, "num_experts": shape.num_experts,
            "num_experts_per_tok": shape.num_experts_per_tok, "num_hidden_layers": shape.num_hidden_layers,
            "num_attention_heads": shape.num_attention_heads, "num_key_value_heads": shape.num_key_value_heads,
            "head_dim": shape.head_dim, "vocab_size": shape.vocab_size,
            "max_position_embeddings": shape.max_position_embeddings, "rope_theta": shape.rope_theta,
            "rms_norm_eps": shape.rms_norm_eps}


def write_random_qwen3_moe(out_dir: Path, shape: MoeShape = TINY_QWEN3_MOE, dtype: torch.dtype = torch.bfloat16,
                           seed: int = 0) -> Path:
    """A Qwen3MoeForCausalLM checkpoint with random weights: every layer sparse, top-k renormalized."""
    return _write_random_moe(out_dir, moe_tensors(shape, dtype, qk_norm_per_head=True),
                             qwen3_moe_config(shape, dtype), seed)


def qwen3_moe_config(shape: MoeShape, dtype: torch.dtype) -> dict:
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **_moe_config(shape, dtype),
            "moe_intermediate_size": shape.moe_intermediate_size,
            # the dense MLP size of mlp_only_layers, of which there are none
            "intermediate_size": shape.moe_intermediate_size,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


def write_random_olmoe(out_dir: Path, shape: MoeShape = TINY_OLMOE, dtype: torch.dtype = torch.bfloat16,
                       seed: int = 0) -> Path:
    """An OlmoeForCausalLM checkpoint with random weights: q/k norm over all heads, top-k not renormalized."""
    config = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **_moe_config(shape, dtype),
              "intermediate_size": shape.moe_intermediate_size,  # OLMoE's name for the expert size
              "norm_topk_prob": False, "clip_qkv": None}
    return _write_random_moe(out_dir, moe_tensors(shape, dtype, qk_norm_per_head=False), config, seed)


# ---------------------------------------------------------------------------------------------------
# Serving-benchmark checkpoints of a Llama shape, written directly in quantized form: random codes with
# sane scales instead of a quantization pass, so a Llama-3-8B-sized checkpoint takes seconds. The packed
# tensors are drawn on the GPU when there is one; the 16-bit ones (embeddings, norms, the lm_head unless it is
# quantized too) come from _random_tensor as in write_random_llama. Decoded weights have RMS 1/sqrt(K), like
# _random_tensor's, so activations stay O(1) through the layers and 16-bit inference never overflows.
# ---------------------------------------------------------------------------------------------------

TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens", "vocab", "merges")


def copy_tokenizer_files(tokenizer_dir: Path, out_dir: Path) -> None:
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(TOKENIZER_FILE_PREFIXES):
            (out_dir / f.name).write_bytes(f.read_bytes())


def llama_config(shape: LlamaShape, dtype: torch.dtype) -> dict:
    """The config.json of write_random_llama's checkpoints."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "torch_dtype": str(dtype).removeprefix("torch."), "bos_token_id": 1, "eos_token_id": 2,
            **{k: v for k, v in asdict(shape).items() if v is not None}}


def generation_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _random_bytes(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """uint8, every bit uniform: viewed as int32 words, uniformly random packed codes."""
    return torch.randint(0, 256, shape, dtype=torch.uint8, device=gen.device, generator=gen)


def _jitter(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """float32 factors in [0.75, 1.25): scales that differ from row to row (group to group), as trained ones do."""
    return 0.75 + 0.5 * torch.rand(shape, device=gen.device, generator=gen)


# A block's absmax code is drawn between a quarter of E4M4's maximum and the maximum: relative to its row's
# largest block (which kbit-quantize maps to E4M4_MAX), as the blocks of a quantized Gaussian weight lie.
KBIT_RANDOM_ABSMAX_LOW = int(kfmt.e4m4_encode(torch.tensor([kfmt.E4M4_MAX / 4])))


def _random_kbit_weight(n: int, k: int, bits: int, codebook: torch.Tensor,
                        gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, qweight_absmax, weight_scale) of a random [n, k] weight in the on-disk kbit layout."""
    blocks = k // kfmt.BLOCK_SIZE
    qweight = _random_bytes((n, blocks * bits * 4), gen).view(torch.int32)
    absmax = torch.randint(KBIT_RANDOM_ABSMAX_LOW, 256, (n, blocks), dtype=torch.uint8, device=gen.device,
                           generator=gen)
    rms_absmax = kfmt.e4m4_table()[KBIT_RANDOM_ABSMAX_LOW:].square().mean().sqrt()
    rms_scale = 1.0 / (codebook.square().mean().sqrt() * rms_absmax * k**0.5)
    return qweight, absmax, rms_scale.item() * _jitter((n,), gen)


def _write_random_kbit(out_dir: Path, tensors: list[tuple[str, torch.dtype, list[int]]], config: dict, bits: int,
                       seed: int, tokenizer_dir: Path | None, quantize_lm_head: bool = False) -> Path:
    """The kbit checkpoint that kbit-quantize writes for a 16-bit checkpoint of tensor plan ``tensors`` (its
    plan, default skips and quantization_config), with random codes."""
    kfmt.check_bits(bits)
    skip = quantize_cli.default_skip(quantize_lm_head)
    plans = [quantize_cli.plan_tensor(name, size, dt, bits, {}, skip) for name, dt, size in tensors]
    shard = quantize_cli.Shard(src=Path(), dst_name="model.safetensors", plans=plans)  # src: nothing is read
    codebooks = {bits: kfmt.normal_float_codebook(bits)}
    cpu_gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(generation_device()).manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    with StreamingWriter(out_dir / shard.dst_name, [o for p in plans for o in p.outputs()]) as writer:
        for p in plans:
            if p.bits is None:
                pieces = [_random_tensor(p.name, p.dtype, p.shape, cpu_gen)]
            else:
                pieces = _random_kbit_weight(*p.shape, p.bits, codebooks[p.bits], device_gen)
            for (name, _, _), piece in zip(p.outputs(), pieces):
                writer.write(name, piece)
    config = {**config, "quantization_config": quantize_cli.quantization_config([shard], bits, codebooks)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir


def write_random_kbit_llama(out_dir: Path, shape: LlamaShape = TINY_LLAMA, bits: int = 4,
                            dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                            tokenizer_dir: Path | None = None, quantize_lm_head: bool = False) -> Path:
    """A kbit checkpoint of a Llama shape with random codes (and a kbit lm_head with quantize_lm_head)."""
    if quantize_lm_head and shape.tie_word_embeddings:
        raise ValueError("quantize_lm_head: this shape ties its lm_head to the embeddings, which stay 16-bit")
    return _write_random_kbit(out_dir, llama_tensors(shape, dtype), llama_config(shape, dtype), bits, seed,
                              tokenizer_dir, quantize_lm_head)


def write_random_kbit_qwen3_moe(out_dir: Path, shape: MoeShape = TINY_QWEN3_MOE, bits: int = 4,
                                dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                                tokenizer_dir: Path | None = None) -> Path:
    """A kbit checkpoint of a Qwen3-MoE shape with random codes (router gates stay 16-bit)."""
    return _write_random_kbit(out_dir, moe_tensors(shape, dtype, qk_norm_per_head=True),
                              qwen3_moe_config(shape, dtype), bits, seed, tokenizer_dir)


# GPTQ int4, group 128, symmetric, no act-order: per module qweight int32 [K/8, N] (word j of column n holds
# the codes of rows 8j..8j+7, row 8j+i in bits 4i..4i+3), qzeros int32 [K/128, N/8] (packed the same way
# along N), scales [K/128, N] in the model dtype, g_idx int32 [K] (row j -> group j // 128).
# Symmetric int4 is vLLM's uint4b8: weight = (code - 8) * scale. The GPTQ checkpoint format (v1, as AutoGPTQ
# writes it) stores every zero point minus one, so 7 in each nibble; vLLM's Marlin and Machete kernels ignore
# qzeros when sym is true, and its Exllama kernel rebuilds them as 7 as well.
GPTQ_GROUP_SIZE = 128
GPTQ_CODE_BIAS = 8
GPTQ_STORED_ZERO = GPTQ_CODE_BIAS - 1
GPTQ_QUANTIZATION_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": GPTQ_GROUP_SIZE, "desc_act": False,
                            "sym": True}
_NIBBLE_SHIFTS = tuple(range(0, 32, 4))


def gptq_outputs(module: str, n: int, k: int, dtype: torch.dtype) -> list[tuple[str, torch.dtype, list[int]]]:
    groups = k // GPTQ_GROUP_SIZE
    return [(f"{module}.qweight", torch.int32, [k // 8, n]), (f"{module}.qzeros", torch.int32, [groups, n // 8]),
            (f"{module}.scales", dtype, [groups, n]), (f"{module}.g_idx", torch.int32, [k])]


def _random_gptq_weight(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """[qweight, qzeros, scales, g_idx] of a random [n, k] weight: uniform codes, the stored zero 7 everywhere."""
    groups = k // GPTQ_GROUP_SIZE
    qweight = _random_bytes((k // 8, n * 4), gen).view(torch.int32)
    stored_zeros = sum(GPTQ_STORED_ZERO << s for s in _NIBBLE_SHIFTS)  # < 2^31: fits int32
    qzeros = torch.full((groups, n // 8), stored_zeros, dtype=torch.int32)
    rms_code = (torch.arange(16.0) - GPTQ_CODE_BIAS).square().mean().sqrt().item()  # codes uniform in 0..15
    scales = (_jitter((groups, n), gen) / (rms_code * k**0.5)).to(dtype)
    g_idx = torch.arange(k, dtype=torch.int32) // GPTQ_GROUP_SIZE
    return [qweight, qzeros, scales, g_idx]


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding 8 int4 values each along ``dim`` -> int32 values, value 8j+i from bits 4i..4i+3."""
    shifts = torch.tensor(_NIBBLE_SHIFTS, dtype=torch.int32, device=packed.device)
    nibbles = (packed.movedim(dim, -1).unsqueeze(-1) >> shifts) & 0xF  # & drops the sign bits of the shift
    return nibbles.flatten(-2).movedim(-1, dim)


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor) -> torch.Tensor:
    """Reference decode of one GPTQ int4 module (v1 zero points) to float32 ``[N, K]``."""
    group = g_idx.long()
    codes = unpack_int4(qweight, dim=0)  # [K, N]
    zeros = unpack_int4(qzeros, dim=1) + 1  # [K/128, N]; stored minus one
    return ((codes - zeros[group]) * scales[group].float()).t()


def _gptq_packs(name: str, dtype: torch.dtype, size: list[int]) -> bool:
    """Whether a weight is packed: the modules kbit-quantize quantizes by default, so both formats quantize
    the same layers."""
    if quantize_cli.plan_tensor(name, size, dtype, 4, {}, quantize_cli.DEFAULT_SKIP).bits is None:
        return False
    n, k = size
    if k % GPTQ_GROUP_SIZE or n % 8:
        raise ValueError(f"{name} {size}: GPTQ g{GPTQ_GROUP_SIZE} needs K % {GPTQ_GROUP_SIZE} == 0 and N % 8 == 0")
    return True


def write_random_gptq_llama(out_dir: Path, shape: LlamaShape = TINY_LLAMA, dtype: torch.dtype = torch.float16,
                            seed: int = 0, tokenizer_dir: Path | None = None) -> Path:
    """A GPTQ int4 (g128, symmetric, no act-order) checkpoint of a Llama shape with random codes; weights
    that are not packed stay in ``dtype``."""
    cpu_gen = torch.Generator().manual_seed(seed)
    device_gen = torch.Generator(generation_device()).manual_seed(seed)
    weights = llama_tensors(shape, dtype)
    plan = [o for name, dt, size in weights
            for o in (gptq_outputs(name.removesuffix(".weight"), *size, dtype) if _gptq_packs(name, dt, size)
                      else [(name, dt, size)])]
    out_dir.mkdir(parents=True, exist_ok=True)
    with StreamingWriter(out_dir / "model.safetensors", plan) as writer:
        for name, dt, size in weights:
            if _gptq_packs(name, dt, size):
                pieces = zip(gptq_outputs(name.removesuffix(".weight"), *size, dtype),
                             _random_gptq_weight(*size, dtype, device_gen))
            else:
                pieces = [((name, dt, size), _random_tensor(name, dt, size, cpu_gen))]
            for (out_name, _, _), tensor in pieces:
                writer.write(out_name, tensor)
    config = {**llama_config(shape, dtype), "quantization_config": dict(GPTQ_QUANTIZATION_CONFIG)}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
