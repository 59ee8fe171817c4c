"""The benchmark scripts refuse a count of 0 by name, before timing anything."""

import importlib
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


@pytest.mark.parametrize(
    "script, flags, message",
    [
        # A bare --lengths (nargs="*") gave [], read as "the default": the full-size run.
        (attention, ["--lengths"], "argument --lengths: expected at least one argument"),
        (gpu, ["--lengths"], "argument --lengths: expected at least one argument"),
        # A bare --sections ran no section and exited 0.
        (gpu, ["--sections"], "argument --sections: expected at least one argument"),
        # These failed in dot_product_attention after compiling, naming its arguments
        # (local_window_size, dropout_rate), not the flag.
        (attention, ["--window", "-3"], "argument --window: must be >= 0, got -3"),
        (attention, ["--dropout", "1.5"], "argument --dropout: must be in [0, 1), got 1.5"),
        (attention, ["--dropout", "-0.1"], "argument --dropout: must be in [0, 1), got -0.1"),
    ],
)
def test_empty_lists_and_out_of_range_settings_are_refused(
    monkeypatch, capsys, script, flags, message
):
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *flags, "--no-such"])
    with pytest.raises(SystemExit) as exit_info:
        script.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script", ["attention", "lstm", "gpt", "gpu", "whole_run"])
@pytest.mark.parametrize("where", ["folder", "missing folder"])
def test_a_json_path_that_cannot_be_written_is_refused_before_timing(
    monkeypatch, capsys, tmp_path, script, where
):
    """It failed in write_json (IsADirectoryError, FileNotFoundError) only after the whole
    benchmark had run, and its figures were lost."""
    module = importlib.import_module(f"benchmarks.{script}")
    path = tmp_path if where == "folder" else tmp_path / "no-such-folder" / "out.json"
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--json", str(path), "--no-such"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --json:" in err
    if where == "folder":
        assert f"{str(tmp_path)!r} is a folder, not a file" in err
    else:
        assert f"folder {str(path.parent)!r} does not exist" in err


@pytest.mark.parametrize(
    "flag, message",
    [
        # ran no job, printed an empty table and exited 0 without its JSON
        ("--repeats", "--repeats must be >= 1, got 0"),
        # ran lm.py (about 15 s), then nanoGPT's loop, which saved no checkpoint at step 0,
        # and its sample.py failed on the missing file
        ("--steps", "--steps must be >= 1, got 0"),
    ],
)
def test_whole_run_settings_below_one_are_refused(monkeypatch, capsys, flag, message):
    from benchmarks import whole_run

    def no_job(cmd):
        raise AssertionError("a job was started")

    monkeypatch.setattr(whole_run, "run", no_job)
    monkeypatch.setattr(sys, "argv", ["whole_run.py", flag, "0"])
    with pytest.raises(SystemExit) as exit_info:
        whole_run.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("peak", ["-197", "nan", "inf"])
def test_a_peak_tflops_that_is_not_a_finite_size_is_refused(monkeypatch, capsys, peak):
    """It printed a negative (or NaN, or zero) MFU after timing every mesh."""

    def no_worker(*args, **kwargs):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(scaling.subprocess, "run", no_worker)
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--peak-tflops", peak])
    with pytest.raises(SystemExit) as exit_info:
        scaling.main()
    assert exit_info.value.code == 2
    want = f"--peak-tflops must be a finite number >= 0, got {float(peak)}"
    assert want in capsys.readouterr().err


def test_write_json_never_leaves_a_cut_off_file(monkeypatch, tmp_path):
    """A script stopped while rewriting its JSON (whole_run.py rewrites it after each job)
    left a cut-off file in place of the figures written before; run_all.py then failed on
    it. Now the previous complete file stays."""
    import json

    out = tmp_path / "figures.json"
    attention.write_json(str(out), {"whole_run": {"jaxattn_s": 130.0}})

    def dump_then_die(obj, f, **kwargs):
        f.write('{"machine": "cut off')
        raise KeyboardInterrupt

    monkeypatch.setattr(attention.json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        attention.write_json(str(out), {"whole_run": {"jaxattn_s": 130.0, "torch_s": 120.0}})
    assert json.loads(out.read_text())["whole_run"] == {"jaxattn_s": 130.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.json"]  # no .partial left
    # A value JSON cannot hold fails the write the same way; "" means no JSON, as before.
    monkeypatch.undo()
    with pytest.raises(TypeError):
        attention.write_json(str(out), {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures.json"]
    assert attention.json_path("") == ""
