"""A/B timing of MMA kernel variants on the GPU, without torch or vLLM (no install, no vLLM kit).

Builds benchmarks/kernel_ab.cu against kernels/ as it is ("base") and against patched copies of kernels/, one per
variant, in parallel, runs each, and prints every variant's speedup over base (and base's over fp16 cuBLAS) per
(shape, k, M): the dense tier, or with --moe the grouped MoE experts (Qwen3-30B-A3B and Qwen3-Next expert layers,
no baseline). A variants file is JSON: {"name": [["mma_core.cuh", "exact old text", "new text"], ...], ...}; each
old text must occur exactly once. Timing only: a variant worth keeping goes into kernels/ and through the GPU tests.

    python benchmarks/kernel_ab.py [--variants FILE] [--interleave | --moe] [--arch sm_90] [--out DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def build(name: str, patches: list[list[str]], arch: str, work: Path) -> Path:
    src = work / name / "kernels"
    shutil.copytree(REPO / "kernels", src)
    for file, old, new in patches:
        text = (src / file).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"variant {name}: {file} holds {text.count(old)} copies of the text to replace (need 1)")
        (src / file).write_text(text.replace(old, new))
    exe = work / name / "kernel_ab"
    cmd = ["nvcc", "-O3", "-std=c++17", f"-arch={arch}", "-Xptxas=-v", f"-I{src}",
           str(REPO / "benchmarks/kernel_ab.cu"), str(src / "mma.cu"), str(src / "moe.cu"), "-lcublas", "-o", str(exe)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"variant {name} does not build:\n{result.stderr[-4000:]}")
    spills = sum(1 for line in result.stderr.splitlines()
                 if "spill stores" in line and " 0 bytes spill stores" not in line)
    print(f"{name}: built, {spills} kernel instantiations spill (mma.cu and moe.cu)", flush=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=Path, help="JSON file of variants (default: base only)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interleave", action="store_true", help="a small kernel before every call, as in a model")
    mode.add_argument("--moe", action="store_true", help="time the grouped MoE experts instead of the dense tier")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where kernel_ab.tsv goes")
    args = parser.parse_args()
    variants = {"base": []} | (json.loads(args.variants.read_text()) if args.variants else {})

    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
        exes = dict(zip(variants, pool.map(lambda v: build(v, variants[v], args.arch, Path(tmp)), variants)))
        rows = []
        for name, exe in exes.items():
            flags = ["moe"] if args.moe else ["interleave"] if args.interleave else []
            result = subprocess.run([str(exe), name] + flags, capture_output=True, text=True)
            if result.returncode:
                raise SystemExit(f"variant {name} failed: {result.stderr[-2000:]}")
            rows += [line.split("\t") for line in result.stdout.splitlines()]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_ab.tsv").write_text("variant\tshape\tk\tM\tkbit_us\tfp16_us\n" + "".join(
        "\t".join(row) + "\n" for row in rows))
    times = {(v, shape, k, m): (float(kbit), float(fp16)) for v, shape, k, m, kbit, fp16 in rows}
    cases = list(dict.fromkeys((shape, k, m) for _, shape, k, m, _, _ in rows))
    others = [v for v in variants if v != "base"]
    header = f"{'shape':<20} {'k':>2} {'M':>3} {'base µs':>8} {'vs fp16':>8} "
    print("\n" + header + " ".join(f"{v[:10]:>10}" for v in others))
    for case in cases:
        base, fp16 = times[("base", *case)]
        ratios = " ".join(f"{base / times[(v, *case)][0]:>9.2f}x" for v in others)
        baseline = f"{fp16 / base:>7.2f}x" if math.isfinite(fp16) else f"{'-':>8}"  # --moe: no baseline
        print(f"{case[0]:<20} {case[1]:>2} {case[2]:>3} {base:>8.2f} {baseline} {ratios}")
    print(f"\nspeedup of each variant over base (> 1: faster); rows in {args.out / 'kernel_ab.tsv'}")


if __name__ == "__main__":
    main()
