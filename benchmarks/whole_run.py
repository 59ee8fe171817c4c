"""The whole Shakespeare job, jaxattn against nanoGPT in PyTorch, each as a user runs it.

    python benchmarks/whole_run.py           # the three runs below, one after another (~7 min)
    python benchmarks/whole_run.py --steps 200   # a shorter check
    python benchmarks/whole_run.py --warm    # also rerun lm.py over its compile cache (+2 min)
    python benchmarks/whole_run.py --repeats 3   # the runs taken in turn, 3 times each

With ``--repeats N`` the jobs alternate (jaxattn, PyTorch, jaxattn without samples,
jaxattn, ...) so that a slow spell of a shared machine falls on all; the table shows every
run and the JSON the medians.

Two pairs, each job in a fresh process timed from start to exit, each job as its users run
it:

- the job with samples: ``python train/lm.py --config=train/configs/shakespeare_char_cpu.py
  --noprogress`` (imports, data, compilation, 2000 steps, nine evaluations, checkpoints and
  the two 500-character samples it prints) against nanoGPT's train.py loop
  (``torch_nanogpt.train_run``: the same config, evaluating both splits and checkpointing on
  improvement) followed by its sample.py (``torch_nanogpt.sample_run``: loads that
  checkpoint, two 500-character samples), as a nanoGPT user gets samples;
- training alone: lm.py with ``--num_samples=0`` against nanoGPT's train.py loop alone.

The two jobs differ in one piece of work: nanoGPT's ``estimate_loss`` evaluates 20 batches
of each split at each of the nine evaluations, lm.py 20 of the validation split (its train
loss is the mean over the steps since the last log). That is 180 forward passes more on
the PyTorch side, about 4.7 s of its run (26 ms each, one thread, measured 2026-12-04).

The PyTorch rows need torch. Prints the wall time, the seconds in train steps and the
final val loss of each.

lm.py starts with an empty compilation cache (``--compilation_cache`` set to a new
folder), as on a fresh machine. With ``--warm`` it runs a second time over the cache the
first run filled, as a rerun or a resumed run would.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT = REPO / "jaxattn" / "data" / "tinyshakespeare.txt"
LM = [sys.executable, "train/lm.py", "--config=train/configs/shakespeare_char_cpu.py"]


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def step_seconds(metrics_jsonl: Path) -> float:
    """Seconds in train steps, from the ``step_time_ms`` of each logged window of lm.py.

    Each window's time runs from the end of the previous log, evaluation or save to the
    host sync of its metrics, so it holds the steps and nothing else. The first window's
    average leaves out its first, compiling step, so it covers one step fewer.
    """
    total, last = 0.0, 0
    for line in metrics_jsonl.read_text().splitlines():
        record = json.loads(line)
        if record.get("step_time_ms") is not None:
            timed = record["step"] - last - (1 if last == 0 else 0)  # (step 1 compiled)
            total += record["step_time_ms"] / 1000 * timed
        last = record["step"]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warm", action="store_true", help="rerun lm.py over its cache")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job, in turn")
    parser.add_argument("--torch-run", metavar="CKPT", help=argparse.SUPPRESS)
    parser.add_argument("--torch-sample", metavar="CKPT", help=argparse.SUPPRESS)
    if any(a.startswith("--torch-") for a in sys.argv[1:]):  # a child process of a PyTorch row
        from benchmarks import torch_nanogpt  # (and nothing that imports JAX)

        args, _ = parser.parse_known_args()
        if args.torch_sample:
            for i, text in enumerate(torch_nanogpt.sample_run(str(TEXT), args.torch_sample)):
                print(f"---------- sample {i} ----------\n{text}")
            return
        val, in_steps = torch_nanogpt.train_run(
            str(TEXT), steps=args.steps, checkpoint_path=args.torch_run
        )
        print(f"val loss {val:.4f}, train steps {in_steps:.2f} s")
        return
    from benchmarks.attention import add_json_flag, machine, versions, write_json

    add_json_flag(parser)
    args = parser.parse_args()
    if args.repeats < 1:  # (0 ran no job and exited 0, with a header and no JSON)
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.steps < 1:  # (0 ran lm.py, then nanoGPT's loop saved no checkpoint to sample)
        parser.error(f"--steps must be >= 1, got {args.steps}")

    print(f"# Whole Shakespeare run — {machine()}, {versions()}, "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}")  # fmt: skip
    print(f"\n| job | wall s | of it train steps, s | val loss at step {args.steps} |")
    print("|---|---|---|---|")
    try:
        import torch
    except ImportError:
        torch = None
    times: dict[str, list[float]] = {}
    results: dict = {"steps": args.steps, "torch": torch.__version__ if torch else None}

    def record(key: str, job: str, seconds: float, steps_s: float, val: str) -> None:
        print(f"| {job} | {seconds:.0f} | {steps_s:.0f} | {val} |", flush=True)
        times.setdefault(key, []).append(seconds)
        results.update({f"{key}_s": statistics.median(times[key]), f"{key}_val_loss": float(val)})
        results[f"{key}_runs_s"] = times[key]
        results.setdefault(f"{key}_steps_runs_s", []).append(steps_s)
        write_json(args.json, {"whole_run": results})  # kept if a later run fails

    def lm_run(key: str, job: str, cache: str, *flags: str) -> None:
        with tempfile.TemporaryDirectory() as workdir:
            seconds, out = run(
                [*LM, f"--workdir={workdir}", "--noprogress", f"--compilation_cache={cache}",
                 f"--config.num_steps={args.steps}", *flags]
            )  # fmt: skip
            steps_s = step_seconds(Path(workdir) / "metrics.jsonl")
        val = re.search(r"Done: step \d+, val loss ([\d.]+)", out).group(1)
        record(key, job, seconds, steps_s, val)

    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:  # empty: a first run compiles everything
            lm_run("jaxattn", "jaxattn `train/lm.py` (with its 2 samples)", cache)
            if args.warm:
                job = "jaxattn `train/lm.py` (with its 2 samples, compiles cached)"
                lm_run("jaxattn_cached", job, cache)
        if torch is not None:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = f"{tmp}/ckpt.pt"
                cmd = [sys.executable, __file__, f"--steps={args.steps}"]
                train_s, out = run([*cmd, f"--torch-run={ckpt}"])
                val, steps_s = re.search(r"val loss ([\d.]+), train steps ([\d.]+) s", out).groups()
                sample_s, _ = run([*cmd, f"--torch-sample={ckpt}"])
            job = f"PyTorch {torch.__version__} nanoGPT train.py loop + sample.py (2 samples)"
            record("torch_sampled", job, train_s + sample_s, float(steps_s), val)
        with tempfile.TemporaryDirectory() as cache:
            lm_run("jaxattn_no_samples", "jaxattn `train/lm.py --num_samples=0`", cache,
                   "--num_samples=0")  # fmt: skip
        if torch is not None:
            record("torch", "the same nanoGPT train.py loop alone", train_s, float(steps_s), val)
    if args.repeats > 1:
        medians = ", ".join(f"{key} {statistics.median(t):.0f} s" for key, t in times.items())
        print(f"\nmedians of {args.repeats}: {medians}")


if __name__ == "__main__":
    main()
