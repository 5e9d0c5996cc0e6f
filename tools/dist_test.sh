#!/usr/bin/env bash
# Distributed testing over torchrun: tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
# On a machine without CUDA the processes use the CPU and the gloo backend.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
DIR="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-python}
[ -x "$DIR/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$DIR/../.venv/bin/python"
# With CUDA: one process per GPU and NCCL (the config's env_cfg.dist_cfg); without: CPU processes and gloo
# (SafeRunner, mlla_mm/engine/runner.py). More processes than this node's GPUs is one error line.
if ! [[ "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: $(basename "$0"): GPUS must be a positive integer (processes on this node), got '$GPUS'" >&2; exit 2
fi
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) || NGPU=0
[[ "$NGPU" =~ ^[0-9]+$ ]] || NGPU=0
if (( NGPU > 0 )); then
  if (( GPUS > NGPU )); then
    echo "error: $(basename "$0"): $GPUS processes but this machine has $NGPU GPU(s) (one process per GPU)" >&2; exit 2
  fi
  echo "$(basename "$0"): $GPUS process(es) on $GPUS of $NGPU GPU(s), NCCL" >&2
else
  echo "$(basename "$0"): no CUDA: $GPUS CPU process(es), gloo" >&2
fi
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" \
  --nproc_per_node="$GPUS" --master_port="$PORT" "$DIR/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
