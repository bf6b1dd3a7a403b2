"""The kbit methods for MoE experts (vLLM's ``RoutedExperts``; vLLM 0.26 and 0.32).

Every expert's gate/up/down projection is a kbit weight as in format.py, stacked over the E local experts
of one tensor-parallel rank (I_part = moe intermediate size / TP size):

* ``w13_qweight`` int32 [E, 2*I_part, H/32*k], ``w13_qweight_absmax`` uint8 [E, 2*I_part, H/32],
  ``w13_weight_scale`` fp32 [E, 2*I_part] -- rows [0, I_part) gate_proj, [I_part, 2*I_part) up_proj,
  the order of vLLM's own ``w13_weight``;
* ``w2_qweight`` int32 [E, H, I_part/32*k], ``w2_qweight_absmax`` uint8 [E, H, I_part/32],
  ``w2_weight_scale`` fp32 [E, H].

The names are load-bearing: ``RoutedExperts`` maps ``experts.3.gate_proj.qweight`` to ``w13_qweight``
(shard w1 of expert 3) and loads a parameter only if its name contains "weight" (then it is sliced like
the weight: rows of w1/w3, K of w2 -- whole 32-wide blocks, as the K-packing keeps blocks intact) or
"scale" with a ``quant_method`` attribute. Both packed tensors contain "weight"; the row scales are
"channel" scales (w1/w3 sliced by rows, w2 copied whole on every rank).

After loading, the tensors are re-packed into the device's layout (ops.prepare_weight) and run by
``torch.ops.kbit.moe_experts`` (through ops.layer_moe_experts).
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase, FusedMoeWeightScaleSupported
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG, FusedMoEConfig
from vllm.model_executor.model_loader.reload.layerwise import initialize_online_processing
from vllm.model_executor.utils import set_weight_attrs

from vllm_kbit import capabilities, format as kfmt, ops
from vllm_kbit.config import install_kernel_tensors, loading_dummy_weights

logger = init_logger("vllm.kbit.moe")  # under the "vllm" logger, like config.py's, so vLLM's logging applies

# w13 holds the gate (shard w1) and up (w3) projections, w2 the down projection.
SHARDS = {"w13": ("w1", "w3"), "w2": ("w2",)}


def expert_weight_shapes(hidden_size: int, intermediate_size_per_partition: int) -> dict[str, tuple[int, int]]:
    """(N, K) of one expert's w13 and w2 on this rank."""
    return {"w13": (2 * intermediate_size_per_partition, hidden_size),
            "w2": (hidden_size, intermediate_size_per_partition)}


def expert_checkpoint_names(layer: torch.nn.Module, prefix: str) -> list[str]:
    """The checkpoint modules behind a RoutedExperts layer: ``{prefix}.{expert}.{gate|up|down}_proj``."""
    projections = [name for name in (layer.ckpt_gate_proj_name, layer.ckpt_up_proj_name, layer.ckpt_down_proj_name)
                   if name is not None]
    return [f"{prefix}.{expert}.{proj}" for expert in range(layer.global_num_experts) for proj in projections]


def _track_expert_loads(layer: torch.nn.Module, param_name: str, weight_loader):
    """Wrap RoutedExperts.weight_loader to record which (expert, shard) of ``param_name`` arrived.

    vLLM does not notice missing tensors of quantized layers (config._load_tracking has the same job
    for dense layers; expert loads are keyed by expert and shard instead).
    """
    arrived = layer.__dict__.setdefault("_kbit_loaded_experts", {}).setdefault(param_name, set())

    # The signature is RoutedExperts.weight_loader's: vLLM calls it with keywords, and the layerwise
    # online loader binds its arguments by name.
    def tracking_weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
        loaded = weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success=True)
        if loaded:
            arrived.add((expert_id, shard_id))
        return loaded if return_success else None

    return tracking_weight_loader


