"""Every benchmark in one command, then the speed and memory targets in one table.

    python benchmarks/run_all.py           # attention, LSTM, GPT, whole run (~20 min, 2 cores)
    python benchmarks/run_all.py --quick   # fewer lengths and repeats, no whole run
    python benchmarks/run_all.py --long    # also attention's T = 32768 peak memory
    python benchmarks/run_all.py --only attention lstm

Runs ``attention.py``, ``lstm.py``, ``gpt.py`` (train step, generation, compile time) and
``whole_run.py``, each in a fresh process, one after the other; their own tables print as
they finish. Each writes its figures with ``--json``, and this script then prints every
target of issues 3 and 5 next to what this run measured (ratios within one run). A target
whose benchmark did not run, or whose peer (PyTorch) is not installed, says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
SCRIPTS = ("attention", "lstm", "gpt", "whole_run")


class Target(NamedTuple):
    """One target: what it asks, which issue, and how to read it from the results."""

    text: str
    issue: int
    measure: Callable[[dict], tuple[str, bool] | str]  # (measured, met) or why there is none


def _at_most(ours: float, theirs: float, limit: float, fmt: str = "{:.3f} s") -> tuple[str, bool]:
    """``("OURS vs THEIRS: RATIOx", ratio <= limit)``, both figures written with ``fmt``."""
    ratio = ours / theirs
    return f"{fmt.format(ours)} vs {fmt.format(theirs)}: {ratio:.2f}x", ratio <= limit


def _attention_2048(results: dict) -> dict:
    rows = results["attention"]["attention"].get("2048", {})
    return {name: row["fwd_bwd_s"] for name, row in rows.items()}


def _vs_torch_sdpa(results: dict) -> tuple[str, bool] | str:
    rows = _attention_2048(results)
    if not rows:
        return "T = 2048 not run"
    if "torch SDPA" not in rows:
        return "PyTorch not installed"
    return _at_most(rows["jaxattn auto"], rows["torch SDPA"], 1.5)


def _vs_jax_nn(results: dict) -> tuple[str, bool] | str:
    rows = _attention_2048(results)
    if "jax.nn" not in rows:
        return "T = 2048 not run"
    speedup = rows["jax.nn"] / rows["jaxattn auto"]
    return f"{rows['jax.nn']:.3f} s vs {rows['jaxattn auto']:.3f} s: {speedup:.2f}x faster", (
        speedup >= 5
    )


def _long_memory(results: dict) -> tuple[str, bool] | str:
    long = results["attention"].get("long")
    if long is None:
        return "not run (--long)"
    return f"{long['peak_gib']:.2f} GiB peak RSS, {long['seconds']:.0f} s", (
        long["peak_gib"] < 4 and long["finite"]
    )


def _lstm(results: dict) -> tuple[str, bool] | str:
    rows = results["lstm"]["lstm"]["rows"]
    torch = [row["fwd_bwd_s"] for name, row in rows.items() if name.startswith("torch")]
    if not torch:
        return "PyTorch not installed"
    return _at_most(rows["jaxattn lstm_scan"]["fwd_bwd_s"], min(torch), 1.0)


def _step(results: dict) -> tuple[str, bool] | str:
    step = results["gpt"]["train_step"]
    if step["torch_s"] is None:
        return "PyTorch not installed"
    return _at_most(1e3 * step["jaxattn_s"], 1e3 * step["torch_s"], 1.0, "{:.1f} ms")


def _kv_cache(results: dict) -> tuple[str, bool] | str:
    """Judged against nanoGPT's generate, which runs the growing context (1..63 tokens) per
    token: the issue's baseline. jaxattn's full pass runs all block_size positions every
    token (one compiled shape), 2x those positions (about 1.6x the time), so its ratio is
    only shown."""
    gen = results["gpt"]["generation"]
    cached, new = gen["cached_unrolled_s"], gen["new_tokens"]
    padded = gen["full_pass_s"] / cached
    padded_text = f"; {padded:.1f}x jaxattn's full pass padded to block_size"
    if not gen.get("torch_no_cache_s"):
        return "PyTorch not installed" + padded_text
    target = 20  # the speed-up over nanoGPT's generate that issue 3 asks for
    speedup = gen["torch_no_cache_s"] / cached
    per_token = [1e6 * t / new for t in (cached, gen["torch_no_cache_s"])]
    # The judged row is generate(unroll_layers=True), not the default layer scan: say so,
    # and give the default's ratio beside it (absent from JSON written before it was kept).
    text = f"unroll_layers=True {per_token[0]:.0f} vs {per_token[1]:.0f} µs/token: {speedup:.1f}x"
    if gen.get("cached_scan_s"):
        text += f"; the default layer scan {gen['torch_no_cache_s'] / gen['cached_scan_s']:.1f}x"
    text += padded_text
    # What 20x would take against what streaming the weights alone takes here (gpt.py's
    # floor row); absent from JSON written before that row existed.
    if gen.get("weight_products_s"):
        floor = 1e6 * gen["weight_products_s"] / new
        text += f"; {target}x needs <= {per_token[1] / target:.0f} µs, "
        text += f"the weight products alone take {floor:.0f}"
    if gen.get("torch_cached_s"):
        text += f"; PyTorch with a KV cache {1e6 * gen['torch_cached_s'] / new:.0f} µs/token"
    return text, speedup >= target


def _compile(results: dict) -> tuple[str, bool]:
    c = results["gpt"]["compile"]
    return _at_most(c["48_layers_s"], c["4_layers_s"], 1.5, "{:.2f} s")


def _whole_run(results: dict) -> tuple[str, bool] | str:
    """Like for like: lm.py with its samples against nanoGPT's train.py + sample.py, and
    lm.py without samples against train.py alone; met when both are."""
    run = results["whole_run"]["whole_run"]
    if "torch_s" not in run and "torch_sampled_s" not in run:
        # whole_run.py names the torch it found; older JSON: none means not installed.
        if run.get("torch") is None:
            return "PyTorch not installed"
        return f"no PyTorch figure (torch {run['torch']}: its run failed)"
    if "torch_sampled_s" not in run:  # a JSON of the single pair whole_run.py used to time
        return _at_most(run["jaxattn_s"], run["torch_s"], 1.0, "{:.0f} s")
    pairs = [("with 2 samples", run["jaxattn_s"], run["torch_sampled_s"]),
             ("training only", run["jaxattn_no_samples_s"], run["torch_s"])]  # fmt: skip
    cells = [(what, *_at_most(ours, theirs, 1.0, "{:.0f} s")) for what, ours, theirs in pairs]
    return "; ".join(f"{what}: {text}" for what, text, _ in cells), all(m for *_, m in cells)


def _val_loss(results: dict) -> tuple[str, bool] | str:
    run = results["whole_run"]["whole_run"]
    if run["steps"] != 2000:
        return f"ran {run['steps']} steps, not 2000"
    return f"{run['jaxattn_val_loss']:.4f}", run["jaxattn_val_loss"] <= 1.88


TARGETS = {
    "attention": [
        Target("causal attention fwd+bwd, [4, 2048, 8, 64]: <= 1.5x SDPA", 5, _vs_torch_sdpa),
        Target("the same: >= 5x faster than jax.nn.dot_product_attention", 5, _vs_jax_nn),
        Target("causal fwd+bwd at T = 32768 (B=1, N=8, H=64): < 4 GiB peak", 5, _long_memory),
    ],
    "lstm": [
        Target("LSTM fwd+bwd, B=64 T=200 I=256 h=512: <= 1.0x PyTorch nn.LSTM", 5, _lstm),
    ],
    "gpt": [
        Target("GPT train step (shakespeare_char_cpu): <= 1.0x nanoGPT in PyTorch", 3, _step),
        Target("KV-cache generation: >= 20x nanoGPT's generate without a cache", 3, _kv_cache),
        Target("train-step compile, 48 layers: <= 1.5x 4 layers", 3, _compile),
    ],
    "whole_run": [
        Target("whole train/lm.py run: <= nanoGPT's run of the same config", 3, _whole_run),
        Target("val loss at step 2000: <= 1.88", 3, _val_loss),
    ],
}


def commands(quick: bool, long: bool) -> dict[str, list[str]]:
    """The command line of each benchmark (without ``--json``)."""
    fast = ["--quick"] if quick else []
    return {
        "attention": ["attention.py", *fast, *(["--long"] if long else [])],
        "lstm": ["lstm.py", *fast],
        "gpt": ["gpt.py", *fast, "--sections", "train,generate,compile"],
        "whole_run": ["whole_run.py"],
    }


def summary(results: dict[str, dict], skipped: dict[str, str]) -> list[str]:
    """The targets table as markdown lines; ``results`` holds each script's JSON."""
    lines = ["| target | issue | measured | met |", "|---|---|---|---|"]
    for script, targets in TARGETS.items():
        for target in targets:
            if script in results:
                try:
                    outcome = target.measure(results)
                except (KeyError, TypeError, ZeroDivisionError) as e:  # a figure is missing
                    outcome = f"no figure ({type(e).__name__}: {e})"
            else:
                outcome = skipped.get(script, "not run")
            if isinstance(outcome, str):
                measured, met = outcome, "-"
            else:
                measured, met = outcome[0], "yes" if outcome[1] else "**no**"
            lines.append(f"| {target.text} | {target.issue} | {measured} | {met} |")
    return lines


