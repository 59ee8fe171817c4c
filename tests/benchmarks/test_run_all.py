"""benchmarks/run_all.py: the targets table, and the --json contract of the scripts it runs."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks import run_all  # noqa: E402

# With torch installed the scripts must time it: a PyTorch row left out (a broken import, a
# renamed row) would otherwise read as "PyTorch not installed" and pass.
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _printed(stdout: str, name: str, column: int) -> str:
    """The cell ``column`` of the printed table row whose cells include ``name``."""
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and name in cells:
            return cells[column]
    raise AssertionError(f"no printed row {name!r} in:\n{stdout}")


def _results(torch: bool = True) -> dict:
    """Figures shaped as the scripts write them: some targets met, some missed."""
    attention = {"jaxattn auto": 0.8, "jax.nn": 3.2} | ({"torch SDPA": 0.6} if torch else {})
    lstm = {"jaxattn lstm_scan": 1.3}
    whole = {"steps": 2000, "jaxattn_s": 130.0, "jaxattn_val_loss": 1.87}
    if torch:
        lstm |= {"torch nn.LSTM": 1.2, "torch nn.LSTM, 1 thread": 2.0}
        whole |= {"torch_s": 120.0}
    return {
        "attention": {
            "attention": {"2048": {k: {"fwd_bwd_s": v} for k, v in attention.items()}},
            "long": {"peak_gib": 1.03, "seconds": 42.0, "finite": True},
        },
        "lstm": {"lstm": {"rows": {k: {"fwd_bwd_s": v} for k, v in lstm.items()}}},
        "gpt": {
            "train_step": {"jaxattn_s": 0.050, "torch_s": 0.055 if torch else None},
            "generation": {
                "new_tokens": 63,
                "cached_unrolled_s": 0.0063,
                "cached_scan_s": 0.0126,
                "full_pass_s": 0.252,
                "weight_products_s": 0.00441,
            }
            | ({"torch_no_cache_s": 0.189, "torch_cached_s": 0.063} if torch else {}),
            "compile": {"4_layers_s": 3.0, "48_layers_s": 3.3},
        },
        "whole_run": {"whole_run": whole},
    }


def _rows(lines: list[str]) -> dict[str, list[str]]:
    """Targets table -> {target text: [issue, measured, met]}."""
    cells = ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])
    return {c[0]: c[1:] for c in cells}


def test_summary_reads_each_target_against_its_threshold():
    rows = _rows(run_all.summary(_results(), {}))
    assert len(rows) == sum(len(t) for t in run_all.TARGETS.values())
    met = {text: cells[2] for text, cells in rows.items()}
    assert met["causal attention fwd+bwd, [4, 2048, 8, 64]: <= 1.5x SDPA"] == "yes"  # 1.33x
    assert met["the same: >= 5x faster than jax.nn.dot_product_attention"] == "**no**"  # 4x
    assert met["causal fwd+bwd at T = 32768 (B=1, N=8, H=64): < 4 GiB peak"] == "yes"
    lstm = rows["LSTM fwd+bwd, B=64 T=200 I=256 h=512: <= 1.0x PyTorch nn.LSTM"]
    assert lstm[2] == "**no**" and "1.08x" in lstm[1]  # against the faster torch row
    assert met["GPT train step (shakespeare_char_cpu): <= 1.0x nanoGPT in PyTorch"] == "yes"
    kv = rows["KV-cache generation: >= 20x nanoGPT's generate without a cache"]
    assert kv[2] == "yes" and "unroll_layers=True 100 vs 3000 µs/token: 30.0x" in kv[1]
    assert "the default layer scan 15.0x" in kv[1]
    assert "40.0x jaxattn's full pass padded to block_size" in kv[1]
    assert "20x needs <= 150 µs, the weight products alone take 70" in kv[1]
    assert "PyTorch with a KV cache 1000 µs/token" in kv[1]
    assert met["train-step compile, 48 layers: <= 1.5x 4 layers"] == "yes"
    assert met["whole train/lm.py run: <= nanoGPT's run of the same config"] == "**no**"
    assert met["val loss at step 2000: <= 1.88"] == "yes"
    assert {cells[0] for cells in rows.values()} == {"3", "5"}


def test_whole_run_compares_like_for_like_pairs():
    results = _results()
    whole = results["whole_run"]["whole_run"]
    target = "whole train/lm.py run: <= nanoGPT's run of the same config"
    whole |= {"torch_sampled_s": 135.0, "jaxattn_no_samples_s": 118.0}  # 130/135, 118/120
    _, measured, met = _rows(run_all.summary(results, {}))[target]
    assert "with 2 samples: 130 s vs 135 s: 0.96x" in measured
    assert "training only: 118 s vs 120 s: 0.98x" in measured and met == "yes"
    whole["jaxattn_no_samples_s"] = 121.0  # one pair over: not met
    assert _rows(run_all.summary(results, {}))[target][2] == "**no**"


def test_summary_without_torch_or_without_a_benchmark_says_why():
    results = _results(torch=False)
    del results["whole_run"]
    rows = _rows(run_all.summary(results, {"whole_run": "not run (--quick)"}))
    no_torch = [t for t, cells in rows.items() if cells[1].startswith("PyTorch not installed")]
    assert len(no_torch) == 4  # SDPA, nn.LSTM, nanoGPT's step and generate
    assert all(rows[text][2] == "-" for text in no_torch)
    assert rows["val loss at step 2000: <= 1.88"][1:] == ["not run (--quick)", "-"]
    assert rows["the same: >= 5x faster than jax.nn.dot_product_attention"][2] == "**no**"


@pytest.mark.slow
def test_lstm_script_writes_the_json_run_all_reads(tmp_path):
    out = tmp_path / "lstm.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "lstm.py"), "--shape", "3", "5", "7", "11",
           "--repeats", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["lstm"]["shape"] == [3, 5, 7, 11]
    rows = results["lstm"]["rows"]
    assert {"jaxattn lstm_scan", "jaxattn, lengths", "flax nn.RNN"} <= set(rows)
    for row in rows.values():
        assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0 and row["n"] == 1
    line = _rows(run_all.summary({"lstm": results}, {}))[
        "LSTM fwd+bwd, B=64 T=200 I=256 h=512: <= 1.0x PyTorch nn.LSTM"
    ]
    assert line[2] in {"yes", "**no**", "-"} and line[1] != "not run"
    if HAVE_TORCH:
        assert {"torch nn.LSTM", "torch nn.LSTM, 1 thread"} <= set(rows)
        assert line[2] in {"yes", "**no**"}, line
        # The printed ratio is ours over the faster PyTorch row (wall, then CPU time).
        torch_rows = [row for name, row in rows.items() if name.startswith("torch")]
        ours = rows["jaxattn lstm_scan"]
        want = [ours[k] / min(r[k] for r in torch_rows) for k in ("fwd_bwd_s", "fwd_bwd_cpu_s")]
        printed = _printed(proc.stdout, "jaxattn lstm_scan", 6)
        assert printed == f"{want[0]:.2f}, {want[1]:.2f}", (printed, want)


def _run_script(name: str, *args: str, json_path: Path) -> tuple[dict, str]:
    """The script's JSON and its printed tables."""
    cmd = [sys.executable, str(REPO / "benchmarks" / name), *args, "--json", str(json_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(json_path.read_text()), proc.stdout


@pytest.mark.slow
def test_attention_and_gpt_scripts_write_the_json_run_all_reads(tmp_path):
    """The two scripts at their smallest (about 30 s), read by run_all as a real run is: a
    renamed key or a row left out would show as "no figure" here, not in the next run."""
    attention, printed = _run_script(
        "attention.py", "--lengths", "64", "--repeats", "1", json_path=tmp_path / "a.json"
    )
    rows = attention["attention"]["64"]
    for row in rows.values():
        assert row["fwd_s"] > 0 and row["fwd_bwd_s"] > 0
    if HAVE_TORCH:  # the ratio column is each row over SDPA (wall, then CPU time)
        sdpa = rows["torch SDPA"]
        for name, row in rows.items():
            want = [row[k] / sdpa[k] for k in ("fwd_bwd_s", "fwd_bwd_cpu_s")]
            assert _printed(printed, name, 7) == f"{want[0]:.2f}, {want[1]:.2f}", name
    attention["attention"]["2048"] = attention["attention"].pop("64")  # the target's T
    gpt_args = ("--quick", "--sections", "train,generate,compile,matmul")
    gpt_json, printed = _run_script("gpt.py", *gpt_args, json_path=tmp_path / "g.json")
    if HAVE_TORCH:  # the train step's "vs PyTorch" column is ours over nanoGPT's
        step = gpt_json["train_step"]
        want = f"{step['jaxattn_s'] / step['torch_s']:.2f}x"
        assert _printed(printed, "jaxattn (jit, XLA:CPU)", 4) == want
    table = _rows(run_all.summary({"attention": attention, "gpt": gpt_json}, {}))
    for target in run_all.TARGETS["attention"] + run_all.TARGETS["gpt"]:
        measured = table[target.text][1]
        if "32768" in target.text:
            assert measured == "not run (--long)"
        else:
            assert not measured.startswith(("no figure", "not run")), (target.text, measured)
            assert not (HAVE_TORCH and "PyTorch not installed" in measured), target.text
    kv = table["KV-cache generation: >= 20x nanoGPT's generate without a cache"][1]
    assert "unroll_layers=True" in kv and "the default layer scan" in kv


def test_main_reports_skipped_and_failed_scripts(monkeypatch, capsys, tmp_path):
    figures = _results()

    del figures["attention"]["long"]

    def fake_run(cmd):  # lstm.py fails at once, attention.py after writing its table
        script = Path(cmd[1]).stem
        if script == "lstm":
            return subprocess.CompletedProcess(cmd, 3)
        out = Path(cmd[cmd.index("--json") + 1])
        out.write_text(json.dumps({"machine": "test machine"} | figures[script]))
        return subprocess.CompletedProcess(cmd, 1 if script == "attention" else 0)

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    stale = {"machine": "an earlier run"} | figures["lstm"]  # must not stand in for this run's
    (tmp_path / "lstm.json").write_text(json.dumps(stale))
    argv = ["run_all.py", "--only", "attention", "lstm", "gpt", "--json-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    failures = r"attention\.py failed \(exit 1\); lstm\.py failed \(exit 3\)"
    with pytest.raises(SystemExit, match=failures):
        run_all.main()
    out = capsys.readouterr().out
    assert "# Targets — test machine" in out
    rows = _rows(out[out.index("| target |") :].strip().splitlines())
    assert rows["LSTM fwd+bwd, B=64 T=200 I=256 h=512: <= 1.0x PyTorch nn.LSTM"][1] == (
        "lstm.py failed (exit 3)"
    )
    assert rows["val loss at step 2000: <= 1.88"][1] == "not run (--only)"
    assert rows["train-step compile, 48 layers: <= 1.5x 4 layers"][2] == "yes"
    # attention.py's table was written before it failed: its figures still count.
    assert rows["causal attention fwd+bwd, [4, 2048, 8, 64]: <= 1.5x SDPA"][2] == "yes"
    assert rows["causal fwd+bwd at T = 32768 (B=1, N=8, H=64): < 4 GiB peak"][1] == (
        "not run (--long)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["attention.json", "gpt.json"]


def test_a_missing_figure_is_reported_not_raised():
    results = _results()
    del results["gpt"]["compile"]
    rows = _rows(run_all.summary(results, {}))
    assert rows["train-step compile, 48 layers: <= 1.5x 4 layers"][1:] == [
        "no figure (KeyError: 'compile')",
        "-",
    ]


def _set(*path: str):
    """A setter of the figure at ``path`` in ``_results()``."""

    def set_figure(results: dict, value) -> None:
        for key in path[:-1]:
            results = results[key]
        results[path[-1]] = value

    return set_figure


_ATTENTION_2048 = ("attention", "attention", "2048")
_LSTM_ROWS = ("lstm", "lstm", "rows")
_WHOLE = ("whole_run", "whole_run")


# (target, figure set, value at the threshold, its measured text, value just past it); the
# other figures of ``_results()`` are the reference: SDPA 0.6 s, jax.nn 3.2 s, the faster
# torch nn.LSTM 1.2 s, nanoGPT's step 55 ms, its generate 0.189 s, 4 layers' compile 3.0 s.
THRESHOLDS = [
    ("causal attention fwd+bwd, [4, 2048, 8, 64]: <= 1.5x SDPA",
     _set(*_ATTENTION_2048, "jaxattn auto", "fwd_bwd_s"), 0.9, "0.900 s vs 0.600 s: 1.50x", 0.901),
    ("the same: >= 5x faster than jax.nn.dot_product_attention",
     _set(*_ATTENTION_2048, "jaxattn auto", "fwd_bwd_s"), 0.64, "3.200 s vs 0.640 s: 5.00x faster",
     0.641),
    ("causal fwd+bwd at T = 32768 (B=1, N=8, H=64): < 4 GiB peak",
     _set("attention", "long", "peak_gib"), 3.99, "3.99 GiB peak RSS, 42 s", 4.0),
    ("LSTM fwd+bwd, B=64 T=200 I=256 h=512: <= 1.0x PyTorch nn.LSTM",
     _set(*_LSTM_ROWS, "jaxattn lstm_scan", "fwd_bwd_s"), 1.2, "1.200 s vs 1.200 s: 1.00x", 1.201),
    ("GPT train step (shakespeare_char_cpu): <= 1.0x nanoGPT in PyTorch",
     _set("gpt", "train_step", "jaxattn_s"), 0.055, "55.0 ms vs 55.0 ms: 1.00x", 0.0551),
    ("KV-cache generation: >= 20x nanoGPT's generate without a cache",
     _set("gpt", "generation", "cached_unrolled_s"), 0.00945,
     "unroll_layers=True 150 vs 3000 µs/token: 20.0x",
     0.00946),
    ("train-step compile, 48 layers: <= 1.5x 4 layers",
     _set("gpt", "compile", "48_layers_s"), 4.5, "4.50 s vs 3.00 s: 1.50x", 4.51),
    ("whole train/lm.py run: <= nanoGPT's run of the same config",
     _set(*_WHOLE, "jaxattn_s"), 120.0, "120 s vs 120 s: 1.00x", 120.1),
    ("val loss at step 2000: <= 1.88", _set(*_WHOLE, "jaxattn_val_loss"), 1.88, "1.8800", 1.8801),
]  # fmt: skip


@pytest.mark.parametrize(
    "target, set_figure, at, text, past", THRESHOLDS, ids=[t[0].split(":")[0] for t in THRESHOLDS]
)
def test_each_target_is_met_at_its_threshold_and_missed_just_past_it(
    target, set_figure, at, text, past
):
    results = _results()
    set_figure(results, at)
    _, measured, met = _rows(run_all.summary(results, {}))[target]
    assert measured.startswith(text) and met == "yes"
    set_figure(results, past)
    assert _rows(run_all.summary(results, {}))[target][2] == "**no**"


def test_targets_that_are_not_a_ratio_need_all_their_conditions():
    results = _results()
    results["attention"]["long"]["finite"] = False  # 1.03 GiB, but NaN or inf gradients
    results["whole_run"]["whole_run"]["steps"] = 1999  # val loss 1.87, of another run
    rows = _rows(run_all.summary(results, {}))
    assert rows["causal fwd+bwd at T = 32768 (B=1, N=8, H=64): < 4 GiB peak"][2] == "**no**"
    assert rows["val loss at step 2000: <= 1.88"][1:] == ["ran 1999 steps, not 2000", "-"]


def test_whole_run_that_failed_part_way_is_not_judged():
    target = "whole train/lm.py run: <= nanoGPT's run of the same config"
    results = _results(torch=False)
    whole = results["whole_run"]["whole_run"]
    whole["torch"] = "2.13.0"  # installed, but its train.py run failed: only jaxattn's figure
    assert _rows(run_all.summary(results, {}))[target][1:] == [
        "no PyTorch figure (torch 2.13.0: its run failed)",
        "-",
    ]
    whole["torch_sampled_s"] = 135.0  # the first pair ran, lm.py --num_samples=0 failed
    assert _rows(run_all.summary(results, {}))[target][1:] == [
        "no figure (KeyError: 'jaxattn_no_samples_s')",
        "-",
    ]
    whole["torch"] = None  # what whole_run.py writes without torch
    del whole["torch_sampled_s"]
    assert _rows(run_all.summary(results, {}))[target][1:] == ["PyTorch not installed", "-"]


@pytest.mark.parametrize(
    "text, error",
    [
        ("", "JSONDecodeError"),  # killed before it wrote a byte
        ('{"machine": "test machine", "lstm": {"rows": {"jaxattn', "JSONDecodeError"),  # cut off
        ("[]", "a JSON list, not an object"),
    ],
)
def test_an_unreadable_json_is_reported_and_the_table_still_printed(
    monkeypatch, capsys, tmp_path, text, error
):
    """An empty or cut-off JSON raised JSONDecodeError in run_all.main: no targets table, and
    the other scripts' figures lost with it."""
    figures = _results()

    def fake_run(cmd):
        script = Path(cmd[1]).stem
        out = Path(cmd[cmd.index("--json") + 1])
        if script == "lstm":
            out.write_text(text)
            return subprocess.CompletedProcess(cmd, 0)
        out.write_text(json.dumps({"machine": "test machine"} | figures[script]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(run_all.subprocess, "run", fake_run)
    argv = ["run_all.py", "--only", "lstm", "gpt", "--json-dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match=rf"lstm\.py wrote an unreadable lstm\.json \({error}"):
        run_all.main()
    out = capsys.readouterr().out
    assert "# Targets — test machine" in out
    rows = _rows(out[out.index("| target |") :].strip().splitlines())
    lstm = rows["LSTM fwd+bwd, B=64 T=200 I=256 h=512: <= 1.0x PyTorch nn.LSTM"]
    assert lstm[1].startswith(f"lstm.py wrote an unreadable lstm.json ({error}") and lstm[2] == "-"
    assert rows["train-step compile, 48 layers: <= 1.5x 4 layers"][2] == "yes"
