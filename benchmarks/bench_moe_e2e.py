"""End-to-end MoE decode: a Qwen3-30B-A3B-shaped model with random weights in bf16 and in kbit (k = 4, 2) under
`vllm bench latency` (128 tokens in, 256 out, default compilation: torch.compile + CUDA graphs).

    python benchmarks/bench_moe_e2e.py --tokenizer-dir DIR [--formats bf16,kbit4,kbit2] [--batch-sizes 1,16]
                                       [--work-dir /tmp/kbit-moe-e2e] [--out benchmarks/results]

kbit checkpoints are written to disk as kbit-quantize would write them (random codes,
random_checkpoint.write_random_kbit_qwen3_moe; router gates, embeddings and norms in bf16), one at a time. The
bf16 model runs from its config with --load-format dummy (random weights drawn by vLLM): its 61 GB would not fit
the GPU machine's disk, and the weights' values do not change the decode time. Tokenizer: any whose ids fit the
151936-entry vocabulary (SmolLM2's).

Recorded per (format, batch size B): latency_s = mean seconds to generate one batch (vLLM's avg_latency), and
ms_per_token = latency_s / 256 * 1000 (prefill included: it is ~1% of the total here), to
--out/moe-e2e-<gpu>.json as {"gpu", "model", "format", "mode": "latency", "concurrency": B, "latency_s",
"ms_per_token"}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
from vllm_kbit import random_checkpoint as rc

from bench_serve import VLLM_BENCH, build_in_child, gpu_name, log, run_logged, vllm_env  # benchmarks/, next to this

MODEL = "Qwen3-30B-A3B"
SHAPE = rc.QWEN3_30B_A3B
FORMATS = {"bf16": None, "kbit4": 4, "kbit3": 3, "kbit2": 2, "kbit5": 5}
INPUT_LEN, OUTPUT_LEN = 128, 256


def _write_kbit(out: Path, bits: int, tokenizer_dir: Path) -> None:
    rc.write_random_kbit_qwen3_moe(out, SHAPE, bits, torch.bfloat16, tokenizer_dir=tokenizer_dir)


def checkpoint(fmt: str, args) -> Path:
    """The model directory of a format under --work-dir (kbit: one checkpoint on disk at a time)."""
    root = args.work_dir / "checkpoints"
    path = root / fmt
    if path.is_dir():
        return path
    root.mkdir(parents=True, exist_ok=True)
    bits = FORMATS[fmt]
    if bits is None:  # config and tokenizer only: vLLM draws the weights (--load-format dummy)
        path.mkdir()
        (path / "config.json").write_text(json.dumps(rc.qwen3_moe_config(SHAPE, torch.bfloat16), indent=2))
        rc.copy_tokenizer_files(args.tokenizer_dir, path)
        return path
    for other in root.iterdir():
        if other.name.startswith("kbit"):
            shutil.rmtree(other)
    return build_in_child(path, _write_kbit, (bits, args.tokenizer_dir))


def latency(fmt: str, batch: int, args) -> float:
    model = checkpoint(fmt, args)
    result = args.work_dir / "raw" / f"latency-{fmt}-b{batch}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-c", VLLM_BENCH, "latency", "--model", str(model), "--input-len", str(INPUT_LEN),
           "--output-len", str(OUTPUT_LEN), "--batch-size", str(batch), "--num-iters-warmup", "2", "--num-iters",
           str(args.iters), "--disable-detokenize", "--output-json", str(result), "--dtype", "bfloat16",
           "--max-model-len", str(min(1024, SHAPE.max_position_embeddings)),
           "--max-num-seqs", str(max(args.batch_sizes))]
    if FORMATS[fmt] is None:
        cmd += ["--load-format", "dummy"]
    run_logged(cmd + args.vllm_args, vllm_env(), args.work_dir / "logs" / f"latency-{fmt}-b{batch}.log", args.timeout)
    return json.loads(result.read_text())["avg_latency"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-dir", type=Path, required=True)
    parser.add_argument("--formats", default="bf16,kbit4,kbit2")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kbit-moe-e2e"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per vLLM run")
    parser.add_argument("--vllm-args", type=shlex.split, default=[],
                        help="extra engine options for every vLLM run, e.g. --vllm-args='--enforce-eager'")
    args = parser.parse_args()
    args.formats = args.formats.split(",")
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {list(FORMATS)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.work_dir, args.out = args.work_dir.resolve(), args.out.resolve()
    gpu = gpu_name()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"moe-e2e-{gpu}.json"
    records = json.loads(path.read_text()) if path.exists() else []
    for fmt in args.formats:
        for batch in args.batch_sizes:
            seconds = latency(fmt, batch, args)
            records = [r for r in records if (r["format"], r["concurrency"]) != (fmt, batch)]
            records.append({"gpu": gpu, "model": MODEL, "format": fmt, "mode": "latency", "concurrency": batch,
                            "latency_s": round(seconds, 4), "ms_per_token": round(seconds / OUTPUT_LEN * 1e3, 3)})
            path.write_text(json.dumps(records, indent=1))
            log(f"{fmt} batch {batch}: {seconds:.3f} s per batch, {seconds / OUTPUT_LEN * 1e3:.2f} ms per token")
    for r in sorted(records, key=lambda r: (r["concurrency"], r["format"])):
        base = next((b["latency_s"] for b in records if b["format"] == "bf16" and b["concurrency"] == r["concurrency"]),
                    None)
        ratio = f"{base / r['latency_s']:.2f}x bf16" if base else ""
        print(f"{r['format']:<6} batch {r['concurrency']:>3}: {r['ms_per_token']:7.2f} ms/token  {ratio}")


if __name__ == "__main__":
    main()
