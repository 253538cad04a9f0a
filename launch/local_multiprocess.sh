#!/usr/bin/env bash
# Test multi-process training on this machine: start P trainer processes on the CPU, each with L
# fake devices, joined through a coordinator on a free local port, as the processes of a
# multi-host slice would be. Waits for all of them; if one fails, stops the others and exits
# non-zero. Run with --help for the options; --dry-run prints the commands without running them.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/local_multiprocess.sh --config=FILE --workdir=DIR [options] [-- TRAINER_ARGS...]

Starts process i = 0..P-1 as
  env XLA_FLAGS=--xla_force_host_platform_device_count=L JAX_PLATFORMS=cpu \
    python3 -m instdisc_jax.main --config=FILE --workdir=DIR \
    --coordinator_address=127.0.0.1:PORT --num_processes=P --process_id=i [TRAINER_ARGS]
with its output in LOG_DIR/process_i.log.

Required:
  --config=FILE              config file, e.g. configs/fashion_mnist.py
  --workdir=DIR              checkpoints and summaries (shared by the processes)

Options:
  --num_processes=P          processes to start (default 2)
  --devices_per_process=L    fake CPU devices per process (default 4)
  --port=PORT                coordinator port on 127.0.0.1 (default: a free one)
  --log_dir=DIR              where process_<i>.log go (default WORKDIR/logs; needed when WORKDIR is
                             gs://)
  --python=PYTHON            Python interpreter (default python3)
  --module=MODULE            Python module to run (default instdisc_jax.main; tests use a stand-in)
  --dry-run                  print the commands without running them
  -h, --help                 this help

Example:
  launch/local_multiprocess.sh --num_processes=2 --devices_per_process=4 \
      --config=configs/fashion_mnist.py --workdir=/tmp/idisc_2proc -- --config.num_epochs=1
EOF
}

OPT_config=""
OPT_workdir=""
OPT_num_processes="2"
OPT_devices_per_process="4"
OPT_port=""
OPT_log_dir=""
OPT_python="python3"
OPT_module="instdisc_jax.main"
OPT_dry_run=0

# Read by parse_args (common.sh).
# shellcheck disable=SC2034
VALUE_OPTS=(config workdir num_processes devices_per_process port log_dir python module)
# shellcheck disable=SC2034
FLAG_OPTS=(dry_run)

# Seconds a process gets between SIGTERM and SIGKILL: after a peer failed (no collective
# checkpoint can finish then), and after Ctrl-C or SIGTERM (the trainer writes a checkpoint
# before it exits).
FAILURE_GRACE_SECONDS=5
SIGNAL_GRACE_SECONDS=60

PIDS=()

# free_port: a TCP port on 127.0.0.1 that nothing listens on now.
free_port() {
  "$OPT_python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

# alive PID: whether the process is still running: it exists and is not a zombie (exited, not
# yet reaped); ps prints its state letters, e.g. S, R+ or Z.
alive() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ -n $state && $state != *Z* ]]
}

# stop_all GRACE: SIGTERM every process still running (and its direct children), SIGKILL those
# still there after GRACE seconds, and reap them all.
stop_all() {
  local grace=$1 pid waited=0 any
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    if alive "$pid"; then
      pkill -TERM -P "$pid" 2>/dev/null || true
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  while ((waited < grace * 10)); do
    any=0
    for pid in ${PIDS[@]+"${PIDS[@]}"}; do
      if alive "$pid"; then
        any=1
      fi
    done
    ((any)) || break
    sleep 0.1
    waited=$((waited + 1))
  done
  for pid in ${PIDS[@]+"${PIDS[@]}"}; do
    if alive "$pid"; then
      pkill -KILL -P "$pid" 2>/dev/null || true
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
}

on_signal() {
  err "interrupted; stopping the processes (SIGKILL after ${SIGNAL_GRACE_SECONDS} s)"
  stop_all "$SIGNAL_GRACE_SECONDS"
  exit 130
}

main() {
  parse_args "$@"
  DRY_RUN=$OPT_dry_run
  if ((${#POSITIONAL[@]} > 0)); then
    usage_error "unexpected argument '${POSITIONAL[0]}' (trainer arguments go after --)"
  fi
  require "$OPT_config" "--config (the config file, e.g. configs/fashion_mnist.py)"
  require "$OPT_workdir" "--workdir (the directory for checkpoints and summaries)"
  require_int "$OPT_num_processes" --num_processes 1
  require_int "$OPT_devices_per_process" --devices_per_process 1
  local log_dir=$OPT_log_dir
  if [[ -z $log_dir ]]; then
    if [[ $OPT_workdir == *://* ]]; then
      usage_error "--workdir $OPT_workdir is not local: pass --log_dir for the process logs"
    fi
    log_dir="$OPT_workdir/logs"
  fi
  need_command "$OPT_python" "pass --python"
  local port=$OPT_port
  if [[ -z $port ]]; then
    port=$(free_port)
  fi
  require_int "$port" --port 1

  local n=$OPT_num_processes
  # Keep the caller's XLA_FLAGS, less any device count of its own.
  local xla_words=() kept=() word
  read -r -a xla_words <<<"${XLA_FLAGS:-}"
  for word in ${xla_words[@]+"${xla_words[@]}"}; do
    if [[ $word != --xla_force_host_platform_device_count=* ]]; then
      kept+=("$word")
    fi
  done
  local xla_flags="${kept[*]+${kept[*]} }--xla_force_host_platform_device_count=$OPT_devices_per_process"
  note "$n processes x $OPT_devices_per_process CPU devices, coordinator 127.0.0.1:$port, logs in $log_dir"
  run mkdir -p "$log_dir"

  trap on_signal INT TERM
  local i cmd log
  local logs=()
  for ((i = 0; i < n; i++)); do
    log="$log_dir/process_$i.log"
    logs+=("$log")
    cmd=(env "XLA_FLAGS=$xla_flags" JAX_PLATFORMS=cpu "$OPT_python" -m "$OPT_module"
      "--config=$OPT_config" "--workdir=$OPT_workdir" "--coordinator_address=127.0.0.1:$port"
      "--num_processes=$n" "--process_id=$i" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})
    printf '+ %s > %s 2>&1 &\n' "$(join_quoted "${cmd[@]}")" "$(quote "$log")"
    if ((!DRY_RUN)); then
      "${cmd[@]}" >"$log" 2>&1 </dev/null &
      PIDS+=("$!")
    fi
  done
  if ((DRY_RUN)); then
    return 0
  fi

  # Poll instead of `wait -n` (bash >= 4.3): reap each process as it ends; the first failure
  # stops the rest so that none is left waiting for a peer that is gone.
  local remaining=$n status pid
  local done_flags=()
  for ((i = 0; i < n; i++)); do
    done_flags+=(0)
  done
  while ((remaining > 0)); do
    for ((i = 0; i < n; i++)); do
      pid=${PIDS[i]}
      if ((done_flags[i])) || alive "$pid"; then
        continue
      fi
      status=0
      wait "$pid" || status=$?
      done_flags[i]=1
      remaining=$((remaining - 1))
      if ((status != 0)); then
        err "process $i exited with status $status; stopping the others. Last lines of ${logs[i]}:"
        tail -n 20 "${logs[i]}" >&2 || true
        stop_all "$FAILURE_GRACE_SECONDS"
        exit "$status"
      fi
      note "process $i finished"
    done
    if ((remaining > 0)); then
      sleep 0.2
    fi
  done
  note "all $n processes finished; logs in $log_dir"
}

main "$@"
