#!/usr/bin/env bash
# Train on the GPUs of one host: one process drives all its visible GPUs (pmap over the local
# devices). With --num_nodes N > 1, run this once on each of N hosts, with the same --coordinator
# and --node_rank 0..N-1; the trainer then joins them through jax.distributed.
# Run with --help for the options; --dry-run prints the command without running it.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_host.sh --config=FILE --workdir=DIR [options] [-- TRAINER_ARGS...]

Runs in the foreground: python -m instdisc_jax.main --config=FILE --workdir=DIR [TRAINER_ARGS].

Required:
  --config=FILE          config file, e.g. configs/cifar10_resnet18.py
  --workdir=DIR          checkpoints and summaries (a local path, or gs://bucket/path)

Options:
  --gpus=LIST            GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --mem_fraction=F       XLA_PYTHON_CLIENT_MEM_FRACTION, the share of each GPU's memory JAX
                         preallocates (default 0.90: the process owns its GPUs; JAX's own default
                         is 0.75). An XLA_PYTHON_CLIENT_MEM_FRACTION already in the environment is
                         kept unless --mem_fraction is given.
  --num_nodes=N          hosts in the job (default 1)
  --node_rank=R          (N > 1) this host's rank, 0..N-1; rank 0 runs the coordinator
  --coordinator=H:P      (N > 1) host:port of rank 0, reachable from every host
  --python=PYTHON        Python interpreter (default python3)
  --module=MODULE        Python module to run (default instdisc_jax.main)
  --dry-run              print the command without running it
  -h, --help             this help

Examples:
  launch/gpu_host.sh --config=configs/cifar10_resnet18.py --workdir=/data/runs/idisc
  launch/gpu_host.sh --gpus=0,1 --config=configs/cifar10_resnet18.py --workdir=/tmp/cifar -- --config.batch_size=256
  # two hosts, on each (R = 0 or 1):
  launch/gpu_host.sh --num_nodes=2 --node_rank=R --coordinator=10.0.0.1:1234 \
      --config=configs/cifar10_resnet18.py --workdir=gs://my-bucket/idisc
EOF
}

OPT_config=""
OPT_workdir=""
OPT_gpus=""
OPT_mem_fraction=""
OPT_num_nodes="1"
OPT_node_rank=""
OPT_coordinator=""
OPT_python="python3"
OPT_module="instdisc_jax.main"
OPT_dry_run=0

# Read by parse_args (common.sh).
# shellcheck disable=SC2034
VALUE_OPTS=(config workdir gpus mem_fraction num_nodes node_rank coordinator python module)
# shellcheck disable=SC2034
FLAG_OPTS=(dry_run)

main() {
  parse_args "$@"
  DRY_RUN=$OPT_dry_run
  if ((${#POSITIONAL[@]} > 0)); then
    usage_error "unexpected argument '${POSITIONAL[0]}' (trainer arguments go after --)"
  fi
  require "$OPT_config" "--config (the config file, e.g. configs/cifar10_resnet18.py)"
  require "$OPT_workdir" "--workdir (a local path or gs://bucket/path for checkpoints and summaries)"

  local env_vars=()
  if [[ -n $OPT_gpus ]]; then
    if [[ ! $OPT_gpus =~ ^[0-9]+(,[0-9]+)*$ ]]; then
      usage_error "--gpus must be a comma-separated list of GPU indices, e.g. 0,1,2,3, got '$OPT_gpus'"
    fi
    env_vars+=("CUDA_VISIBLE_DEVICES=$OPT_gpus")
  fi
  local fraction=$OPT_mem_fraction
  if [[ -z $fraction ]]; then
    fraction=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
  fi
  if [[ ! $fraction =~ ^(0?\.[0-9]*[1-9][0-9]*|1|1\.0*)$ ]]; then
    usage_error "--mem_fraction must be a number in (0, 1], e.g. 0.9, got '$fraction'"
  fi
  env_vars+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$fraction")

  local distributed=()
  require_int "$OPT_num_nodes" --num_nodes 1
  if ((OPT_num_nodes > 1)); then
    require "$OPT_node_rank" "--node_rank (this host's rank, 0..$((OPT_num_nodes - 1)))"
    require "$OPT_coordinator" "--coordinator (host:port of the rank-0 host, e.g. 10.0.0.1:1234)"
    require_int "$OPT_node_rank" --node_rank 0
    if ((OPT_node_rank >= OPT_num_nodes)); then
      usage_error "--node_rank must be below --num_nodes ($OPT_num_nodes), got $OPT_node_rank"
    fi
    if [[ ! $OPT_coordinator =~ ^[^:[:space:]]+:[0-9]+$ ]]; then
      usage_error "--coordinator must be host:port, got '$OPT_coordinator'"
    fi
    distributed=("--coordinator_address=$OPT_coordinator" "--num_processes=$OPT_num_nodes"
      "--process_id=$OPT_node_rank")
    note "node $OPT_node_rank of $OPT_num_nodes, coordinator $OPT_coordinator"
  elif [[ -n $OPT_node_rank || -n $OPT_coordinator ]]; then
    usage_error "--node_rank and --coordinator need --num_nodes > 1"
  fi

  need_command "$OPT_python" "pass --python"
  note "one process for all visible GPUs${OPT_gpus:+ ($OPT_gpus)}; workdir $OPT_workdir"
  run env "${env_vars[@]}" "$OPT_python" -m "$OPT_module" "--config=$OPT_config" \
    "--workdir=$OPT_workdir" ${distributed[@]+"${distributed[@]}"} \
    ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
}

main "$@"
