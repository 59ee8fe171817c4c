"""The whole Shakespeare job, jaxattn against nanoGPT in PyTorch, each as a user runs it.

    python benchmarks/whole_run.py           # both runs, one after the other (~5 min)
    python benchmarks/whole_run.py --steps 200   # a shorter check
    python benchmarks/whole_run.py --warm    # also rerun lm.py over its compile cache (~7 min)
    python benchmarks/whole_run.py --repeats 3   # the two jobs taken in turn, 3 times each

With ``--repeats N`` the jobs alternate (jaxattn, PyTorch, jaxattn, ...) so that a slow
spell of a shared machine falls on both; the table shows every run and the JSON the
medians.

Runs ``python train/lm.py --config=train/configs/shakespeare_char_cpu.py --noprogress`` in a
fresh process and times it from start to exit: imports, data, compilation, 2000 steps,
nine evaluations, checkpoints and the two 500-character samples it prints. Then, when torch
is installed, the same job in nanoGPT's way (``torch_nanogpt.train_run``: its train.py loop
with the same config, evaluating both splits and checkpointing on improvement, no
samples), also in a fresh process. Prints the wall time and final val loss of each.

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
    parser.add_argument("--torch-run", action="store_true", help=argparse.SUPPRESS)
    if "--torch-run" in sys.argv[1:]:  # the child process of the PyTorch row
        from benchmarks.torch_nanogpt import train_run  # (and nothing that imports JAX)

        args, _ = parser.parse_known_args()
        with tempfile.TemporaryDirectory() as tmp:
            val, in_steps = train_run(str(TEXT), steps=args.steps, checkpoint_path=f"{tmp}/ckpt.pt")
        print(f"val loss {val:.4f}, train steps {in_steps:.2f} s")
        return
    from benchmarks.attention import add_json_flag, machine, write_json

    add_json_flag(parser)
    args = parser.parse_args()

    print(f"# Whole Shakespeare run — {machine()}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"\n| job | wall s | of it train steps, s | val loss at step {args.steps} |")
    print("|---|---|---|---|")
    try:
        import torch
    except ImportError:
        torch = None
    times: dict[str, list[float]] = {}
    results: dict = {"steps": args.steps}

    def record(key: str, job: str, seconds: float, steps_s: float, val: str) -> None:
        print(f"| {job} | {seconds:.0f} | {steps_s:.0f} | {val} |", flush=True)
        times.setdefault(key, []).append(seconds)
        results.update({f"{key}_s": statistics.median(times[key]), f"{key}_val_loss": float(val)})
        results[f"{key}_runs_s"] = times[key]
        results.setdefault(f"{key}_steps_runs_s", []).append(steps_s)
        write_json(args.json, {"whole_run": results})  # kept if a later run fails

    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            for row in ("", ", compiles cached") if args.warm else ("",):
                with tempfile.TemporaryDirectory() as workdir:
                    seconds, out = run(
                        [*LM, f"--workdir={workdir}", "--noprogress",
                         f"--compilation_cache={cache}", f"--config.num_steps={args.steps}"]
                    )  # fmt: skip
                    steps_s = step_seconds(Path(workdir) / "metrics.jsonl")
                val = re.search(r"Done: step \d+, val loss ([\d.]+)", out).group(1)
                key = "jaxattn_cached" if row else "jaxattn"
                job = f"jaxattn `train/lm.py` (with its samples{row})"
                record(key, job, seconds, steps_s, val)
        if torch is not None:
            seconds, out = run([sys.executable, __file__, "--torch-run", f"--steps={args.steps}"])
            val, steps_s = re.search(r"val loss ([\d.]+), train steps ([\d.]+) s", out).groups()
            job = f"PyTorch {torch.__version__} nanoGPT train loop"
            record("torch", job, seconds, float(steps_s), val)
    if args.repeats > 1:
        medians = ", ".join(f"{key} {statistics.median(t):.0f} s" for key, t in times.items())
        print(f"\nmedians of {args.repeats}: {medians}")


if __name__ == "__main__":
    main()
