"""Tables, targets and the speedup plot of a kernel benchmark run, from its JSON records.

    python benchmarks/plot.py benchmarks/results/kernels-<gpu>.json

re-renders ``kernels-<gpu>.png`` and ``kernels-<gpu>.md`` next to the JSON file and prints the summary.
benchmarks/bench_kernels.py writes the records and calls :func:`render` at the end of a run.

A record is ``{"gpu", "shape", "K", "N", "M", "k", "dtype", "impl", "us"}``. ``shape`` is "<family> <layer>"
(e.g. "Llama-3-8B gate_up"); ``k`` is the kbit bit width (null for other impls); ``us`` is GPU µs per call,
except for the ``*_eager_host`` impls, where it is host µs per eager call. The impl ``fp16`` is cuBLAS
(``F.linear``) in the record's dtype, fp16 or bf16, and every speedup is over it at the same dtype and M.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from vllm_kbit.format import packed_bytes

BASELINE = "fp16"
# (impl, k, column label) in table and legend order
COLUMNS = (
    ("kbit", 2, "kbit k=2"),
    ("kbit", 3, "kbit k=3"),
    ("kbit", 4, "kbit k=4"),
    ("kbit", 5, "kbit k=5"),
    ("marlin_int4", None, "Marlin int4"),
    ("bnb_nf4", None, "bnb NF4"),
)
# host µs per eager call at M = 1 (bench_kernels.py): impl -> what was called
EAGER_IMPLS = {
    "kbit_layer_eager_host": "kbit as an eager layer calls it (ops.layer_gemm)",
    "kbit_eager_host": "kbit through the op (torch.ops.kbit.gemm)",
    "kbit_launch_eager_host": "kbit binding launch alone (_C.mma)",
    "fp16_eager_host": "F.linear",
}
BIG_WEIGHT_BYTES = 32e6  # "large" weights for the bandwidth comparison: fixed per-call cost is small there
LLAMA8B, LLAMA70B_GATE_UP, QWEN3_NEXT = "Llama-3-8B", "Llama-3-70B gate_up", "Qwen3-Next"


def family_of(shape: str) -> str:
    return shape.rsplit(" ", 1)[0]


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


class Results:
    """Look-ups over the records of one run."""

    def __init__(self, records: list[dict]):
        timed = [r for r in records if r["impl"] not in EAGER_IMPLS]
        self.gpu = records[0]["gpu"] if records else "unknown GPU"
        self.eager = [r for r in records if r["impl"] in EAGER_IMPLS]
        self.us = {(r["impl"], r["k"], r["shape"], r["dtype"], r["M"]): r["us"] for r in timed}
        self.dims = {r["shape"]: (r["K"], r["N"]) for r in timed}
        self.shapes = list(self.dims)  # in run order
        self.families = list(dict.fromkeys(family_of(s) for s in self.shapes))
        self.dtypes = list(dict.fromkeys(r["dtype"] for r in timed))
        self.ms = sorted({r["M"] for r in timed})

    def time(self, impl: str, k: int | None, shape: str, dtype: str, m: int) -> float | None:
        return self.us.get((impl, k, shape, dtype, m))

    def speedup(self, impl: str, k: int | None, shape: str, dtype: str, m: int) -> float | None:
        base, t = self.time(BASELINE, None, shape, dtype, m), self.time(impl, k, shape, dtype, m)
        return base / t if base is not None and t is not None else None

    def geomean_speedup(self, impl: str, k: int | None, shapes: list[str], dtype: str, m: int) -> float | None:
        values = [self.speedup(impl, k, s, dtype, m) for s in shapes]
        return geomean([v for v in values if v is not None])

    def family_shapes(self, family: str) -> list[str]:
        return [s for s in self.shapes if family_of(s) == family]


# ---------------------------------------------------------------------------------------------------
# Tables: (title, header, rows, note); rendered as aligned text or markdown
# ---------------------------------------------------------------------------------------------------


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def speedup_table(res: Results):
    header = ["family", "dtype", "M", "cuBLAS µs (sum)"] + [label for _, _, label in COLUMNS]
    rows = []
    for family in res.families:
        shapes = res.family_shapes(family)
        for dtype in res.dtypes:
            for m in res.ms:
                base = [res.time(BASELINE, None, s, dtype, m) for s in shapes]
                total = f"{sum(base):.1f}" if base and None not in base else "–"
                rows.append([family, dtype, str(m), total]
                            + [_x(res.geomean_speedup(impl, k, shapes, dtype, m)) for impl, k, _ in COLUMNS])
    return ("Speedup over cuBLAS, geomean over each family's layers", header, rows,
            "cuBLAS µs is the family's summed F.linear time in that dtype (the ruler for the speedups).")


def layer_table(res: Results, m: int = 1):
    header = ["layer", "K", "N", "dtype", "cuBLAS µs"] + [f"{label} µs" for _, _, label in COLUMNS]
    rows = []
    for shape in res.shapes:
        k_dim, n_dim = res.dims[shape]
        for dtype in res.dtypes:
            base = res.time(BASELINE, None, shape, dtype, m)
            cells = []
            for impl, k, _ in COLUMNS:
                t = res.time(impl, k, shape, dtype, m)
                cells.append("–" if t is None else f"{t:.2f} ({_x(res.speedup(impl, k, shape, dtype, m))})")
            rows.append([shape, str(k_dim), str(n_dim), dtype, "–" if base is None else f"{base:.2f}"] + cells)
    return (f"Per layer at M={m}: µs per call (speedup over cuBLAS)", header, rows, None)


def bandwidth_cases(res: Results, m: int = 1):
    """(shape, dtype, k, packed bytes, kbit TB/s, cuBLAS TB/s) for kbit weights of >= BIG_WEIGHT_BYTES."""
    cases = []
    for shape in res.shapes:
        k_dim, n_dim = res.dims[shape]
        for dtype in res.dtypes:
            base = res.time(BASELINE, None, shape, dtype, m)
            for bits in (2, 3, 4, 5):
                t = res.time("kbit", bits, shape, dtype, m)
                size = packed_bytes(n_dim, k_dim, bits)
                if t is None or base is None or size < BIG_WEIGHT_BYTES:
                    continue
                cases.append((shape, dtype, bits, size, size / t / 1e6, 2 * n_dim * k_dim / base / 1e6))
    return cases


def bandwidth_table(res: Results):
    header = ["layer", "dtype", "k", "kbit MB", "kbit µs", "kbit TB/s", "cuBLAS TB/s", "kbit / cuBLAS"]
    rows = [[shape, dtype, str(bits), f"{size / 1e6:.1f}", f"{size / kbit_bw / 1e6:.2f}", f"{kbit_bw:.2f}",
             f"{base_bw:.2f}", f"{kbit_bw / base_bw:.0%}"]
            for shape, dtype, bits, size, kbit_bw, base_bw in bandwidth_cases(res)]
    return ("Effective bandwidth at M=1, kbit weights of at least 32 MB", header, rows,
            "Bytes: kbit packed weight incl. E4M4 absmax and row scales; cuBLAS 2·N·K. Per call, weights not in L2.")


def eager_table(res: Results):
    header = ["op", "k", "dtype", "M", "host µs per call"]
    rows = [[EAGER_IMPLS[r["impl"]] + f" ({r['shape']})", "–" if r["k"] is None else str(r["k"]),
             r["dtype"], str(r["M"]), f"{r['us']:.2f}"] for r in res.eager]
    return ("Eager host overhead (perf_counter over queued calls; the GPU is kept busy)", header, rows, None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def _kbit_cases(res: Results, ms: list[int], value, bits_list=(2, 3, 4, 5)) -> list[tuple[float, str]]:
    """(value(shape, bits, m), where) over every kbit configuration that has data."""
    cases = []
    for shape in res.shapes:
        for bits in bits_list:
            for m in ms:
                v = value(shape, bits, m)
                if v is not None:
                    cases.append((v, f"{shape} k={bits} M={m}"))
    return cases


def _flatness(res: Results, dtype: str) -> list[tuple[float, str]]:
    """kbit time(M) / time(M=1) for M = 2..16."""
    return _kbit_cases(res, [m for m in res.ms if 2 <= m <= 16],
                       lambda s, b, m: _ratio(res.time("kbit", b, s, dtype, m), res.time("kbit", b, s, dtype, 1)))


def _vs_marlin(res: Results, dtype: str) -> list[tuple[float, str]]:
    """Marlin µs / kbit k=4 µs for M <= 16."""
    return _kbit_cases(res, [m for m in res.ms if m <= 16],
                       lambda s, b, m: _ratio(res.time("marlin_int4", None, s, dtype, m),
                                              res.time("kbit", b, s, dtype, m)), bits_list=(4,))


def _speedups(res: Results, dtype: str, ms: list[int]) -> list[tuple[float, str]]:
    return _kbit_cases(res, [m for m in ms if m in res.ms], lambda s, b, m: res.speedup("kbit", b, s, dtype, m))


def _worst(cases: list[tuple[float, str]], bound: float, larger_is_better: bool, fmt, strict: bool = False):
    """(measured text, ok or None without data): the worst case against bound, and how many miss it."""
    if not cases:
        return "no data", None
    value, where = (min if larger_is_better else max)(cases)
    if larger_is_better:
        misses = sum(v <= bound if strict else v < bound for v, _ in cases)
    else:
        misses = sum(v >= bound if strict else v > bound for v, _ in cases)
    return f"{fmt(value)} at {where} ({misses}/{len(cases)} miss)", misses == 0


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def target_table(res: Results):
    header = ["target", "dtype", "required", "measured", "result"]
    rows = []

    def add(name, dtype, required, measured, ok):
        rows.append([name, dtype, required, measured, _verdict(ok)])

    gate_up_70b = [s for s in res.shapes if s == LLAMA70B_GATE_UP]
    pct = "{:.0%}".format
    for dtype in res.dtypes:
        for bits, what, shapes, bound in (
                (4, "geomean Llama-3-8B", res.family_shapes(LLAMA8B), 2.5),
                (4, "Llama-3-70B gate_up", gate_up_70b, 3.3),
                (4, "geomean Qwen3-Next", res.family_shapes(QWEN3_NEXT), 1.8),
                (2, "geomean Llama-3-8B", res.family_shapes(LLAMA8B), 3.5),
                (2, "Llama-3-70B gate_up", gate_up_70b, 5.0)):
            value = res.geomean_speedup("kbit", bits, shapes, dtype, 1)
            add(f"kbit k={bits} vs cuBLAS, M=1, {what}", dtype, f">= {bound:.1f}x",
                "no data" if value is None else _x(value), None if value is None else value >= bound)

        bandwidth = [(kbit_bw / base_bw, f"{shape} k={bits}")
                     for shape, dt, bits, _, kbit_bw, base_bw in bandwidth_cases(res) if dt == dtype]
        add("kbit / cuBLAS bandwidth, M=1, weights >= 32 MB (worst)", dtype, ">= 85%",
            *_worst(bandwidth, 0.85, True, pct))

        add("kbit time(M) / time(M=1), M=2..16 (worst)", dtype, "<= 1.25x",
            *_worst(_flatness(res, dtype), 1.25, False, _x))
        add("kbit k=4 faster than Marlin, every M <= 16 (Marlin µs / kbit µs, worst)", dtype, "> 1.00x",
            *_worst(_vs_marlin(res, dtype), 1.0, True, _x, strict=True))
        for what, ms, bound in (("M=64", [64], 1.0), ("M >= 128", [m for m in res.ms if m >= 128], 0.95)):
            add(f"kbit vs cuBLAS at {what} (worst layer and k)", dtype, f">= {bound:.2f}x",
                *_worst(_speedups(res, dtype, ms), bound, True, _x))

    # what an eager layer pays: its own path where the run timed it (older runs timed the op only)
    impl = next((i for i in ("kbit_layer_eager_host", "kbit_eager_host") if any(r["impl"] == i for r in res.eager)),
                "kbit_eager_host")
    host = [(r["us"], f"k={r['k']} {r['shape']}") for r in res.eager if r["impl"] == impl]
    host_dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in res.eager if r["impl"] == impl))
    add(f"{EAGER_IMPLS[impl]}: eager host overhead per call, M=1 (worst k)", host_dtypes or "–", "<= 5 µs",
        *_worst(host, 5.0, False, "{:.2f} µs".format))
    return ("Targets", header, rows, None)


def sections(res: Results):
    return [speedup_table(res), layer_table(res), bandwidth_table(res), eager_table(res), target_table(res)]


# ---------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------


NUMBER = re.compile(r"[\d.]+(x|%| µs)?( \([\d.]+x\))?|–")  # "12.3", "2.41x", "5.31 (3.59x)", "–" (no data)


def _numeric(column: list[str]) -> bool:
    """Right-align columns of numbers."""
    return all(NUMBER.fullmatch(cell) for cell in column)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    columns = list(zip(header, *rows))
    widths = [max(len(c) for c in col) for col in columns]
    right = [_numeric(list(col[1:])) for col in columns]
    lines = []
    for row in [header] + rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    right = [_numeric(list(col[1:])) for col in zip(header, *rows)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_text(res: Results) -> str:
    parts = [f"Kernel benchmark on {res.gpu}"]
    for title, header, rows, note in sections(res):
        parts.append(f"\n{title}\n{'=' * len(title)}")
        parts.append(text_table(header, rows) if rows else "(no data)")
        if note:
            parts.append(note)
    return "\n".join(parts)


def render_markdown(res: Results, png_name: str | None) -> str:
    parts = [f"# Kernel benchmark: {res.gpu}", ""]
    if png_name:
        parts += [f"![speedup over cuBLAS vs M]({png_name})", ""]
    for title, header, rows, note in sections(res):
        parts += [f"## {title}", "", markdown_table(header, rows) if rows else "(no data)", ""]
        if note:
            parts += [note, ""]
    return "\n".join(parts)


PANELS = (  # (title, the layers whose geomean speedup one panel shows)
    (LLAMA8B, lambda res: res.family_shapes(LLAMA8B)),
    (QWEN3_NEXT, lambda res: res.family_shapes(QWEN3_NEXT)),
    (LLAMA70B_GATE_UP, lambda res: [s for s in res.shapes if s == LLAMA70B_GATE_UP]),
)
STYLES = {"marlin_int4": dict(color="black", linestyle="--", marker="s"),
          "bnb_nf4": dict(color="grey", linestyle=":", marker="^")}


def plot_speedups(res: Results, png_path: Path) -> bool:
    """Speedup over cuBLAS vs M: one panel per PANELS entry with data, one row per dtype. False if not drawn."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: {png_path} not written. Install it (pip install matplotlib) and run "
              f"python benchmarks/plot.py on the JSON records.", flush=True)
        return False
    matplotlib.use("Agg")  # files only; no display on benchmark machines
    import matplotlib.pyplot as plt

    panels = [(title, shapes(res)) for title, shapes in PANELS if shapes(res)]
    if not panels or not res.dtypes:
        print(f"no timings to plot: {png_path} not written", flush=True)
        return False
    fig, axes = plt.subplots(len(res.dtypes), len(panels), figsize=(5.2 * len(panels), 4.2 * len(res.dtypes)),
                             squeeze=False)
    kbit_colors = plt.get_cmap("viridis")
    for row, dtype in enumerate(res.dtypes):
        for col, (title, shapes) in enumerate(panels):
            ax = axes[row][col]
            for impl, k, label in COLUMNS:
                points = [(m, res.geomean_speedup(impl, k, shapes, dtype, m)) for m in res.ms]
                points = [(m, v) for m, v in points if v is not None]
                if not points:
                    continue
                style = STYLES.get(impl) or dict(color=kbit_colors((k - 2) / 3.5), marker="o")
                ax.plot(*zip(*points), label=label, linewidth=1.6, markersize=4, **style)
            ax.axhline(1.0, color="red", linewidth=0.8, alpha=0.6)
            ax.set_xscale("log", base=2)
            ax.set_xticks(res.ms, [str(m) for m in res.ms], fontsize=8)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel(f"speedup over cuBLAS {dtype}")
            geo = f", geomean of {len(shapes)} layers" if len(shapes) > 1 else ""
            ax.set_title(f"{title}{geo}, {dtype}", fontsize=10)
            ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Weight-only GEMM speedup over cuBLAS on {res.gpu} (CUDA-graph GPU time, weights not in L2)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return True


def render(records: list[dict], json_path: Path) -> str:
    """Write <stem>.png and <stem>.md next to json_path; return the text summary."""
    res = Results(records)
    png_path, md_path = json_path.with_suffix(".png"), json_path.with_suffix(".md")
    drawn = plot_speedups(res, png_path)
    md_path.write_text(render_markdown(res, png_path.name if drawn else None))
    return render_text(res) + f"\n\nwrote {md_path}" + (f" and {png_path}" if drawn else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, help="kernels-<gpu>.json written by bench_kernels.py")
    args = parser.parse_args()
    print(render(json.loads(args.records.read_text()), args.records))


if __name__ == "__main__":
    main()
