#!/usr/bin/env bash
# The long CamVid runs of docs/anomaly_maps.md and docs/benchmarks.md ("claims that hold beyond
# one setup"), as one script for a lent CUDA machine (16 CPU cores, one GPU), all runs at once:
#   - benchmarks/camvid_anomaly.py: car, pedestrian, sign and pole held out, seeds 0 1,
#     parametric and ProtoSeg, 1000 iterations (16 runs), each scored on val right after it
#     trains;
#   - benchmarks/camvid_benchmark.py: parametric and ProtoSeg K=10, seeds 0 1 2, 4000
#     iterations (6 runs).
# Every run is resumable (its record.json / anomaly.json is kept), so DEADLINE_S stops the
# training that is still going and the runs that finished come back in OUT/results.tar.gz
# (records and tables only; no checkpoints). Rebuild the tables here with
# `camvid_anomaly.py --report-only` / `camvid_benchmark.py` pointed at the unpacked folders.
#
# That machine has Python 3.12 with PyTorch (CUDA) but no MMSeg stack and no network: WHEELS
# holds the pure-Python wheels (mmengine, mmsegmentation and their missing needs) and mmcv's
# sdist (see run_gpu_checks.sh for how to download them). mmcv is used from its source tree
# without building its compiled ops: mmcv._ext is replaced by a module whose every function
# raises, so MMSeg imports, and a run that called an mmcv op would fail loudly (MiT, the
# SegFormer head, ProtoHead and the CamVid pipeline call none).
#
# Usage: bash tools/dev/run_gpu_claims.sh WHEELS CAMVID OUT [DEADLINE_S]
#   ANOMALY_ARGS (default: the 16 runs above) replaces camvid_anomaly.py's run selection, e.g.
#   ANOMALY_ARGS='--models protoseg --seeds 0' ; ACCURACY=0 skips the 4000-iteration runs.
set -uo pipefail
WHEELS="$1"; CAMVID="$(cd "$2" && pwd)"; OUT="$3"; DEADLINE_S="${4:-480}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
start=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    "$WHEELS"/*.whl || exit 1
mkdir -p /tmp/mmcv && tar xzf "$WHEELS"/mmcv-*.tar.gz -C /tmp/mmcv --strip-components 1
cat > /tmp/mmcv/mmcv/_ext.py <<'EOF'
"""Stand-in for mmcv's compiled ops (not built on this machine): every op raises."""


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)

    def op(*args, **kwargs):
        raise RuntimeError(f'mmcv op {name} was called, but mmcv ops are not built here')
    return op
EOF
export PYTHONPATH="/tmp/site:/tmp/mmcv:$PWD"
python3 -c "import torch, mmcv, mmseg, mmengine, mmseg.models, mmseg_proto; \
print('torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmseg', mmseg.__version__, \
torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt" || exit 1
echo "set-up $(($(date +%s) - start)) s"

left=$((DEADLINE_S - ($(date +%s) - start)))
timeout "$left" python3 benchmarks/camvid_anomaly.py --data-root "$CAMVID" --iters 1000 \
    --held-out car pedestrian sign pole ${ANOMALY_ARGS:---seeds 0 1 --jobs 16 --threads 16} --device cuda \
    --out /tmp/claims/anomaly > "$OUT/anomaly.log" 2>&1 &
anomaly=$!
[ "${ACCURACY:-1}" = 0 ] && accuracy_cmd=true || accuracy_cmd=python3
timeout "$left" $accuracy_cmd benchmarks/camvid_benchmark.py --data-root "$CAMVID" --iters 4000 \
    --variants parametric protoseg --seeds 0 1 2 --jobs 6 --threads 6 \
    --out /tmp/claims/camvid_4000 > "$OUT/camvid_4000.log" 2>&1 &
accuracy=$!
while kill -0 $anomaly 2>/dev/null || kill -0 $accuracy 2>/dev/null; do
    sleep 30
    echo "$(($(date +%s) - start)) s: $(ls /tmp/claims/*/work/*/record.json 2>/dev/null | wc -l) trained, $(ls /tmp/claims/*/work/*/anomaly.json 2>/dev/null | wc -l) scored"
done
wait $anomaly; echo "anomaly exit $?"; wait $accuracy; echo "camvid_4000 exit $?"
tail -n 5 "$OUT/anomaly.log" "$OUT/camvid_4000.log"
(cd /tmp/claims && find . \( -name 'record.json' -o -name 'anomaly.json' -o -name '*.md' \
    -o -name '*records.json' \) -print0 | tar czf "$OUT/results.tar.gz" --null -T -)
echo "total $(($(date +%s) - start)) s"
