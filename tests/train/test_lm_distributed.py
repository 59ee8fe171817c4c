"""train/lm.py across processes: two local processes joined by ``jax.distributed``.

Each process simulates 4 CPU devices, so the run has 8 devices on a (2, 2, 2) mesh and the
processes talk through gloo on 127.0.0.1. The test trains, checkpoints, resumes, checks
the losses against a one-device run, and samples from the checkpoint on one device.
"""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxattn.training.metrics import read_metrics
from tests.processes import cpu_env, finish_processes, free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "train" / "lm.py"
TINY = REPO / "train" / "configs" / "tiny.py"
COMMON = [
    f"--config={TINY}", "--noprogress", "--num_samples=0", "--config.batch_size=8",
    "--config.eval_every=2", "--config.eval_batches=2", "--config.checkpoint_every=50",
    "--compilation_cache=",  # Each test compiles afresh; nothing written to ~/.cache.
]  # fmt: skip


def start_processes(
    workdir, num_steps, *, processes=2, devices_each=4, mesh=(2, 2, 2), command=(str(SCRIPT),)
):
    env = cpu_env(devices_each)
    args = [
        *COMMON, f"--workdir={workdir}", f"--config.num_steps={num_steps}",
        f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}",
        f"--config.mesh.tensor={mesh[2]}",
    ]  # fmt: skip
    if processes > 1:
        args += [f"--coordinator_address=127.0.0.1:{free_port()}", f"--num_processes={processes}"]
    # The processes must take a Ctrl-C: run as a shell's background job (nohup ... &), this
    # test process ignores SIGINT, its children would inherit that, and the loop rightly
    # keeps an ignored SIGINT ignored. (Python handlers themselves become SIG_DFL on exec.)
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        return [
            subprocess.Popen(
                [sys.executable, *command, *args]
                + ([f"--process_id={i}"] if processes > 1 else []),
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for i in range(processes)
        ]
    finally:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def finish(procs, returncode=0, timeout=900):
    """Each process's output (stdout and stderr together)."""
    return [out for out, _ in finish_processes(procs, returncode, timeout)]


def val_losses(workdir):
    """{step: val_loss} (the last record per step)."""
    records = read_metrics(workdir / "metrics.jsonl")
    return {r["step"]: r["val_loss"] for r in records if r.get("val_loss") is not None}


def wait_for_step(workdir, step, procs, timeout=600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = workdir / "metrics.jsonl"
        if path.is_file() and any(r["step"] >= step for r in read_metrics(path)):
            return
        assert all(p.poll() is None for p in procs), "a process exited before the signal"
        time.sleep(0.2)
    raise AssertionError(f"no metrics for step {step} after {timeout} s")


@pytest.mark.slow
def test_two_processes_stop_together_resume_and_match_one_device(tmp_path):
    workdir = tmp_path / "two_processes"
    procs = start_processes(workdir, 500)
    wait_for_step(workdir, 4, procs)
    procs[1].send_signal(signal.SIGTERM)  # Preemption reaches one host only ...
    # ... and both save one checkpoint at the same step and exit with 143 (not finished).
    first = finish(procs, returncode=143)
    match = re.search(r"saved a checkpoint at step (\d+)", first[0])
    assert match, first[0][-3000:]
    stopped = int(match.group(1))
    assert 4 <= stopped < 500
    assert "over 8 cpu devices, process 0 of 2" in first[0]
    assert "data:" not in first[1]  # Only process 0 prints.
    data_dir = workdir / "checkpoints" / str(stopped) / "data"
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json",
    ]  # fmt: skip

    second = finish(start_processes(workdir, stopped + 2))
    assert "Resumed from" in second[0] and f"Done: step {stopped + 2}" in second[0]

    reference = tmp_path / "one_device"
    finish(start_processes(reference, stopped + 2, processes=1, devices_each=1, mesh=(1, 1, 1)))
    got, want = val_losses(workdir), val_losses(reference)
    common = sorted(set(got) & set(want))
    assert stopped + 2 in common and len(common) >= 3, (got, want)
    for step in common:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (step, got, want)

    # The 8-device checkpoint of two processes samples on one device.
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), f"--workdir={workdir}", "--sample_only",
         "--num_samples=1", "--sample_tokens=20", "--compilation_cache="],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Sampling from {workdir / 'checkpoints' / str(stopped + 2)}" in proc.stdout


@pytest.mark.slow
def test_ctrl_c_on_one_process_stops_both_with_one_checkpoint(tmp_path):
    """A SIGINT raised KeyboardInterrupt in that process only: the other waited in a
    collective (and it in JAX's shutdown barrier) for minutes, and nothing was saved."""
    workdir = tmp_path / "ctrl_c"
    procs = start_processes(workdir, 500)
    wait_for_step(workdir, 2, procs)
    procs[1].send_signal(signal.SIGINT)
    outputs = []
    try:
        outputs = [proc.communicate(timeout=90)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [143, 143], outputs[0][-3000:]
    stopped = int(re.search(r"saved a checkpoint at step (\d+)", outputs[0]).group(1))
    data_dir = workdir / "checkpoints" / str(stopped) / "data"
    assert sorted(p.name for p in data_dir.iterdir()) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json",
    ]  # fmt: skip


