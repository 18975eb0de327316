#!/usr/bin/env bash
# Create an isolated environment (.venv) with everything mmseg_proto needs, CPU only:
# torch 2.13.0, mmcv 2.1.0 built with its compiled ops, mmengine, mmsegmentation 1.2.2,
# openmim, and mmseg_proto in editable mode. Idempotent: a second run reuses the venv and
# pip's cached mmcv wheel, and finishes in well under a minute.
#
# Usage: bash tools/setup_env.sh            (VENV=path to override .venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)

step() { echo "[setup_env] $*"; }
die() { echo "[setup_env] ERROR: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create a venv with $PYTHON"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check)

"$PY" -c "import sys; assert sys.version_info[:2] >= (3, 8)" \
  || die "Python >= 3.8 is required"

step "build tools (setuptools < 81: mmcv's and mmengine's code import pkg_resources)"
"${PIP[@]}" -q "pip>=23" "setuptools>=64,<81" wheel ninja || die "could not install build tools"

step "torch 2.13.0 (CPU)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || "${PIP[@]}" "torch==2.13.0" || die "could not install torch==2.13.0"

step "mmcv 2.1.0 with compiled ops (first build takes ~20 min on 2 cores; cached afterwards)"
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '2.1.0'" 2>/dev/null; then
  "$PY" -m pip uninstall -y -q mmcv mmcv-lite 2>/dev/null || true
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" --no-build-isolation "mmcv==2.1.0" || die "building mmcv 2.1.0 failed (see above)"
  "$PY" -c "import mmcv.ops" \
    || die "mmcv was installed without its compiled ops (mmcv._ext missing). Remove it from pip's cache ('$PY -m pip cache remove mmcv') and rerun: torch must be importable during the build."
fi

step "mmengine, mmsegmentation 1.2.2, openmim and mmseg_proto (editable)"
"${PIP[@]}" -q -e "$ROOT[tests]" || die "could not install mmseg_proto and its requirements"
# openmim can pull a newer setuptools; pin it back.
"${PIP[@]}" -q "setuptools>=64,<81" || die "could not pin setuptools"

step "checking the environment"
"$PY" - <<'PY' || die "environment check failed (see above)"
import torch, mmcv, mmcv.ops, mmengine, mmseg, mmseg.models, mmseg_proto  # noqa: F401
print(f"torch {torch.__version__}, mmcv {mmcv.__version__} (ops ok), "
      f"mmengine {mmengine.__version__}, mmseg {mmseg.__version__}, mmseg_proto {mmseg_proto.__version__}")
PY
command -v "$VENV/bin/mim" >/dev/null || die "mim is missing from $VENV/bin"
step "done in $(( $(date +%s) - START )) s. Activate with: source $VENV/bin/activate"
