"""For tests that start Python subprocesses: train/ scripts, ``jax.distributed`` workers."""

import os
import socket


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
