"""The package as installed: kernels compiled where a CUDA compiler exists, clean errors where not."""

import shutil

import pytest
import torch

from vllm_kbit import format as kfmt, ops


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA compiler on this machine")
def test_kernels_were_compiled():
    # CI has nvcc but no GPU: the extension must still build and import (static CUDA runtime, no driver).
    assert ops.kernels_available(), "vllm_kbit._C is missing although nvcc is on PATH"
    for entry in ("dequantize", "mma"):
        assert hasattr(ops._C, entry)


def test_gpu_layout_without_kernels_names_the_fix(monkeypatch):
    monkeypatch.setattr(ops, "_C", None)
    packed = kfmt.quantize(torch.randn(32, 64), 4)
    with pytest.raises(RuntimeError, match="installed without its CUDA kernels.*nvcc"):
        ops.prepare_weight(packed, torch.device("cuda"))
