"""Serving benchmark: a Llama-3-8B-shaped model in fp16, kbit (k = 2..5) and GPTQ int4 g128 (vLLM's default
kernel, Machete on Hopper, and Marlin), under `vllm bench latency` and `vllm bench serve`.

    python benchmarks/bench_serve.py latency [--formats fp16,kbit4,...] [--batch-sizes 1,4,16] [--quick]
    python benchmarks/bench_serve.py serve   [--formats ...] [--concurrency 1,4,16,64] [--quick]
    python benchmarks/bench_serve.py all     [...]                # latency, then serve, format by format
    python benchmarks/bench_serve.py build   --formats kbit4      # only write the checkpoint (e.g. for load_test.py)
    python benchmarks/bench_serve.py report  [RECORDS.json ...]   # re-render PNG + markdown from the records

Checkpoints: random weights written directly in each format (vllm_kbit/random_checkpoint.py) into
--work-dir/checkpoints, all in --dtype (default float16, so the format is the only difference), with the
tokenizer from --tokenizer-dir (SmolLM2's: its 49152 ids fit Llama-3's vocab). One checkpoint is on disk at
a time: building one deletes the others, and a later invocation for the same format reuses it (run `latency`
then `serve` for one format before moving on, or `all`). The GPTQ formats share one checkpoint. Formats run in
the order listed in FORMATS; --formats with one format keeps an invocation short. "kbit4-lmhead" and
"kbit2-lmhead" quantize the lm_head too (kbit-quantize --quantize-lm-head); the plain kbit formats keep it 16-bit.

Every vLLM engine runs with --max-num-seqs 64 (as serving_configs/ do; more if a level asks for more), so
CUDA graphs are captured up to 128 tokens and all runs of one format share one torch.compile cache entry.
--quick: formats fp16, kbit4, kbit2, gptq-marlin; batch size 1; 1, 4 and 64 users; fewer iterations and
prompts -- enough for every target.

latency: for each batch size B, `vllm bench latency --batch-size B --input-len 128` twice, with --output-len
256 and with --output-len 1, default compilation (torch.compile + CUDA graphs). The runs of a format and mode
share one engine (VLLM_LATENCY_RUNS): vLLM's latency benchmark, unchanged, runs once per (B, output length) in
one process, whose records are written when it has finished (if it fails, its finished runs' results stay in
--work-dir/raw, unrecorded). Latency L is the mean over the timed iterations of generating one batch.
Recorded: tpot_ms = (L(256) - L(1)) / 255 (the decode step, prefill excluded), ttft_ms = L(1) (prefill of the
batch plus one token), output_tok_s = B * 256 / L(256).
For kbit4 the batch-1 pair also runs with --enforce-eager (mode "latency_eager"): its TPOT minus the graphed
one is the host time per decode step that CUDA graphs hide.

serve: one `vllm serve` (the api_server module) on 127.0.0.1 per format, then for each concurrency C one
`vllm bench serve` (random dataset, 128 tokens in, 256 out, --ignore-eos, --max-concurrency C, max(8, 4*C)
prompts (--quick: 2*C), C warm-up requests; no prefix caching, as in latency mode). Recorded: vLLM's mean
TPOT, mean TTFT and output token throughput. Any failed request aborts the run.

GPTQ: "gptq-machete" runs vLLM's default kernel choice, "gptq-marlin" sets
VLLM_DISABLED_KERNELS=MacheteLinearKernel; on a GPU the kernel vLLM logs must be the one the format names.

Records {"gpu", "model", "format", "mode", "concurrency", "tpot_ms", "ttft_ms", "output_tok_s"} (concurrency
is the batch size in the latency modes) go to --out/serve-<gpu>.json, written after every measurement (serve:
every level; latency: every format and mode; a re-measured point replaces the old one); serve-<gpu>.png (TPOT
and output tokens/s vs concurrency) and serve-<gpu>.md (ratios vs fp16, targets) are rendered next to it at the
end of every invocation.

vLLM's `bench serve` runs through a one-line shim (VLLM_BENCH) that does what the `vllm` script's subcommand
does, and `bench latency` through VLLM_LATENCY_RUNS (above); the `vllm` script itself crashes on vLLM's CPU
build, which this also runs on.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch
from vllm_kbit import random_checkpoint as rc

import plot  # benchmarks/plot.py, next to this script: text and markdown tables

REPO = Path(__file__).resolve().parents[1]
# vLLM processes start outside the repository: started in its root, Python would import vllm_kbit (vLLM's
# plugin) from the source tree instead of the installed package that holds the compiled kernels.
VLLM_CWD = Path(tempfile.gettempdir())


@dataclass(frozen=True)
class Format:
    name: str  # the records' "format"
    kind: str  # "fp16", "kbit" or "gptq": which writer builds the checkpoint
    bits: int | None = None  # kbit k
    lm_head: bool = False  # kbit: the lm_head quantized too (kbit-quantize --quantize-lm-head)
    disabled_kernels: str | None = None  # VLLM_DISABLED_KERNELS for every vLLM process
    gptq_kernel: str | None = None  # the kernel vLLM must log for AutoGPTQLinearMethod (checked on GPUs)

    @property
    def checkpoint(self) -> str:  # formats that differ only in how vLLM runs them share a checkpoint
        return self.name if self.kind == "kbit" else self.kind


FORMATS = {f.name: f for f in (
    Format("fp16", "fp16"),
    Format("kbit2", "kbit", bits=2),
    Format("kbit2-lmhead", "kbit", bits=2, lm_head=True),
    Format("kbit3", "kbit", bits=3),
    Format("kbit4", "kbit", bits=4),
    Format("kbit4-lmhead", "kbit", bits=4, lm_head=True),
    Format("kbit5", "kbit", bits=5),
    Format("gptq-machete", "gptq", gptq_kernel="MacheteLinearKernel"),  # vLLM's default on Hopper
    Format("gptq-marlin", "gptq", disabled_kernels="MacheteLinearKernel", gptq_kernel="MarlinLinearKernel"),
)}
BASELINE = "fp16"
EAGER_FORMATS = ("kbit4",)  # measured again with --enforce-eager at batch 1 (mode "latency_eager")

# Model shapes. "tiny" is for CPU checks of this script: its vocab holds every SmolLM2 token id and, like
# Llama-3's, more ids than the tokenizer knows, which a random model generates.
SHAPES = {
    "llama3-8b": ("Llama-3-8B", rc.LLAMA3_8B),
    "tiny": ("tiny-llama", rc.LlamaShape(256, 512, 2, 4, 2, 65536, max_position_embeddings=2048)),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Levels:
    formats: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    concurrency: tuple[int, ...]
    latency_iters: tuple[int, int]  # (warm-up, timed) iterations of `vllm bench latency`
    prompts_per_user: int  # `vllm bench serve` sends max(MIN_PROMPTS, prompts_per_user * C) prompts


FULL = Levels(tuple(FORMATS), (1, 4, 16), (1, 4, 16, 64), (3, 10), 4)
QUICK = Levels(("fp16", "kbit4", "kbit2", "gptq-marlin"), (1,), (1, 4, 64), (2, 5), 2)  # enough for the targets
MIN_PROMPTS = 8
# Every engine, latency or serve, runs with the same --max-num-seqs (64, or the largest level if larger):
# CUDA graphs are captured up to twice that, and one torch.compile cache entry serves all runs of a format.
MIN_ENGINE_SEQS = 64


def engine_max_num_seqs(levels: Levels) -> int:
    return max(MIN_ENGINE_SEQS, *levels.batch_sizes, *levels.concurrency)

# `vllm bench <latency|serve> ARGS` as vLLM's CLI runs it (cli/benchmark/{latency,serve}.py: add_cli_args,
# then main; cli_env_setup as cli/main.py does), without the `vllm` script's version lookup.
VLLM_BENCH = ("import importlib, sys\n"
              "from vllm.entrypoints.serve.utils.api_utils import cli_env_setup\n"
              "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
              "bench = importlib.import_module('vllm.benchmarks.' + sys.argv[1])\n"
              "cli_env_setup()\n"
              "parser = FlexibleArgumentParser()\n"
              "bench.add_cli_args(parser)\n"
              "bench.main(parser.parse_args(sys.argv[2:]))\n")
# `vllm bench latency` once per run in argv[1] (a JSON list of extra arguments), all on one engine: vLLM's
# latency main as above, with LLM.from_engine_args returning the engine that the first run built (its engine
# arguments are the same in every run). A vLLM engine start costs about 100 s on the GPU machines (imports,
# engine process, compile cache, graph capture): six of them per format cost more than the measurements.
VLLM_LATENCY_RUNS = ("import json, sys\n"
                     "from vllm import LLM\n"
                     "from vllm.benchmarks import latency\n"
                     "from vllm.entrypoints.serve.utils.api_utils import cli_env_setup\n"
                     "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
                     "engines, build = [], LLM.from_engine_args\n"
                     "def one_engine(cls, engine_args, **kwargs):\n"
                     "    if not engines:\n"
                     "        engines.append(build(engine_args, **kwargs))\n"
                     "    return engines[0]\n"
                     "LLM.from_engine_args = classmethod(one_engine)\n"
                     "cli_env_setup()\n"
                     "parser = FlexibleArgumentParser()\n"
                     "latency.add_cli_args(parser)\n"
                     "for run in json.loads(sys.argv[1]):\n"
                     "    latency.main(parser.parse_args(sys.argv[2:] + run))\n")
GPTQ_KERNEL_LOG = re.compile(r"Using (\w+) for AutoGPTQLinearMethod")


class BenchError(RuntimeError):
    """A failed vLLM run or measurement: the run stops, records measured so far are kept."""


# ---------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------


def _write_checkpoint(out: Path, fmt_name: str, shape_key: str, dtype_name: str, tokenizer_dir: Path) -> None:
    fmt, shape, dtype = FORMATS[fmt_name], SHAPES[shape_key][1], DTYPES[dtype_name]
    if fmt.kind == "fp16":
        rc.write_random_llama(out, shape, dtype, tokenizer_dir=tokenizer_dir)
    elif fmt.kind == "kbit":
        rc.write_random_kbit_llama(out, shape, fmt.bits, dtype, tokenizer_dir=tokenizer_dir,
                                   quantize_lm_head=fmt.lm_head)
    else:
        rc.write_random_gptq_llama(out, shape, dtype, tokenizer_dir=tokenizer_dir)


def ensure_checkpoint(fmt: Format, args) -> Path:
    """The format's checkpoint under --work-dir/checkpoints, built unless there already; deletes the others."""
    root = args.work_dir / "checkpoints"
    path = root / f"{args.shape}-{fmt.checkpoint}-{args.dtype}"
    if path.is_dir():
        return path
    root.mkdir(parents=True, exist_ok=True)
    for other in root.iterdir():  # the disk holds one Llama-3-8B checkpoint at a time
        shutil.rmtree(other)
    return build_in_child(path, _write_checkpoint, (fmt.name, args.shape, args.dtype, args.tokenizer_dir))


