"""MoE expert-layer benchmark: torch.ops.kbit.moe_experts against vLLM's bf16 fused MoE (Triton) and vLLM's int4
Marlin MoE, on the expert layers of Qwen3-30B-A3B and Qwen3-Next.

    python benchmarks/bench_moe.py [--quick] [--out benchmarks/results] [--only-k K ...]

One call = one MoE layer's experts for M tokens (gate/up, activation, down, weighted sum over the top-k) given
the router's top-k ids and weights; routing is uniform at random (each token picks top_k distinct experts).
Method as in bench_kernels.py (its graph_us): GPU time per call from CUDA-graph replays of R calls, median of
replays. Each call of a replay uses another of R routings, so consecutive calls mostly touch different experts and
the used experts stream from HBM (at M = 1 a kbit call reads only ~10-20 MB, less than L2). Every implementation
is checked against an fp64 reference per (token, expert) before it is timed (a wrong kbit result aborts the run).

Impls: ``kbit`` (k = 2..5; M <= 16 the grouped kernel, above it dequantize + vLLM fused MoE: the op decides),
``bf16`` (vLLM fused_experts on bf16 weights: the ruler), ``marlin_int4`` (vLLM fused_marlin_moe, GPTQ uint4b8,
group 128). Records ``{"gpu", "model", "M", "k", "impl", "us"}`` go to moe-<gpu>.json, the speedup plot to
moe-<gpu>.png, and the table with the issue's targets is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from vllm_kbit import capabilities
from vllm_kbit import format as kfmt
from vllm_kbit import ops as kops

from bench_kernels import Case, graph_us, unpack_gptq_int4  # benchmarks/, next to this script


@dataclass(frozen=True)
class MoeShape:
    model: str
    hidden: int
    experts: int
    top_k: int
    intermediate: int


MODELS = (
    MoeShape("Qwen3-30B-A3B", 2048, 128, 8, 768),
    MoeShape("Qwen3-Next", 2048, 512, 10, 512),
)
M_FULL = (1, 2, 4, 8, 16, 32, 64, 256)
M_QUICK = (1, 4, 16, 64)
ROUTINGS = 16  # routings per graph (one per call)
TOLERANCE = 2e-2  # ||out - ref|| / ||ref|| against the fp64 reference
MARLIN_GROUP = 128
DTYPE = torch.bfloat16


class WrongResult(RuntimeError):
    pass


def routings(shape: MoeShape, m: int, device: torch.device, gen: torch.Generator):
    out = []
    for _ in range(ROUTINGS):
        scores = torch.rand(m, shape.experts, generator=gen)
        weights, ids = scores.topk(shape.top_k, dim=-1)
        out.append(((weights / weights.sum(-1, keepdim=True)).to(device), ids.to(torch.int32).to(device)))
    return out


class Reference:
    """fp64 reference of the layer from per-expert fp32 decodes (made on demand: Qwen3-Next has 512 experts)."""

    def __init__(self, decode):
        self.decode = decode  # expert -> (w13 [2I, H], w2 [H, I]) fp32

    def __call__(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
        for e in topk_ids.unique().tolist():
            tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
            w13, w2 = (w.double() for w in self.decode(e))
            gate, up = (x[tokens].double() @ w13.T).chunk(2, dim=-1)
            hidden = torch.nn.functional.silu(gate) * up
            out.index_add_(0, tokens, (hidden @ w2.T) * topk_weights[tokens, slots].double().unsqueeze(-1))
        return out


@dataclass
class MoeCase:
    """One implementation's layer: ``run(x, (topk_weights, topk_ids))``, and its fp64 reference."""

    impl: str
    run: Callable[[torch.Tensor, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
    reference: Reference


def kbit_case(shape: MoeShape, bits: int, device: torch.device) -> MoeCase:
    codebook = kfmt.normal_float_codebook(bits)  # on the CPU, as the op takes it
    packed, prepared = {}, {}
    for stem, (n, k) in {"w13": (2 * shape.intermediate, shape.hidden),
                         "w2": (shape.hidden, shape.intermediate)}.items():
        packed[stem] = kfmt.quantize(torch.randn(shape.experts, n, k, device=device) / math.sqrt(k), bits, codebook)
        prepared[stem] = kops.prepare_weight(packed[stem], device)
    w13, w2 = prepared["w13"], prepared["w2"]

    def run(x, routing):
        topk_weights, topk_ids = routing
        return torch.ops.kbit.moe_experts(x, topk_weights, topk_ids, w13["qweight"], w13["qweight_absmax"],
                                          w13["weight_scale"], w2["qweight"], w2["qweight_absmax"],
                                          w2["weight_scale"], codebook, bits, "silu")

    def decode(e):
        return tuple(kfmt.dequantize(kfmt.KbitTensor(t.qweight[e], t.absmax[e], t.scale[e], bits), codebook)
                     for t in (packed["w13"], packed["w2"]))

    return MoeCase("kbit", run, Reference(decode))


def bf16_case(shape: MoeShape, device: torch.device) -> MoeCase:
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    w13 = (torch.randn(shape.experts, 2 * shape.intermediate, shape.hidden, device=device)
           / math.sqrt(shape.hidden)).to(DTYPE)
    w2 = (torch.randn(shape.experts, shape.hidden, shape.intermediate, device=device)
          / math.sqrt(shape.intermediate)).to(DTYPE)

    def run(x, routing):
        topk_weights, topk_ids = routing
        return fused_experts(x, w13, w2, topk_weights, topk_ids, activation=MoEActivation.SILU)

    return MoeCase("bf16", run, Reference(lambda e: (w13[e].float(), w2[e].float())))


def marlin_case(shape: MoeShape, device: torch.device) -> MoeCase:
    from vllm import _custom_ops as vllm_ops
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
    from vllm.model_executor.layers.quantization.utils import marlin_utils
    from vllm.scalar_type import scalar_types

    # A random GPTQ checkpoint (uint4b8, symmetric, group 128, no act-order) per expert, prepared as vLLM's
    # int_wna16 MoE oracle does.
    raw, marlin = {}, {}
    for stem, (n, k) in {"w13": (2 * shape.intermediate, shape.hidden),
                         "w2": (shape.hidden, shape.intermediate)}.items():
        packed = torch.randint(-2**31, 2**31, (shape.experts, k // 8, n), dtype=torch.int32, device=device)
        scales = ((torch.rand(shape.experts, k // MARLIN_GROUP, n, device=device) + 0.5)
                  / (8 * math.sqrt(k))).to(DTYPE)
        no_perm = torch.empty(shape.experts, 0, dtype=torch.int32, device=device)
        marlin[stem] = (vllm_ops.gptq_marlin_moe_repack(packed, no_perm, k, n, 4),
                        marlin_utils.marlin_moe_permute_scales(scales, k, n, MARLIN_GROUP))
        raw[stem] = (packed, scales)
    workspace = marlin_utils.marlin_make_workspace_new(device, 4)

    def run(x, routing):
        topk_weights, topk_ids = routing
        return fused_marlin_moe(x, marlin["w13"][0], marlin["w2"][0], None, None, marlin["w13"][1],
                                marlin["w2"][1], topk_weights, topk_ids, quant_type_id=scalar_types.uint4b8.id,
                                workspace=workspace)

    def decode(e):
        return tuple(((unpack_gptq_int4(raw[stem][0][e]) - 8).float()
                      * raw[stem][1][e].float().repeat_interleave(MARLIN_GROUP, dim=0)).T
                     for stem in ("w13", "w2"))

    return MoeCase("marlin_int4", run, Reference(decode))


def check(case: MoeCase, x: torch.Tensor, routing, what: str) -> None:
    out = case.run(x, routing)
    ref = case.reference(x, *routing)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    if not err < TOLERANCE:
        raise WrongResult(f"{what}: relative error {err:.3g} (tolerance {TOLERANCE})")


def bench_impl(name: str, build, shape: MoeShape, ms, device, records: list, gpu: str, bits=None) -> None:
    print(f"  {shape.model:<14} {name:<12}", end="", flush=True)
    try:
        case = build()
        gen = torch.Generator().manual_seed(1)
        for m in ms:
            routes = routings(shape, m, device, gen)
            x = torch.randn(m, shape.hidden, generator=gen).to(DTYPE).to(device)
            check(case, x, routes[0], f"{shape.model} {name} M={m}")
            # graph_us's calls rotate over the routings, as they rotate over weight copies in bench_kernels
            timed = Case(case.impl, bits, ROUTINGS, lambda x_, i: case.run(x_, routes[i]), None)
            us = graph_us(timed, x)
            records.append({"gpu": gpu, "model": shape.model, "M": m, "k": bits, "impl": case.impl,
                            "us": round(us, 3)})
            base = next((r["us"] for r in records if r["impl"] == "bf16" and r["model"] == shape.model
                         and r["M"] == m), None)
            print(f" M{m}: {us:.1f}" + (f" ({base / us:.2f}x)" if base and case.impl != "bf16" else ""),
                  end="", flush=True)
    finally:
        print(flush=True)
        torch.cuda.empty_cache()


def table(records: list[dict]) -> str:
    def us(model, impl, k, m):
        return next((r["us"] for r in records if (r["model"], r["impl"], r["k"], r["M"]) == (model, impl, k, m)),
                    None)

    columns = [("kbit", k, f"k={k}") for k in kfmt.SUPPORTED_BITS] + [("marlin_int4", None, "marlin")]
    lines = ["speedup over vLLM bf16 fused MoE (GPU time per layer call)"]
    for model in dict.fromkeys(r["model"] for r in records):
        lines.append(f"{model:<14} {'M':>4} {'bf16 µs':>9} " + " ".join(f"{c[2]:>7}" for c in columns))
        for m in sorted({r["M"] for r in records if r["model"] == model}):
            base = us(model, "bf16", None, m)
            cells = []
            for impl, k, _ in columns:
                t = us(model, impl, k, m)
                cells.append(f"{base / t:6.2f}x" if base and t else f"{'–':>7}")
            lines.append(f"{'':<14} {m:>4} {base or float('nan'):9.1f} " + " ".join(cells))
    k4 = [us(r["model"], "bf16", None, r["M"]) / r["us"] for r in records
          if r["impl"] == "kbit" and r["k"] == 4 and r["M"] <= 16 and us(r["model"], "bf16", None, r["M"])]
    if k4:
        lines.append(f"target: k=4 expert layer >= 2x bf16 at every M <= 16: worst {min(k4):.2f}x -> "
                     f"{'MET' if min(k4) >= 2 else 'NOT MET'}")
    return "\n".join(lines)


def plot(records: list[dict], png: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib missing: no PNG)")
        return
    models = list(dict.fromkeys(r["model"] for r in records))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        base = {r["M"]: r["us"] for r in records if r["model"] == model and r["impl"] == "bf16"}
        for impl, k, label, style in [("kbit", k, f"kbit k={k}", "-o") for k in kfmt.SUPPORTED_BITS] + [
                ("marlin_int4", None, "Marlin int4", "--s")]:
            points = sorted((r["M"], base[r["M"]] / r["us"]) for r in records
                            if r["model"] == model and r["impl"] == impl and r["k"] == k and r["M"] in base)
            if points:
                ax.plot(*zip(*points), style, label=label, color="black" if impl != "kbit" else None)
        ax.axhline(1.0, color="gray", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("speedup over bf16 fused MoE")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MoE expert layer, {records[0]['gpu']}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"plot -> {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"M in {M_QUICK}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--only-k", nargs="+", type=int, choices=kfmt.SUPPORTED_BITS, metavar="K")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU")
    kops.require_kernels()
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    ms = M_QUICK if args.quick else M_FULL
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"moe-{gpu.lower().replace(' ', '-')}.json"
    records: list[dict] = []
    started = time.perf_counter()
    with torch.no_grad():
        for shape in MODELS:
            print(f"[{time.perf_counter() - started:6.1f} s] {shape}; kbit plan: "
                  f"{capabilities.describe_moe_plan(shape.top_k, shape.experts, shape.intermediate)}", flush=True)
            bench_impl("bf16", lambda: bf16_case(shape, device), shape, ms, device, records, gpu)
            for bits in args.only_k or kfmt.SUPPORTED_BITS:
                try:
                    bench_impl(f"kbit k={bits}", lambda: kbit_case(shape, bits, device), shape, ms, device, records,
                               gpu, bits)
                except WrongResult as e:
                    json_path.write_text(json.dumps(records, indent=1))
                    sys.exit(f"!!! KBIT RESULT WRONG, run aborted: {e}")
            try:
                bench_impl("marlin_int4", lambda: marlin_case(shape, device), shape, ms, device, records, gpu)
            except Exception as e:  # a broken baseline must not cost the kbit numbers
                print(f"  !!! SKIPPED marlin_int4 {shape.model}: {e!r}", flush=True)
            json_path.write_text(json.dumps(records, indent=1))
    print(f"[{time.perf_counter() - started:6.1f} s] done; records -> {json_path}\n")
    print(table(records))
    plot(records, json_path.with_suffix(".png"))


if __name__ == "__main__":
    main()
