#!/usr/bin/env bash
# Install mmseg_proto into an environment that already has the OneDL MMSeg stack
# (onedl-mmsegmentation, onedl-mmcv, onedl-mmengine: the same mmseg/mmcv/mmengine modules
# under other distribution names), check that pip adds no OpenMMLab distribution on top of
# it, and run the whole test suite there. Versions: requirements/onedl-constraints.txt.
#
# Usage: bash tools/dev/check_onedl_stack.sh [pytest args]   (VENV=path, default .venv-onedl)
# The onedl-mmcv sdist builds its compiled ops on first use: about 8-10 min on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VENV:-$ROOT/.venv-onedl}"
CONSTRAINTS="$ROOT/requirements/onedl-constraints.txt"
START=$(date +%s)
step() { echo "[onedl] $*"; }
die() { echo "[onedl] ERROR: $*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV" || die "could not create $VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS")
"$PY" -m pip install -q --disable-pip-version-check "pip>=23"
step "build tools and torch"
"${PIP[@]}" setuptools wheel ninja torch
"$PY" -c "import pkg_resources" || die "setuptools without pkg_resources: keep setuptools<81 in $CONSTRAINTS"
step "the OneDL stack (onedl-mmcv builds from its sdist with torch present)"
"$PY" -c "import mmcv.ops" 2>/dev/null || MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" \
  "${PIP[@]}" --no-build-isolation onedl-mmcv || die "onedl-mmcv failed to build"
"${PIP[@]}" onedl-mmengine onedl-mmsegmentation
STACK=$(( $(date +%s) - START ))

step "mmseg_proto with its own requirements: pip must not add OpenMMLab's distributions"
"$PY" -m pip freeze --exclude-editable > "$VENV/before.txt"
"${PIP[@]}" -e "$ROOT[tests]" || die "installing mmseg_proto failed"
"$PY" -m pip freeze --exclude-editable > "$VENV/after.txt"
if grep -iE '^(mmsegmentation|mmcv|mmcv-lite|mmengine|mmengine-lite)==' "$VENV/after.txt"; then
  die "installing mmseg_proto added OpenMMLab distributions on top of OneDL's (above)"
fi
diff "$VENV/before.txt" "$VENV/after.txt" | grep -iE '^[<>] onedl' \
  && die "installing mmseg_proto changed a OneDL distribution (above)" || true
"$PY" - <<'PY'
from importlib.metadata import version
import mmcv, mmengine, mmseg, torch, mmseg_proto
print('[onedl] torch', torch.__version__, '| onedl-mmengine', version('onedl-mmengine'),
      '(mmengine', mmengine.__version__ + ') | onedl-mmcv', version('onedl-mmcv'),
      '(mmcv', mmcv.__version__ + ') | onedl-mmsegmentation', version('onedl-mmsegmentation'),
      '(mmseg', mmseg.__version__ + ') | mmseg_proto', mmseg_proto.__version__)
PY
step "stack ready in ${STACK} s; running the test suite"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
set +e
"$PY" -m pytest "$ROOT/tests" -q -p no:cacheprovider "$@"
rc=$?
step "done in $(( $(date +%s) - START )) s (pytest exit code $rc)"
exit $rc
