"""Helpers for tests that start real vLLM engines and servers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_kbit import format as kfmt

RUNNER = Path(__file__).with_name("vllm_runner.py")
# Small, fixed KV cache: the CPU build otherwise reserves a fraction of the machine's memory.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
              "TOKENIZERS_PARALLELISM": "false"}


class EngineFailed(Exception):
    def __init__(self, stderr: str):
        super().__init__(stderr[-4000:])
        self.stderr = stderr


def run_engine(spec: dict, timeout: int = 600, env: dict | None = None) -> dict:
    """Run tests/vllm_runner.py in a fresh process; raise EngineFailed with its output if it fails."""
    proc = subprocess.run([sys.executable, str(RUNNER), json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENGINE_ENV, **(env or {})})
    for line in proc.stdout.splitlines():
        if line.startswith("KBIT-RESULT "):
            return json.loads(line.removeprefix("KBIT-RESULT "))
    raise EngineFailed(proc.stdout + "\n" + proc.stderr)


def write_dequantized_twin(kbit_dir: Path, out_dir: Path) -> Path:
    """A bf16 checkpoint holding exactly the weights a kbit checkpoint decodes to (the acceptance twin)."""
    out_dir.mkdir(parents=True)
    config = json.loads((kbit_dir / "config.json").read_text())
    qc = config.pop("quantization_config")
    codebooks = {int(k): torch.tensor(v) for k, v in qc["codebooks"].items()}
    tensors = {}
    for f in sorted(kbit_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    twin = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            module = name.removesuffix(".qweight")
            bits = qc["module_bits"].get(module, qc["bits"])
            packed = kfmt.KbitTensor(t, tensors[f"{module}.qweight_absmax"], tensors[f"{module}.weight_scale"], bits)
            twin[f"{module}.weight"] = kfmt.dequantize(packed, codebooks[bits], torch.bfloat16)
        elif not name.endswith((".qweight_absmax", ".weight_scale")):
            twin[name] = t
    save_file(twin, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config))
    for f in kbit_dir.iterdir():
        if f.name.startswith(("tokenizer", "generation_config", "special_tokens")):
            (out_dir / f.name).write_bytes(f.read_bytes())
    return out_dir


def copy_without_tensor(checkpoint: Path, out_dir: Path, tensor: str) -> Path:
    """A copy of a single-file checkpoint with one tensor deleted (an incomplete checkpoint)."""
    shutil.copytree(checkpoint, out_dir)
    tensors = load_file(out_dir / "model.safetensors")
    del tensors[tensor]
    save_file(tensors, str(out_dir / "model.safetensors"))
    return out_dir
