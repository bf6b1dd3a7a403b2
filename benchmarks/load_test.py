"""Load test: concurrent users on a local vLLM endpoint for a fixed time, counting failed requests and
watching the server's memory for growth. Not part of the test suite.

    python benchmarks/load_test.py --model DIR [--config serving_configs/X.yaml] [--users 64] [--duration 600]
    python benchmarks/load_test.py --port 8000 [...]      # a server already listening on 127.0.0.1:8000

With --model, starts `vllm serve DIR` on 127.0.0.1 (the api_server module, as benchmarks/bench_serve.py does;
--config and --vllm-args are passed on) and stops it at the end. Requests only ever go to 127.0.0.1.

Each user sends one /v1/completions request at a time until --duration has passed: a prompt of random words,
max_tokens drawn from [16, --max-tokens], ignore_eos so that every request generates exactly that many tokens.
A request fails if it raises, times out (--request-timeout), returns an HTTP error or a different number of
tokens. No request starts after --duration; those in flight finish, each bounded by --request-timeout.

Every --sample-interval seconds: the resident memory (RSS) of the server process and all its descendants, and
the GPU memory in use (nvidia-smi; none on CPU-only machines). Growth is the mean of the last three samples
minus the mean of the first three taken after the warm-up (the first 10% of the run).

Writes --out/load-<gpu>.json (the summary and every sample). Exit code 0 only if no request failed, the
server still runs at the end, and neither memory grew by more than its --max-*-growth-mib.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

import bench_serve  # benchmarks/bench_serve.py, next to this script: the server launcher, the GPU name

WORDS = ("the", "model", "serves", "many", "users", "at", "once", "while", "memory", "stays", "flat", "and",
         "every", "request", "ends", "with", "exactly", "as", "tokens", "it", "asked", "for", "quantized",
         "weights", "blocks", "of", "thirty", "two", "codebook", "scale", "row", "kernel", "batch", "decode")
MIN_TOKENS = 16
WARMUP_FRACTION = 0.1
GROWTH_SAMPLES = 3
FAILURE_PAUSE_S = 1.0


class BadResponse(Exception):
    """An HTTP answer that is not a complete completion of the requested length."""


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.output_tokens = 0
        self.failures: list[str] = []

    @property
    def done(self) -> int:
        return len(self.latencies) + len(self.failures)


async def user(session: aiohttp.ClientSession, url: str, model: str, deadline: float, args, stats: Stats,
               rng: random.Random) -> None:
    while time.monotonic() < deadline:
        max_tokens = rng.randint(MIN_TOKENS, args.max_tokens)
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(8, args.prompt_words)))
        payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                   "temperature": 1.0}
        start = time.monotonic()
        try:
            async with session.post(url, json=payload) as response:
                body = await response.text()
                if response.status != 200:
                    raise BadResponse(f"HTTP {response.status}: {body[:300]}")
                got = json.loads(body)["usage"]["completion_tokens"]
                if got != max_tokens:
                    raise BadResponse(f"{got} tokens instead of {max_tokens}")
        except (aiohttp.ClientError, asyncio.TimeoutError, BadResponse, KeyError, ValueError) as e:
            stats.failures.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(FAILURE_PAUSE_S)  # a dead server must not turn the loop into a busy spin
            continue
        stats.latencies.append(time.monotonic() - start)
        stats.output_tokens += got


def gpu_memory_mib() -> float | None:
    """GPU memory in use on all GPUs (MiB), or None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30)
    return sum(float(line) for line in out.stdout.split()) if out.returncode == 0 else None


