"""Causal attention on this machine: jaxattn vs jax.nn vs einsum vs Flax vs PyTorch.

    python benchmarks/attention.py            # T = 256 .. 8192, forward and forward+backward
    python benchmarks/attention.py --quick    # T = 256, 1024, 2048 with 3 repeats
    python benchmarks/attention.py --long     # also peak RSS of blockwise fwd+bwd at T = 32768
    python benchmarks/attention.py --wait-quiet 5   # shared machine: wait <= 5 s for idle CPUs
    python benchmarks/attention.py --dropout 0.1    # with attention dropout (training)
    python benchmarks/attention.py --window 256     # a causal sliding window of 257 keys

Layout ``[B, T, N, H]`` with N = 8 heads of H = 64, float32, causal self-attention; B = 4
up to T = 2048, then halved whenever T doubles (B T = 8192 tokens) so the dense baselines
fit in memory. Times are the median of ``--repeats`` calls after one warm-up call (fewer
when a single call takes over ``--slow`` seconds; the ``n`` column says how many), all rows
of one T timed in turn (each round calls every row once), with the
process CPU time (all threads) of the same calls: on a machine shared with other jobs the
CPU time is the steadier figure, and wall < CPU shows how well both cores were used.
Memory of forward+backward: for JAX the temporary buffers XLA allocates for the compiled
step (``memory_analysis().temp_size_in_bytes``, exact); for PyTorch the growth of the peak
resident set (VmHWM) of a fresh subprocess over one call. Ratios are to PyTorch's
``F.scaled_dot_product_attention`` measured in the same run.

With ``--dropout RATE`` every row drops attention probabilities as in training: jaxattn's
kernels, its einsum path, Flax linen (``dropout_rng``) and PyTorch SDPA (``dropout_p``);
``jax.nn.dot_product_attention`` and the plain einsum take no dropout and are left out.

With ``--window W`` every row is causal sliding-window attention over the W keys before
each query and itself (``local_window_size=(W, 0)``): jaxattn's kernels, ``jax.nn`` with
the same ``local_window_size``, and PyTorch SDPA with the window as a boolean
``attn_mask`` (SDPA has no window argument); the "jaxattn causal, no window" row is the
same kernel over the whole causal context, for what the window saves.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# This checkout's jaxattn, as the other scripts (its own folder, benchmarks/, is what
# Python puts first on sys.path, so an installed jaxattn would be timed instead).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxattn.ops.attention import dot_product_attention

N, H = 8, 64


def machine() -> str:
    """CPU model and core count (lscpu), for the table's header."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {jax.default_backend()}"


def versions() -> str:
    """The jax and flax versions, for the table's header."""
    import flax

    return f"jax {jax.__version__}, flax {flax.__version__}"


def add_wait_quiet_flag(parser: argparse.ArgumentParser) -> None:
    """``--wait-quiet SECONDS``, shared by the benchmark scripts (see ``wait_quiet``)."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each timed call, wait up to this long for no other runnable task",
    )


def positive_int(text: str) -> int:
    """argparse type for counts such as ``--repeats``: 0 would time nothing (or, read as
    ``args.repeats or default``, silently mean the default)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def probability(text: str) -> float:
    """argparse type for ``--dropout``: a probability in [0, 1), refused by name at once
    rather than by the attention op after the first rows are compiled."""
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for ``--window`` (0: no window)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def json_path(text: str) -> str:
    """argparse type for ``--json FILE``: not a folder, in a folder that exists (checked
    before the benchmark runs: either used to fail only when the results were written,
    after minutes of timing). ``""`` stays "no JSON"."""
    if not text:
        return text
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {str(path.parent)!r} does not exist")
    return text


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """``--json FILE``, shared by the benchmark scripts (read by ``run_all.py``)."""
    parser.add_argument(
        "--json", type=json_path, metavar="FILE", help="also write the results to FILE as JSON"
    )


def write_json(path: str | None, results: dict) -> None:
    """Write ``results`` (plus machine and date) to ``path``; a no-op without a path.

    Written to a temporary file beside it, then renamed over it: a script stopped while
    writing (the scripts rewrite the file as figures come in) leaves the previous complete
    JSON, never a cut-off one.
    """
    if path:
        header = {"machine": machine(), "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}"}
        partial_path = f"{path}.partial"
        try:
            with open(partial_path, "w") as f:
                json.dump(header | results, f, indent=1)
            os.replace(partial_path, path)
        finally:  # (a failed or interrupted write leaves no partial file behind)
            Path(partial_path).unlink(missing_ok=True)