# train/lm.py (argv[1]) with process 1 late by 8 s (its text loads late), as on a slower host.
LATE = """
import runpy, sys, time
from pathlib import Path
import jax
from jaxattn.training import data
load = data.load_text
def late(path=None):
    if jax.process_index() == 1:
        time.sleep(8)
    return load(path)
data.load_text = late
sys.argv = sys.argv[1:]
sys.path.insert(0, str(Path(sys.argv[0]).parent))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_late_process_joins_a_fresh_run(tmp_path):
    """Process 0 found no checkpoints folder and created it; process 1, looking later, found
    it and opened a Checkpointer that process 0 did not: both hung at orbax's barriers
    (for good: JAX's preemption service takes the SIGTERM that would stop them)."""
    workdir = tmp_path / "late"
    procs = start_processes(
        workdir, 2, devices_each=1, mesh=(2, 1, 1), command=("-c", LATE, str(SCRIPT))
    )
    first, _ = finish(procs, timeout=300)  # (a hang: TimeoutExpired)
    assert "Done: step 2" in first, first[-3000:]
    assert "Resumed" not in first


def test_joining_processes_needs_all_three_flags(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *COMMON, f"--workdir={tmp_path}",
         "--coordinator_address=127.0.0.1:1234", "--num_processes=2"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "--process_id missing" in proc.stderr
    assert not any(tmp_path.iterdir())  # Nothing written.


@pytest.mark.slow
def test_a_process_whose_peers_never_join_gives_up_after_the_distributed_timeout(tmp_path):
    """Process 0 of 2 started alone (process 1 failed before it joined): it waited
    jax.distributed's 300 s in silence; --distributed_timeout shortens the wait, and the
    process says what it waits for before it does."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *COMMON, f"--workdir={tmp_path / 'run'}",
         f"--coordinator_address=127.0.0.1:{free_port()}", "--num_processes=2",
         "--process_id=0", "--distributed_timeout=3"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0 and time.monotonic() - start < 200
    assert (
        "Joining the run's processes as process 0 of 2 through 127.0.0.1:"
        in proc.stderr.splitlines()[0]
    )
    assert "each waits up to 3 s for all of them (--distributed_timeout)" in proc.stderr
    assert "DEADLINE_EXCEEDED" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_mesh_that_does_not_fit_the_devices_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *COMMON, f"--workdir={tmp_path}", "--config.mesh.data=2"],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "product must equal the device count" in proc.stderr


def start_joined(args_of, devices_each=1, **env_changes):
    """Two processes of ``SCRIPT``, joined; ``args_of(i)``: process i's flags."""
    env, port = cpu_env(devices_each, **env_changes), free_port()
    joined = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
    return [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *args_of(i), *joined, f"--process_id={i}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]


@pytest.mark.slow
def test_sigterm_stops_sampling_on_every_process(tmp_path):
    """JAX's preemption service took SIGTERM for good: outside fit's loop nothing asked
    it, and --sample_only (or the samples after training) ran on to the end."""
    finish(start_processes(tmp_path, 2, processes=1, devices_each=1, mesh=(1, 1, 1)))
    sample = [
        f"--workdir={tmp_path}", "--sample_only", "--num_samples=1", "--compilation_cache=",
        "--sample_tokens=1000000",  # minutes of sampling
    ]  # fmt: skip
    procs = start_joined(lambda i: sample, PYTHONUNBUFFERED="1")
    try:
        for line in procs[0].stdout:
            if line.startswith("Sampling from"):
                break
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    # As one process: ended by the signal (status 143 in a shell).
    assert [proc.returncode for proc in procs] == [-signal.SIGTERM] * 2, outputs


@pytest.mark.slow
def test_an_error_on_one_process_is_named_by_the_other(tmp_path):
    """A data file missing on process 1's host only: process 1 said so, and process 0 waited
    2 minutes for its devices, then ended in a traceback that did not say why."""
    args = [*COMMON, f"--workdir={tmp_path / 'run'}", "--config.mesh.data=2"]
    missing = tmp_path / "missing.txt"
    # (a data_path of its own, as a host reading a local copy of the data may be given)
    procs = start_joined(lambda i: args + ([f"--config.data_path={missing}"] if i else []))
    first, second = finish(procs, returncode=1, timeout=150)
    assert f"error: text data file not found: '{missing}'" in second, second[-3000:]
    assert "error: process 1 of the run failed" in first and "not found" in first, first[-3000:]
    assert "Traceback" not in first


@pytest.mark.parametrize(
    "process_1, named",
    [
        (["--config.learning_rate=0.05"], "config.learning_rate 0.01 -> 0.05"),
        (["--config.num_steps=4"], "config.num_steps 2 -> 4"),
        ("workdir", "--workdir '{run}' -> '{other}'"),
    ],
    ids=["learning_rate", "num_steps", "workdir"],
)
def test_processes_given_different_settings_are_refused_naming_them(tmp_path, process_1, named):
    """Process 1's own learning rate trained its replicas of the weights with it, silently
    (the checkpoint recorded process 0's config); its own num_steps left process 0 waiting
    in a collective after its last step until JAX aborted the other; its own workdir failed
    orbax's save naming a temporary file while process 0 hung."""
    run, other = tmp_path / "run", tmp_path / "other"

    def args_of(i):
        args = [*COMMON, f"--workdir={run}", "--config.num_steps=2", "--config.mesh.data=2"]
        if i == 1:
            args += [f"--workdir={other}"] if process_1 == "workdir" else process_1
        return args

    outputs = finish(start_joined(args_of), returncode=1, timeout=120)
    want = (
        "error: process 1 of the run was given other settings than process 0 (process 0 -> "
        f"process 1: {named.format(run=run, other=other)}); give every process the same "
        "command line"
    )
    for out in outputs:  # Both stop at once with the same line, naming the setting.
        assert want in out and "Traceback" not in out, out[-3000:]
    assert not run.exists() and not other.exists()  # Nothing written.
