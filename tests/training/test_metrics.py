"""Metrics: host reduction of sums and counts, JSONL lines, TensorBoard event files."""

import json
import math
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.training.metrics import Mean, MetricsWriter, read_metrics, reduce_means


def test_reduce_means_weights_by_count():
    steps = [
        {"loss": Mean(jnp.float32(3.0), jnp.float32(3)), "gn": Mean(jnp.float32(2.0), 1.0)},
        {"loss": Mean(jnp.float32(1.0), jnp.float32(1)), "gn": Mean(jnp.float32(4.0), 1.0)},
    ]
    got = reduce_means(steps)
    assert got == pytest.approx({"loss": 4.0 / 4.0, "gn": 3.0})


def test_reduce_means_of_nothing_is_empty():
    assert reduce_means([]) == {}


def test_a_mean_over_no_items_is_nan_not_zero():
    """An evaluation without one real target token has no loss; 0.0 would rank as the
    best val_loss where the loop's non-finite guard must stop the run."""
    got = reduce_means([{"val_loss": Mean(jnp.float32(0.0), jnp.float32(0))}])
    assert math.isnan(got["val_loss"])


def test_only_numbers_become_tensorboard_curves(tmp_path):
    """A bool is kept in metrics.jsonl but is no 0/1 curve; a None (no rate yet) is neither."""
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"x": 1.0, "flag": True, "tokens_per_s": None, "n": 3})
    [record] = read_metrics(tmp_path / "metrics.jsonl")
    assert record["flag"] is True and record["tokens_per_s"] is None
    [(_, events)] = tensorboard_events(tmp_path / "tb")
    tags = {v.tag for e in events for v in e.summary.value}
    assert tags == {"x", "n"}


def test_writer_lines_parse_and_mirror_to_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(10, {"train_loss": 2.5, "tokens_per_s": 1234.0})
        writer.write(20, {"val_loss": jnp.float32(2.25), "tokens_per_s": None})
        writer.write(30, {"train_loss": math.nan, "tokens_per_s": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # Strict JSON: no NaN tokens.
    assert records == read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [10, 20, 30]
    for r in records:
        assert "tokens_per_s" in r and ("train_loss" in r or "val_loss" in r)
    assert records[0]["train_loss"] == 2.5
    assert records[1]["val_loss"] == pytest.approx(2.25)
    assert records[2]["train_loss"] is None  # NaN is written as null.
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def strict_json(line):
    """``json.loads`` that refuses NaN and Infinity (which it accepts by default)."""

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(line, parse_constant=refuse)


def test_one_element_lists_are_scalars_and_never_nan_tokens(tmp_path):
    """A one-element list passes as a scalar, as a one-element array does; [nan] was
    written as [NaN], which no strict JSON reader parses."""
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"train_loss": [math.nan], "tokens_per_s": (2.5,), "x": np.ones(1)})
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    record = strict_json(line)
    assert (record["train_loss"], record["tokens_per_s"], record["x"]) == (None, 2.5, 1.0)
    [(_, events)] = tensorboard_events(tmp_path / "tb")
    assert {v.tag for e in events for v in e.summary.value} == {"tokens_per_s", "x"}


