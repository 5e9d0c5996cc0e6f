# Sourced by dist_train.sh and dist_test.sh: `dist_run TOOL GPUS [TOOL ARGS...]` starts GPUS processes of
# tools/TOOL over torchrun. With CUDA: one process per GPU and NCCL (the config's env_cfg.dist_cfg); without:
# CPU processes and gloo (SafeRunner, mlla_mm/engine/runner.py). More processes than this node's GPUs, or a
# count that is not a positive integer, is one error line (exit 2).
dist_run() {
  local tool=$1 gpus=$2
  shift 2
  local nnodes=${NNODES:-1} node_rank=${NODE_RANK:-0} port=${PORT:-29500} master_addr=${MASTER_ADDR:-127.0.0.1}
  local dir py ngpu name
  dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  name="$(basename "$0")"
  py=${PYTHON:-python}
  [ -x "$dir/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && py="$dir/../.venv/bin/python"
  if ! [[ "$gpus" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name: GPUS must be a positive integer (processes on this node), got '$gpus'" >&2; exit 2
  fi
  ngpu=$("$py" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null) \
    || ngpu=0
  [[ "$ngpu" =~ ^[0-9]+$ ]] || ngpu=0
  if (( ngpu > 0 )); then
    if (( gpus > ngpu )); then
      echo "error: $name: $gpus processes but this machine has $ngpu GPU(s) (one process per GPU)" >&2; exit 2
    fi
    echo "$name: $gpus process(es) on $gpus of $ngpu GPU(s), NCCL" >&2
  else
    echo "$name: no CUDA: $gpus CPU process(es), gloo" >&2
  fi
  exec "$py" -m torch.distributed.run --nnodes="$nnodes" --node_rank="$node_rank" --master_addr="$master_addr" \
    --nproc_per_node="$gpus" --master_port="$port" "$dir/$tool" "$@"
}
