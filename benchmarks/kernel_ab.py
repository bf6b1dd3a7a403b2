"""A/B timing of MMA kernel variants on the GPU, without torch or vLLM (no install, no vLLM kit).

Builds benchmarks/kernel_ab.cu against kernels/ as it is ("base") and against patched copies of kernels/, one per
variant, in parallel, runs each, and prints every variant's speedup over base (and base's over fp16 cuBLAS) per
(shape, k, M): the dense MMA tier, with --wgmma the Hopper tier at M = 64..1024 (each case also as "SHAPE dq":
dequantize + cuBLAS, which the variants do not change), or with --moe the grouped MoE experts (Qwen3-30B-A3B and
Qwen3-Next expert layers, no baseline). A variants file is JSON: {"name": [["mma_core.cuh", "exact old text", "new
text"], ...], ...}; each old text must occur exactly once. Timing only: a variant worth keeping goes into kernels/ and
through the GPU tests. KBIT_AB_SHAPE, KBIT_AB_M and KBIT_AB_BITS time a subset (benchmarks/kernel_ab.cu).

    python benchmarks/kernel_ab.py [--variants FILE] [--interleave | --moe | --wgmma] [--arch sm_90] [--out DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


class Objects:
    """Object files of kernel sources, compiled once per distinct text: a variant recompiles only the sources that its
    patches change (a source's text together with every header beside it), and a source's compile is shared."""

    def __init__(self, arch: str, work: Path, wgmma: bool) -> None:
        # -gencode rather than -arch: nvcc 13 turns -arch=sm_90a into sm_90a code and compute_90 PTX, which cannot
        # hold wgmma. KBIT_WGMMA: kernel_ab.cu calls the Hopper tier (as in bindings.cpp).
        self.arch = [f"-gencode=arch=compute_{arch.removeprefix('sm_')},code={arch}"]
        self.defines = ["-DKBIT_WGMMA=1"] if wgmma else []
        self.work = work
        self.futures: dict[str, concurrent.futures.Future] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 4)
        self.lock = threading.Lock()

    def get(self, src: Path) -> concurrent.futures.Future:
        headers = sorted(p for p in src.parent.iterdir() if p.suffix in (".h", ".cuh"))
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in [src, *headers])).hexdigest()[:16]
        with self.lock:
            if digest not in self.futures:
                self.futures[digest] = self.pool.submit(self.compile, src, self.work / f"{src.stem}-{digest}.o")
            return self.futures[digest]

    def compile(self, src: Path, obj: Path) -> tuple[Path, str]:
        cmd = ["nvcc", "-O3", "-std=c++17", *self.arch, *self.defines, "-Xptxas=-v", f"-I{src.parent}", "-c", str(src),
               "-o", str(obj)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{src} does not build:\n{result.stderr[-4000:]}")
        return obj, result.stderr


def build(name: str, patches: list[list[str]], objects: Objects, wgmma: bool) -> Path:
    src = objects.work / name / "kernels"
    shutil.copytree(REPO / "kernels", src)
    for file, old, new in patches:
        text = (src / file).read_text()
        if text.count(old) != 1:
            raise SystemExit(f"variant {name}: {file} holds {text.count(old)} copies of the text to replace (need 1)")
        (src / file).write_text(text.replace(old, new))
    exe = objects.work / name / "kernel_ab"
    sources = ["kernel_ab.cu", "mma.cu", "moe.cu", "dequant.cu"] + (["wgmma.cu"] if wgmma else [])
    shutil.copy(REPO / "benchmarks/kernel_ab.cu", src / "kernel_ab.cu")
    built = [objects.get(src / f).result() for f in sources]
    result = subprocess.run(["nvcc", *objects.arch, *(str(obj) for obj, _ in built), "-lcublas", "-o",
                             str(exe)], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"variant {name} does not link:\n{result.stderr[-4000:]}")
    spills = sum(1 for _, log in built for line in log.splitlines()
                 if "spill stores" in line and " 0 bytes spill stores" not in line)
    print(f"{name}: built, {spills} kernel instantiations spill ({', '.join(sources[1:])})", flush=True)
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=Path, help="JSON file of variants (default: base only)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--interleave", action="store_true", help="a small kernel before every call, as in a model")
    mode.add_argument("--moe", action="store_true", help="time the grouped MoE experts instead of the dense tier")
    mode.add_argument("--wgmma", action="store_true",
                      help="time the Hopper tier (and dequantize + cuBLAS) at M = 64..1024 instead (sm_90a)")
    parser.add_argument("--arch", default=None, help="GPU target (default sm_90, sm_90a with --wgmma)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")), help="where kernel_ab.tsv goes")
    args = parser.parse_args()
    variants = {"base": []} | (json.loads(args.variants.read_text()) if args.variants else {})
    arch = args.arch or ("sm_90a" if args.wgmma else "sm_90")

    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
        objects = Objects(arch, Path(tmp), args.wgmma)
        exes = dict(zip(variants, pool.map(lambda v: build(v, variants[v], objects, args.wgmma), variants)))
        rows = []
        for name, exe in exes.items():
            flags = ["moe"] if args.moe else ["interleave"] if args.interleave else ["wgmma"] if args.wgmma else []
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
    header = f"{'shape':<20} {'k':>2} {'M':>4} {'base µs':>8} {'vs fp16':>8} "
    print("\n" + header + " ".join(f"{v[:10]:>10}" for v in others))
    for case in cases:
        base, fp16 = times[("base", *case)]
        ratios = " ".join(f"{base / times[(v, *case)][0]:>9.2f}x" for v in others)
        baseline = f"{fp16 / base:>7.2f}x" if math.isfinite(fp16) else f"{'-':>8}"  # --moe: no baseline
        print(f"{case[0]:<20} {case[1]:>2} {case[2]:>4} {base:>8.2f} {baseline} {ratios}")
    print(f"\nspeedup of each variant over base (> 1: faster); rows in {args.out / 'kernel_ab.tsv'}")


if __name__ == "__main__":
    main()
