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


@pytest.fixture(scope="session")
def vllm_context():
    """A one-rank process group and a current vLLM config, as vLLM sets up before building a model."""
    import socket

    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)
        yield
