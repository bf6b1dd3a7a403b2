"""Shared by the test modules of the CUDA kernels (vllm_kbit._C): they skip without a GPU or the build."""

import pytest
import torch

# the activation dtype codes of vllm_kbit._C
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1}


def kernels_or_skip():
    """vllm_kbit._C; skips the calling test module where there is no CUDA GPU or the kernels were not built."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    try:
        from vllm_kbit import _C
    except ImportError:
        pytest.skip("vllm_kbit._C is not built (install with nvcc present)", allow_module_level=True)
    return _C
