#!/usr/bin/env bash
# The test suite: everything that can run on this machine (GPU tests skip without a GPU).
# Runs pytest from tests/ so that `vllm_kbit` resolves to the installed package (with its kernels),
# not to the source tree.
set -euo pipefail
cd "$(dirname "$0")/../tests"
exec python -m pytest -q -rs "$@" .