def tree_rss_mib(pid: int) -> float | None:
    """RSS of a process and all its descendants (vLLM's engine runs in child processes); None once it exited."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:  # ended between listing and reading
            pass
    return total / 2**20


def listening_pid(port: int) -> int:
    pids = {c.pid for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    if len(pids) != 1:
        raise SystemExit(f"load_test: expected one process listening on port {port}, found {sorted(pids) or 'none'}")
    return pids.pop()


async def sample(pid: int, start: float, stats: Stats) -> dict:
    gpu = await asyncio.to_thread(gpu_memory_mib)
    rss = tree_rss_mib(pid)
    return {"t_s": round(time.monotonic() - start, 1), "rss_mib": None if rss is None else round(rss, 1),
            "gpu_mib": gpu, "requests_done": stats.done}


async def sampler(pid: int, start: float, stats: Stats, samples: list[dict], interval: float,
                  stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(await sample(pid, start, stats))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass
    samples.append(await sample(pid, start, stats))  # after the load


async def served_model(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(f"{base_url}/v1/models") as response:
        return (await response.json())["data"][0]["id"]


async def run_load(base_url: str, pid: int, args) -> tuple[Stats, list[dict], float, str]:
    stats, samples, stop = Stats(), [], asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=args.users)) as session:
        model = await served_model(session, base_url)
        start = time.monotonic()
        deadline = start + args.duration
        watcher = asyncio.create_task(sampler(pid, start, stats, samples, args.sample_interval, stop))
        rngs = [random.Random(args.seed * 100003 + i) for i in range(args.users)]
        await asyncio.gather(*(user(session, f"{base_url}/v1/completions", model, deadline, args, stats, rng)
                               for rng in rngs))
        elapsed = time.monotonic() - start
        stop.set()
        await watcher
    return stats, samples, elapsed, model


def growth(samples: list[dict], key: str, warmup_s: float) -> dict | None:
    values = [s[key] for s in samples if s[key] is not None and s["t_s"] >= warmup_s]
    if len(values) < 2:
        return None
    n = min(GROWTH_SAMPLES, len(values) // 2)
    first, last = statistics.mean(values[:n]), statistics.mean(values[-n:])
    return {"first": round(first, 1), "last": round(last, 1), "max": max(values), "growth": round(last - first, 1)}


def summarize(stats: Stats, samples: list[dict], elapsed: float, model: str, base_url: str, args) -> dict:
    warmup_s = WARMUP_FRACTION * args.duration
    rss, gpu = growth(samples, "rss_mib", warmup_s), growth(samples, "gpu_mib", warmup_s)
    latencies = sorted(stats.latencies)
    server_alive = samples[-1]["rss_mib"] is not None
    passed = (server_alive and not stats.failures and latencies
              and (rss is None or rss["growth"] <= args.max_rss_growth_mib)
              and (gpu is None or gpu["growth"] <= args.max_gpu_growth_mib))
    return {
        "gpu": bench_serve.gpu_name(), "endpoint": base_url, "model": model,
        "checkpoint": str(args.model) if args.model else None, "users": args.users, "duration_s": args.duration,
        "elapsed_s": round(elapsed, 1), "server_alive_at_end": server_alive, "requests_ok": len(latencies),
        "requests_failed": len(stats.failures),
        "failures": stats.failures[:20], "output_tokens": stats.output_tokens,
        "output_tok_s": round(stats.output_tokens / elapsed, 1),
        "request_latency_s": {"p50": round(latencies[len(latencies) // 2], 3),
                              "p99": round(latencies[int(len(latencies) * 0.99)], 3),
                              "max": round(latencies[-1], 3)} if latencies else None,
        "rss_mib": rss, "gpu_mib": gpu, "max_rss_growth_mib": args.max_rss_growth_mib,
        "max_gpu_growth_mib": args.max_gpu_growth_mib, "passed": bool(passed), "samples": samples,
    }


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", type=Path, help="checkpoint directory: start `vllm serve` on it")
    target.add_argument("--port", type=int, help="use the server already listening on 127.0.0.1:PORT")
    parser.add_argument("--config", type=Path, help="with --model: a `vllm serve --config` YAML (serving_configs/)")
    parser.add_argument("--vllm-args", type=shlex.split, default=[],
                        help="with --model: more `vllm serve` options, e.g. --vllm-args='--enforce-eager'")
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--max-tokens", type=int, default=256, help=f"output tokens per request: {MIN_TOKENS}..this")
    parser.add_argument("--prompt-words", type=int, default=256, help="prompt length in words: 8..this")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--sample-interval", type=float, default=10, help="seconds between memory samples")
    parser.add_argument("--max-rss-growth-mib", type=float, default=256)
    parser.add_argument("--max-gpu-growth-mib", type=float, default=256)
    parser.add_argument("--server-timeout", type=float, default=600, help="seconds for `vllm serve` to get ready")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=bench_serve.REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    for name in ("model", "config"):  # absolute: vLLM runs in bench_serve.VLLM_CWD
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    if args.max_tokens < MIN_TOKENS:
        parser.error(f"--max-tokens must be at least {MIN_TOKENS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model:
        server_args = (["--config", str(args.config)] if args.config else []) + args.vllm_args
        log_path = Path(tempfile.mkdtemp(prefix="kbit-load-test-")) / "server.log"
        with bench_serve.VllmServer(args.model, "load-test", bench_serve.vllm_env(), log_path, server_args,
                                    args.server_timeout) as server:
            bench_serve.log(f"vllm serve ready on {server.base_url} (log {log_path})")
            stats, samples, elapsed, model = asyncio.run(run_load(server.base_url, server.proc.pid, args))
            base_url = server.base_url
    else:
        base_url = f"http://127.0.0.1:{args.port}"
        stats, samples, elapsed, model = asyncio.run(run_load(base_url, listening_pid(args.port), args))
    summary = summarize(stats, samples, elapsed, model, base_url, args)
    path = args.out / f"load-{summary['gpu']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")
    brief = {k: v for k, v in summary.items() if k not in ("samples", "failures")}
    print(json.dumps(brief, indent=1))
    for failure in summary["failures"]:
        print("failed:", failure)
    bench_serve.log(f"{'PASSED' if summary['passed'] else 'FAILED'}; wrote {path}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