def build_in_child(path: Path, write, write_args: tuple) -> Path:
    """``write(out_dir, *write_args)`` in a child process, into a temporary directory renamed to ``path`` when
    complete (a killed build is never reused). The child keeps this process from creating a CUDA context that
    would hold GPU memory while vLLM runs."""
    partial = path.with_name(f".{path.name}.partial")
    start = time.time()
    child = multiprocessing.get_context("spawn").Process(target=write, args=(partial, *write_args))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise BenchError(f"writing {path.name} failed (exit code {child.exitcode})")
    partial.rename(path)
    size = sum(f.stat().st_size for f in path.iterdir()) / 2**30
    log(f"built {path} ({size:.1f} GiB) in {time.time() - start:.0f} s")
    return path


# ---------------------------------------------------------------------------------------------------
# Running vLLM
# ---------------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {message}", flush=True)


def gpu_name() -> str:
    """torch.cuda.get_device_name(), lower case, spaces as '-'; "cpu" without a GPU. Asked in a child
    process, so that this one creates no CUDA context."""
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
    name = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return name.strip().lower().replace(" ", "-")


def vllm_env(fmt: Format | None = None) -> dict[str, str]:
    # Unbuffered: vLLM's log lines reach the log file at once (the GPTQ kernel check reads them).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    if fmt is not None and fmt.disabled_kernels:
        env["VLLM_DISABLED_KERNELS"] = fmt.disabled_kernels
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL, to the process group that `proc` leads (it and the engine processes it started)."""
    for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], env: dict[str, str], log_path: Path, timeout: float) -> None:
    """Run a vLLM command with its output in log_path; BenchError with the log's tail if it fails or times out."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        out.write(shlex.join(cmd) + "\n\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=VLLM_CWD,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process_group(proc)
            raise BenchError(f"timed out after {timeout:.0f} s: {log_path}\n{log_tail(log_path)}") from None
        except BaseException:  # SIGTERM (see _exit_on_sigterm) or Ctrl-C: the vLLM processes go too
            stop_process_group(proc)
            raise
    if code != 0:
        raise BenchError(f"exit code {code}: {log_path}\n{log_tail(log_path)}")