def test_a_non_scalar_metric_is_named(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        with pytest.raises(ValueError, match=r"train_loss at step 3 must be a scalar.*\(2,\)"):
            writer.write(3, {"train_loss": np.ones(2), "tokens_per_s": None})


def test_a_metric_that_is_no_number_is_named_before_anything_is_written(tmp_path):
    """A dict (np.size 1) was written as a nested JSON object, and a complex number or
    another object failed in json.dumps as "Object of type complex is not JSON
    serializable", naming neither the metric nor the step."""
    with MetricsWriter(tmp_path) as writer:
        for bad, kind in [({"loss": 1.0}, "dict"), (1 + 2j, "complex"), (object(), "object")]:
            message = rf"val at step 4 must be a real number, a bool, a str or None, got a {kind}"
            with pytest.raises(ValueError, match=message):
                writer.write(4, {"loss": 1.0, "val": bad})
        writer.write(5, {"b": np.bool_(True), "h": jnp.bfloat16(1.5), "s": "x", "n": np.int64(2)})
    [record] = read_metrics(tmp_path / "metrics.jsonl")
    assert (record["step"], record["b"], record["h"], record["s"], record["n"]) == (
        5,
        True,
        1.5,
        "x",
        2,
    )


def test_writer_appends_across_runs(tmp_path):
    for step in (1, 2):
        with MetricsWriter(tmp_path, tensorboard=False) as writer:
            writer.write(step, {"train_loss": 1.0, "tokens_per_s": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("remote", [False, True])
def test_a_record_cut_off_by_a_crash_does_not_swallow_the_next(tmp_path, monkeypatch, remote):
    from jaxattn.training import metrics

    monkeypatch.setattr(metrics, "is_remote", lambda path: remote)
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "train_lo')  # killed mid-write
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(2, {"train_loss": 2.0})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[1] == '{"step": 2, "train_lo'  # kept, on its own line
    assert json.loads(lines[2])["train_loss"] == 2.0
    with pytest.warns(UserWarning, match=r"metrics.jsonl: line 2 is not a JSON record"):
        records = read_metrics(path)
    assert [(r["step"], r["train_loss"]) for r in records] == [(1, 3.0), (2, 2.0)]


def test_writer_does_not_import_torch(tmp_path):
    """tensorboardX would import torch (~2 s) when installed; the writer keeps it out."""
    pytest.importorskip("torch")
    code = (
        "import sys\n"
        "from jaxattn.training.metrics import MetricsWriter\n"
        f"with MetricsWriter({str(tmp_path)!r}) as w:\n"
        "    w.write(1, {'loss': 0.5})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"  # ... and stays importable afterwards.
        "print(float(torch.ones(1)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1.0"
    assert list((tmp_path / "tb").iterdir())  # TensorBoard still got its event file.


def tensorboard_events(tb_dir):
    """``[(file name, [Event, ...]), ...]`` of the event files in ``tb_dir``, oldest first."""
    import struct

    from tensorboardX.proto import event_pb2

    files = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        events, data = [], path.read_bytes()
        while len(data) >= 12:
            (size,) = struct.unpack("<Q", data[:8])
            if len(data) < 16 + size:
                break
            events.append(event_pb2.Event.FromString(data[12 : 12 + size]))
            data = data[16 + size :]
        files.append((path.name, events))
    return files


def scalar_steps(events, tag):
    return [e.step for e in events if any(v.tag == tag for v in e.summary.value)]


def test_tensorboard_events_reach_the_disk_before_close(tmp_path):
    """A run killed with SIGKILL (OOM, lost VM) keeps the events it logged: tensorboardX
    flushed every 2 minutes, and steps before the last checkpoint were lost for good."""
    writer = MetricsWriter(tmp_path)
    try:
        for step in range(1, 6):
            writer.write(step, {"train_loss": 1.0 / step})
        deadline = time.monotonic() + 10
        while True:
            [(_, events)] = tensorboard_events(tmp_path / "tb")
            if scalar_steps(events, "train_loss") == [1, 2, 3, 4, 5]:
                break
            assert time.monotonic() < deadline, scalar_steps(events, "train_loss")
            time.sleep(0.2)
    finally:
        writer.close()


def test_purge_step_hides_a_killed_runs_later_events(tmp_path):
    with MetricsWriter(tmp_path, purge_step=7) as writer:
        writer.write(7, {"train_loss": 1.0})
    [(_, events)] = tensorboard_events(tmp_path / "tb")
    starts = [e.step for e in events if e.HasField("session_log")]
    assert starts == [7]  # TensorBoard drops earlier files' events at steps >= 7.


def test_writers_opened_in_the_same_second_keep_their_own_event_files(tmp_path):
    """tensorboardX names event files by the second; a resumed run (or a second fit in a
    notebook) opened within it used to overwrite the first file's events."""
    for step in (1, 2):
        with MetricsWriter(tmp_path) as writer:
            writer.write(step, {"train_loss": 1.0})
    files = tensorboard_events(tmp_path / "tb")
    assert [scalar_steps(events, "train_loss") for _, events in files] == [[1], [2]]