class KbitMoEMethod(FusedMoEMethodBase):
    """MoE experts whose weights arrive packed from a kbit checkpoint."""

    MISSING_HINT = "The checkpoint is incomplete or was not written by kbit-quantize; re-quantize it."

    def __init__(self, quant_config, bits: int, moe: FusedMoEConfig, prefix: str = "") -> None:
        super().__init__(moe)
        self.quant_config = quant_config
        self.bits = bits
        self.prefix = prefix

    # --- checks -------------------------------------------------------------------------------------

    def _check_supported(self, layer) -> None:
        if layer.expert_map is not None:
            raise NotImplementedError(
                f"kbit does not support expert parallelism yet ({self.prefix}); serve this model without "
                "--enable-expert-parallel (tensor parallelism works)."
            )
        unsupported = []
        if layer.apply_router_weight_on_input:
            unsupported.append("router weights applied to the input (apply_router_weight_on_input)")
        if layer.activation.value not in ops.MOE_ACTIVATIONS:
            unsupported.append(f"the {layer.activation.value!r} activation (supported: "
                               f"{', '.join(ops.MOE_ACTIVATIONS)})")
        if self.moe.has_bias:
            unsupported.append("expert biases")
        if getattr(layer, "swiglu_limit", None) is not None:
            unsupported.append("clamped activations (swiglu_limit)")
        if unsupported:
            raise NotImplementedError(
                f"kbit cannot quantize the MoE experts of {self.prefix} yet: {'; '.join(unsupported)} "
                "is not supported. Leave the experts unquantized: kbit-quantize --skip '.*experts.*' "
                "(or list them in quantization_config.modules_to_not_convert)."
            )

    def _check_shapes(self, hidden_size: int, intermediate_size_per_partition: int) -> None:
        tp = self.moe.moe_parallel_config.tp_size
        projections = {"w13": "gate_proj/up_proj", "w2": "down_proj"}
        for stem, (n, k) in expert_weight_shapes(hidden_size, intermediate_size_per_partition).items():
            capabilities.check_partition(k, n, f"{self.prefix} (the experts' {projections[stem]})", tp)

    def _check_all_loaded(self, layer) -> None:
        if loading_dummy_weights():
            return
        projection = {"w1": layer.ckpt_gate_proj_name, "w3": layer.ckpt_up_proj_name,
                      "w2": layer.ckpt_down_proj_name}
        # One record per parameter made by create_weights, e.g. "w13_qweight".
        for param_name, arrived in layer.__dict__["_kbit_loaded_experts"].items():
            stem, _, suffix = param_name.partition("_")
            missing = [(e, s) for e in range(self.moe.num_local_experts) for s in SHARDS[stem]
                       if (e, s) not in arrived]
            if missing:
                expert, shard = missing[0]
                more = f" (and {len(missing) - 1} more expert tensors)" if len(missing) > 1 else ""
                raise RuntimeError(f"kbit: {self.prefix}.{expert}.{projection[shard]}.{suffix} was never "
                                   f"loaded{more}. {self.MISSING_HINT}")

    # --- FusedMoEMethodBase ---------------------------------------------------------------------------

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        self._check_supported(layer)
        self._check_shapes(hidden_size, intermediate_size_per_partition)
        for stem, (n, k) in expert_weight_shapes(hidden_size, intermediate_size_per_partition).items():
            for suffix, data, attrs in self._expert_params(num_experts, n, k, params_dtype):
                param = torch.nn.Parameter(data, requires_grad=False)
                layer.register_parameter(f"{stem}_{suffix}", param)
                loader = _track_expert_loads(layer, f"{stem}_{suffix}", extra_weight_attrs["weight_loader"])
                set_weight_attrs(param, {**extra_weight_attrs, **attrs, "weight_loader": loader})
        layer.kbit_bits = self.bits

    def _expert_params(self, num_experts: int, n: int, k: int, params_dtype: torch.dtype):
        """(suffix, data, extra attributes) of the parameters of one stem (w13 or w2), N x K per expert."""
        blocks = k // kfmt.BLOCK_SIZE
        return [("qweight", torch.empty(num_experts, n, blocks * self.bits, dtype=torch.int32), {}),
                ("qweight_absmax", torch.empty(num_experts, n, blocks, dtype=torch.uint8), {}),
                ("weight_scale", torch.full((num_experts, n), float("nan"), dtype=torch.float32),
                 {"quant_method": FusedMoeWeightScaleSupported.CHANNEL.value})]

    def get_fused_moe_quant_config(self, layer):
        return FUSED_MOE_UNQUANTIZED_CONFIG  # no vLLM kernel reads kbit weights; apply runs our op

    def _packed_experts(self, layer) -> dict[str, kfmt.KbitTensor]:
        self._check_all_loaded(layer)
        return {stem: kfmt.KbitTensor(getattr(layer, f"{stem}_qweight").data,
                                      getattr(layer, f"{stem}_qweight_absmax").data,
                                      getattr(layer, f"{stem}_weight_scale").data, self.bits)
                for stem in SHARDS}

    def process_weights_after_loading(self, layer) -> None:
        # Runs again after layerwise processing and under dummy loading: do the work once.
        if getattr(layer, "_already_called_process_weights_after_loading", False):
            return
        packed = self._packed_experts(layer)
        device = packed["w13"].qweight.device
        codebook = self.quant_config.codebook(self.bits)
        for stem, weight in packed.items():
            install_kernel_tensors(layer, ops.prepare_weight(weight, device), codebook, prefix=f"{stem}_")
        self._log_plan(packed, device)
        layer._already_called_process_weights_after_loading = True

    def _log_plan(self, packed: dict[str, kfmt.KbitTensor], device: torch.device) -> None:
        experts, n13 = packed["w13"].scale.shape
        n2 = packed["w2"].scale.shape[1]
        plan = (capabilities.describe_moe_plan(self.moe.experts_per_token, experts, n13 // 2)
                if device.type == "cuda" else f"{capabilities.MOE_CPU_TIER.name} ({capabilities.MOE_CPU_TIER.what})")
        logger.info_once("kbit: MoE experts %d x (w13 %dx%d, w2 %dx%d), k=%d on %s -> %s", experts, n13,
                         packed["w13"].in_features, n2, packed["w2"].in_features, self.bits, device.type, plan)

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts, shared_experts_input) -> torch.Tensor:
        # Shared experts, if any, are run by vLLM's MoE runner (this method has no modular kernel).
        return ops.layer_moe_experts(
            x, topk_weights, topk_ids, layer.w13_qweight, layer.w13_qweight_absmax, layer.w13_weight_scale,
            layer.w2_qweight, layer.w2_qweight_absmax, layer.w2_weight_scale, layer.kbit_codebook,
            layer.kbit_bits, layer.activation.value)


class KbitOnlineMoEMethod(KbitMoEMethod):
    """MoE experts that load 16-bit weights and are quantized as soon as their layer is complete."""

    uses_meta_device = True
    MISSING_HINT = "The checkpoint is incomplete."

    def create_weights(self, layer, *args, **kwargs):
        super().create_weights(layer, *args, **kwargs)
        initialize_online_processing(layer)

    def _expert_params(self, num_experts: int, n: int, k: int, params_dtype: torch.dtype):
        # On the meta device: layerwise loading materializes the layer when all its weights have arrived
        # and quantizes it right away, so peak memory stays near the quantized model.
        return [("weight", torch.empty(num_experts, n, k, dtype=params_dtype, device="meta"), {})]

    def _packed_experts(self, layer) -> dict[str, kfmt.KbitTensor]:
        self._check_all_loaded(layer)
        codebook = self.quant_config.codebook(self.bits)
        packed = {}
        for stem in SHARDS:
            packed[stem] = kfmt.quantize(getattr(layer, f"{stem}_weight").data, self.bits, codebook)
            delattr(layer, f"{stem}_weight")
        return packed
