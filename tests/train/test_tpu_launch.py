"""train/tpu/launch.sh without a TPU: syntax, usage, dry runs, and `run`/`stop` on a fake slice.

The fake slice is a ``gcloud`` stub first on PATH that runs each ``ssh --command`` in a local
bash with ``HOME`` set to a temporary folder (one "worker"), and a stub interpreter standing
in for the workers' venv python. No real gcloud is ever called: the stub rejects anything but
``compute tpus tpu-vm ssh``.
"""

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "train" / "tpu" / "launch.sh"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

FAKE_GCLOUD = """#!/usr/bin/env bash
# Stand-in for gcloud: `compute tpus tpu-vm ssh NAME ... --command=CMD` runs CMD locally.
if [ "$1 $2 $3 $4" != "compute tpus tpu-vm ssh" ]; then
  echo "fake gcloud: unexpected call: $*" >&2
  exit 99
fi
echo "$*" >> "$FAKE_GCLOUD_CALLS"
for arg in "$@"; do
  case "$arg" in --command=*) cmd="${arg#--command=}" ;; esac
done
exec bash -c "$cmd"
"""

FAKE_PYTHON_TRAINS = """#!/usr/bin/env bash
# Stand-in for the training script: record the arguments, run until SIGTERM.
printf '%s\\n' "$@" > "$HOME/args.txt"
trap 'echo SIGTERM > "$HOME/term.txt"; exit 0' TERM
echo "training..."
while true; do sleep 0.05; done
"""

FAKE_PYTHON_FAILS = """#!/usr/bin/env bash
echo "error: unknown config key 'bogus'" >&2
exit 2
"""


def launch(*args, env=None, check=False):
    full_env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    full_env.update(env or {})
    return subprocess.run(
        [BASH, str(LAUNCH), *args], env=full_env, capture_output=True, text=True, timeout=30,
        check=check,
    )  # fmt: skip


