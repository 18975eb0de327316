#!/usr/bin/env bash
# The browser check of the prototype report (issue 22): installs Debian's chromium package if
# no Chromium is found, then runs the tests that open tools/analysis_tools/prototype_report.py's
# page (and explain_pixel.py's) from disk in headless Chromium: every <img> loaded
# (naturalWidth > 0), the rows and crops match gallery.json, and a screenshot is written.
# Here the tests fail, not skip, when Chromium is missing.
#
# Usage: bash tools/dev/check_report_browser.sh [pytest args]
#   PYTHON=path (default .venv/bin/python, else python3)
#   SCREENSHOT=file (default work_dirs/report_browser_check.png): where the screenshot is kept
#   CHROMIUM=path: a Chromium other than /usr/bin/chromium or chromium on PATH
# apt-get needs root (or sudo); it takes about a minute.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
step() { echo "[report-browser] $*"; }
die() { echo "[report-browser] ERROR: $*" >&2; exit 1; }

if [ -z "${CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null; then
  command -v apt-get >/dev/null || die "no Chromium and no apt-get: install Chromium and set CHROMIUM=path"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || die "installing chromium needs root or sudo"
    SUDO="sudo"
  fi
  step "installing Debian's chromium package"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
fi
step "$("${CHROMIUM:-chromium}" --version 2>/dev/null || /usr/bin/chromium --version)"

PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3
SHOT="${SCREENSHOT:-$ROOT/work_dirs/report_browser_check.png}"
mkdir -p "$(dirname "$SHOT")"
cd "$ROOT"
PROTO_REPORT_REQUIRE_BROWSER=1 PROTO_REPORT_SCREENSHOT="$SHOT" \
  "$PY" -m pytest tests/test_tools/test_prototype_report.py -q -p no:cacheprovider -rs \
  -k "headless_chromium or (explain_pixel_tool and not refuses)" "$@"
step "passed; screenshot of the report page: $SHOT"
