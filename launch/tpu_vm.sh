#!/usr/bin/env bash
# Cloud TPU VMs for instdisc_jax: create (directly or as a queued resource), copy and install the
# project on every worker, start the trainer on every worker, read its log, stop it, delete.
# Run with --help for the options; --dry-run prints the gcloud commands without running them.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

SUBCOMMANDS="create, describe, setup, run, logs, stop, delete"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh SUBCOMMAND --name=NAME --zone=ZONE --project=PROJECT [options] [-- TRAINER_ARGS...]

Subcommands:
  create     create the TPU VM (--tpu_type required), or a queued resource with --queued
  describe   show the TPU VM, or the queued resource with --queued (its state: WAITING_FOR_RESOURCES,
             PROVISIONING, ACTIVE, ...)
  setup      copy this checkout to every worker (or git clone --repo_url there) and install it,
             with "jax[tpu]", in a Python >= 3.11 virtual environment
  run        start the trainer on every worker (--worker=all), detached with nohup, logging to
             LOG_DIR/RUN_NAME.log on each worker; arguments after -- go to the trainer
  logs       tail the latest log of worker 0 (or --worker=N)
  stop       kill the trainer started by "run" on every worker
  delete     delete the TPU VM, or the queued resource and its TPU VM with --queued

Required:
  --name=NAME            TPU VM name (also the queued resource's name with --queued)
  --zone=ZONE            TPU zone, e.g. us-central2-b
  --project=PROJECT      Google Cloud project id
  --tpu_type=TYPE        (create) accelerator type, e.g. v4-32, v5litepod-8, v5p-8, v6e-8
  --config=FILE          (run) config file, relative to the repo root, e.g. configs/cifar10_resnet18.py
  --workdir=DIR          (run) checkpoints and summaries; a gs://bucket/path for multi-host slices

Options:
  --version=VERSION      (create) TPU software version; default by generation: v2/v3/v4
                         tpu-ubuntu2204-base, v5litepod (v5e) v2-alpha-tpuv5-lite,
                         v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --queued               (create, describe, delete) use a queued resource instead of a direct create
  --spot                 (create) Spot TPU VM (can be preempted)
  --preemptible          (create) preemptible TPU VM (not with --queued; use --spot there)
  --wait                 (create --queued) poll every 30 s until the queued resource is ACTIVE
  --src=DIR              (setup) local checkout to copy (default: the repo holding this script);
                         the files git tracks or would track are copied, not .git or ignored ones
  --repo_url=URL         (setup) git clone URL on every worker instead of copying --src
  --branch=BRANCH        (setup) branch or tag to clone with --repo_url
  --python=VERSION       (setup) Python for the virtual environment, a version or a path on the
                         VM (default 3.11; uv fetches it if the image lacks it)
  --remote_dir=DIR       project directory on the workers (default ~/instdisc_jax)
  --venv=DIR             virtual environment on the workers (default ~/instdisc_venv)
  --log_dir=DIR          log directory on the workers (default ~/instdisc_logs)
  --run_name=NAME        (run, logs) log file name without .log (run: default a UTC timestamp;
                         logs: default the latest run)
  --worker=N             (logs) worker whose log to show (default 0)
  --lines=N              (logs) lines of history to show (default 100)
  --no_follow            (logs) print and exit instead of following
  --module=MODULE        (run) Python module to run (default instdisc_jax.main)
  --dry-run              print the commands without running them
  -h, --help             this help

Examples:
  launch/tpu_vm.sh create --name=idisc --zone=us-central2-b --project=my-proj --tpu_type=v4-32
  launch/tpu_vm.sh setup  --name=idisc --zone=us-central2-b --project=my-proj
  launch/tpu_vm.sh run    --name=idisc --zone=us-central2-b --project=my-proj \
      --config=configs/cifar10_resnet18.py --workdir=gs://my-bucket/idisc/run1 -- --config.num_epochs=200
  launch/tpu_vm.sh logs   --name=idisc --zone=us-central2-b --project=my-proj --worker=1
  launch/tpu_vm.sh delete --name=idisc --zone=us-central2-b --project=my-proj
EOF
}

OPT_name=""
OPT_zone=""
OPT_project=""
OPT_tpu_type=""
OPT_version=""
OPT_config=""
OPT_workdir=""
OPT_src=$(cd "$LAUNCH_DIR/.." && pwd)
OPT_repo_url=""
OPT_branch=""
OPT_python="3.11"
# Paths on the workers: the ~ is meant literally here and expands in the workers' shells.
# shellcheck disable=SC2088
OPT_remote_dir="~/instdisc_jax"
# shellcheck disable=SC2088
OPT_venv="~/instdisc_venv"
# shellcheck disable=SC2088
OPT_log_dir="~/instdisc_logs"
OPT_run_name=""
OPT_worker="0"
OPT_lines="100"
OPT_module="instdisc_jax.main"
OPT_queued=0
OPT_spot=0
OPT_preemptible=0
OPT_wait=0
OPT_no_follow=0
OPT_dry_run=0

