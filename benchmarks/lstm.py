"""One LSTM layer on this machine: jaxattn vs Flax vs PyTorch, forward and forward+backward.

    python benchmarks/lstm.py                  # B=64, T=200, I=256, h=512, 5 repeats
    python benchmarks/lstm.py --quick          # 3 repeats
    python benchmarks/lstm.py --shape 8 50 32 64   # other B T I h
    python benchmarks/lstm.py --wait-quiet 5   # shared machine: wait <= 5 s for idle CPUs

float32, batch first ``[B, T, I]``, zero initial state. The loss is ``sum(ys * probe)``
over all outputs, and fwd+bwd computes the gradient of every weight and of ``xs`` (a first
layer reading embeddings needs ``dxs``). Rows:

- ``jaxattn lstm_scan``: ``jaxattn.ops.lstm.lstm_scan`` with ``implementation=None`` (on CPU
  the scan with its hand-written backward).
- ``jaxattn, lengths``: the same with ``lengths`` (packed-sequence semantics, masked scan).
- ``jaxattn, autodiff scan``: ``implementation="autodiff"``, ``jax.grad`` of the same scan
  without the hand-written backward (what it replaced).
- ``flax nn.RNN``: ``flax.linen.RNN(OptimizedLSTMCell(h))``.
- ``torch nn.LSTM``: ``torch.nn.LSTM(I, h, batch_first=True)`` (when torch is installed),
  with its default threads, and again with ``torch.set_num_threads(1)``: while other jobs
  load the machine, PyTorch's OpenMP threads wait on each other and its default-thread
  figures inflate most; the 1-thread CPU time is then the steadier measure of its work.

Times are the median of ``--repeats`` rounds after one warm-up call per row, with the
process CPU time (all threads) of the same calls. Each round times every row once, in
turn, so a slow spell of a shared machine hits all rows alike. Ratios are to PyTorch
measured in the same run (for each column the faster of its two rows).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import (  # shared helpers
    add_json_flag,
    add_wait_quiet_flag,
    machine,
    positive_int,
    timed_round_robin,
    versions,
    write_json,
)
from jaxattn.ops import lstm as lstm_ops


def _inputs(b, t, i, h):
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((b, t, i)).astype(np.float32)
    probe = rng.standard_normal((b, t, h)).astype(np.float32)
    lengths = rng.integers(t // 2, t + 1, size=b).astype(np.int32)
    lengths[0] = t
    return xs, probe, lengths


def _jax_calls(apply, params, xs, probe):
    """Compiled fwd and fwd+bwd (grads of params and xs) closures for ``apply(params, xs)``."""
    xs, probe = jnp.asarray(xs), jnp.asarray(probe)
    fwd = jax.jit(apply).lower(params, xs).compile()
    loss = lambda p, x: jnp.sum(apply(p, x) * probe)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile()
    return (
        lambda: fwd(params, xs).block_until_ready(),
        lambda: jax.block_until_ready(grad(params, xs)),
    )


def jaxattn_calls(xs, probe, lengths, h, variant):
    """``variant``: None (``implementation=None``), ``"lengths"`` (the same with
    ``lengths``), or an explicit implementation (``"scan"``, ``"autodiff"``, ``"cudnn"``)."""
    weights = lstm_ops.init_lstm(jax.random.key(0), xs.shape[2], h)
    n = jnp.asarray(lengths) if variant == "lengths" else None
    impl = None if variant in (None, "lengths") else variant
    apply = lambda w, x: lstm_ops.lstm_scan(w, x, lengths=n, implementation=impl)[0]
    return _jax_calls(apply, weights, xs, probe)


def flax_calls(xs, probe, h):
    import flax.linen as nn

    module = nn.RNN(nn.OptimizedLSTMCell(h))
    params = module.init(jax.random.key(0), jnp.asarray(xs))
    return _jax_calls(module.apply, params, xs, probe)


def torch_calls(xs, probe, h, threads=None, device="cpu"):
    """PyTorch's fwd and fwd+bwd, each returning when its work is done (on ``"cuda"``
    after a synchronize); ``threads`` sets ``torch.set_num_threads`` for the calls."""
    import torch

    if threads:
        default = torch.get_num_threads()
        fwd, fwd_bwd = torch_calls(xs, probe, h, device=device)

        def with_threads(fn):
            torch.set_num_threads(threads)
            try:
                fn()
            finally:
                torch.set_num_threads(default)

        return lambda: with_threads(fwd), lambda: with_threads(fwd_bwd)
    torch.manual_seed(0)
    module = torch.nn.LSTM(xs.shape[2], h, batch_first=True).to(device)
    x = torch.from_numpy(xs).to(device).requires_grad_()
    p = torch.from_numpy(probe).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def fwd():
        with torch.no_grad():
            module(x)
        sync()

    def fwd_bwd():
        module.zero_grad(set_to_none=True)
        x.grad = None
        (module(x)[0] * p).sum().backward()
        sync()

    return fwd, fwd_bwd


def run_table(shape, repeats, quiet) -> dict:
    """Print the table; return ``{implementation: {fwd_s, fwd_cpu_s, fwd_bwd_s, ...}}``."""
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None

    b, t, i, h = shape
    xs, probe, lengths = _inputs(b, t, i, h)
    print(f"# One LSTM layer, float32, B={b}, T={t}, I={i}, h={h}; grads of weights and xs")
    print(f"machine: {machine()}; date: {datetime.date.today()}")
    print(f"{versions()}, torch {torch_version or 'absent'}")
    with open("/proc/loadavg") as f:
        print(f"load average at start: {' '.join(f.read().split()[:3])}")
    print(f"median of {repeats} rounds after a warm-up; each round times every row once;")
    print(f"each timed call waited up to {quiet} s for no other runnable task\n")
    calls = {
        "jaxattn lstm_scan": lambda: jaxattn_calls(xs, probe, lengths, h, None),
        "jaxattn, lengths": lambda: jaxattn_calls(xs, probe, lengths, h, "lengths"),
        "jaxattn, autodiff scan": lambda: jaxattn_calls(xs, probe, lengths, h, "autodiff"),
        "flax nn.RNN": lambda: flax_calls(xs, probe, h),
    }
    if torch_version:
        calls["torch nn.LSTM"] = lambda: torch_calls(xs, probe, h)
        calls["torch nn.LSTM, 1 thread"] = lambda: torch_calls(xs, probe, h, threads=1)
    built = {name: make() for name, make in calls.items()}  # compile everything first
    fwds = timed_round_robin([f for f, _ in built.values()], repeats, quiet)
    fwd_bwds = timed_round_robin([fb for _, fb in built.values()], repeats, quiet)
    rows = {name: (*f[:2], *fb) for name, f, fb in zip(built, fwds, fwd_bwds)}  # fb: n last
    # Ratios to the faster PyTorch configuration, per column: the stricter comparison.
    torch_rows = [r for name, r in rows.items() if name.startswith("torch")]
    ref = [min(r[k] for r in torch_rows) for k in range(4)] if torch_rows else None
    print("ratios are to the faster of the PyTorch rows, per column\n")
    print(
        "| implementation | fwd ms | fwd+bwd ms | fwd+bwd CPU s | n "
        "| fwd / torch (wall, CPU) | fwd+bwd / torch (wall, CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (tf, cf, tfb, cfb, n) in rows.items():
        rf = f"{tf / ref[0]:.2f}, {cf / ref[1]:.2f}" if ref else "-"
        rfb = f"{tfb / ref[2]:.2f}, {cfb / ref[3]:.2f}" if ref else "-"
        print(
            f"| {name} | {1e3 * tf:.0f} | {1e3 * tfb:.0f} | {cfb:.2f} | {n} | {rf} | {rfb} |",
            flush=True,
        )
    keys = ("fwd_s", "fwd_cpu_s", "fwd_bwd_s", "fwd_bwd_cpu_s", "n")
    return {name: dict(zip(keys, row)) for name, row in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument(
        "--shape",
        type=positive_int,
        nargs=4,
        default=(64, 200, 256, 512),
        metavar=("B", "T", "I", "H"),
        help="batch, time, input size, hidden size",
    )
    parser.add_argument("--repeats", type=positive_int, help="timed calls (default 5)")
    add_wait_quiet_flag(parser)
    add_json_flag(parser)
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 5)
    rows = run_table(tuple(args.shape), repeats, args.wait_quiet)
    write_json(args.json, {"lstm": {"shape": list(args.shape), "rows": rows}})


if __name__ == "__main__":
    main()
