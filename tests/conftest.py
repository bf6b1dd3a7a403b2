"""Fixtures shared by the whole test suite."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint, converted once into models/ (git-ignored)."""
    # Imported here so that test modules that do not use the checkpoint run without gguf and tokenizers.
    from vllm_kbit.smollm2 import ensure_checkpoint

    return ensure_checkpoint(REPO_ROOT / "models" / "smollm2-135m-bf16")
