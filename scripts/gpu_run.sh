#!/usr/bin/env bash
# Developer script for the GPU machine (the `device` tool), run in the project root after the vLLM kit
# parts have arrived (see the developers' guide): builds vllm-kbit for the local GPU and runs the given
# pytest targets (default: every test that can use the GPU), writing logs to $OUT.
#   bash scripts/gpu_run.sh [pytest args...]
set -uo pipefail
source .gpukit/bin/env.sh || exit 1
out=${OUT:-/tmp/kbit-out}
mkdir -p "$out"
# Pure-Python wheels the image lacks (gguf, for the SmolLM2 converter), carried in .gpudata/whl.
if compgen -G ".gpudata/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/site .gpudata/whl/*.whl
fi
# The SmolLM2 GGUF travels in two parts (each call carries at most 64 MiB); reassemble it where
# vllm_kbit.smollm2 looks for a cached copy.
gguf=$HOME/.cache/vllm-kbit/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $gguf ]] && compgen -G "/tmp/gguf-parts/*" >/dev/null; then
  mkdir -p "$(dirname "$gguf")" && cat /tmp/gguf-parts/* > "$gguf"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
KBIT_CUDA_ARCHS=${KBIT_CUDA_ARCHS:-90} python3 -m pip install --no-build-isolation --no-deps -q . 2>&1 | tail -20
cd tests  # from here `vllm_kbit` is the installed package (with _C), not the source tree
python3 -c "import vllm, torch, vllm_kbit.ops as o; print('vllm', vllm.__version__, 'torch', torch.__version__, 'kernels', o.kernels_available())"
if [[ $# -eq 0 ]]; then
  set -- test_kernels_gpu.py test_kernel_layout.py test_compile.py test_plugin.py test_smollm2_vllm.py
fi
python3 -m pytest -q -rs -s "$@" 2>&1 | tee "$out/pytest.log"
