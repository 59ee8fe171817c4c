"""The whole Shakespeare job, jaxattn against nanoGPT in PyTorch, each as a user runs it.

    python benchmarks/whole_run.py           # both runs, one after the other (~5 min)
    python benchmarks/whole_run.py --steps 200   # a shorter check
    python benchmarks/whole_run.py --warm    # also rerun lm.py over its compile cache (~7 min)

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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TEXT = REPO / "jaxattn" / "data" / "tinyshakespeare.txt"


def run(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--warm", action="store_true", help="rerun lm.py over its cache")
    parser.add_argument("--torch-run", action="store_true", help=argparse.SUPPRESS)
    if "--torch-run" in sys.argv[1:]:  # the child process of the PyTorch row
        from benchmarks.torch_nanogpt import train_run  # (and nothing that imports JAX)

        args, _ = parser.parse_known_args()
        with tempfile.TemporaryDirectory() as tmp:
            val = train_run(str(TEXT), steps=args.steps, checkpoint_path=f"{tmp}/ckpt.pt")
        print(f"val loss {val:.4f}")
        return
    from benchmarks.attention import add_json_flag, machine, write_json

    add_json_flag(parser)
    args = parser.parse_args()

    print(f"# Whole Shakespeare run — {machine()}, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"\n| job | wall s | val loss at step {args.steps} |\n|---|---|---|")
    lm = [sys.executable, "train/lm.py", "--config=train/configs/shakespeare_char_cpu.py"]
    results = {"steps": args.steps}
    with tempfile.TemporaryDirectory() as cache:
        for row in ("", ", compiles cached") if args.warm else ("",):
            with tempfile.TemporaryDirectory() as workdir:
                seconds, out = run(
                    [*lm, f"--workdir={workdir}", "--noprogress", f"--compilation_cache={cache}",
                     f"--config.num_steps={args.steps}"]
                )  # fmt: skip
            val = re.search(r"Done: step \d+, val loss ([\d.]+)", out).group(1)
            job = f"jaxattn `train/lm.py` (with its samples{row})"
            print(f"| {job} | {seconds:.0f} | {val} |", flush=True)
            key = "jaxattn_cached" if row else "jaxattn"
            results |= {f"{key}_s": seconds, f"{key}_val_loss": float(val)}
            write_json(args.json, {"whole_run": results})  # kept if a later run fails
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        seconds, out = run([sys.executable, __file__, "--torch-run", f"--steps={args.steps}"])
        val = re.search(r"val loss ([\d.]+)", out).group(1)
        print(f"| PyTorch {torch.__version__} nanoGPT train loop | {seconds:.0f} | {val} |")
        results |= {"torch_s": seconds, "torch_val_loss": float(val)}
    write_json(args.json, {"whole_run": results})


if __name__ == "__main__":
    main()
