#!/usr/bin/env bash
# The test command the README gives: the whole suite, on CPU, with Triton kernels interpreted.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
exec python3 -m pytest -q -x --durations=15 "$@"