def check_gptq_kernel(fmt: Format, log_path: Path, gpu: str) -> None:
    """On a GPU, a GPTQ format must have run the kernel it is named after."""
    if fmt.gptq_kernel is None or gpu == "cpu":
        return
    used = set(GPTQ_KERNEL_LOG.findall(log_path.read_text(errors="replace")))
    if used != {fmt.gptq_kernel}:
        hint = "; vLLM runs Machete on Hopper GPUs only" if fmt.gptq_kernel == "MacheteLinearKernel" else ""
        raise BenchError(f"{fmt.name} should run {fmt.gptq_kernel}, but vLLM logged {sorted(used) or 'none'} "
                         f"({log_path}){hint}")


class VllmServer:
    """`vllm serve` (the api_server module, which both vLLM builds ship) on 127.0.0.1, as a context manager."""

    def __init__(self, model: Path, served_name: str, env: dict[str, str], log_path: Path,
                 server_args: list[str], timeout: float):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                    "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port),
                    "--disable-uvicorn-access-log", *server_args]
        self.env, self.log_path, self.timeout = env, log_path, timeout

    def __enter__(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self._log.write(shlex.join(self.cmd) + "\n\n")
        self._log.flush()
        # A new session: the server and the engine processes it starts form one group that stop() ends.
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=VLLM_CWD, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"vllm serve exited with code {self.proc.returncode}: {self.log_path}\n"
                                 f"{log_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        raise BenchError(f"vllm serve not ready after {self.timeout:.0f} s: {self.log_path}\n"
                         f"{log_tail(self.log_path)}")

    def __exit__(self, *exc) -> None:
        stop_process_group(self.proc)
        self._log.close()


