"""``kbit-quantize SRC DST``: turn a Hugging Face safetensors checkpoint into a kbit checkpoint.

Streams one tensor at a time: every output header is planned from the input headers first (the
quantized shapes follow from the input shapes), then each tensor is read, quantized and appended, so
peak memory is about one tensor. Output goes to a hidden directory next to DST that is renamed at the
very end; a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from vllm_kbit import format as kfmt
from vllm_kbit.safetensors_stream import StreamingWriter, dtype_from_tag

# Modules left in 16-bit unless the user says otherwise: they are small, or precision-critical.
LM_HEAD = r".*lm_head"
DEFAULT_SKIP = (r".*embed.*", LM_HEAD, r".*norm.*", r"(.*\.)?(gate|router|shared_expert_gate)", r"wte", r"wpe")
QUANTIZABLE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Parts of one vLLM fused layer: they must share bits (or all stay unquantized).
FUSED_GROUPS = ((r"q_proj|k_proj|v_proj", "qkv_proj"), (r"gate_proj|up_proj", "gate_up_proj"), (r"w1|w3", "w13"))
INDEX_NAME = "model.safetensors.index.json"
class QuantizeError(Exception):
    """Bad input: printed as one line, exit code 2."""


@dataclass
class Plan:
    """What to write for one input tensor."""

    name: str
    shape: list[int]
    dtype: torch.dtype
    bits: int | None  # None: copied unchanged

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    def outputs(self) -> list[tuple[str, torch.dtype, list[int]]]:
        if self.bits is None:
            return [(self.name, self.dtype, self.shape)]
        *lead, n, k = self.shape
        blocks = k // kfmt.BLOCK_SIZE
        return [(f"{self.module}.qweight", torch.int32, [*lead, n, blocks * self.bits]),
                (f"{self.module}.qweight_absmax", torch.uint8, [*lead, n, blocks]),
                (f"{self.module}.weight_scale", torch.float32, [*lead, n])]


@dataclass
class Shard:
    src: Path
    dst_name: str
    plans: list[Plan] = field(default_factory=list)


def parse_bits_map(items: list[str]) -> dict[str, int]:
    result = {}
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not pattern or not bits.isdigit():
            raise QuantizeError(f"--bits-map expects REGEX=K (e.g. 'down_proj=5'), got {item!r}")
        try:
            re.compile(pattern)
            result[pattern] = kfmt.check_bits(int(bits))
        except (re.error, kfmt.KbitFormatError) as e:
            raise QuantizeError(f"--bits-map {item!r}: {e}") from None
    return result


def find_shards(src: Path) -> list[Path]:
    if not src.is_dir():
        raise QuantizeError(f"{src} is not a directory holding a Hugging Face checkpoint")
    if not (src / "config.json").is_file():
        raise QuantizeError(f"{src} has no config.json; point SRC at a Hugging Face model directory")
    index = src / INDEX_NAME
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (src / n).is_file()]
        if missing:
            raise QuantizeError(f"{INDEX_NAME} names shards that are missing in {src}: {', '.join(missing)}")
        return [src / n for n in names]
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise QuantizeError(f"{src} holds no .safetensors files (only safetensors checkpoints are supported)")
    return files


def module_matches(patterns, module: str) -> bool:
    return any(re.fullmatch(p, module) or re.fullmatch(rf".*\.(?:{p})", module) for p in patterns)


def plan_tensor(name: str, shape: list[int], dtype: torch.dtype, bits: int, bits_map: dict[str, int],
                skip: tuple[str, ...]) -> Plan:
    module = name.removesuffix(".weight")
    if not name.endswith(".weight") or len(shape) not in (2, 3) or module_matches(skip, module):
        return Plan(name, shape, dtype, None)
    if dtype not in QUANTIZABLE_DTYPES:
        raise QuantizeError(
            f"{name} has dtype {str(dtype).removeprefix('torch.')}; kbit-quantize reads bf16/fp16/fp32 "
            "weights (is this checkpoint already quantized?) -- or skip it with --skip"
        )
    if shape[-1] % kfmt.BLOCK_SIZE:
        raise QuantizeError(
            f"{name}: input size {shape[-1]} is not a multiple of {kfmt.BLOCK_SIZE}; "
            f"leave it unquantized with --skip '{re.escape(module)}'"
        )
    for pattern, k in bits_map.items():
        if module_matches((pattern,), module):
            bits = k
            break
    return Plan(name, shape, dtype, bits)


def default_skip(quantize_lm_head: bool = False) -> tuple[str, ...]:
    return tuple(p for p in DEFAULT_SKIP if not (quantize_lm_head and p == LM_HEAD))


def ties_word_embeddings(config: dict) -> bool:
    """Whether a Hugging Face config says so explicitly (multimodal models: in its text_config)."""
    text_config = config.get("text_config") or {}
    return config.get("tie_word_embeddings") is True or text_config.get("tie_word_embeddings") is True


def quantizes_lm_head(plans: list[Plan]) -> bool:
    return any(p.bits is not None and module_matches((LM_HEAD,), p.module) for p in plans)


def check_fused_groups(plans: list[Plan]) -> None:
    groups: dict[str, dict[str, int | None]] = {}
    for plan in plans:
        if not plan.name.endswith(".weight") or len(plan.shape) not in (2, 3):
            continue
        for parts, fused in FUSED_GROUPS:
            key = re.sub(rf"(^|\.)(?:{parts})$", rf"\1{fused}", plan.module)
            if key != plan.module:
                groups.setdefault(key, {})[plan.module] = plan.bits
    for fused, members in groups.items():
        if len(set(members.values())) > 1:
            detail = ", ".join(f"{m}: {'skipped' if b is None else f'{b} bits'}" for m, b in sorted(members.items()))
            raise QuantizeError(f"vLLM fuses these into {fused}, so they need the same treatment: {detail}")


def plan_checkpoint(src: Path, bits: int, bits_map: dict[str, int], skip: tuple[str, ...]) -> list[Shard]:
    shards = []
    files = find_shards(src)
    for i, path in enumerate(files):
        dst_name = path.name if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        shard = Shard(path, dst_name)
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _torch_dtype(sl.get_dtype(), name)
                    shard.plans.append(plan_tensor(name, list(sl.get_shape()), dtype, bits, bits_map, skip))
        except QuantizeError:
            raise
        except Exception as e:  # safetensors raises plain exceptions for corrupt files
            raise QuantizeError(f"cannot read {path}: {e}") from None
        shards.append(shard)
    check_fused_groups([p for s in shards for p in s.plans])
    return shards


def _torch_dtype(tag: str, name: str) -> torch.dtype:
    dtype = dtype_from_tag(tag)
    if dtype is None:
        raise QuantizeError(f"{name} has safetensors dtype {tag}, which kbit-quantize cannot copy")
    return dtype


def write_shard(shard: Shard, out_dir: Path, codebooks: dict[int, torch.Tensor], progress: tqdm) -> dict[str, str]:
    plan = [o for p in shard.plans for o in p.outputs()]
    with safe_open(shard.src, framework="pt") as src, StreamingWriter(out_dir / shard.dst_name, plan) as dst:
        for p in shard.plans:
            tensor = src.get_tensor(p.name)
            if p.bits is None:
                pieces = [tensor]
            else:
                q = kfmt.quantize(tensor, p.bits, codebooks[p.bits])
                pieces = [q.qweight, q.absmax, q.scale]
            for (name, _, _), piece in zip(p.outputs(), pieces):
                dst.write(name, piece)
            progress.update(1)
    return {name: shard.dst_name for name, _, _ in plan}


def quantization_config(shards: list[Shard], bits: int, codebooks: dict[int, torch.Tensor]) -> dict:
    plans = [p for s in shards for p in s.plans]
    linear = [p for p in plans if p.name.endswith(".weight") and len(p.shape) in (2, 3)]
    return {
        "quant_method": "kbit",
        "format_version": 1,
        "packed": True,
        "bits": bits,
        "block_size": kfmt.BLOCK_SIZE,
        "codebooks": {str(k): cb.tolist() for k, cb in sorted(codebooks.items())},
        "modules_to_not_convert": sorted(p.module for p in linear if p.bits is None),
        "module_bits": {p.module: p.bits for p in linear if p.bits is not None and p.bits != bits},
        "lm_head": quantizes_lm_head(plans),
    }


def quantize_checkpoint(src: Path, dst: Path, bits: int = 4, bits_map: dict[str, int] | None = None,
                        skip: tuple[str, ...] = (), use_default_skip: bool = True, quiet: bool = False,
                        quantize_lm_head: bool = False) -> Path:
    kfmt.check_bits(bits)
    if dst.exists():
        raise QuantizeError(f"{dst} already exists; choose a new output directory or remove it first")
    config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
    if config is not None and "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise QuantizeError(f"{src} is already quantized ({method}); kbit-quantize needs a 16-bit checkpoint")
    if quantize_lm_head and config is not None and ties_word_embeddings(config):
        raise QuantizeError(
            f"--quantize-lm-head: {src} ties its lm_head to the input embeddings (tie_word_embeddings), which stay "
            "16-bit, so there is no separate lm_head to quantize; drop --quantize-lm-head"
        )
    skip = (*(default_skip(quantize_lm_head) if use_default_skip else ()), *skip)
    for pattern in skip:
        try:
            re.compile(pattern)
        except re.error as e:
            raise QuantizeError(f"--skip {pattern!r} is not a valid regex: {e}") from None
    shards = plan_checkpoint(src, bits, bits_map or {}, skip)
    used_bits = {p.bits for s in shards for p in s.plans if p.bits is not None}
    if not used_bits:
        raise QuantizeError(f"nothing to quantize in {src}: every weight matched a skip pattern")
    if quantize_lm_head and not quantizes_lm_head([p for s in shards for p in s.plans]):
        raise QuantizeError(
            f"--quantize-lm-head: {src} has no lm_head weight to quantize (a model with tie_word_embeddings "
            "uses its input embeddings as the lm_head, and those stay 16-bit), or --skip matched it"
        )
    codebooks = {k: kfmt.normal_float_codebook(k) for k in sorted(used_bits | {bits})}

    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    try:
        weight_map = {}
        total = sum(len(s.plans) for s in shards)
        with tqdm(total=total, unit="tensor", desc="kbit-quantize", disable=quiet) as progress:
            for shard in shards:
                weight_map.update(write_shard(shard, tmp, codebooks, progress))
        if len(shards) > 1:
            total_size = sum((tmp / s.dst_name).stat().st_size for s in shards)
            (tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
        config["quantization_config"] = quantization_config(shards, bits, codebooks)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for extra in src.iterdir():  # tokenizer, generation config, chat template, ...
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name not in ("config.json", INDEX_NAME):
                shutil.copy2(extra, tmp / extra.name)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kbit-quantize",
        description="Quantize a Hugging Face safetensors checkpoint (bf16/fp16/fp32) to the kbit format.",
    )
    parser.add_argument("src", type=Path, help="Hugging Face model directory (config.json + *.safetensors)")
    parser.add_argument("dst", type=Path, help="output directory (must not exist)")
    parser.add_argument("--bits", type=int, default=4, help="bits per weight, 2..5 (default 4)")
    parser.add_argument("--bits-map", action="append", default=[], metavar="REGEX=K",
                        help="bits for modules whose name matches REGEX (first match wins); repeatable")
    parser.add_argument("--skip", action="append", default=[], metavar="REGEX",
                        help="leave modules whose name matches REGEX unquantized; repeatable")
    parser.add_argument("--no-default-skip", action="store_true",
                        help=f"also quantize what is skipped by default: {', '.join(DEFAULT_SKIP)}")
    parser.add_argument("--quantize-lm-head", action="store_true",
                        help="quantize the lm_head too (faster decode at small batch, at some cost in accuracy; "
                             "not for models that tie it to the input embeddings)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        kfmt.check_bits(args.bits)
        dst = quantize_checkpoint(args.src, args.dst, args.bits, parse_bits_map(args.bits_map),
                                  tuple(args.skip), not args.no_default_skip, args.quiet, args.quantize_lm_head)
    except (QuantizeError, kfmt.KbitFormatError) as e:
        print(f"kbit-quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"kbit-quantize: wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