@pytest.fixture
def no_gcloud(tmp_path):
    """PATH whose gcloud fails loudly: dry runs must not call it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text("#!/bin/sh\necho 'gcloud was called' >&2\nexit 97\n")
    gcloud.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_bash_syntax():
    subprocess.run([BASH, "-n", str(LAUNCH)], check=True)


def test_no_arguments_prints_usage_and_fails():
    result = launch()
    assert result.returncode == 2
    assert "Usage: train/tpu/launch.sh COMMAND" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("flag", ["--help", "-h", "help"])
def test_help_prints_usage_and_succeeds(flag):
    result = launch(flag)
    assert result.returncode == 0, result.stderr
    assert "Usage: train/tpu/launch.sh COMMAND" in result.stdout
    for command in ("create", "create-queued", "install", "run", "logs", "ssh", "stop", "delete"):
        assert f"\n  {command} " in result.stdout


def test_unknown_command_fails():
    result = launch("launch-missiles")
    assert result.returncode == 2
    assert "unknown command: launch-missiles" in result.stderr


def dry_run(command, *args, env=None):
    result = launch(command, *args, env=env, check=True)
    return [shlex.split(line) for line in result.stdout.splitlines()]


def option(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, argv
    return values[0]


def test_dry_run_run_prints_ssh_to_all_workers_with_the_train_command(no_gcloud):
    env = no_gcloud | {"DRY_RUN": "1", "WORKDIR": "gs://bucket/runs/shake", "ZONE": "zone-x",
                       "PROJECT": "proj-y"}  # fmt: skip
    (argv,) = dry_run("run", "--config.model.dtype=bfloat16", "--prompt=it's ROMEO", env=env)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jaxattn"]
    assert "--worker=all" in argv
    assert option(argv, "zone") == "zone-x"
    assert option(argv, "project") == "proj-y"
    remote = option(argv, "command")
    subprocess.run([BASH, "-n", "-c", remote], check=True)  # The worker's shell can parse it.
    # The training command, as the worker's shell will split it.
    start = remote.index("$HOME/jaxattn-venv/bin/python")
    train = shlex.split(remote[start : remote.index(" > ", start)])
    assert train == [
        "$HOME/jaxattn-venv/bin/python",
        "train/lm.py",
        "--config=train/configs/shakespeare_char.py",
        "--distributed",
        "--workdir=gs://bucket/runs/shake",
        "--config.model.dtype=bfloat16",
        "--prompt=it's ROMEO",
    ]
    assert "nohup" in remote and "< /dev/null &" in remote  # Survives the ssh session.


def test_run_requires_a_gcs_workdir(no_gcloud):
    result = launch("run", env=no_gcloud | {"DRY_RUN": "1", "WORKDIR": "/tmp/local"})
    assert result.returncode == 2
    assert "WORKDIR=gs://" in result.stderr
    result = launch("run", env=no_gcloud | {"DRY_RUN": "1"})
    assert result.returncode == 2


def test_dry_run_create_and_queued_and_delete(no_gcloud):
    env = no_gcloud | {"DRY_RUN": "1", "ACCELERATOR_TYPE": "v6e-16",
                       "RUNTIME_VERSION": "v2-alpha-tpuv6e", "TPU_NAME": "t1"}  # fmt: skip
    (create,) = dry_run("create", env=env)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
    assert option(create, "accelerator-type") == "v6e-16"
    assert option(create, "version") == "v2-alpha-tpuv6e"
    assert "--spot" not in create and not any(a.startswith("--project") for a in create)
    (queued,) = dry_run("create-queued", env=env | {"SPOT": "1"})
    assert queued[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "t1-qr"]
    assert option(queued, "node-id") == "t1"
    assert option(queued, "runtime-version") == "v2-alpha-tpuv6e"
    assert "--spot" in queued
    (delete,) = dry_run("delete", env=env)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "t1"]
    (delete,) = dry_run("delete", env=env | {"USE_QUEUED": "1"})
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "t1-qr"]
    assert "--force" in delete


def test_dry_run_install_parses_and_installs_jax_tpu(no_gcloud):
    env = no_gcloud | {"DRY_RUN": "1", "REPO_URL": "https://example.org/jaxattn.git"}
    (argv,) = dry_run("install", env=env)
    assert "--worker=all" in argv
    remote = option(argv, "command")
    subprocess.run([BASH, "-n", "-c", remote], check=True)
    assert "git clone https://example.org/jaxattn.git" in remote
    assert "'jax[tpu]'" in remote and "gcsfs" in remote


@pytest.fixture
def fake_slice(tmp_path):
    """A one-worker "slice": fake gcloud on PATH, a worker HOME with a checkout and a venv."""
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    (home / "jaxattn").mkdir(parents=True)
    (home / "jaxattn-venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(home),
        "FAKE_GCLOUD_CALLS": str(tmp_path / "calls.txt"),
        "WORKDIR": "gs://bucket/fake-run",
        "START_CHECK_S": "1",  # Generous: the machine may be busy.
    }
    started = []
    yield home, env, started
    for pid in started:  # Never leave a stub running, whatever the test did.
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def install_python(home, text):
    python = home / "jaxattn-venv" / "bin" / "python"
    python.write_text(text)
    python.chmod(0o755)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill 0; it has exited all the same.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_run_starts_in_background_refuses_a_second_run_and_stop_sends_sigterm(fake_slice):
    home, env, started = fake_slice
    install_python(home, FAKE_PYTHON_TRAINS)
    assert "fake-run is not running" in launch("stop", env=env).stdout  # No pid file yet.
    result = launch("run", "--config.num_steps=7", env=env)
    assert result.returncode == 0, result.stderr
    assert "started fake-run" in result.stdout
    pid = int((home / "jaxattn-logs" / "fake-run.pid").read_text())
    started.append(pid)
    assert alive(pid)  # Still running after the ssh "session" returned.
    assert wait_for(lambda: (home / "args.txt").exists())
    assert (home / "args.txt").read_text().splitlines() == [
        "train/lm.py",
        "--config=train/configs/shakespeare_char.py",
        "--distributed",
        "--workdir=gs://bucket/fake-run",
        "--config.num_steps=7",
    ]
    assert "training..." in (home / "jaxattn-logs" / "fake-run.log").read_text()
    calls = Path(env["FAKE_GCLOUD_CALLS"]).read_text().splitlines()
    assert all("--worker=all" in call for call in calls)

    again = launch("run", env=env)
    assert again.returncode != 0
    assert f"already running: fake-run (pid {pid})" in again.stderr

    stopped = launch("stop", env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM sent to fake-run" in stopped.stdout
    assert wait_for(lambda: (home / "term.txt").exists() and not alive(pid))
    assert (home / "term.txt").read_text().strip() == "SIGTERM"


def test_run_reports_a_run_that_dies_at_once(fake_slice):
    home, env, _ = fake_slice
    install_python(home, FAKE_PYTHON_FAILS)
    result = launch("run", "--config.bogus=1", env=env)
    assert result.returncode != 0
    assert "fake-run exited within 1s" in result.stderr
    assert "unknown config key 'bogus'" in result.stderr  # The log's tail is shown.


def test_run_logs_and_stop_with_a_space_in_the_run_name(fake_slice):
    """RUN_NAME comes from WORKDIR's last part; with a space it used to split the log and pid
    paths in the worker's shell (output to a file `my`, no pid file, a false "exited")."""
    home, env, started = fake_slice
    install_python(home, FAKE_PYTHON_TRAINS)
    env = env | {"WORKDIR": "gs://bucket/my run"}
    result = launch("run", env=env)
    assert result.returncode == 0, result.stderr
    assert "started my run" in result.stdout
    pid = int((home / "jaxattn-logs" / "my run.pid").read_text())
    started.append(pid)
    assert wait_for(lambda: "training..." in (home / "jaxattn-logs" / "my run.log").read_text())
    assert "--workdir=gs://bucket/my run" in (home / "args.txt").read_text().splitlines()
    assert "training..." in launch("logs", env=env).stdout
    assert "SIGTERM sent to my run" in launch("stop", env=env).stdout
    assert wait_for(lambda: (home / "term.txt").exists() and not alive(pid))


