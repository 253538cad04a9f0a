"""Tests of the launch scripts (launch/*.sh).

The scripts print every command as "+ <shell-quoted words>"; the tests parse those lines with
shlex, so they check the words a shell would pass, quoting included. Nothing here needs gcloud, a
TPU, a GPU or the network: the gcloud commands are checked through --dry-run and a stand-in
gcloud, the remote shell commands are run locally against a scratch home directory, and
local_multiprocess.sh runs stand-in modules instead of the trainer.
"""
import json
import os
from pathlib import Path
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_vm.sh", "gpu_host.sh", "local_multiprocess.sh"]
TPU = ["--name=idisc", "--zone=us-central2-b", "--project=my-proj"]
TPU_FLAGS = ["idisc", "--zone=us-central2-b", "--project=my-proj"]


def clean_env(**extra):
    """The test process's environment, less what the scripts read from it (conftest sets some)."""
    env = dict(os.environ)
    for name in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_PLATFORMS"):
        env.pop(name, None)
    env.update(extra)
    return env


def launch(script, *args, env=None, timeout=60):
    return subprocess.run(
        [str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=timeout,
        cwd=REPO,
    )


def commands(stdout):
    """The printed commands ("+ " lines), each split into words as a shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def remote_command(argv):
    """The --command=... of a gcloud ssh command line."""
    (cmd,) = [w[len("--command="):] for w in argv if w.startswith("--command=")]
    return cmd


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def usage_error(result, message):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr == f"error: {message}\n"
    assert "+ " not in result.stdout


# --- every script ------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(script, flag):
    result = ok(launch(script, flag))
    assert result.stdout.startswith(f"Usage: launch/{script} ")
    assert "--dry-run" in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_option(script):
    usage_error(launch(script, "--bogus=1", "--dry-run"), "unknown option --bogus=1 (see --help)")


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not on PATH (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh"))
    assert "launch/common.sh" in scripts and len(scripts) == 4
    result = subprocess.run(
        [shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_executable_bash(script):
    path = LAUNCH / script
    assert path.stat().st_mode & stat.S_IXUSR
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()


# --- tpu_vm.sh: create / describe / delete -----------------------------------------------------


def test_tpu_create_prints_exact_command():
    result = ok(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v4-32", "--dry-run"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert lines == [
        "+ gcloud compute tpus tpu-vm create idisc --zone=us-central2-b --project=my-proj "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    ]
    assert "# create TPU VM idisc (v4-32, software tpu-ubuntu2204-base)" in result.stdout


@pytest.mark.parametrize(
    "tpu_type, version",
    [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-8", "v2-alpha-tpuv5-lite"),
        ("v5p-16", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
def test_tpu_create_default_version_per_generation(tpu_type, version):
    result = ok(launch("tpu_vm.sh", "create", *TPU, f"--tpu_type={tpu_type}", "--dry-run"))
    assert commands(result.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", *TPU_FLAGS,
         f"--accelerator-type={tpu_type}", f"--version={version}"]
    ]


def test_tpu_create_version_override_and_provisioning():
    result = ok(launch("tpu_vm.sh", "create", *TPU, "--tpu_type", "v6e-16", "--version",
                       "v2-alpha-tpuv6e-custom", "--spot", "--dry-run"))
    assert commands(result.stdout)[0][-2:] == ["--version=v2-alpha-tpuv6e-custom", "--spot"]
    result = ok(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v4-8", "--preemptible", "--dry_run"))
    assert commands(result.stdout)[0][-1] == "--preemptible"


def test_tpu_create_queued():
    result = ok(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v5litepod-16", "--queued",
                       "--spot", "--dry-run"))
    assert commands(result.stdout) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", *TPU_FLAGS,
         "--node-id=idisc", "--accelerator-type=v5litepod-16",
         "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
    ]


def test_tpu_create_queued_wait_prints_the_poll():
    result = ok(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v4-8", "--queued", "--wait",
                       "--dry-run"))
    assert commands(result.stdout)[1] == [
        "gcloud", "compute", "tpus", "queued-resources", "describe", *TPU_FLAGS,
        "--format=value(state.state)",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--queued", "--preemptible"],
         "--preemptible is not available for queued resources; use --spot"),
        (["--spot", "--preemptible"], "--spot and --preemptible exclude each other"),
        (["--wait"], "--wait is for --queued (a direct create returns once the TPU VM is ready)"),
    ],
)
def test_tpu_create_bad_combinations(args, message):
    usage_error(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v4-8", *args, "--dry-run"), message)


def test_tpu_create_unknown_type_needs_version():
    usage_error(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v9x-8", "--dry-run"),
                "no default TPU software version for --tpu_type v9x-8; pass --version")
    usage_error(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v5e-8", "--dry-run"),
                "--tpu_type v5e-8: v5e accelerator types are spelled v5litepod-N (e.g. v5litepod-8)")
    result = ok(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v9x-8", "--version=v9-base",
                       "--dry-run"))
    assert commands(result.stdout)[0][-1] == "--version=v9-base"


@pytest.mark.parametrize(
    "sub, queued, expected",
    [
        ("delete", False, ["tpu-vm", "delete", *TPU_FLAGS, "--quiet"]),
        ("delete", True, ["queued-resources", "delete", *TPU_FLAGS, "--force", "--quiet"]),
        ("describe", False, ["tpu-vm", "describe", *TPU_FLAGS]),
        ("describe", True, ["queued-resources", "describe", *TPU_FLAGS]),
    ],
)
def test_tpu_delete_and_describe(sub, queued, expected):
    args = [sub, *TPU, "--dry-run"] + (["--queued"] if queued else [])
    result = ok(launch("tpu_vm.sh", *args))
    assert commands(result.stdout) == [["gcloud", "compute", "tpus", *expected]]


# --- tpu_vm.sh: argument errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "drop, message",
    [
        ("--name=idisc", "missing --name (the TPU VM name)"),
        ("--zone=us-central2-b", "missing --zone (the TPU zone, e.g. us-central2-b)"),
        ("--project=my-proj", "missing --project (the Google Cloud project id)"),
        ("--tpu_type=v4-8", "missing --tpu_type (the accelerator type, e.g. v4-32 or v5litepod-8)"),
    ],
)
def test_tpu_create_missing_argument(drop, message):
    args = [a for a in [*TPU, "--tpu_type=v4-8"] if a != drop]
    usage_error(launch("tpu_vm.sh", "create", *args, "--dry-run"), message)
    # Also without --dry-run: the check comes before anything runs.
    usage_error(launch("tpu_vm.sh", "create", *args), message)


@pytest.mark.parametrize(
    "drop, message",
    [
        ("--config=configs/x.py", "missing --config (the config file, e.g. configs/cifar10_resnet18.py)"),
        ("--workdir=gs://b/w",
         "missing --workdir (a local path or gs://bucket/path for checkpoints and summaries)"),
    ],
)
def test_tpu_run_missing_argument(drop, message):
    args = [a for a in ["--config=configs/x.py", "--workdir=gs://b/w"] if a != drop]
    usage_error(launch("tpu_vm.sh", "run", *TPU, *args, "--dry-run"), message)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing subcommand (one of create, describe, setup, run, logs, stop, delete)"),
        (["start"], "unknown subcommand 'start' (one of create, describe, setup, run, logs, stop, delete)"),
        (["logs", "stop"], "one subcommand expected, got: logs stop"),
        (["logs", "--", "x"], "arguments after -- are for the trainer and only go with 'run'"),
        (["logs", "--zone"], "--zone needs a value"),
        (["logs", "--zone", "--project=p"], "--zone needs a value"),
        (["logs", "--dry-run=yes"], "--dry_run takes no value"),
        (["logs", "--worker=x"], "--worker must be a whole number >= 0, got 'x'"),
        (["setup", "--remote_dir=~"],
         "--remote_dir must be ~/DIR or /DIR, made of letters, digits and . _ / - (got '~')"),
        (["setup", "--venv=~/a/../.."],
         "--venv must be ~/DIR or /DIR, made of letters, digits and . _ / - (got '~/a/../..')"),
        (["setup", "--remote_dir=rel/dir"],
         "--remote_dir must be ~/DIR or /DIR, made of letters, digits and . _ / - (got 'rel/dir')"),
        (["setup", "--log_dir=~/a b"],
         "--log_dir must be ~/DIR or /DIR, made of letters, digits and . _ / - (got '~/a b')"),
        (["setup", "--branch=main"], "--branch goes with --repo_url"),
    ],
)
def test_tpu_argument_errors(args, message):
    usage_error(launch("tpu_vm.sh", *args, *TPU, "--dry-run"), message)


def test_tpu_name_must_be_a_gcp_name():
    usage_error(launch("tpu_vm.sh", "describe", "--name=My/TPU", "--zone=z", "--project=p",
                       "--dry-run"),
                "--name must be lowercase letters, digits and hyphens, starting with a letter, "
                "got 'My/TPU'")


def test_tpu_needs_gcloud_unless_dry_run(tmp_path):
    # A PATH with only what the script needs before it looks for gcloud.
    for tool in ("bash", "dirname"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    result = launch("tpu_vm.sh", "describe", *TPU, env=clean_env(PATH=str(tmp_path)))
    assert result.returncode == 1
    assert result.stderr == "error: gcloud not found on PATH (install the Google Cloud CLI)\n"


# --- tpu_vm.sh: setup ----------------------------------------------------------------------------


def make_checkout(root):
    """A small git checkout: tracked, untracked, ignored and deleted-but-tracked files."""
    root.mkdir()
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (root / ".gitignore").write_text("/workdirs/\n*.pyc\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "gone.py").write_text("")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], check=True)
    (root / "gone.py").unlink()
    (root / "pkg" / "a.py").write_text("A = 2\n")  # edited, not committed
    (root / "configs").mkdir()
    (root / "configs" / "new config.py").write_text("N = 3\n")  # untracked, not ignored
    (root / "workdirs").mkdir()
    (root / "workdirs" / "big.bin").write_text("x")  # ignored
    (root / "pkg" / "a.pyc").write_text("x")  # ignored


def test_tpu_setup_dry_run_copies_with_scp_to_all_workers(tmp_path):
    src = tmp_path / "checkout"
    make_checkout(src)
    result = ok(launch("tpu_vm.sh", "setup", *TPU, f"--src={src}", "--dry-run",
                       env=clean_env(TMPDIR=str(tmp_path))))
    stage = tmp_path / "instdisc_jax_stage_idisc"
    ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *TPU_FLAGS, "--worker=all"]
    cmds = commands(result.stdout)
    assert cmds[:5] == [
        ["rm", "-rf", str(stage)],
        ["mkdir", "-p", str(stage / "instdisc_jax")],
        [*ssh, "--command=rm -rf ~/instdisc_jax"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "--worker=all",
         "--zone=us-central2-b", "--project=my-proj", str(stage / "instdisc_jax"),
         "idisc:instdisc_jax"],
        ["rm", "-rf", str(stage)],
    ]
    assert cmds[5][:-1] == ssh
    install = remote_command(cmds[5]).split(" && ")
    assert install == [
        "python3 -m pip install --user --upgrade uv",
        "rm -rf ~/instdisc_venv",
        "python3 -m uv venv --seed --python 3.11 ~/instdisc_venv",
        "~/instdisc_venv/bin/python -m pip install --upgrade pip",
        "cd ~/instdisc_jax",
        "~/instdisc_venv/bin/python -m pip install -U -e . 'jax[tpu]'",
        "~/instdisc_venv/bin/python -c 'import jax; print(\"jax\", jax.__version__)'",
    ]
    assert len(cmds) == 6
    assert not stage.exists()  # --dry-run touches nothing


def test_tpu_setup_from_repo_url():
    result = ok(launch("tpu_vm.sh", "setup", *TPU, "--repo_url=https://example.com/me/idisc.git",
                       "--branch=v1", "--remote_dir=~/code/idisc", "--venv=/opt/venv",
                       "--python=3.12", "--dry-run"))
    cmds = commands(result.stdout)
    assert len(cmds) == 2
    assert remote_command(cmds[0]) == (
        "rm -rf ~/code/idisc && git clone --depth=1 --branch=v1 "
        "https://example.com/me/idisc.git ~/code/idisc"
    )
    install = remote_command(cmds[1])
    assert "python3 -m uv venv --seed --python 3.12 /opt/venv" in install
    assert "cd ~/code/idisc && /opt/venv/bin/python -m pip install -U -e . 'jax[tpu]'" in install


def test_tpu_setup_rejects_a_non_git_src(tmp_path):
    usage_error(launch("tpu_vm.sh", "setup", *TPU, f"--src={tmp_path}", "--dry-run"),
                f"--src {tmp_path} is not a git checkout (copy needs git ls-files; or use --repo_url)")


def fake_gcloud(tmp_path, exit_code=0):
    """A gcloud that records its arguments (one JSON list a line) and exits with exit_code; for
    scp it copies the source directory to tmp_path/scp_copy."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "gcloud_calls.jsonl"
    script = bin_dir / "gcloud"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        f"with open({str(record)!r}, 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "if 'scp' in sys.argv:\n"
        f"    shutil.copytree(sys.argv[-2], {str(tmp_path / 'scp_copy')!r}, symlinks=True)\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    return env, record


def recorded(record):
    return [json.loads(line) for line in record.read_text().splitlines()]


def test_tpu_setup_runs_what_it_prints_and_stages_the_worktree(tmp_path):
    src = tmp_path / "checkout"
    make_checkout(src)
    env, record = fake_gcloud(tmp_path)
    result = ok(launch("tpu_vm.sh", "setup", *TPU, f"--src={src}", env=env))
    printed = [c for c in commands(result.stdout) if c[0] == "gcloud"]
    assert [["gcloud", *c] for c in recorded(record)] == printed
    copied = tmp_path / "scp_copy"  # what scp was given
    files = sorted(str(p.relative_to(copied)) for p in copied.rglob("*") if p.is_file())
    assert files == [".gitignore", "configs/new config.py", "pkg/a.py"]
    assert (copied / "pkg" / "a.py").read_text() == "A = 2\n"  # the work tree, not HEAD
    assert not (tmp_path / "instdisc_jax_stage_idisc").exists()  # removed after the copy


def test_tpu_stops_at_the_first_failing_gcloud(tmp_path):
    env, record = fake_gcloud(tmp_path, exit_code=7)
    result = launch("tpu_vm.sh", "setup", *TPU, "--repo_url=https://example.com/r.git", env=env)
    assert result.returncode == 7
    assert len(recorded(record)) == 1


def test_tpu_create_runs_what_it_prints(tmp_path):
    env, record = fake_gcloud(tmp_path)
    result = ok(launch("tpu_vm.sh", "create", *TPU, "--tpu_type=v5p-8", "--spot", env=env))
    assert [["gcloud", *c] for c in recorded(record)] == commands(result.stdout)


# --- tpu_vm.sh: run, logs, stop --------------------------------------------------------------------

EXTRA = ["--config.note=it's a \"test\"", "--config.lr=0.03", "two words", "$HOME", ""]


def test_tpu_run_dry_run():
    result = ok(launch("tpu_vm.sh", "run", *TPU, "--config=configs/cifar10_resnet18.py",
                       "--workdir=gs://my-bucket/idisc/run 1", "--run_name=r1", "--dry-run",
                       "--", *EXTRA))
    (cmd,) = commands(result.stdout)
    assert cmd[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *TPU_FLAGS, "--worker=all"]
    remote = remote_command(cmd)
    words = shlex.split(remote)
    start = words.index("setsid")
    expected = [
        "setsid", "nohup", "~/instdisc_venv/bin/python", "-m", "instdisc_jax.main",
        "--config=configs/cifar10_resnet18.py", "--workdir=gs://my-bucket/idisc/run 1", *EXTRA,
        ">", "~/instdisc_logs/r1.log",
    ]
    assert words[start:start + len(expected)] == expected
    assert "cd ~/instdisc_jax &&" in remote
    assert "ln -sfn r1.log ~/instdisc_logs/latest.log" in remote


def test_tpu_run_default_run_name_is_a_timestamp():
    result = ok(launch("tpu_vm.sh", "run", *TPU, "--config=c.py", "--workdir=gs://b/w",
                       "--dry-run"))
    assert re.search(r"~/instdisc_logs/train_\d{8}_\d{6}\.log", remote_command(commands(result.stdout)[0]))


def test_tpu_logs_and_stop_dry_run():
    result = ok(launch("tpu_vm.sh", "logs", *TPU, "--worker=3", "--dry-run"))
    assert commands(result.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", *TPU_FLAGS, "--worker=3",
         "--command=tail -n 100 -F ~/instdisc_logs/latest.log"]
    ]
    result = ok(launch("tpu_vm.sh", "logs", *TPU, "--run_name=r1", "--lines=5", "--no_follow",
                       "--dry-run"))
    assert remote_command(commands(result.stdout)[0]) == "tail -n 5 ~/instdisc_logs/r1.log"
    result = ok(launch("tpu_vm.sh", "stop", *TPU, "--dry-run"))
    (cmd,) = commands(result.stdout)
    assert "--worker=all" in cmd
    assert remote_command(cmd).startswith(
        'if [ -f ~/instdisc_logs/latest.pid ] && ps -o stat= -p "$(cat ~/instdisc_logs/latest.pid)"'
        ' 2>/dev/null | grep -qv Z; then kill -TERM -- -"$(cat ~/instdisc_logs/latest.pid)"')