# ---------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------


def bench_latency(model: Path, runs: list[tuple[int, int]], eager: bool, fmt: Format, args,
                  gpu: str) -> dict[tuple[int, int], float]:
    """Mean seconds of one `vllm bench latency` batch for each (batch size, output length) in runs."""
    tag = f"{args.shape}-{fmt.name}{'-eager' if eager else ''}"
    results = {run: args.work_dir / "raw" / f"latency-{tag}-b{run[0]}-out{run[1]}.json" for run in runs}
    warmup, iters = args.levels.latency_iters
    per_run = [["--batch-size", str(batch), "--output-len", str(output_len), "--output-json", str(result)]
               for (batch, output_len), result in results.items()]
    cmd = [sys.executable, "-c", VLLM_LATENCY_RUNS, json.dumps(per_run), "--model", str(model),
           "--input-len", str(args.input_len), "--num-iters-warmup", str(warmup), "--num-iters", str(iters),
           "--disable-detokenize", "--max-num-seqs", str(engine_max_num_seqs(args.levels))]
    if eager:
        cmd.append("--enforce-eager")
    for result in results.values():
        result.parent.mkdir(parents=True, exist_ok=True)
        result.unlink(missing_ok=True)
    log_path = args.work_dir / "logs" / f"latency-{tag}.log"
    run_logged(cmd + args.vllm_args, vllm_env(fmt), log_path, args.timeout * len(runs))
    check_gptq_kernel(fmt, log_path, gpu)
    return {run: json.loads(result.read_text())["avg_latency"] for run, result in results.items()}