def read_figures(path: Path) -> tuple[dict | None, str | None]:
    """A script's ``--json`` figures, or ``(None, why)`` when the file is not a JSON object
    (empty, cut off by a script killed while writing it, or not what the scripts write)."""
    try:
        figures = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{type(e).__name__}: {e}"
    if not isinstance(figures, dict):
        return None, f"a JSON {type(figures).__name__}, not an object"
    return figures, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="quick modes, no whole run")
    parser.add_argument("--long", action="store_true", help="also attention at T = 32768")
    parser.add_argument("--only", nargs="+", choices=SCRIPTS, help="run only these")
    parser.add_argument("--json-dir", help="keep each script's JSON here (default: discard)")
    args = parser.parse_args()
    selected = args.only or [s for s in SCRIPTS if not (args.quick and s == "whole_run")]
    results, skipped, failed = {}, {}, []
    started = datetime.datetime.now()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.json_dir or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name, cmd in commands(args.quick, args.long).items():
            if name not in selected:
                skipped[name] = "not run (--only)" if args.only else "not run (--quick)"
                continue
            out = folder / f"{name}.json"
            out.unlink(missing_ok=True)  # never read an older run's figures
            print(f"\n$ python benchmarks/{' '.join(cmd)}", flush=True)
            proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:], "--json", out])
            why = f"{cmd[0]} failed (exit {proc.returncode})"
            if proc.returncode != 0:
                failed.append(why)
            if out.exists():  # what a failing script measured before it failed still counts
                figures, error = read_figures(out)
                if error:  # (an empty or cut-off file raised here: no targets table at all)
                    why = f"{cmd[0]} wrote an unreadable {out.name} ({error})"
                    failed.append(why)
                    skipped[name] = why
                else:
                    results[name] = figures
            else:
                skipped[name] = why
    minutes = (datetime.datetime.now() - started).total_seconds() / 60
    known = [r["machine"] for r in results.values() if "machine" in r]
    machine = known[0] if known else "machine unknown" if results else "no benchmark ran"
    print(f"\n# Targets — {machine}, {started:%Y-%m-%d %H:%M}, {minutes:.0f} min in all\n")
    print("\n".join(summary(results, skipped)))
    if failed:
        sys.exit("; ".join(failed))


if __name__ == "__main__":
    main()