def remote_shell(command, home, timeout=30):
    """Run a worker's shell command here, with HOME as the worker's home directory."""
    env = clean_env(HOME=str(home))
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=home)


def process_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] == "Z"  # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("setsid") and Path("/proc").is_dir()),
                    reason="needs Linux (setsid, /proc) to play a TPU worker")
def test_tpu_run_logs_stop_commands_work_on_a_worker(tmp_path):
    """Play one worker: the remote commands of run, logs and stop, run by a local bash."""
    home = tmp_path / "home"
    (home / "instdisc_jax").mkdir(parents=True)
    (home / "instdisc_venv" / "bin").mkdir(parents=True)
    python = home / "instdisc_venv" / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    (home / "instdisc_jax" / "stand_in.py").write_text(
        "import os, sys, time\n"
        "print('ARGS', sys.argv[1:], 'CWD', os.getcwd(), flush=True)\n"
        "time.sleep(120)\n"
    )
    tpu = [*TPU, "--dry-run", "--module=stand_in"]

    def remote(sub, *args):
        return remote_command(commands(ok(launch("tpu_vm.sh", sub, *tpu, *args)).stdout)[0])

    run_cmd = remote("run", "--config=configs/x.py", "--workdir=gs://b/w", "--run_name=r1",
                     "--", *EXTRA)
    started = remote_shell(run_cmd, home)
    assert started.returncode == 0, started.stderr
    logs = home / "instdisc_logs"
    pid = int((logs / "r1.pid").read_text())
    assert os.readlink(logs / "latest.log") == "r1.log"
    assert os.readlink(logs / "latest.pid") == "r1.pid"
    assert f"pid {pid}, log " in started.stdout
    assert os.getpgid(pid) == pid  # setsid: the trainer leads its own process group
    assert wait_until(lambda: "ARGS" in (logs / "r1.log").read_text())
    line = (logs / "r1.log").read_text().splitlines()[0]
    expected = ["--config=configs/x.py", "--workdir=gs://b/w", *EXTRA]
    assert line == f"ARGS {expected!r} CWD {home / 'instdisc_jax'}"

    # The guard: a second run while the first is alive fails on that worker.
    again = remote_shell(remote("run", "--config=configs/x.py", "--workdir=gs://b/w",
                                "--run_name=r2"), home)
    assert again.returncode == 1
    assert "error: a trainer is already running on" in again.stderr
    assert not (logs / "r2.log").exists()

    shown = remote_shell(remote("logs", "--no_follow"), home)
    assert shown.stdout.startswith("ARGS ")

    stopped = remote_shell(remote("stop"), home)
    assert stopped.returncode == 0
    assert f"stopped the trainer (pid {pid})" in stopped.stdout
    assert wait_until(lambda: process_gone(pid))
    assert "no trainer running" in remote_shell(remote("stop"), home).stdout