def measure_latency(fmt: Format, model: Path, args, gpu: str) -> None:
    eager = fmt.name in EAGER_FORMATS and not args.no_eager
    modes = [("latency", False, args.levels.batch_sizes)] + ([("latency_eager", True, (1,))] if eager else [])
    for mode, eager, batch_sizes in modes:
        latency = bench_latency(model, [(b, n) for b in batch_sizes for n in (args.output_len, 1)], eager, fmt,
                                args, gpu)
        for batch in batch_sizes:
            full, first = latency[batch, args.output_len], latency[batch, 1]
            record = make_record(args, gpu, fmt, mode, batch, tpot_ms=(full - first) / (args.output_len - 1) * 1e3,
                                 ttft_ms=first * 1e3, output_tok_s=batch * args.output_len / full)
            save_record(record, args)


def measure_serve(fmt: Format, model: Path, args, gpu: str) -> None:
    levels = args.levels.concurrency
    # No prefix caching, as `vllm bench latency` defaults: every level draws its prompts with the same seed,
    # so a later level would otherwise find the prompts of an earlier one cached and skip their prefill.
    server_args = ["--max-num-seqs", str(engine_max_num_seqs(args.levels)), "--no-enable-prefix-caching",
                   *args.vllm_args]
    server_log = args.work_dir / "logs" / f"server-{args.shape}-{fmt.name}.log"
    with VllmServer(model, fmt.name, vllm_env(fmt), server_log, server_args, args.timeout) as server:
        log(f"{fmt.name}: vllm serve ready on {server.base_url}")
        check_gptq_kernel(fmt, server_log, gpu)
        for users in levels:
            prompts = max(MIN_PROMPTS, args.levels.prompts_per_user * users)
            tag = f"{args.shape}-{fmt.name}-c{users}"
            result_dir = args.work_dir / "raw"
            result_dir.mkdir(parents=True, exist_ok=True)
            (result_dir / f"serve-{tag}.json").unlink(missing_ok=True)
            cmd = [sys.executable, "-c", VLLM_BENCH, "serve", "--backend", "openai", "--base-url", server.base_url,
                   "--endpoint", "/v1/completions", "--model", fmt.name, "--tokenizer", str(model),
                   "--dataset-name", "random", "--random-input-len", str(args.input_len),
                   "--random-output-len", str(args.output_len), "--random-range-ratio", "0.0", "--ignore-eos",
                   "--num-prompts", str(prompts), "--max-concurrency", str(users), "--num-warmups", str(users),
                   "--temperature", "1.0",  # as `vllm bench latency` samples
                   "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99", "--seed", "0",
                   "--disable-tqdm", "--save-result", "--result-dir", str(result_dir),
                   "--result-filename", f"serve-{tag}.json"]
            run_logged(cmd, vllm_env(fmt), args.work_dir / "logs" / f"serve-{tag}.log", args.timeout)
            result = json.loads((result_dir / f"serve-{tag}.json").read_text())
            if result["failed"] or result["completed"] != prompts:
                raise BenchError(f"{fmt.name} at {users} users: {result['failed']} failed, "
                                 f"{result['completed']} of {prompts} completed ({server_log})")
            save_record(make_record(args, gpu, fmt, "serve", users, tpot_ms=result["mean_tpot_ms"],
                                    ttft_ms=result["mean_ttft_ms"], output_tok_s=result["output_throughput"]), args)


def make_record(args, gpu: str, fmt: Format, mode: str, concurrency: int, **values: float) -> dict:
    return {"gpu": gpu, "model": SHAPES[args.shape][0], "format": fmt.name, "mode": mode,
            "concurrency": concurrency, **{k: round(v, 4) for k, v in values.items()}}


def record_key(r: dict) -> tuple:
    return r["gpu"], r["model"], r["format"], r["mode"], r["concurrency"]


def records_path(out: Path, gpu: str) -> Path:
    return out / f"serve-{gpu}.json"


def save_record(record: dict, args) -> None:
    path = records_path(args.out, record["gpu"])
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if record_key(r) != record_key(record)] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    tmp.replace(path)
    log(f"{record['format']} {record['mode']} @{record['concurrency']}: TPOT {record['tpot_ms']:.2f} ms, "
        f"TTFT {record['ttft_ms']:.1f} ms, {record['output_tok_s']:.1f} output tok/s")


