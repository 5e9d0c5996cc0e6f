#!/usr/bin/env bash
# Distributed testing over torchrun: tools/dist_test.sh CONFIG CHECKPOINT GPUS [test.py options]
# With CUDA one process per GPU and NCCL; without, the processes use the CPU and the gloo backend.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
source "$(dirname "$0")/dist_common.sh"
dist_run test.py "$GPUS" "$CONFIG" "$CHECKPOINT" --launcher pytorch "${@:4}"
