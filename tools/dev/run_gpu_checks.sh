#!/usr/bin/env bash
# The GPU checks and benchmarks, as one script for a lent CUDA machine (see docs/benchmarks.md,
# "GPU"). That machine has Python 3.12 with PyTorch (CUDA) but no MMSeg stack and no network:
# WHEELS holds the pure-Python wheels (mmengine, mmsegmentation and their missing needs,
# setuptools < 81) and mmcv's sdist, which is built there with its CPU ops (MMSeg imports
# mmcv.ops; none of our code runs an mmcv op). CAMVID is the full CamVid copy
# (../shared/data/camvid). Results go to OUT.
#
# Usage: bash tools/dev/run_gpu_checks.sh WHEELS CAMVID OUT
#
# WHEELS, prepared where pip can reach PyPI (Python 3.12 on the GPU machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d WHEELS mmengine==0.10.7 mmsegmentation==1.2.2 \
#     addict yapf platformdirs termcolor prettytable wcwidth ftfy "setuptools<81"
#   pip download --no-deps --no-binary=:all: -d WHEELS mmcv==2.1.0
set -uo pipefail
WHEELS="$1"; CAMVID="$2"; OUT="$3"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl || exit 1
start=$(date +%s)
mkdir -p /tmp/mmcv && tar xzf "$WHEELS"/mmcv-*.tar.gz -C /tmp/mmcv --strip-components 1
# CPU ops only (CUDA hidden while building): MMSeg needs mmcv._ext to import.
(cd /tmp/mmcv && CUDA_VISIBLE_DEVICES='' MMCV_WITH_OPS=1 MAX_JOBS=16 \
    python3 setup.py build_ext --inplace >"$OUT/mmcv_build.log" 2>&1) || {
    tail -30 "$OUT/mmcv_build.log"; exit 1; }
export PYTHONPATH="/tmp/site:/tmp/mmcv:$PWD"
echo "mmcv built in $(($(date +%s) - start)) s"
python3 -c "import torch, mmcv, mmcv.ops, mmseg, mmengine, mmseg_proto; \
print('torch', torch.__version__, 'mmcv', mmcv.__version__, 'mmseg', mmseg.__version__)" || exit 1

step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt" | grep -v -i warn | tail -40
}
step check_cuda 120 python3 tools/dev/check_cuda.py
step perf 200 python3 benchmarks/bench_protoseg_perf.py --repeats 15 --infer-repeats 31
step latency 150 python3 benchmarks/bench_inference_latency.py --device cuda --repeats 30
MMSEG_TOOLS=$(python3 -c "import mmseg, os; print(os.path.dirname(mmseg.__file__))")/.mim/tools
CFG=configs/protoseg/camvid/protoseg_segformer_mit-b0_1xb4-80it_camvid-160x160.py
for amp in "" "--amp"; do
    work=/tmp/demo${amp}
    step "train${amp}" 120 python3 "$MMSEG_TOOLS/train.py" "$CFG" --work-dir "$work" $amp
    step "test${amp}" 60 python3 "$MMSEG_TOOLS/test.py" "$CFG" "$work/iter_80.pth" \
        --work-dir "$work/test"
done
step camvid 240 python3 benchmarks/camvid_benchmark.py --data-root "$CAMVID" \
    --variants parametric protoseg --seeds 0 --threads 8 --out /tmp/camvid_gpu
cp /tmp/camvid_gpu/results.md "$OUT/camvid_results.md" 2>/dev/null
cp /tmp/camvid_gpu/records.json "$OUT/camvid_records.json" 2>/dev/null
echo "total $(($(date +%s) - start)) s"