# ---------------------------------------------------------------------------------------------------
# Report: tables (ratios vs fp16, targets) and the plot
# ---------------------------------------------------------------------------------------------------

MODE_TITLES = {"latency": "Latency: one batch (`vllm bench latency`)",
               "serve": "Serving: concurrent users (`vllm bench serve` against `vllm serve`)"}
# (name, mode, concurrency (None: every level up to 64), format ("kbit*": every k), metric, bound, strict):
# the worst speedup over fp16 among the cases must be >= bound (> bound if strict).
TARGETS = (
    ("batch-1 TPOT, kbit k=4 vs fp16", "latency", 1, "kbit4", "tpot_ms", 2.2, False),
    ("batch-1 TPOT, kbit k=2 vs fp16", "latency", 1, "kbit2", "tpot_ms", 3.0, False),
    ("batch-1 TPOT, kbit k=4 with its lm_head quantized too, vs fp16", "latency", 1, "kbit4-lmhead", "tpot_ms", 2.2,
     False),
    ("batch-1 TPOT, kbit k=2 with its lm_head quantized too, vs fp16", "latency", 1, "kbit2-lmhead", "tpot_ms", 3.0,
     False),
    ("4 users, output tok/s, kbit k=4 vs fp16", "serve", 4, "kbit4", "output_tok_s", 1.8, False),
    ("kbit ahead of fp16 in output tok/s up to 64 users (worst k and level)", "serve", None, "kbit*",
     "output_tok_s", 1.0, True),
)


class Results:
    def __init__(self, records: list[dict]):
        self.by_key = {(r["model"], r["format"], r["mode"], r["concurrency"]): r for r in records}
        self.gpu = records[0]["gpu"] if records else "unknown GPU"
        self.models = list(dict.fromkeys(r["model"] for r in records))
        self.formats = [f for f in FORMATS if any(r["format"] == f for r in records)]

    def value(self, model, fmt, mode, users, metric) -> float | None:
        record = self.by_key.get((model, fmt, mode, users))
        return None if record is None else record[metric]

    def speedup(self, model, fmt, mode, users, metric) -> float | None:
        """Over fp16: fp16 TPOT / TPOT, or throughput / fp16 throughput."""
        base, value = (self.value(model, f, mode, users, metric) for f in (BASELINE, fmt))
        if base is None or value is None:
            return None
        return base / value if metric.endswith("_ms") else value / base

    def levels(self, model, mode) -> list[int]:
        return sorted({c for m, _, md, c in self.by_key if m == model and md == mode})