# Read by parse_args (common.sh).
# shellcheck disable=SC2034
VALUE_OPTS=(name zone project tpu_type version config workdir src repo_url branch python
  remote_dir venv log_dir run_name worker lines module)
# shellcheck disable=SC2034
FLAG_OPTS=(queued spot preemptible wait no_follow dry_run)

# runtime_version_for TYPE: the TPU software version to use for JAX on that accelerator type.
runtime_version_for() {
  case $1 in
    v2-* | v3-* | v4-*) printf '%s' tpu-ubuntu2204-base ;;
    v5litepod-*) printf '%s' v2-alpha-tpuv5-lite ;;
    v5p-*) printf '%s' v2-alpha-tpuv5 ;;
    v6e-*) printf '%s' v2-alpha-tpuv6e ;;
    v5e-*) usage_error "--tpu_type $1: v5e accelerator types are spelled v5litepod-N (e.g. v5litepod-8)" ;;
    *) usage_error "no default TPU software version for --tpu_type $1; pass --version" ;;
  esac
}

# check_remote_path OPTION VALUE: remote paths go into remote shell commands unquoted (so that a
# leading ~/ expands there) and some get "rm -rf": allow only ~/PATH or /PATH made of characters
# that need no quoting, with no . or .. component and not the home or root directory itself.
check_remote_path() {
  local path=$2 rest
  rest=${path#\~/}
  rest=${rest#/}
  rest=${rest%/}
  if [[ ! $path =~ ^(~/|/)[A-Za-z0-9._/-]+$ || -z $rest || /$rest/ == */./* || /$rest/ == */../* ]]; then
    usage_error "$1 must be ~/DIR or /DIR, made of letters, digits and . _ / - (got '$path')"
  fi
}

# scp_path DIR: DIR as an scp remote path: relative to the home directory instead of ~/.
scp_path() {
  case $1 in
    \~/*) printf '%s' "${1#\~/}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# tpu_vm_cmd SUBCOMMAND ARGS...: gcloud compute tpus tpu-vm SUBCOMMAND NAME --zone --project ARGS.
tpu_vm_cmd() {
  local sub=$1
  shift
  run gcloud compute tpus tpu-vm "$sub" "$OPT_name" "--zone=$OPT_zone" "--project=$OPT_project" "$@"
}

# on_workers WORKER COMMAND: run the shell COMMAND on worker WORKER ("all" for every worker).
on_workers() {
  tpu_vm_cmd ssh "--worker=$1" "--command=$2"
}

cmd_create() {
  require "$OPT_tpu_type" "--tpu_type (the accelerator type, e.g. v4-32 or v5litepod-8)"
  local version=$OPT_version
  if [[ -z $version ]]; then
    version=$(runtime_version_for "$OPT_tpu_type")
  fi
  if ((OPT_spot && OPT_preemptible)); then
    usage_error "--spot and --preemptible exclude each other"
  fi
  local provisioning=()
  if ((OPT_spot)); then
    provisioning=(--spot)
  elif ((OPT_preemptible)); then
    provisioning=(--preemptible)
  fi
  if ((OPT_queued)); then
    if ((OPT_preemptible)); then
      usage_error "--preemptible is not available for queued resources; use --spot"
    fi
    note "create queued resource $OPT_name (TPU VM $OPT_name, $OPT_tpu_type, software $version) in $OPT_zone, project $OPT_project"
    run gcloud compute tpus queued-resources create "$OPT_name" "--zone=$OPT_zone" \
      "--project=$OPT_project" "--node-id=$OPT_name" "--accelerator-type=$OPT_tpu_type" \
      "--runtime-version=$version" ${provisioning[@]+"${provisioning[@]}"}
    if ((OPT_wait)); then
      wait_active
    else
      note "the TPU VM exists once the queued resource is ACTIVE: launch/tpu_vm.sh describe --queued ..."
    fi
  else
    if ((OPT_wait)); then
      usage_error "--wait is for --queued (a direct create returns once the TPU VM is ready)"
    fi
    note "create TPU VM $OPT_name ($OPT_tpu_type, software $version) in $OPT_zone, project $OPT_project"
    tpu_vm_cmd create "--accelerator-type=$OPT_tpu_type" "--version=$version" \
      ${provisioning[@]+"${provisioning[@]}"}
  fi
}

# wait_active: poll the queued resource until it is ACTIVE; fail on FAILED or SUSPENDED.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$OPT_name" "--zone=$OPT_zone"
    "--project=$OPT_project" "--format=value(state.state)")
  note "poll every 30 s until the state is ACTIVE:"
  print_cmd "${describe[@]}"
  if ((DRY_RUN)); then
    return 0
  fi
  local state
  while true; do
    state=$("${describe[@]}")
    note "$(date -u +%H:%M:%S) $OPT_name: $state"
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING) die "queued resource $OPT_name is $state" ;;
    esac
    sleep 30
  done
}

cmd_describe() {
  if ((OPT_queued)); then
    run gcloud compute tpus queued-resources describe "$OPT_name" "--zone=$OPT_zone" \
      "--project=$OPT_project"
  else
    tpu_vm_cmd describe
  fi
}

cmd_setup() {
  local remote=$OPT_remote_dir venv=$OPT_venv
  if [[ -n $OPT_repo_url ]]; then
    local clone=(git clone --depth=1)
    if [[ -n $OPT_branch ]]; then
      clone+=("--branch=$OPT_branch")
    fi
    note "clone $OPT_repo_url into $remote on every worker of $OPT_name"
    on_workers all "rm -rf $remote && $(join_quoted "${clone[@]}" "$OPT_repo_url") $remote"
  else
    if [[ -n $OPT_branch ]]; then
      usage_error "--branch goes with --repo_url"
    fi
    [[ -d $OPT_src ]] || usage_error "--src $OPT_src is not a directory"
    git -C "$OPT_src" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
      usage_error "--src $OPT_src is not a git checkout (copy needs git ls-files; or use --repo_url)"
    local stage base
    base=$(basename "$(scp_path "$remote")")
    stage="${TMPDIR:-/tmp}/instdisc_jax_stage_$OPT_name"
    note "copy $OPT_src to $remote on every worker of $OPT_name: the files git tracks or would track (not .git, not ignored files)"
    run rm -rf "$stage"
    run mkdir -p "$stage/$base"
    note "copy the files listed by: git -C $(quote "$OPT_src") ls-files --cached --others --exclude-standard, into $stage/$base"
    if ((!DRY_RUN)); then
      copy_worktree "$OPT_src" "$stage/$base"
    fi
    on_workers all "rm -rf $remote"
    run gcloud compute tpus tpu-vm scp --recurse --worker=all "--zone=$OPT_zone" \
      "--project=$OPT_project" "$stage/$base" "$OPT_name:$(scp_path "$remote")"
    run rm -rf "$stage"
  fi
  local py="$venv/bin/python"
  local steps=(
    "python3 -m pip install --user --upgrade uv"
    "rm -rf $venv"
    "python3 -m uv venv --seed --python $(quote "$OPT_python") $venv"
    "$py -m pip install --upgrade pip"
    "cd $remote"
    "$py -m pip install -U -e . 'jax[tpu]'"
    "$py -c 'import jax; print(\"jax\", jax.__version__)'"
  )
  local joined="" step
  for step in "${steps[@]}"; do
    joined+="${joined:+ && }$step"
  done
  note "install the project and jax[tpu] into $venv on every worker"
  on_workers all "$joined"
}

# copy_worktree SRC DEST: copy the files git tracks or would track in SRC (tracked, plus untracked
# but not ignored; skipping tracked files deleted from the work tree) to DEST.
copy_worktree() {
  local src=$1 dest=$2 file
  git -C "$src" ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' file; do
    if [[ -e $src/$file || -L $src/$file ]]; then
      mkdir -p "$dest/$(dirname "$file")"
      cp -P -p "$src/$file" "$dest/$file"
    fi
  done
}

# alive_test PIDFILE: a worker shell test that PIDFILE exists and names a live process: ps shows
# its state letters (e.g. Sl), and they hold no Z (a zombie has exited already).
alive_test() {
  # The $(...) is for the worker's shell.
  # shellcheck disable=SC2016
  printf '[ -f %s ] && ps -o stat= -p "$(cat %s)" 2>/dev/null | grep -qv Z' "$1" "$1"
}

cmd_run() {
  require "$OPT_config" "--config (the config file, e.g. configs/cifar10_resnet18.py)"
  require "$OPT_workdir" "--workdir (a local path or gs://bucket/path for checkpoints and summaries)"
  local run_name=$OPT_run_name
  if [[ -z $run_name ]]; then
    run_name="train_$(date -u +%Y%m%d_%H%M%S)"
  fi
  if [[ ! $run_name =~ ^[A-Za-z0-9._-]+$ ]]; then
    usage_error "--run_name may hold only letters, digits and . _ -, got '$run_name'"
  fi
  local logs=$OPT_log_dir
  local log="$logs/$run_name.log" pidfile="$logs/$run_name.pid"
  # The venv path stays unquoted so that its ~ expands on the worker (check_remote_path made it
  # safe); everything else is quoted for the worker's shell.
  local trainer
  trainer="$OPT_venv/bin/python $(join_quoted -m "$OPT_module" "--config=$OPT_config" \
    "--workdir=$OPT_workdir" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"})"
  local remote
  remote="mkdir -p $logs"
  remote+=" && if $(alive_test "$logs/latest.pid");"
  remote+=" then echo \"error: a trainer is already running on \$(hostname) (pid \$(cat $logs/latest.pid)); use: tpu_vm.sh stop\" >&2; exit 1; fi"
  remote+=" && cd $OPT_remote_dir"
  remote+=" && { setsid nohup $trainer > $log 2>&1 < /dev/null & echo \$! > $pidfile; }"
  remote+=" && ln -sfn $run_name.log $logs/latest.log && ln -sfn $run_name.pid $logs/latest.pid"
  remote+=" && echo \"started on \$(hostname): pid \$(cat $pidfile), log $log\""
  note "start $OPT_module on every worker of $OPT_name, detached (nohup); log on each worker: $log"
  on_workers all "$remote"
  note "follow worker 0: launch/tpu_vm.sh logs --name=$OPT_name --zone=$OPT_zone --project=$OPT_project"
}

cmd_logs() {
  require_int "$OPT_worker" --worker 0
  require_int "$OPT_lines" --lines 0
  local file="$OPT_log_dir/latest.log"
  if [[ -n $OPT_run_name ]]; then
    [[ $OPT_run_name =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "bad --run_name '$OPT_run_name'"
    file="$OPT_log_dir/$OPT_run_name.log"
  fi
  local follow=" -F"
  if ((OPT_no_follow)); then
    follow=""
  fi
  on_workers "$OPT_worker" "tail -n $OPT_lines$follow $file"
}

cmd_stop() {
  local pidfile="$OPT_log_dir/latest.pid"
  local remote
  remote="if $(alive_test "$pidfile");"
  remote+=" then kill -TERM -- -\"\$(cat $pidfile)\" && echo \"stopped the trainer (pid \$(cat $pidfile)) on \$(hostname)\";"
  remote+=" else echo \"no trainer running on \$(hostname)\"; fi"
  note "stop the trainer (its whole process group) on every worker of $OPT_name"
  on_workers all "$remote"
}

cmd_delete() {
  if ((OPT_queued)); then
    note "delete queued resource $OPT_name and its TPU VM"
    run gcloud compute tpus queued-resources delete "$OPT_name" "--zone=$OPT_zone" \
      "--project=$OPT_project" --force --quiet
  else
    note "delete TPU VM $OPT_name"
    tpu_vm_cmd delete --quiet
  fi
}

main() {
  parse_args "$@"
  DRY_RUN=$OPT_dry_run
  if ((${#POSITIONAL[@]} == 0)); then
    usage_error "missing subcommand (one of $SUBCOMMANDS)"
  fi
  if ((${#POSITIONAL[@]} > 1)); then
    usage_error "one subcommand expected, got: ${POSITIONAL[*]}"
  fi
  local sub=${POSITIONAL[0]}
  if ! in_list "$sub" create describe setup run logs stop delete; then
    usage_error "unknown subcommand '$sub' (one of $SUBCOMMANDS)"
  fi
  if ((${#PASSTHROUGH[@]} > 0)) && [[ $sub != run ]]; then
    usage_error "arguments after -- are for the trainer and only go with 'run'"
  fi
  require "$OPT_name" "--name (the TPU VM name)"
  require "$OPT_zone" "--zone (the TPU zone, e.g. us-central2-b)"
  require "$OPT_project" "--project (the Google Cloud project id)"
  if [[ ! $OPT_name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    usage_error "--name must be lowercase letters, digits and hyphens, starting with a letter, got '$OPT_name'"
  fi
  check_remote_path --remote_dir "$OPT_remote_dir"
  check_remote_path --venv "$OPT_venv"
  check_remote_path --log_dir "$OPT_log_dir"
  OPT_remote_dir=${OPT_remote_dir%/}
  OPT_venv=${OPT_venv%/}
  OPT_log_dir=${OPT_log_dir%/}
  need_command gcloud "install the Google Cloud CLI"
  "cmd_$sub"
}

main "$@"
