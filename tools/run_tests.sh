#!/usr/bin/env bash
# The test command: set up (or reuse) .venv, then run the whole pytest suite on CPU.
# Extra arguments go to pytest, e.g. `bash tools/run_tests.sh -k sinkhorn`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash tools/setup_env.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
exec "$ROOT/.venv/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
