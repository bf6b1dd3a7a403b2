"""The ``kbit`` QuantizationConfig and its dense linear methods.

Two ways in:
* a checkpoint written by ``kbit-quantize`` (``quantization_config.packed = true``): layers load the
  packed tensors (``KbitLinearMethod``);
* a bf16/fp16 checkpoint with ``--quantization kbit`` (optionally ``--hf-overrides`` carrying a
  ``quantization_config``): layers load the 16-bit weight on the meta device and quantize it as soon as
  it has arrived, one layer at a time (``KbitOnlineLinearMethod``), so peak memory stays near the
  quantized model.

The lm_head (the output projection) is quantized only where ``quantization_config.lm_head`` is true (as
GPTQ's key): it is the largest single matrix of most models, so at batch 1 it is a good part of the time
of a decode step, and quantizing it costs more accuracy than any other layer.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.model_loader.reload.layerwise import initialize_online_processing
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
)
from vllm.model_executor.utils import replace_parameter
from vllm.platforms import current_platform

from vllm_kbit import capabilities, format as kfmt, ops

# Under the "vllm" logger so that vLLM's logging configuration (handlers, level) applies.
logger = init_logger("vllm.kbit")

DEFAULT_BITS = 4
FORMAT_VERSION = 1
# The fix for an lm_head whose shape kbit cannot split: a packed one cannot be skipped at load time.
LM_HEAD_FIX = "serve the lm_head 16-bit (quantization_config.lm_head: false, or quantize without --quantize-lm-head)"
# Router gates take the hidden state to expert logits; quantizing them costs accuracy and saves nothing.
ROUTER_GATE = re.compile(r"(^|\.)(gate|shared_expert_gate|router)$")


def module_matches(pattern: str, name: str) -> bool:
    """True if ``pattern`` (a module name or a regex) names module ``name`` or a trailing part of it."""
    return name == pattern or re.search(rf"(?:^|\.)(?:{pattern})$", name) is not None


class KbitConfig(QuantizationConfig):
    """k-bit codebook quantization; see vllm_kbit/format.py for the format."""

    def __init__(
        self,
        bits: int = DEFAULT_BITS,
        block_size: int = kfmt.BLOCK_SIZE,
        packed: bool = False,
        codebooks: dict[str, list[float]] | None = None,
        modules_to_not_convert: list[str] | None = None,
        module_bits: dict[str, int] | None = None,
        bits_map: dict[str, int] | None = None,
        lm_head: bool = False,
    ) -> None:
        super().__init__()
        self.bits = kfmt.check_bits(bits)
        if block_size != kfmt.BLOCK_SIZE:
            raise kfmt.KbitFormatError(
                f"kbit uses blocks of {kfmt.BLOCK_SIZE} weights; quantization_config.block_size is "
                f"{block_size}. Re-quantize the checkpoint with kbit-quantize."
            )
        self.packed = packed
        self.lm_head = lm_head
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.module_bits = {name: kfmt.check_bits(k) for name, k in (module_bits or {}).items()}
        self.bits_map = {pattern: kfmt.check_bits(k) for pattern, k in (bits_map or {}).items()}
        self.codebooks = {int(k): kfmt.codebook_from_config(int(k), cb) for k, cb in (codebooks or {}).items()}

    def __repr__(self) -> str:
        mode = "pre-quantized" if self.packed else "load-time"
        return f"KbitConfig(bits={self.bits}, {mode}, lm_head={self.lm_head}, skip={self.modules_to_not_convert})"

    # --- QuantizationConfig interface ---------------------------------------------------------------

    def get_name(self) -> str:
        return "kbit"

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        dtypes = capabilities.CPU_ACT_DTYPES if current_platform.is_cpu() else capabilities.GPU_ACT_DTYPES
        return list(dtypes)

    @classmethod
    def get_min_capability(cls) -> int:
        return capabilities.MIN_CUDA_CAPABILITY

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # no side file: without quantization_config, `--quantization kbit` means load-time

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> KbitConfig:
        version = config.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise kfmt.KbitFormatError(
                f"this checkpoint uses kbit format version {version}; this vllm-kbit reads version "
                f"{FORMAT_VERSION}. Upgrade vllm-kbit or re-quantize the checkpoint."
            )
        return cls(
            bits=cls.get_from_keys_or(config, ["bits"], DEFAULT_BITS),
            block_size=cls.get_from_keys_or(config, ["block_size"], kfmt.BLOCK_SIZE),
            packed=bool(config.get("packed", False)),
            codebooks=config.get("codebooks"),
            modules_to_not_convert=config.get("modules_to_not_convert"),
            module_bits=config.get("module_bits"),
            bits_map=config.get("bits_map"),
            lm_head=bool(config.get("lm_head", False)),
        )

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            names = self.checkpoint_names(prefix)
            if self.is_skipped(prefix, names):
                return UnquantizedLinearMethod()
            return self._linear_method(self.bits_for(prefix, names), prefix)
        if isinstance(layer, ParallelLMHead):
            if not self.lm_head or self.is_skipped(prefix, [prefix]):
                return None  # unquantized (also heads that kbit-quantize's lm_head pattern did not match)
            if _ties_word_embeddings():
                raise kfmt.KbitFormatError(
                    f"quantization_config.lm_head is true, but this model ties {prefix} to its input embeddings "
                    "(tie_word_embeddings), which kbit leaves 16-bit: there is no separate lm_head to quantize. "
                    "Set quantization_config.lm_head to false."
                )
            return self._linear_method(self.bits_for(prefix, [prefix]), prefix)
        if _is_moe_layer(layer):
            from vllm_kbit.moe import KbitMoEMethod, KbitOnlineMoEMethod, expert_checkpoint_names  # imports us

            names = expert_checkpoint_names(layer, prefix)
            if self.is_skipped(prefix, names):
                return None  # unquantized experts
            method = KbitMoEMethod if self.packed else KbitOnlineMoEMethod
            return method(self, self.bits_for(prefix, names), layer.moe_config, prefix)
        return None  # embeddings, attention: unquantized

    def _linear_method(self, bits: int, prefix: str) -> KbitLinearMethod:
        return (KbitLinearMethod if self.packed else KbitOnlineLinearMethod)(self, bits, prefix)

    # --- which modules, how many bits ---------------------------------------------------------------

    def checkpoint_names(self, prefix: str) -> list[str]:
        """The checkpoint module names behind a vLLM layer (a fused qkv_proj stands for q/k/v_proj)."""
        parent, _, leaf = prefix.rpartition(".")
        shards = self.packed_modules_mapping.get(leaf)
        if not shards:
            return [prefix]
        return [f"{parent}.{shard}" if parent else shard for shard in shards]

    def is_skipped(self, prefix: str, names: list[str]) -> bool:
        if ROUTER_GATE.search(prefix):
            return True
        skipped = [any(module_matches(p, name) for p in self.modules_to_not_convert) for name in names]
        if any(skipped) and not all(skipped):
            raise kfmt.KbitFormatError(
                f"{prefix} fuses {names}, but only some of them are unquantized; quantize all or none "
                "of a fused group (kbit-quantize does this for you)."
            )
        return all(skipped)

    def bits_for(self, prefix: str, names: list[str]) -> int:
        found = {self._bits_for_name(name) for name in names}
        if len(found) > 1:
            raise kfmt.KbitFormatError(
                f"{prefix} fuses {names}, which were given different bits {sorted(found)}; "
                "give every part of a fused layer the same bits."
            )
        return found.pop()

    def _bits_for_name(self, name: str) -> int:
        if name in self.module_bits:
            return self.module_bits[name]
        for pattern, bits in self.bits_map.items():
            if module_matches(pattern, name):
                return bits
        return self.bits

    def codebook(self, bits: int) -> torch.Tensor:
        if bits not in self.codebooks:
            self.codebooks[bits] = kfmt.normal_float_codebook(bits)
        return self.codebooks[bits]


def _ties_word_embeddings() -> bool:
    from vllm.config import get_current_vllm_config

    model_config = get_current_vllm_config().model_config
    return model_config is not None and bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))


def _is_moe_layer(layer: torch.nn.Module) -> bool:
    try:  # 0.26 and 0.32 both export it; the class owning expert weights
        from vllm.model_executor.layers.fused_moe import RoutedExperts
    except ImportError:  # pragma: no cover - older layouts
        from vllm.model_executor.layers.fused_moe import FusedMoE as RoutedExperts
    return isinstance(layer, RoutedExperts)


def _expected_shards(layer: torch.nn.Module) -> set:
    if isinstance(layer, QKVParallelLinear):
        return {"q", "k", "v"}
    if isinstance(layer, MergedColumnParallelLinear):
        return set(range(len(layer.output_sizes)))
    return {None}


def _load_tracking(layer: torch.nn.Module, name: str, weight_loader):
    """Wrap a weight loader to record which shards of parameter ``name`` arrived.

    vLLM does not notice missing tensors of quantized layers, so process_weights_after_loading
    checks this record instead.
    """
    loaded = layer.__dict__.setdefault("_kbit_loaded_shards", {}).setdefault(name, set())

    def tracking_weight_loader(param, loaded_weight, *args, **kwargs):
        result = weight_loader(param, loaded_weight, *args, **kwargs)
        loaded.add(args[0] if args else kwargs.get("loaded_shard_id"))
        return result

    return tracking_weight_loader


def loading_dummy_weights() -> bool:
    """--load-format dummy: no weight loader runs, so there is nothing to check for completeness."""
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config().load_config.load_format == "dummy"


def install_kernel_tensors(layer: torch.nn.Module, tensors: dict[str, torch.Tensor], codebook: torch.Tensor,
                           prefix: str = "") -> None:
    """Put the kernel-layout tensors (ops.prepare_weight) and the codebook on the layer.

    The codebook stays a CPU tensor on any device: the op passes its values to the kernels by value.

    Loaded parameters are replaced in place of their name (keeping vLLM's bookkeeping); names that did
    not exist before (load-time quantization loads a 16-bit ``weight`` instead) are registered.
    """
    for name, tensor in tensors.items():
        name = prefix + name
        if hasattr(layer, name):
            replace_parameter(layer, name, tensor)
        else:
            layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
    layer.register_buffer("kbit_codebook", codebook, persistent=False)


def _check_all_loaded(layer: torch.nn.Module, names: tuple[str, ...], prefix: str) -> None:
    if loading_dummy_weights():
        return
    expected = _expected_shards(layer)
    record = layer.__dict__.get("_kbit_loaded_shards", {})
    for name in names:
        got = record.get(name, set())
        if None not in got and not expected <= got:
            missing = sorted(map(str, expected - got - {None}))
            which = f" (missing shards: {', '.join(missing)})" if missing else ""
            raise RuntimeError(
                f"kbit: {prefix}.{name} was never loaded{which}. "
                "The checkpoint is incomplete or was not written by kbit-quantize; re-quantize it."
            )


_LOGGED_SHAPES: set[tuple] = set()


def _log_kernel_choice(n: int, k: int, bits: int, device: torch.device) -> None:
    key = (n, k, bits, device.type)
    if key in _LOGGED_SHAPES:
        return
    _LOGGED_SHAPES.add(key)
    if device.type == "cuda":
        plan = capabilities.describe_tiers(ops.tiers_for_device(device.index or 0, n, k, bits))
    else:
        plan = capabilities.CPU_TIER.what
    logger.info("kbit: %dx%d weight, k=%d on %s -> %s", n, k, bits, device.type, plan)


@register_weight_loader_v2_supported_method
class KbitLinearMethod(LinearMethodBase):
    """Linear layer whose weight arrives packed from a kbit checkpoint."""

    PARAMS = ("qweight", "qweight_absmax", "weight_scale")

    def __init__(self, quant_config: KbitConfig, bits: int, prefix: str = "") -> None:
        self.quant_config = quant_config
        self.bits = bits
        self.prefix = prefix

    def _check_shapes(self, layer, input_size_per_partition: int, output_partition_sizes: list[int]) -> None:
        from vllm.distributed import get_tensor_model_parallel_world_size

        tp = get_tensor_model_parallel_world_size()
        # An lm_head's rows per rank: the vocabulary padded to 64, split over the ranks.
        fix = LM_HEAD_FIX if isinstance(layer, ParallelLMHead) else capabilities.LEAVE_UNQUANTIZED
        for n in output_partition_sizes:
            capabilities.check_partition(input_size_per_partition, n, self.prefix or type(layer).__name__, tp, fix)

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        self._check_shapes(layer, input_size_per_partition, output_partition_sizes)
        n, k = sum(output_partition_sizes), input_size_per_partition
        weight_loader = extra_weight_attrs["weight_loader"]
        qweight = PackedvLLMParameter(
            data=torch.empty(n, k // kfmt.BLOCK_SIZE * self.bits, dtype=torch.int32),
            input_dim=1, output_dim=0, packed_dim=1, packed_factor=Fraction(kfmt.BLOCK_SIZE, self.bits),
            weight_loader=_load_tracking(layer, "qweight", weight_loader),
        )
        absmax = GroupQuantScaleParameter(
            data=torch.empty(n, k // kfmt.BLOCK_SIZE, dtype=torch.uint8), input_dim=1, output_dim=0,
            weight_loader=_load_tracking(layer, "qweight_absmax", weight_loader),
        )
        scale = ChannelQuantScaleParameter(
            data=torch.full((n,), float("nan"), dtype=torch.float32), output_dim=0,
            weight_loader=_load_tracking(layer, "weight_scale", weight_loader),
        )
        layer.register_parameter("qweight", qweight)
        layer.register_parameter("qweight_absmax", absmax)
        layer.register_parameter("weight_scale", scale)
        layer.kbit_bits = self.bits

    def _packed_weight(self, layer) -> kfmt.KbitTensor:
        _check_all_loaded(layer, self.PARAMS, self.prefix)
        return kfmt.KbitTensor(layer.qweight.data, layer.qweight_absmax.data, layer.weight_scale.data, self.bits)

    def process_weights_after_loading(self, layer) -> None:
        # Runs again after layerwise processing and under dummy loading: do the work once.
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        packed = self._packed_weight(layer)
        device = packed.qweight.device
        install_kernel_tensors(layer, ops.prepare_weight(packed, device), self.quant_config.codebook(self.bits))
        _log_kernel_choice(packed.scale.shape[0], packed.in_features, self.bits, device)
        layer._already_called_process_weights_after_loading = True

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = ops.layer_gemm(x.reshape(-1, x.shape[-1]), layer.qweight, layer.qweight_absmax, layer.weight_scale,
                             layer.kbit_codebook, layer.kbit_bits)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        if bias is not None:
            out = out + bias
        return out


@register_weight_loader_v2_supported_method
class KbitOnlineLinearMethod(KbitLinearMethod):
    """Linear layer that loads a 16-bit weight and quantizes it as soon as its layer is complete."""

    uses_meta_device = True
    PARAMS = ("weight",)

    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        self._check_shapes(layer, input_size_per_partition, output_partition_sizes)
        weight = ModelWeightParameter(
            data=torch.empty(sum(output_partition_sizes), input_size_per_partition, device="meta",
                             dtype=params_dtype),
            input_dim=1, output_dim=0,
            weight_loader=_load_tracking(layer, "weight", extra_weight_attrs["weight_loader"]),
        )
        layer.register_parameter("weight", weight)
        layer.kbit_bits = self.bits
        initialize_online_processing(layer)

    def _packed_weight(self, layer) -> kfmt.KbitTensor:
        _check_all_loaded(layer, self.PARAMS, self.prefix)
        packed = kfmt.quantize(layer.weight.data, self.bits, self.quant_config.codebook(self.bits))
        del layer.weight
        return packed