@pytest.mark.slow
def test_tpu_setup_clone_command_works_on_a_worker(tmp_path):
    src = tmp_path / "checkout"
    make_checkout(src)
    home = tmp_path / "home"
    home.mkdir()
    (home / "instdisc_jax").mkdir()
    (home / "instdisc_jax" / "stale.txt").write_text("old")
    result = ok(launch("tpu_vm.sh", "setup", *TPU, f"--repo_url=file://{src}", "--dry-run"))
    cloned = remote_shell(remote_command(commands(result.stdout)[0]), home)
    assert cloned.returncode == 0, cloned.stderr
    assert (home / "instdisc_jax" / "pkg" / "a.py").read_text() == "A = 1\n"  # committed state
    assert not (home / "instdisc_jax" / "stale.txt").exists()


# --- gpu_host.sh ---------------------------------------------------------------------------------

GPU = ["--config=configs/cifar10_resnet18.py", "--workdir=gs://my-bucket/idisc"]


def test_gpu_single_host():
    result = ok(launch("gpu_host.sh", *GPU, "--gpus=0,1,2,3", "--dry-run", "--", "--config.x=a b"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert lines == [
        "+ env CUDA_VISIBLE_DEVICES=0,1,2,3 XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 python3 -m "
        "instdisc_jax.main --config=configs/cifar10_resnet18.py --workdir=gs://my-bucket/idisc "
        "--config.x='a b'"
    ]


def test_gpu_memory_fraction():
    result = ok(launch("gpu_host.sh", *GPU, "--dry-run",
                       env=clean_env(XLA_PYTHON_CLIENT_MEM_FRACTION=".5")))
    assert commands(result.stdout)[0][:3] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=.5", "python3"]
    result = ok(launch("gpu_host.sh", *GPU, "--mem_fraction=0.8", "--dry-run",
                       env=clean_env(XLA_PYTHON_CLIENT_MEM_FRACTION=".5")))
    assert commands(result.stdout)[0][1] == "XLA_PYTHON_CLIENT_MEM_FRACTION=0.8"


def test_gpu_multi_node():
    result = ok(launch("gpu_host.sh", *GPU, "--num_nodes=4", "--node_rank", "3",
                       "--coordinator=10.0.0.1:1234", "--python=/opt/py/bin/python", "--dry-run",
                       "--", "--config.seed=1"))
    assert commands(result.stdout) == [[
        "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90", "/opt/py/bin/python", "-m",
        "instdisc_jax.main", *GPU, "--coordinator_address=10.0.0.1:1234", "--num_processes=4",
        "--process_id=3", "--config.seed=1",
    ]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir=/w"], "missing --config (the config file, e.g. configs/cifar10_resnet18.py)"),
        (["--config=c.py"],
         "missing --workdir (a local path or gs://bucket/path for checkpoints and summaries)"),
        ([*GPU, "--num_nodes=2", "--coordinator=h:1"],
         "missing --node_rank (this host's rank, 0..1)"),
        ([*GPU, "--num_nodes=2", "--node_rank=0"],
         "missing --coordinator (host:port of the rank-0 host, e.g. 10.0.0.1:1234)"),
        ([*GPU, "--num_nodes=2", "--node_rank=2", "--coordinator=h:1"],
         "--node_rank must be below --num_nodes (2), got 2"),
        ([*GPU, "--num_nodes=2", "--node_rank=1", "--coordinator=h"],
         "--coordinator must be host:port, got 'h'"),
        ([*GPU, "--node_rank=1"], "--node_rank and --coordinator need --num_nodes > 1"),
        ([*GPU, "--num_nodes=0"], "--num_nodes must be a whole number >= 1, got '0'"),
        ([*GPU, "--gpus=0;1"],
         "--gpus must be a comma-separated list of GPU indices, e.g. 0,1,2,3, got '0;1'"),
        ([*GPU, "--mem_fraction=1.5"], "--mem_fraction must be a number in (0, 1], e.g. 0.9, got '1.5'"),
        ([*GPU, "extra"], "unexpected argument 'extra' (trainer arguments go after --)"),
    ],
)
def test_gpu_argument_errors(args, message):
    usage_error(launch("gpu_host.sh", *args, "--dry-run"), message)


STAND_IN = """\
import json, os, sys, time
args = sys.argv[1:]
pid = next(a.split("=", 1)[1] for a in args if a.startswith("--process_id=")) \
    if any(a.startswith("--process_id=") for a in args) else "0"
out = os.environ["STAND_IN_OUT"]
# Written whole, then renamed: a test polling for the file never reads it half written.
with open(os.path.join(out, f"p{pid}.json.tmp"), "w") as f:
    json.dump({"args": args, "pid": os.getpid(),
               "env": {k: os.environ.get(k) for k in
                       ("XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES",
                        "XLA_PYTHON_CLIENT_MEM_FRACTION")}}, f)
os.replace(os.path.join(out, f"p{pid}.json.tmp"), os.path.join(out, f"p{pid}.json"))
print("stand-in", pid, "done", flush=True)
fail = os.environ.get("STAND_IN_FAIL")
if fail is not None:
    if pid == fail:
        time.sleep(0.3)
        print("failing on purpose", flush=True)
        sys.exit(3)
    time.sleep(120)
"""


@pytest.fixture
def stand_in(tmp_path):
    pkg = tmp_path / "stand_in_pkg"
    pkg.mkdir()
    (pkg / "stand_in.py").write_text(STAND_IN)
    out = tmp_path / "out"
    out.mkdir()

    def env(**extra):
        return clean_env(PYTHONPATH=str(pkg), STAND_IN_OUT=str(out), **extra)

    return env, out


def test_gpu_host_runs_the_printed_command(stand_in):
    env, out = stand_in
    result = ok(launch("gpu_host.sh", "--config=c.py", "--workdir=/tmp/w", "--gpus=1,3",
                       f"--python={sys.executable}", "--module=stand_in", "--", "a b",
                       env=env()))
    record = json.loads((out / "p0.json").read_text())
    assert record["args"] == ["--config=c.py", "--workdir=/tmp/w", "a b"]
    assert record["env"]["CUDA_VISIBLE_DEVICES"] == "1,3"
    assert record["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
    assert "stand-in 0 done" in result.stdout


# --- local_multiprocess.sh -----------------------------------------------------------------------


def test_local_dry_run(tmp_path):
    workdir = tmp_path / "w"
    result = ok(launch("local_multiprocess.sh", "--num_processes=2", "--devices_per_process=4",
                       "--config=configs/fm.py", f"--workdir={workdir}", "--port=12345",
                       "--dry-run", "--", "--config.note=a b"))
    lines = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert lines == [f"+ mkdir -p {workdir}/logs"] + [
        f"+ env XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python3 -m "
        f"instdisc_jax.main --config=configs/fm.py --workdir={workdir} "
        f"--coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id={i} "
        f"--config.note='a b' > {workdir}/logs/process_{i}.log 2>&1 &"
        for i in range(2)
    ]
    assert not workdir.exists()


def test_local_picks_a_free_port_and_keeps_other_xla_flags(tmp_path):
    result = ok(launch("local_multiprocess.sh", "--config=c.py", f"--workdir={tmp_path}",
                       "--dry-run", env=clean_env(
                           XLA_FLAGS="--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=8")))
    cmds = commands(result.stdout)[1:]
    assert len(cmds) == 2  # default: 2 processes
    assert cmds[0][1] == ("XLA_FLAGS=--xla_dump_to=/tmp/d "
                          "--xla_force_host_platform_device_count=4")  # default: 4 devices
    (address,) = [w for w in cmds[0] if w.startswith("--coordinator_address=")]
    assert re.fullmatch(r"--coordinator_address=127\.0\.0\.1:\d+", address)
    assert address in cmds[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir=/w"], "missing --config (the config file, e.g. configs/fashion_mnist.py)"),
        (["--config=c.py"], "missing --workdir (the directory for checkpoints and summaries)"),
        (["--config=c.py", "--workdir=gs://b/w"],
         "--workdir gs://b/w is not local: pass --log_dir for the process logs"),
        (["--config=c.py", "--workdir=/w", "--num_processes=0"],
         "--num_processes must be a whole number >= 1, got '0'"),
        (["--config=c.py", "--workdir=/w", "--devices_per_process=two"],
         "--devices_per_process must be a whole number >= 1, got 'two'"),
    ],
)
def test_local_argument_errors(args, message):
    usage_error(launch("local_multiprocess.sh", *args, "--dry-run"), message)


def test_local_gcs_workdir_with_log_dir(tmp_path):
    result = ok(launch("local_multiprocess.sh", "--config=c.py", "--workdir=gs://b/w",
                       f"--log_dir={tmp_path}/logs", "--port=1", "--dry-run"))
    first = commands(result.stdout)[1]
    assert "--workdir=gs://b/w" in first
    assert first[-5:] == ["--process_id=0", ">", f"{tmp_path}/logs/process_0.log", "2>&1", "&"]


@pytest.mark.slow
def test_local_starts_p_processes_with_their_flags(tmp_path, stand_in):
    env, out = stand_in
    workdir = tmp_path / "w"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = ok(launch("local_multiprocess.sh", "--num_processes=3", "--devices_per_process=2",
                       "--config=c.py", f"--workdir={workdir}", f"--port={port}",
                       f"--python={sys.executable}", "--module=stand_in", "--", "x y", "",
                       env=env()))
    for i in range(3):
        record = json.loads((out / f"p{i}.json").read_text())
        assert record["args"] == [
            "--config=c.py", f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=3", f"--process_id={i}", "x y", "",
        ]
        assert record["env"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
        assert record["env"]["JAX_PLATFORMS"] == "cpu"
        assert (workdir / "logs" / f"process_{i}.log").read_text() == f"stand-in {i} done\n"
    assert "# all 3 processes finished" in result.stdout


@pytest.mark.slow
def test_local_one_failure_stops_the_others(tmp_path, stand_in):
    env, out = stand_in
    workdir = tmp_path / "w"
    start = time.monotonic()
    result = launch("local_multiprocess.sh", "--num_processes=3", "--devices_per_process=1",
                    "--config=c.py", f"--workdir={workdir}", f"--python={sys.executable}",
                    "--module=stand_in", env=env(STAND_IN_FAIL="1"), timeout=60)
    elapsed = time.monotonic() - start
    assert result.returncode == 3
    assert elapsed < 20  # the others sleep 120 s: they were stopped, not waited for
    assert "error: process 1 exited with status 3; stopping the others." in result.stderr
    assert "failing on purpose" in result.stderr  # the end of its log
    for i in (0, 2):
        pid = json.loads((out / f"p{i}.json").read_text())["pid"]
        assert wait_until(lambda: process_gone(pid), timeout=5)


@pytest.mark.slow
def test_local_sigterm_stops_every_process(tmp_path, stand_in):
    env, out = stand_in
    script = subprocess.Popen(
        [str(LAUNCH / "local_multiprocess.sh"), "--num_processes=2", "--config=c.py",
         f"--workdir={tmp_path / 'w'}", f"--python={sys.executable}", "--module=stand_in"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env(STAND_IN_FAIL="none"),  # no process fails: both sleep 120 s
    )
    try:
        assert wait_until(lambda: all((out / f"p{i}.json").exists() for i in range(2)))
        pids = [json.loads((out / f"p{i}.json").read_text())["pid"] for i in range(2)]
        script.send_signal(signal.SIGTERM)
        _, stderr = script.communicate(timeout=30)
    finally:
        if script.poll() is None:
            script.kill()
    assert script.returncode == 130
    assert stderr.startswith("error: interrupted; stopping the processes")
    for pid in pids:
        assert wait_until(lambda: process_gone(pid), timeout=5)


JAX_STAND_IN = """\
import json, os, sys
from absl import app, flags
flags.DEFINE_string("config", None, "")
flags.DEFINE_string("workdir", None, "")
flags.DEFINE_string("coordinator_address", None, "")
flags.DEFINE_integer("num_processes", None, "")
flags.DEFINE_integer("process_id", None, "")
FLAGS = flags.FLAGS

def main(argv):
    import jax
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    with open(os.path.join(FLAGS.workdir, f"p{FLAGS.process_id}.json"), "w") as f:
        json.dump({"process_index": jax.process_index(), "process_count": jax.process_count(),
                   "device_count": jax.device_count(),
                   "local_device_count": jax.local_device_count(),
                   "platform": jax.devices()[0].platform}, f)

app.run(main)
"""


@pytest.mark.slow
def test_local_processes_join_one_jax_job(tmp_path):
    pytest.importorskip("jax")
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "jax_stand_in.py").write_text(JAX_STAND_IN)
    workdir = tmp_path / "w"
    workdir.mkdir()
    ok(launch("local_multiprocess.sh", "--num_processes=2", "--devices_per_process=3",
              "--config=c.py", f"--workdir={workdir}", f"--python={sys.executable}",
              "--module=jax_stand_in", env=clean_env(PYTHONPATH=str(pkg)), timeout=120))
    for i in range(2):
        record = json.loads((workdir / f"p{i}.json").read_text())
        assert record == {"process_index": i, "process_count": 2, "device_count": 6,
                          "local_device_count": 3, "platform": "cpu"}