def wait_quiet(limit: float = 30.0) -> None:
    """Wait (up to ``limit`` s) until no other task is runnable (Linux ``/proc/loadavg``)."""
    deadline, calm = time.monotonic() + limit, 0
    while time.monotonic() < deadline and calm < 5:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
        calm = calm + 1 if running <= 1 else 0
        time.sleep(0.02)


def peak_rss() -> int:
    """This process's peak resident set (VmHWM) in bytes.

    Unlike ``ru_maxrss``, which a child inherits from its parent across fork and exec,
    VmHWM starts afresh in the new program.
    """
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return 1024 * int(line.split()[1])


def _timed_call(fn, quiet: float) -> tuple[float, float]:
    """(wall s, process CPU s) of one ``fn()`` call, after waiting up to ``quiet`` s."""
    if quiet:
        wait_quiet(quiet)
    cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def timed(fn, repeats: int, slow: float, quiet: float) -> tuple[float, float, int]:
    """Median (wall s, CPU s) of ``repeats`` calls after one warm-up (2 if one is slow)."""
    start = time.perf_counter()
    fn()
    if time.perf_counter() - start > slow:
        repeats = min(repeats, 2)
    walls, cpus = zip(*(_timed_call(fn, quiet) for _ in range(repeats)))
    return float(np.median(walls)), float(np.median(cpus)), repeats


def timed_round_robin(
    fns, repeats: int, quiet: float, slow: float = math.inf
) -> list[tuple[float, float, int]]:
    """Median (wall s, CPU s, n) of each of ``fns``, timed in turn: round r calls every
    function once, so a slow spell of a shared machine hits all of them alike. One
    warm-up call each first; a function whose warm-up took over ``slow`` seconds is timed
    in the first 2 rounds only (n = 2)."""
    counts = []
    for fn in fns:
        start = time.perf_counter()
        fn()
        counts.append(min(repeats, 2) if time.perf_counter() - start > slow else repeats)
    samples = [[] for _ in fns]
    for r in range(repeats):
        for fn, n, out in zip(fns, counts, samples):
            if r < n:
                out.append(_timed_call(fn, quiet))
    return [
        (float(np.median([w for w, _ in s])), float(np.median([c for _, c in s])), len(s))
        for s in samples
    ]


# ------------------------------------------------------------------ JAX implementations


def einsum_attention(q, k, v):
    """Plain softmax attention: what one writes without a library."""
    t, s = q.shape[1], k.shape[1]
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1]).astype(np.float32)
    logits = jnp.where(jnp.tril(jnp.ones((t, s), bool)), logits, -jnp.inf)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)


def flax_attention(q, k, v, dropout: float = 0.0):
    """Flax linen's einsum attention (``flax.nnx.dot_product_attention`` calls jax.nn's)."""
    import flax.linen as nn

    t = q.shape[1]
    mask = jnp.tril(jnp.ones((1, 1, t, t), bool))
    if not dropout:
        return nn.dot_product_attention(q, k, v, mask=mask)
    # broadcast_dropout=False: Flax's default shares one [T, S] mask across batch and heads,
    # which draws B N times fewer random bits than the other rows.
    return nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        dropout_rng=DROPOUT_KEY,
        dropout_rate=dropout,
        broadcast_dropout=False,
        deterministic=False,
    )


JAX_IMPLS = {
    "jaxattn auto": lambda q, k, v: dot_product_attention(q, k, v, is_causal=True),
    "jaxattn blockwise": lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, implementation="blockwise"
    ),
    "jax.nn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
    "einsum": einsum_attention,
    "flax linen": flax_attention,
}
DENSE = {"jax.nn", "einsum", "flax linen", "jaxattn xla (einsum)"}
DROPOUT_KEY = jax.random.key(0)


def jax_impls(dropout: float, window: int = 0) -> dict:
    """The JAX rows; with attention dropout, those that take it; with a window, those
    that take one (and the whole causal context, for scale)."""
    if window:
        sized = {"local_window_size": (window, 0), "is_causal": True}
        attend = partial(dot_product_attention, **sized)
        return {
            "jaxattn auto": attend,
            "jaxattn blockwise": partial(attend, implementation="blockwise"),
            "jaxattn causal, no window": JAX_IMPLS["jaxattn auto"],
            "jax.nn": partial(jax.nn.dot_product_attention, **sized),
        }
    if not dropout:
        return JAX_IMPLS
    attend = partial(
        dot_product_attention, is_causal=True, dropout_rate=dropout, dropout_rng=DROPOUT_KEY
    )
    return {
        "jaxattn auto": attend,
        "jaxattn blockwise": partial(attend, implementation="blockwise"),
        "jaxattn xla (einsum)": partial(attend, implementation="xla"),
        "flax linen": partial(flax_attention, dropout=dropout),
    }