@pytest.mark.parametrize(
    "command, setting, value",
    [
        ("create", "DRY_RUN", "true"),  # ran the real `gcloud ... create`: a billed slice
        ("create", "SPOT", "yes"),  # created an on-demand slice
        ("delete", "USE_QUEUED", "true"),  # deleted the node, left the queued request
        ("run", "ALLOW_LOCAL_WORKDIR", "yes"),
        ("logs", "FOLLOW", "true"),
    ],
)
def test_on_off_settings_other_than_0_or_1_are_refused(no_gcloud, command, setting, value):
    """Every value but 1 read as 0, silently."""
    env = no_gcloud | {"DRY_RUN": "1", "WORKDIR": "gs://b/run-x", setting: value}
    result = launch(command, env=env)
    assert result.returncode == 2
    assert f"launch.sh: {setting} must be 0 or 1, got '{value}'" in result.stderr
    assert "gcloud was called" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command", ["logs", "stop"])
def test_logs_and_stop_without_workdir_or_run_name_are_refused(no_gcloud, command):
    """Without WORKDIR they looked for a run named "run": `stop` printed "run is not running"
    and exited 0 while the run started with WORKDIR=gs://.../shakespeare went on."""
    result = launch(command, env=no_gcloud | {"DRY_RUN": "1"})
    assert result.returncode == 2
    assert "set WORKDIR (the one given to `run`) or RUN_NAME" in result.stderr
    assert result.stdout == ""
    (argv,) = dry_run(command, env=no_gcloud | {"DRY_RUN": "1", "RUN_NAME": "shakespeare"})
    assert "name=shakespeare;" in option(argv, "command")


def test_run_without_workdir_is_refused_even_when_local_is_allowed(no_gcloud):
    """With ALLOW_LOCAL_WORKDIR=1 it sent `--workdir=` (empty) to every worker."""
    result = launch("run", env=no_gcloud | {"DRY_RUN": "1", "ALLOW_LOCAL_WORKDIR": "1"})
    assert result.returncode == 2
    assert "set WORKDIR=" in result.stderr and result.stdout == ""
