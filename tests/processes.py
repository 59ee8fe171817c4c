"""For tests that start Python subprocesses: train/ scripts, ``jax.distributed`` workers."""

import json
import os
import socket
import subprocess
import sys


def cpu_env(devices: int | None = None, **changes: str) -> dict[str, str]:
    """The environment of a child process under test: JAX on the CPU, with ``devices``
    simulated devices when given (after the suite's own ``XLA_FLAGS``, tests/conftest.py,
    which also puts this checkout first on ``PYTHONPATH`` for the child's ``import
    jaxattn``), and ``changes`` on top."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if devices is not None:
        flags = env.get("XLA_FLAGS", "")
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env | changes


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a ``jax.distributed`` coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_joined(code: str, processes: int, devices: int, *args: str, timeout: float = 120) -> list:
    """Run ``python -c code 127.0.0.1:PORT PROCESS_ID *args`` in ``processes`` processes of
    ``devices`` CPU devices each (the code joins them with ``jax.distributed.initialize``),
    assert that each exits 0, and return each one's last stdout line that is a JSON object,
    parsed (gloo prints its connections to stdout too)."""
    port, env = free_port(), cpu_env(devices=devices)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"127.0.0.1:{port}", str(i), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = finish_processes(procs, timeout=timeout)
    return [
        json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
        for out, _ in outputs
    ]


def finish_processes(procs: list, returncode: int = 0, timeout: float = 900) -> list[tuple]:
    """Wait for ``procs`` (killing any left when this fails), assert that each exited with
    ``returncode``, and return each one's ``(stdout, stderr)``."""
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == returncode, (err or out)[-4000:]
    return outputs
