#!/usr/bin/env bash
# Multi-process training on CPU (gloo + MMDistributedDataParallel).
# Usage: tools/dist_train_cpu.sh CONFIG NPROC [train args: --work-dir D --resume --cfg-options ...]
# Multi-machine: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=host PORT=29500 tools/dist_train_cpu.sh ...
# GPUs: use `mim train mmsegmentation CONFIG --launcher pytorch --gpus N` instead.
set -euo pipefail
if [ "$#" -lt 2 ]; then
    echo "usage: $0 CONFIG NPROC [--work-dir DIR] [--resume] [--cfg-options k=v ...]" >&2
    exit 2
fi
CONFIG=$1
NPROC=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
PYTHON=${PYTHON:-python}
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# One OpenMP thread per process unless asked otherwise (NPROC processes share the cores).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" --nproc_per_node="$NPROC" \
    -m mmseg_proto.tools.train "$CONFIG" --launcher pytorch "${@:3}"
