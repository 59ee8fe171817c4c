"""The benchmark scripts refuse a count of 0 by name, before timing anything."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import attention, gpu, lstm, scaling  # noqa: E402


@pytest.mark.parametrize(
    "script, flags, message",
    [
        # Read as ``args.repeats or default``, 0 silently meant the default.
        (attention, ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (lstm, ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        (gpu, ["--repeats", "0"], "argument --repeats: must be >= 1, got 0"),
        # A length or LSTM size of 0 failed after compiling, deep inside (ZeroDivisionError
        # for attention's batch, numpy's "negative dimensions", torch's "sequence length").
        (attention, ["--lengths", "0"], "must be >= 1, got 0"),
        (attention, ["--lengths", "256", "-4"], "must be >= 1, got -4"),
        (gpu, ["--lengths", "0"], "must be >= 1, got 0"),
        (lstm, ["--shape", "4", "0", "8", "16"], "must be >= 1, got 0"),
    ],
)
def test_counts_and_sizes_below_one_are_refused(monkeypatch, capsys, script, flags, message):
    """(The unknown flag after them makes argparse stop before timing anything if such a
    value were ever accepted again.)"""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *flags, "--no-such"])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        # It failed after timing every mesh, in the median of no step times.
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        # It failed in the worker, in JAX's CPU backend start-up.
        (["--devices", "2", "0"], "--devices must be >= 1, got 0"),
    ],
)
def test_zero_scaling_steps_or_devices_are_refused(monkeypatch, capsys, flags, message):
    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(scaling.subprocess, "run", no_worker)
    monkeypatch.setattr(sys, "argv", ["scaling.py", *flags])
    with pytest.raises(SystemExit) as exit_info:
        scaling.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_zero_whole_run_repeats_are_refused(monkeypatch, capsys):
    """``--repeats 0`` ran no job, printed an empty table and exited 0 without its JSON."""
    from benchmarks import whole_run

    def no_job(cmd):
        raise AssertionError("a job was started")

    monkeypatch.setattr(whole_run, "run", no_job)
    monkeypatch.setattr(sys, "argv", ["whole_run.py", "--repeats", "0"])
    with pytest.raises(SystemExit) as exit_info:
        whole_run.main()
    assert exit_info.value.code == 2
    assert "--repeats must be >= 1, got 0" in capsys.readouterr().err
