#!/usr/bin/env bash
# Create an isolated environment (.venv) with everything mmseg_proto needs, CPU only: the
# known-good set in requirements/constraints.txt (torch 2.13.0, mmcv 2.1.0 built with its
# compiled ops, mmengine 0.10.7, mmsegmentation 1.2.2), openmim, and mmseg_proto in editable
# mode. Every pip call gets `-c requirements/constraints.txt`, so nothing can move setuptools
# to 81+ (no pkg_resources, which mmcv's setup.py imports).
#
# mmcv is built from its sdist once per set of build inputs (mmcv, Python, torch and
# setuptools versions, compiler, build flags) and the wheel is kept under pip's cache directory
# in a folder named by the hash of those inputs: a change to any of them builds from source
# again, in this very run, instead of reusing a wheel built under other conditions (pip's own
# wheel cache is keyed by the sdist alone). An empty PIP_CACHE_DIR therefore means a full build.
#
# Usage: bash tools/setup_env.sh            (VENV=path to override .venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
CONSTRAINTS="$ROOT/requirements/constraints.txt"
MMCV_VERSION=2.1.0
START=$(date +%s)

step() { echo "[setup_env] $*"; }
die() { echo "[setup_env] ERROR: $*" >&2; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create a venv with $PYTHON"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -c "$CONSTRAINTS")

"$PY" -c "import sys; assert sys.version_info[:2] >= (3, 8)" \
  || die "Python >= 3.8 is required"

step "build tools (setuptools < 81, from $CONSTRAINTS)"
"$PY" -m pip install -q --disable-pip-version-check "pip>=23" || die "could not upgrade pip"
"${PIP[@]}" -q setuptools wheel ninja || die "could not install build tools"

step "torch 2.13.0 (CPU)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || "${PIP[@]}" torch || die "could not install torch==2.13.0"

mmcv_build_key() {
  # Everything the from-source mmcv build depends on; the wheel is reused only when all match.
  {
    echo "mmcv=$MMCV_VERSION flags=MMCV_WITH_OPS=1,FORCE_CUDA=0,--no-build-isolation"
    "$PY" -c "import sys, platform, torch, setuptools; print(sys.implementation.cache_tag, platform.machine(), torch.__version__, setuptools.__version__)"
    "${CC:-cc}" --version 2>/dev/null | head -n 1 || echo "no cc"
  } | sha256sum | cut -c1-16
}

step "mmcv $MMCV_VERSION with compiled ops"
if ! "$PY" -c "import mmcv, mmcv.ops; assert mmcv.__version__ == '$MMCV_VERSION'" 2>/dev/null; then
  "$PY" -c "import pkg_resources" 2>/dev/null || die "setuptools $("$PY" -c 'import setuptools; print(setuptools.__version__)') in $VENV has no pkg_resources, which mmcv's setup.py imports. Keep 'setuptools<81' in $CONSTRAINTS and pass it with -c to every pip call of this script (something upgraded setuptools after the pin)."
  WHEELS="$("$PY" -m pip cache dir 2>/dev/null || echo "$HOME/.cache/pip")/mmseg_proto-wheels/mmcv-$MMCV_VERSION-$(mmcv_build_key)"
  if ! ls "$WHEELS"/mmcv-*.whl >/dev/null 2>&1; then
    step "building mmcv $MMCV_VERSION from source into $WHEELS (about 8-9 min on 2 cores)"
    rm -rf "$WHEELS.tmp" && mkdir -p "$WHEELS.tmp"
    MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" -m pip wheel --disable-pip-version-check -c "$CONSTRAINTS" --no-build-isolation \
      --no-deps --no-cache-dir --no-binary mmcv -w "$WHEELS.tmp" "mmcv==$MMCV_VERSION" \
      || die "building mmcv $MMCV_VERSION failed (see above)"
    rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
  else
    step "reusing $WHEELS (built from source with the same inputs)"
  fi
  "$PY" -m pip uninstall -y -q mmcv mmcv-lite 2>/dev/null || true
  "${PIP[@]}" -q "$WHEELS"/mmcv-*.whl || die "could not install the mmcv wheel"
  "$PY" -c "import mmcv.ops" \
    || die "mmcv was built without its compiled ops (mmcv._ext missing): torch must be importable during the build. Delete $WHEELS and rerun."
fi

step "mmengine, mmsegmentation, openmim and mmseg_proto (editable)"
"${PIP[@]}" -q -e "$ROOT[openmmlab,tests]" || die "could not install mmseg_proto and its requirements"

step "checking the environment"
"$PY" - <<'PY' || die "environment check failed (see above)"
import pkg_resources  # noqa: F401  (mmengine's mmseg:: config resolution and mim need it)
import torch, mmcv, mmcv.ops, mmengine, mmseg, mmseg.models, mmseg_proto  # noqa: F401
print(f"torch {torch.__version__}, mmcv {mmcv.__version__} (ops ok), "
      f"mmengine {mmengine.__version__}, mmseg {mmseg.__version__}, mmseg_proto {mmseg_proto.__version__}")
PY
command -v "$VENV/bin/mim" >/dev/null || die "mim is missing from $VENV/bin"
step "done in $(( $(date +%s) - START )) s. Activate with: source $VENV/bin/activate"