def jax_calls(name, b, t, dropout=0.0, window=0):
    """Compiled (fwd, fwd+bwd) closures and the fwd+bwd step's XLA temp bytes."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, N, H)), jnp.float32) for _ in range(3))
    f = jax_impls(dropout, window)[name]
    fwd = jax.jit(f).lower(q, k, v).compile()
    loss = lambda *a: jnp.sum(f(*a))
    # value_and_grad, not grad: under jax.grad the output O = P V is dead code (the
    # gradient of sum(O) never reads it) and XLA drops it from the dense paths, while
    # PyTorch's fwd+bwd (and any real training step) computes it.
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    temp = grad.memory_analysis().temp_size_in_bytes
    return (
        lambda: fwd(q, k, v).block_until_ready(),
        lambda: jax.block_until_ready(grad(q, k, v)),
        temp,
    )


def torch_calls(b, t, dropout=0.0, window=0):
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(b, N, t, H, requires_grad=True) for _ in range(3))
    masking = {"is_causal": True}
    if window:  # SDPA takes a window only as a dense mask (and not with is_causal)
        back = torch.arange(t)[:, None] - torch.arange(t)[None, :]  # query minus key position
        masking = {"attn_mask": (back >= 0) & (back <= window)}

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **masking)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, **masking)
        out.sum().backward()

    return fwd, fwd_bwd


# ------------------------------------------------------------------ the table


def torch_memory_child(b: int, t: int, dropout: float, window: int) -> None:
    """Print the peak-RSS growth (bytes) of one torch fwd+bwd in this fresh process.

    A tiny fwd+bwd runs first: PyTorch's first call in a process takes about 7 MiB once
    (measured 2026-12-04), which jax's figure, the compiled step's buffers, leaves out.
    """
    _, warm_up = torch_calls(1, 16, dropout, window)
    warm_up()
    _, fwd_bwd = torch_calls(b, t, dropout, window)
    before = peak_rss()
    fwd_bwd()
    print(peak_rss() - before)


def torch_memory(b: int, t: int, dropout: float, window: int) -> int:
    cmd = [sys.executable, __file__, "--torch-memory-child"]
    cmd += [str(b), str(t), str(dropout), str(window)]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def run_table(lengths, repeats, slow, max_dense_gib, quiet, dropout=0.0, window=0) -> dict:
    """Print the table; return ``{T: {implementation: {fwd_s, fwd_bwd_s, ...}}}``."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None

    title = f", attention dropout {dropout}" if dropout else ""
    if window:
        title += f", causal window of {window + 1} keys (local_window_size=({window}, 0))"
    print(f"# Causal attention, float32, [B, T, N={N}, H={H}]{title}")
    print(f"machine: {machine()}; date: {datetime.date.today()}")
    print(f"{versions()}, torch {torch_version or 'absent'}")
    print(f"median of {repeats} after a warm-up; B = 4 up to T = 2048, then B T = 8192")
    print(f"each timed call waited up to {quiet} s for no other runnable task\n")
    print(
        "| T | B | implementation | fwd ms | fwd+bwd ms | fwd+bwd CPU s | n "
        "| fwd+bwd / torch (wall, CPU) | fwd+bwd MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for t in lengths:
        b = max(1, min(4, 8192 // t))
        rows, torch_fb, built = [], None, {}
        names = list(jax_impls(dropout, window)) + (["torch SDPA"] if torch_version else [])
        dense_gib = 3 * 4 * b * N * t * t / 2**30  # logits, probs, their cotangent
        for name in names:
            if name in DENSE and dense_gib > max_dense_gib:
                continue
            if name == "torch SDPA":
                fwd, fwd_bwd = torch_calls(b, t, dropout, window)
                mem = torch_memory(b, t, dropout, window)
            else:
                fwd, fwd_bwd, mem = jax_calls(name, b, t, dropout, window)
            built[name] = (fwd, fwd_bwd, mem)
        # Every row of this T timed in turn (round r calls each once), as lstm.py does, so
        # a slow spell of the shared machine does not fall on one row (e.g. on SDPA alone).
        fwds = timed_round_robin([f for f, _, _ in built.values()], repeats, quiet, slow)
        fwd_bwds = timed_round_robin([fb for _, fb, _ in built.values()], repeats, quiet, slow)
        timings = dict(zip(built, zip(fwds, fwd_bwds)))
        for name in names:
            if name not in built:
                rows.append((name, None, f"skipped: ~{dense_gib:.0f} GiB dense"))
                continue
            (tf, _, _), (tfb, cfb, n) = timings[name]
            if name == "torch SDPA":
                torch_fb = (tfb, cfb)
            rows.append((name, (tf, tfb, cfb, n, built[name][2] / 2**20), None))
        for name, r, note in rows:
            if note:
                print(f"| {t} | {b} | {name} | - | - | - | - | - | {note} |")
                continue
            tf, tfb, cfb, n, mem = r
            results.setdefault(str(t), {})[name] = {
                "batch": b, "fwd_s": tf, "fwd_bwd_s": tfb, "fwd_bwd_cpu_s": cfb, "mib": mem
            }  # fmt: skip
            ratio = f"{tfb / torch_fb[0]:.2f}, {cfb / torch_fb[1]:.2f}" if torch_fb else "-"
            print(
                f"| {t} | {b} | {name} | {1e3 * tf:.0f} | {1e3 * tfb:.0f} | {cfb:.2f} | {n} "
                f"| {ratio} | {mem:.0f} |",
                flush=True,
            )
    return results


def long_child(t: int) -> None:
    """Run blockwise causal fwd+bwd at [1, t, N, H]; print baseline and peak RSS (MiB)."""
    q, k, v = (
        jnp.asarray(np.random.default_rng(i).standard_normal((1, t, N, H)), jnp.float32)
        for i in range(3)
    )
    f = lambda *a: jnp.sum(dot_product_attention(*a, is_causal=True, implementation="blockwise"))
    grad = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile()
    base = peak_rss() / 2**20
    start = time.perf_counter()
    grads = jax.block_until_ready(grad(q, k, v))
    seconds = time.perf_counter() - start
    finite = all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    peak = peak_rss() / 2**20
    print(f"{t} {seconds:.1f} {base:.0f} {peak:.0f} {finite}")


def run_long(t: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--long-child", str(t)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    seconds, base, peak, finite = out[1], out[2], out[3], out[4]
    dense = 4 * N * t * t / 2**30
    print(f"\n# Long sequence: blockwise causal fwd+bwd, [B=1, T={t}, N={N}, H={H}], float32")
    print(
        f"peak RSS of the process {float(peak) / 1024:.2f} GiB (after compiling, before the "
        f"step: {float(base) / 1024:.2f} GiB); {seconds} s; grads finite: {finite}; the dense "
        f"[N, T, T] float32 scores alone would be {dense:.0f} GiB"
    )
    peak_gib = float(peak) / 1024
    return {"T": t, "peak_gib": peak_gib, "seconds": float(seconds), "finite": finite == "True"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 256, 1024, 2048; 3 repeats")
    # nargs="+": a bare --lengths (say, from an empty shell variable) ran the full default.
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="override the T values")
    parser.add_argument("--repeats", type=positive_int, help="timed calls (default 5)")
    parser.add_argument(
        "--slow",
        type=float,
        default=10.0,
        help="seconds per call above which only 2 calls are timed",
    )
    parser.add_argument(
        "--max-dense-gib",
        type=float,
        default=8.0,
        help="skip dense baselines whose [B, N, T, T] buffers exceed this",
    )
    parser.add_argument("--long", action="store_true", help="also run T = 32768 (minutes)")
    parser.add_argument(
        "--dropout", type=probability, default=0.0, help="attention dropout rate of every row"
    )
    parser.add_argument(
        "--window",
        type=non_negative_int,
        default=0,
        help="causal sliding window: W keys before each query",
    )
    add_wait_quiet_flag(parser)
    add_json_flag(parser)
    parser.add_argument("--long-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--torch-memory-child", type=float, nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.window and args.dropout:
        parser.error("--window and --dropout: one at a time")
    if args.long_child:
        return long_child(args.long_child)
    if args.torch_memory_child:
        b, t, dropout, window = args.torch_memory_child
        return torch_memory_child(int(b), int(t), dropout, int(window))
    lengths = args.lengths or (
        [256, 1024, 2048] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    )
    repeats = args.repeats or (3 if args.quick else 5)
    table = run_table(
        lengths, repeats, args.slow, args.max_dense_gib, args.wait_quiet, args.dropout, args.window
    )
    kind = "attention_window" if args.window else "attention"
    results = {"attention_dropout" if args.dropout else kind: table}
    write_json(args.json, results)  # kept even if the long run below fails
    if args.long:
        results["long"] = run_long(32768)
        write_json(args.json, results)


if __name__ == "__main__":
    main()