def _x(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def metric_table(res: Results, model: str, mode: str, metric: str, title: str, unit: str):
    header = ["users" if mode == "serve" else "batch"] + res.formats
    rows = []
    for users in res.levels(model, mode):
        row = [str(users)]
        for fmt in res.formats:
            value = res.value(model, fmt, mode, users, metric)
            with_ratio = fmt != BASELINE and metric != "ttft_ms"
            ratio = f" ({_x(res.speedup(model, fmt, mode, users, metric))})" if with_ratio else ""
            row.append("–" if value is None else f"{value:.2f}{ratio}")
        rows.append(row)
    note = f"{unit}; in brackets: speedup over fp16" if metric != "ttft_ms" else unit
    return (f"{model}: {title}", header, rows, note)


def eager_table(res: Results, model: str):
    header = ["format", "TPOT, CUDA graphs (ms)", "TPOT, --enforce-eager (ms)", "host time per step hidden (ms)"]
    rows = []
    for fmt in EAGER_FORMATS:
        graphs, eager = (res.value(model, fmt, mode, 1, "tpot_ms") for mode in ("latency", "latency_eager"))
        if eager is not None:
            hidden = "–" if graphs is None else f"{eager - graphs:.2f}"
            rows.append([fmt, "–" if graphs is None else f"{graphs:.2f}", f"{eager:.2f}", hidden])
    return (f"{model}: batch-1 decode step, CUDA graphs vs eager", header, rows,
            "eager TPOT minus graphed TPOT: the host time per decode step (Python, launches) that CUDA graphs hide")


def target_table(res: Results, model: str):
    header = ["target", "required", "measured", "result"]
    rows = []
    for name, mode, users, fmt, metric, bound, strict in TARGETS:
        formats = [f for f in res.formats if f.startswith("kbit")] if fmt == "kbit*" else [fmt]
        levels = [u for u in res.levels(model, mode) if u <= 64] if users is None else [users]
        cases = [(s, f"{f} @{u}") for f in formats for u in levels
                 if (s := res.speedup(model, f, mode, u, metric)) is not None]
        required = f"{'>' if strict else '>='} {bound:.1f}x"
        if not cases:
            rows.append([name, required, "no data", "n/a"])
            continue
        worst, where = min(cases)
        ok = worst > bound if strict else worst >= bound
        rows.append([name, required, _x(worst) + (f" ({where})" if len(cases) > 1 else ""), "PASS" if ok else "FAIL"])
    return (f"{model}: targets", header, rows, None)


def sections(res: Results) -> list:
    out = []
    for model in res.models:
        for mode in ("latency", "serve"):
            if not res.levels(model, mode):
                continue
            out.append(metric_table(res, model, mode, "tpot_ms", f"{MODE_TITLES[mode]}, TPOT", "ms per output token"))
            out.append(metric_table(res, model, mode, "output_tok_s", f"{MODE_TITLES[mode]}, output tokens/s",
                                    "output tokens per second, all users together"))
            out.append(metric_table(res, model, mode, "ttft_ms", f"{MODE_TITLES[mode]}, TTFT",
                                    "ms to the first token (latency mode: the whole batch's prefill)"))
        if res.levels(model, "latency_eager"):
            out.append(eager_table(res, model))
        out.append(target_table(res, model))
    return out


def plot_results(res: Results, png_path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        log(f"matplotlib is not installed: {png_path} not written (pip install matplotlib; then the report command)")
        return False
    matplotlib.use("Agg")  # files only; no display on benchmark machines
    import matplotlib.pyplot as plt

    panels = [(model, mode) for model in res.models for mode in ("latency", "serve") if res.levels(model, mode)]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 2, figsize=(11, 4 * len(panels)), squeeze=False)
    colors = plt.get_cmap("tab10")
    for row, (model, mode) in enumerate(panels):
        for col, (metric, label) in enumerate((("tpot_ms", "TPOT (ms)"), ("output_tok_s", "output tokens/s"))):
            ax = axes[row][col]
            for i, fmt in enumerate(res.formats):
                for series_mode, style in ((mode, "-o"), ("latency_eager", "x")):
                    if series_mode == "latency_eager" and mode != "latency":
                        continue
                    points = [(u, v) for u in res.levels(model, series_mode)
                              if (v := res.value(model, fmt, series_mode, u, metric)) is not None]
                    if points:
                        name = fmt if series_mode == mode else f"{fmt} --enforce-eager"
                        ax.plot(*zip(*points), style, color=colors(i), label=name, markersize=5 if style == "-o" else 9)
            ax.set_xscale("log", base=2)
            low, high = ax.get_ylim()
            if low > 0 and high / low > 4:  # the eager TPOT, ~8x the graphed ones, would flatten them on a linear axis
                ax.set_yscale("log")
                for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                    axis_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 3, 4, 6, 10, 20: not 2 x 10^1
            levels = res.levels(model, mode)
            ax.set_xticks(levels, [str(u) for u in levels])
            ax.set_xlabel("concurrent users" if mode == "serve" else "batch size")
            ax.set_ylabel(label)
            ax.set_title(f"{model}, {mode}: {label}", fontsize=10)
            ax.grid(True, alpha=0.3)
        axes[row][0].legend(fontsize=8)
    fig.suptitle(f"vLLM serving benchmark: {png_path.stem.removeprefix('serve-')}", fontsize=11)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return True


def render(records: list[dict], json_path: Path) -> str:
    """Write <stem>.png and <stem>.md next to json_path; return the text tables."""
    res = Results(records)
    png_path, md_path = json_path.with_suffix(".png"), json_path.with_suffix(".md")
    drawn = plot_results(res, png_path)
    # Titled by the file's name, not only the GPU: a GPU can have several records files (runs on other machines).
    page_title = f"Serving benchmark: {json_path.stem.removeprefix('serve-')}"
    parts = [f"# {page_title}", ""] + ([f"![TPOT and output tokens/s]({png_path.name})", ""] if drawn else [])
    text = [page_title]
    for title, header, rows, note in sections(res):
        parts += [f"## {title}", "", plot.markdown_table(header, rows) if rows else "(no data)", ""]
        parts += [note, ""] if note else []
        text += [f"\n{title}\n{'=' * len(title)}", plot.text_table(header, rows) if rows else "(no data)"]
    md_path.write_text("\n".join(parts))
    return "\n".join(text) + f"\n\nwrote {md_path}" + (f" and {png_path}" if drawn else "")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------


def int_list(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def format_list(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    return names


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "latency", "serve", "all", "report"),
                        help="all: latency, then serve, for each format (one checkpoint build per format)")
    parser.add_argument("records", nargs="*", type=Path, help="report: serve-<gpu>.json files (default: all in --out)")
    parser.add_argument("--formats", type=format_list, help=f"comma-separated, from {', '.join(FORMATS)} "
                        f"(default: all; --quick: {','.join(QUICK.formats)})")
    parser.add_argument("--batch-sizes", type=int_list, help="latency (default 1,4,16; --quick 1)")
    parser.add_argument("--concurrency", type=int_list, help="serve (default 1,4,16,64; --quick 1,4,64)")
    parser.add_argument("--quick", action="store_true", help="fewer formats, levels, iterations and prompts")
    parser.add_argument("--work-dir", "--model-dir", type=Path, default=Path("/tmp/kbit-serve-bench"),
                        help="checkpoints, logs and vLLM's raw results (default /tmp/kbit-serve-bench)")
    parser.add_argument("--tokenizer-dir", type=Path, default=REPO / "models" / "smollm2-135m-bf16",
                        help="tokenizer files copied into every checkpoint (default: the SmolLM2 checkpoint)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="records, PNG, markdown")
    parser.add_argument("--shape", choices=tuple(SHAPES), default="llama3-8b")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="every checkpoint's 16-bit dtype")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds for each vLLM server start, `bench serve` level or latency run")
    parser.add_argument("--vllm-args", type=shlex.split, default=[],
                        help="extra engine options for every vLLM run, e.g. --vllm-args='--enforce-eager'")
    parser.add_argument("--no-eager", action="store_true",
                        help=f"skip the --enforce-eager latency runs of {', '.join(EAGER_FORMATS)}")
    args = parser.parse_args(argv)
    # absolute: vLLM runs in VLLM_CWD
    args.work_dir, args.tokenizer_dir, args.out = (p.resolve() for p in (args.work_dir, args.tokenizer_dir, args.out))
    base = QUICK if args.quick else FULL
    args.levels = Levels(args.formats or base.formats, args.batch_sizes or base.batch_sizes,
                         args.concurrency or base.concurrency, base.latency_iters, base.prompts_per_user)
    if args.command != "report" and not args.tokenizer_dir.is_dir():
        parser.error(f"--tokenizer-dir {args.tokenizer_dir} is not a directory")
    if args.output_len < 2:
        parser.error("--output-len must be at least 2 (TPOT needs two tokens)")
    return args


def _exit_on_sigterm(signum, frame) -> None:
    # `timeout` and job control send SIGTERM: exit through the context managers, so that a running vLLM
    # server (VllmServer.__exit__) and vLLM commands (run_logged) are stopped, not left holding the GPU.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if args.command == "report":
        for path in args.records or sorted(args.out.glob("serve-*.json")):
            print(render(json.loads(path.read_text()), path))
        return 0
    gpu = gpu_name()
    start = time.time()
    try:
        for fmt in (f for name, f in FORMATS.items() if name in args.levels.formats):
            model = ensure_checkpoint(fmt, args)
            if args.command in ("latency", "all"):
                measure_latency(fmt, model, args, gpu)
            if args.command in ("serve", "all"):
                measure_serve(fmt, model, args, gpu)
            log(f"{fmt.name} done, {time.time() - start:.0f} s into the run")
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    finally:
        path = records_path(args.out, gpu)
        if args.command != "build" and path.exists():
            print(render(json.loads(path.read_text()), path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
