#!/usr/bin/env bash
# The main job: install (or reuse) the environment, then train ProtoSeg (SegFormer MiT-B0 +
# ProtoHead, from scratch) on the bundled CamVid subset with MMSeg's own tools through mim,
# and evaluate the final checkpoint with `mim test`, printing mIoU. A few minutes on 2 cores.
#
# Usage: bash tools/demo.sh [CONFIG]   (default: the ProtoSeg CamVid config)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG="${1:-configs/protoseg/camvid/protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py}"
WORK_DIR="${WORK_DIR:-work_dirs/demo/$(basename "$CONFIG" .py)}"

bash tools/setup_env.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

echo "[demo] training $CONFIG -> $WORK_DIR"
mim train mmsegmentation "$CONFIG" --work-dir "$WORK_DIR" </dev/null
CKPT="$WORK_DIR/$(cat "$WORK_DIR/last_checkpoint" | xargs basename)"
echo "[demo] evaluating $CKPT"
mim test mmsegmentation "$CONFIG" --checkpoint "$CKPT" --work-dir "$WORK_DIR/test" </dev/null
echo "[demo] done: logs and checkpoints in $WORK_DIR"
