"""vllm-kbit: k-bit (k = 2..5) weight-only quantization for vLLM, as an out-of-tree plugin.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every process it starts;
afterwards ``--quantization kbit`` and checkpoints with ``quant_method: "kbit"`` work. Importing this
package imports neither vLLM nor the kernels, so the format and kernels are usable without vLLM.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Tested range of vLLM releases (0.26 on GPU, 0.32 on the CPU build); the dense API is the same.
MIN_VLLM = (0, 26)
MAX_TESTED_VLLM = (0, 32)


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_vllm_version(version: str) -> str | None:
    """Raise for releases whose plugin API kbit cannot use; return a warning for untested newer ones."""
    release = _release(version)
    if release < MIN_VLLM:
        raise RuntimeError(
            f"vllm-kbit needs vLLM >= {MIN_VLLM[0]}.{MIN_VLLM[1]} (found {version}); upgrade vLLM."
        )
    if release > MAX_TESTED_VLLM:
        return (f"vllm-kbit was tested with vLLM {MIN_VLLM[0]}.{MIN_VLLM[1]} to "
                f"{MAX_TESTED_VLLM[0]}.{MAX_TESTED_VLLM[1]}; vLLM {version} may work but is untested.")
    return None


def register() -> None:
    """Register the ``kbit`` quantization method with vLLM. Safe to call any number of times."""
    import vllm
    from vllm.logger import init_logger
    from vllm.model_executor.layers.quantization import (
        _CUSTOMIZED_METHOD_TO_QUANT_CONFIG,
        register_quantization_config,
    )

    logger = init_logger("vllm.kbit")  # under "vllm": vLLM configures its handlers
    warning = check_vllm_version(vllm.__version__)
    from vllm_kbit.config import KbitConfig

    existing = _CUSTOMIZED_METHOD_TO_QUANT_CONFIG.get("kbit")
    if existing is KbitConfig:
        return
    if existing is not None:
        logger.warning("kbit: the quantization name 'kbit' is already registered by %s.%s; "
                       "leaving it in place (uninstall the other plugin to use vllm-kbit).",
                       existing.__module__, existing.__qualname__)
        return
    if warning:
        logger.warning(warning)
    import vllm_kbit.ops  # noqa: F401  (defines torch.ops.kbit.* in this process)

    register_quantization_config("kbit")(KbitConfig)
