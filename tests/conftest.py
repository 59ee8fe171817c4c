"""Test settings shared by the whole suite.

Strict dtype promotion makes an accidental int/float or f32/f64 mix an error instead of a
silent upcast. Tests compare against float64 NumPy references, so JAX stays in float32.

XLA's backend (LLVM) optimisation is off: the suite's time is mostly XLA compiling small
programs once each, and the tests check numbers and program structure (HLO, buffers,
shardings), not how fast the generated code runs, which is what ``benchmarks/`` measures
with the default level. The setting reaches the scripts and notebooks the tests start,
through the environment. To run the suite on optimised code, set the level yourself:
``XLA_FLAGS=--xla_backend_optimization_level=3 pytest ...`` (3 is XLA's default).

This checkout comes first on ``PYTHONPATH``, which the scripts, notebook kernels and child
processes the tests start inherit: a script's own folder (``train/``) or a kernel's
temporary folder comes first on its ``sys.path``, so ``import jaxattn`` there would find
whichever jaxattn is installed (another checkout's editable install, a release), not the
code under test.
"""

import contextlib
import json
import os
import subprocess
import sys

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import jax  # after XLA_FLAGS: the CPU backend reads them once, as it starts
import numpy as np
import pytest

from tests.processes import cpu_env

jax.config.update("jax_numpy_dtype_promotion", "strict")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture
def rng() -> jax.Array:
    """A fixed PRNG key; tests split it, never share global state."""
    return jax.random.key(0)


@pytest.fixture
def np_rng() -> np.random.Generator:
    """A seeded NumPy generator for reference inputs."""
    return np.random.default_rng(0)


def _correlated_draws(trees) -> list[tuple[str, str, float]]:
    """Pairs of random leaves (across ``trees``) whose leading entries correlate.

    A key used for two draws gives them equal leading entries (``normal(k, (T, D))`` is
    ``normal(k, (V, D))[:T]``), scaled by each leaf's std; independent draws of 8 or more
    entries do not correlate near 1. Constant leaves (zero biases, unit norms) are skipped.
    """
    leaves = []
    for i, tree in enumerate(trees):
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            flat = np.asarray(x, np.float64).ravel()
            if flat.size >= 8 and np.ptp(flat) > 0:
                leaves.append((f"[{i}]{jax.tree_util.keystr(path)}", flat))
    pairs = []
    for a, (name_a, x) in enumerate(leaves):
        for name_b, y in leaves[a + 1 :]:
            n = min(x.size, y.size)
            if n >= 8 and abs(r := float(np.corrcoef(x[:n], y[:n])[0, 1])) > 0.9:
                pairs.append((name_a, name_b, r))
    return pairs


@pytest.fixture
def assert_independent_draws():
    """``check(*trees)``: no two random leaves of the given init trees share their draws
    (a key reused by mistake ties parameters together, which shape and std checks miss)."""

    def check(*trees) -> None:
        pairs = _correlated_draws(trees)
        assert not pairs, f"leaves drawn from one key: {pairs}"

    return check


_TRACE_AND_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/backend_compile_duration",
)


@pytest.fixture
def count_traces():
    """``with count_traces() as traced: ...``: ``traced`` lists the functions JAX traced or
    compiled inside the block (by name), e.g. a jit cache miss or a loop run eagerly."""

    @contextlib.contextmanager
    def counting():
        traced: list[str] = []

        def listen(event: str, duration: float, **kwargs) -> None:
            if event in _TRACE_AND_COMPILE_EVENTS:
                traced.append(str(kwargs.get("fun_name", event)))

        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            yield traced
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)

    return counting


@pytest.fixture
def assert_compiled_once(count_traces):
    """``assert_compiled_once({name: call})``: each zero-argument ``call``, run once to warm
    up, traces and compiles nothing when run again (an eager loop or a jit cache miss
    would compile on every call)."""

    def check(calls: dict) -> None:
        for name, call in calls.items():
            jax.block_until_ready(call())
            with count_traces() as traced:
                jax.block_until_ready(call())
            assert traced == [], name

    return check


@pytest.fixture
def assert_inlined_when_traced():
    """``assert_inlined_when_traced(name, fun, *args)``: ``fun(*args)`` calls the jitted
    function ``name`` (a nested jit in its jaxpr) when its arguments are concrete, and
    inlines it, leaving the caller's program as it was, when they are traced."""

    def called(fun, *args) -> set[str]:
        return {str(eqn.params.get("name")) for eqn in jax.make_jaxpr(fun)(*args).jaxpr.eqns}

    def check(name: str, fun, *args) -> None:
        assert name in called(lambda: fun(*args)), "the check cannot see the nested jit"
        assert name not in called(fun, *args)

    return check


@pytest.fixture(scope="session")
def run_on_8_devices():
    """``run_on_8_devices(args, timeout) -> dict``: run ``python *args`` with 8 simulated CPU
    devices (they exist only in a fresh process: ``--xla_force_host_platform_device_count``
    must be set before JAX starts); its last stdout line, as JSON."""

    def run(args: list[str], timeout: int) -> dict:
        proc = subprocess.run(  # (the suite's XLA flags above, and the 8 devices)
            [sys.executable, *args], env=cpu_env(devices=8), capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
