"""Attention and LSTM on a GPU (or a TPU): correctness of each kernel, then time and memory
against jax.nn and PyTorch, in one run.

    python benchmarks/gpu.py                    # checks, attention T = 1024 .. 16384, LSTM
    python benchmarks/gpu.py --quick            # T = 1024, 4096; fewer repeats
    python benchmarks/gpu.py --sections checks  # any of: checks attention blocks long lstm
    python benchmarks/gpu.py --json FILE
    python benchmarks/gpu.py --smoke            # every section at toy sizes (CI, on CPU)

Made for a GPU. On a TPU it checks and times the Pallas kernel in place of cuDNN, in
bfloat16, without PyTorch rows. On a CPU it still runs (no cuDNN or Pallas rows, PyTorch
on the CPU), which only shows that the script works. ``--smoke`` shrinks every size (the
check cases' T and S by 8, rounded down to even, though they keep their names; timing at
T = 128 and 256 with B T = 1024 tokens; T = 2048 for ``long``; a small LSTM) so that the
whole script runs in about a minute on 2 CPU cores; the test suite runs it that way.

- ``checks``: every attention kernel (``cudnn`` on a GPU, ``pallas`` on a TPU where its
  limits allow, ``blockwise``, ``xla``, and what ``implementation=None`` picks) in
  bfloat16 against a float32 reference written here (einsum at ``precision="highest"``),
  on causal, padded, grouped-query with padding, queries-last (T < S), biased and H = 128
  cases: the output and the gradients of q, k and v, as ``max |got - want| / max |want|``.
  Also ``blockwise`` in float32 at highest precision, and ``blockwise`` with attention
  dropout 0.1 against the einsum path with the same key.
- ``attention``: causal self-attention in bfloat16, ``[B, T, N=16, H=128]`` with
  B T = 32768 tokens, forward and forward+backward: jaxattn's kernels, ``jax.nn`` with
  ``implementation="xla"`` and ``"cudnn"``, and PyTorch's ``scaled_dot_product_attention``.
  Times are the median of ``--repeats`` rounds; each round runs a row back to back until
  about 0.1 s have passed, then waits for the device, so launch overhead is amortised as
  in a training loop. Memory: XLA's temporary buffers of the compiled step
  (``memory_analysis``), PyTorch's peak allocation above its inputs.
- ``blocks``: the blockwise kernel at T = 4096 in the attention section's shape: all
  heads in each tile step (``batch_heads``) on 128, 256 and 512 tiles, against one head at
  a time on 512 tiles (to set ``flash.ACCELERATOR_BLOCK``); and attention dropout 0.1 in
  the blockwise kernel against the einsum path at the ``shakespeare_char`` GPT's
  attention shape, ``[64, 256, 6, 64]``, where the dense scores are small enough that the
  automatic choice takes the einsum path.
- ``long``: causal fwd+bwd at T = 32768 (B = 1, N = 8, H = 64): blockwise in float32 and
  cuDNN (GPU) or Pallas (TPU) in bfloat16, time and XLA temporary memory.
- ``lstm``: one layer, float32, B = 64, T = 200, I = 256, h = 512 (issue 5's shape; more
  shapes with ``--lstm-shapes``): jaxattn's pick (the scan, also on GPU since 2026-12-04),
  with and without ``lengths``, its scan, its cuDNN path (GPU only), Flax ``nn.RNN`` and
  PyTorch ``nn.LSTM`` (cuDNN on GPU), plus the cuDNN path's error against the scan.

A section that raises is reported (its traceback, and ``{"error": ...}`` in the JSON) and
the others still run; the script then exits non-zero, as it does when a check is over its
tolerance.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.attention import add_json_flag, machine, positive_int, write_json  # shared
from jaxattn.ops import flash
from jaxattn.ops import lstm as lstm_ops
from jaxattn.ops.attention import _pallas_fits, _select_implementation, dot_product_attention
from jaxattn.ops.masks import padding_mask

ON_GPU = jax.default_backend() == "gpu"
ON_TPU = jax.default_backend() == "tpu"
SECTIONS = ("checks", "attention", "blocks", "long", "lstm")


def _timing_dtype():
    """The attention timings' dtype: bfloat16 on an accelerator, float32 on a CPU."""
    return jnp.bfloat16 if ON_GPU or ON_TPU else jnp.float32


def _torch():
    """(torch module, device string) on jax's kind of device, or (None, None) without torch,
    on a TPU, or on a GPU with a CPU-only torch (its rows would time float32 on the CPU
    against bfloat16 on the accelerator)."""
    try:
        import torch
    except ImportError:
        return None, None
    if ON_TPU or (ON_GPU and not torch.cuda.is_available()):
        return None, None
    return torch, "cuda" if ON_GPU else "cpu"


def torch_sync(torch, device):
    """``sync(out=None)`` for ``time_call``: wait for the CUDA stream; nothing on CPU."""
    if device == "cuda":
        return lambda out=None: torch.cuda.synchronize()
    return lambda out=None: None


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.device_kind} ({d.platform})"


def _tflops(flop_per_s: float) -> str:
    """TFLOP/s to three significant figures: a CPU's 0.2 printed as 0 with a fixed ``.0f``."""
    return f"{flop_per_s / 1e12:.3g}"


def time_call(fn, sync, repeats: int, budget: float = 0.1) -> float:
    """Median seconds per call: each of ``repeats`` rounds calls ``fn`` back to back for
    about ``budget`` seconds (at least once), then ``sync()``s. One warm-up round first."""
    sync(fn())
    start, calls = time.perf_counter(), 0
    # Calls per round, from the warm-up pace. Syncing each warm-up call keeps the dispatch
    # queue short: unsynced, a slow call (CPU) could queue up seconds of work in 0.1 s.
    while time.perf_counter() - start < budget:
        sync(fn())
        calls += 1
    calls = max(1, int(calls * budget / max(time.perf_counter() - start, 1e-9)))
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = fn()
        sync(out)
        rounds.append((time.perf_counter() - start) / calls)
    return float(np.median(rounds))


def jax_sync(out=None) -> None:
    jax.block_until_ready(out)


def _random_qkv(shape, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q, k, v of one ``[B, T, N, H]`` shape from standard normals, the same for every call
    with that shape (seed 0), so rows timed on one shape see the same inputs."""
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))


# ------------------------------------------------------------------ checks


def reference_attention(q, k, v, mask, bias, is_causal):
    """Float32 softmax attention at highest precision; queries are the last T of S keys,
    GQA by repeating key/value heads, and a row with no visible key outputs 0."""
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    t, n, h = q.shape[1:]
    s, kv = k.shape[1:3]
    k, v = jnp.repeat(k, n // kv, axis=2), jnp.repeat(v, n // kv, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k, precision="highest") / np.float32(np.sqrt(h))
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    visible = jnp.ones((1, 1, t, s), bool)
    if mask is not None:
        visible = visible & mask
    if is_causal:
        visible = visible & (jnp.arange(s)[None, :] <= jnp.arange(t)[:, None] + (s - t))
    logits = jnp.where(visible, logits, np.float32(-1e30))
    has_key = jnp.any(visible, axis=-1, keepdims=True).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1) * has_key
    return jnp.einsum("bnts,bsnh->btnh", probs, v, precision="highest")


CASES = {  # name: (B, T, S, N, K, H, is_causal, extra)
    "causal T=S=1024": (2, 1024, 1024, 8, 8, 64, True, None),
    "causal T=S=1000, padding": (2, 1000, 1000, 8, 8, 64, True, "padding"),
    "causal GQA N=8 K=2, padding": (2, 1024, 1024, 8, 2, 64, True, "padding"),
    "causal T=256 < S=1024": (2, 256, 1024, 8, 8, 64, True, None),
    "bias, not causal, 512": (2, 512, 512, 8, 8, 64, False, "bias"),
    "causal H=128, 2048": (1, 2048, 2048, 8, 8, 128, True, None),
}


def _shrink(case, factor: int):
    """A case with T and S divided by ``factor`` and rounded down to even (for ``--smoke``).

    Even: cuDNN's backward refuses odd T or S with a bias (a mask, or a T < S causal
    mask, is one), so T = S = 1000 / 8 = 125 failed the explicit ``cudnn`` row on a GPU.
    """
    b, t, s, *rest = case
    return (b, max(2, t // factor // 2 * 2), max(2, s // factor // 2 * 2), *rest)


def _case_inputs(case, dtype):
    b, t, s, n, kv, h, is_causal, extra = case
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((b, s, kv, h)), dtype)
    v = jnp.asarray(rng.standard_normal((b, s, kv, h)), dtype)
    probe = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    kw = {"is_causal": is_causal}
    if extra == "padding":  # row 1 keeps only its first 60% of keys
        kw["mask"] = padding_mask(jnp.asarray([s, s * 3 // 5], jnp.int32), s)[:, None, None, :]
    if extra == "bias":
        kw["bias"] = jnp.asarray(rng.standard_normal((1, n, t, s)), dtype)
    return (q, k, v), probe, kw


def _out_and_grads(fn, qkv, probe):
    """``[out, dq, dk, dv]`` of ``sum(fn(q, k, v) * probe)``, in one compiled program (one
    compile per kernel and case instead of two: the checks are mostly compile time)."""
    loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * probe)
    out, grads = jax.jit(lambda *a: (fn(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(*qkv)
    return [out, *grads]


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _check_row(results, row, fn, qkv, probe, want, tol, precision="default") -> None:
    """Compare ``[out, dq, dk, dv]`` of ``fn`` on ``qkv`` with ``want``; print the table row
    ``row = (case, dtype name, label, key)`` and record it as ``results[case][key]``. An
    exception becomes a failed row."""
    name, dname, label, key = row
    try:
        with jax.default_matmul_precision(precision):
            errs = [_rel_err(g, w) for g, w in zip(_out_and_grads(fn, qkv, probe), want)]
    except Exception as e:  # report, go on with the other rows
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
        print(f"| {name} | {dname} | {label} | error: {msg} | | | | **no** |")
        results.setdefault(name, {})[key] = {"error": msg}
        return
    ok = all(e <= tol for e in errs)
    cells = " | ".join(f"{e:.1e}" for e in errs)
    print(f"| {name} | {dname} | {label} | {cells} | {'yes' if ok else '**no**'} |", flush=True)
    results.setdefault(name, {})[key] = {"errors": errs, "ok": ok}


def run_checks(shrink: int = 1) -> dict:
    print("# Correctness: max |got - want| / max |want| against a float32 einsum reference")
    print("(out, dq, dk, dv; the loss is sum(out * probe)). Tolerance: 3e-2 in bfloat16,")
    print("1e-4 for float32 at highest precision. With dropout 0.1 the reference is the")
    print("einsum path in float32 at highest precision with the same key (same mask).\n")
    print("| case | dtype | implementation | out | dq | dk | dv | ok |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    runs = {
        jnp.bfloat16: ("auto", "cudnn", "pallas", "blockwise", "xla"),
        jnp.float32: ("blockwise",),
    }
    for name, case in CASES.items():
        for dtype, impls in runs.items():
            # Inputs and the reference once per case and dtype: every kernel is held to them.
            qkv, probe, kw = _case_inputs(_shrink(case, shrink), dtype)
            mask, bias, is_causal = kw.get("mask"), kw.get("bias"), kw["is_causal"]
            ref = functools.partial(reference_attention, mask=mask, bias=bias, is_causal=is_causal)
            want = _out_and_grads(ref, qkv, probe)
            tol = 3e-2 if dtype == jnp.bfloat16 else 1e-4
            precision = "highest" if dtype == jnp.float32 else "default"
            dname = jnp.dtype(dtype).name
            for impl in impls:
                if impl == "cudnn" and not ON_GPU:
                    continue
                if impl == "pallas" and not (ON_TPU and _pallas_fits(*qkv, mask, bias, is_causal)):
                    continue
                label = impl
                if impl == "auto":
                    picked = _select_implementation(*qkv, mask, bias, is_causal, 0.0)
                    label = f"auto ({picked})"
                impl_arg = None if impl == "auto" else impl
                fn = functools.partial(dot_product_attention, implementation=impl_arg, **kw)
                row = (name, dname, label, f"{dname} {impl}")
                _check_row(results, row, fn, qkv, probe, want, tol, precision)
        # Attention dropout: the blockwise kernel in bfloat16 against the einsum path, which
        # draws the same position-hashed mask for the same key.
        qkv, probe, kw = _case_inputs(_shrink(case, shrink), jnp.float32)
        kw |= {"dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}
        einsum = functools.partial(dot_product_attention, implementation="xla", **kw)
        with jax.default_matmul_precision("highest"):
            want = _out_and_grads(einsum, qkv, probe)
        blockwise = functools.partial(dot_product_attention, implementation="blockwise", **kw)
        bf16 = tuple(x.astype(jnp.bfloat16) for x in qkv)
        row = (name, "bfloat16", "blockwise, dropout 0.1", "bfloat16 blockwise dropout")
        _check_row(results, row, blockwise, bf16, probe, want, 3e-2)
    return results


# ------------------------------------------------------------------ attention timing

N_HEADS, HEAD_DIM, TOKENS = 16, 128, 32768

JAX_ROWS = {
    "jaxattn auto": lambda q, k, v: dot_product_attention(q, k, v, is_causal=True),
    "jaxattn blockwise": lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, implementation="blockwise"
    ),
    "jaxattn xla": lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"
    ),
    "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="xla"
    ),
    "jax.nn cudnn": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn"
    ),
}
DENSE_ROWS = {"jaxattn xla", "jax.nn xla"}
GPU_ONLY_ROWS = {"jax.nn cudnn"}


def _jax_attention_calls(f, q, k, v):
    """Compiled ``f(q, k, v)`` and its ``value_and_grad``, and the latter's XLA temp bytes."""
    fwd = jax.jit(f).lower(q, k, v).compile()
    loss = lambda *a: jnp.sum(f(*a).astype(jnp.float32))
    # value_and_grad: as PyTorch's row, compute the output, its float32 cast and the sum
    # (under jax.grad they are dead code and XLA drops them; the dense path loses P V).
    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    temp = grad.memory_analysis().temp_size_in_bytes
    return (lambda: fwd(q, k, v)), (lambda: grad(q, k, v)), temp


def _torch_attention_calls(torch, device, b, t):
    import torch.nn.functional as F

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = (
        torch.randn(b, N_HEADS, t, HEAD_DIM, device=device, dtype=dtype, requires_grad=True)
        for _ in range(3)
    )

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True).float().sum().backward()

    mem = None  # PyTorch reports no peak memory on the CPU: the row prints "-"
    if device == "cuda":
        fwd_bwd()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fwd_bwd()
        torch.cuda.synchronize()
        mem = torch.cuda.max_memory_allocated() - base
    return fwd, fwd_bwd, mem


def run_attention(lengths, repeats, max_dense_gib, tokens: int = TOKENS) -> dict:
    torch, device = _torch()
    dtype = _timing_dtype()
    dname = jnp.dtype(dtype).name
    print(f"\n# Causal attention, {dname}, [B, T, N={N_HEADS}, H={HEAD_DIM}], B T = {tokens}")
    print(f"median of {repeats} rounds of ~0.1 s each; TFLOP/s counts the causal half only")
    print("(fwd 2 B N T² H, fwd+bwd 3.5x that); ratios are to PyTorch SDPA's fwd+bwd\n")
    print("| T | B | implementation | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | / torch | MiB |")
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for t in lengths:
        b = max(1, tokens // t)
        q, k, v = _random_qkv((b, t, N_HEADS, HEAD_DIM), dtype)
        flops = 3.5 * 2 * b * N_HEADS * t * t * HEAD_DIM
        rows = {}
        names = [n for n in JAX_ROWS if ON_GPU or n not in GPU_ONLY_ROWS]
        dense_gib = 3 * 4 * b * N_HEADS * t * t / 2**30  # f32 logits, probs, cotangent
        for name in names + (["torch SDPA"] if torch else []):
            if name in DENSE_ROWS and dense_gib > max_dense_gib:
                rows[name] = f"skipped: ~{dense_gib:.0f} GiB dense"
                continue
            try:
                if name == "torch SDPA":
                    fwd, fwd_bwd, mem = _torch_attention_calls(torch, device, b, t)
                    sync = torch_sync(torch, device)
                else:
                    fwd, fwd_bwd, mem = _jax_attention_calls(JAX_ROWS[name], q, k, v)
                    sync = jax_sync
                rows[name] = (time_call(fwd, sync, repeats), time_call(fwd_bwd, sync, repeats),
                              None if mem is None else mem / 2**20)  # fmt: skip
            except Exception as e:  # report, go on with the other rows
                rows[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        ref = rows.get("torch SDPA")
        picked = _select_implementation(q, k, v, None, None, True, 0.0)
        for name, r in rows.items():
            label = f"{name} ({picked})" if name == "jaxattn auto" else name
            if isinstance(r, str):
                print(f"| {t} | {b} | {label} | {r} | | | | |")
                results.setdefault(str(t), {})[name] = {"note": r}
                continue
            tf, tfb, mib = r
            ratio = f"{tfb / ref[1]:.2f}" if isinstance(ref, tuple) else "-"
            print(f"| {t} | {b} | {label} | {1e3 * tf:.2f} | {1e3 * tfb:.2f} "
                  f"| {_tflops(flops / tfb)} | {ratio} | {'-' if mib is None else f'{mib:.0f}'} |",
                  flush=True)  # fmt: skip
            row = {"batch": b, "fwd_s": tf, "fwd_bwd_s": tfb, "mib": mib}
            if name == "jaxattn auto":
                row["picked"] = picked  # what implementation=None ran
            results.setdefault(str(t), {})[name] = row
    return results


def run_blocks(
    t: int,
    repeats: int,
    blocks=(128, 256, 512),
    tokens: int = TOKENS,
    dropout_shape=(64, 256, 6, 64),
) -> dict:
    """The blockwise kernel's settings and attention dropout's two kernels, causal fwd+bwd.

    At T in the attention section's dtype and ``[B, T, N, H]``: every (batch, head) pair in
    each tile step (``batch_heads=True``, the default off CPU) on square tiles of each size
    in ``blocks``, to set ``flash.ACCELERATOR_BLOCK``, and one pair at a time (the CPU
    order). Then dropout 0.1 in the blockwise kernel and the einsum path at
    ``dropout_shape`` (``[B, T, N, H]``; default the ``shakespeare_char`` GPT's attention),
    whose dense scores are under ``_DENSE_SCORES_MAX_BYTES``, where
    ``_select_implementation`` picks the einsum path for dropout: is that the faster one?
    """
    dtype = _timing_dtype()
    b = max(1, tokens // t)
    kernel_shape = (b, t, N_HEADS, HEAD_DIM)
    print(f"\n# The blockwise kernel's settings, and dropout's kernels: {jnp.dtype(dtype).name},")
    print(f"causal; defaults on {jax.default_backend()}: batch_heads="
          f"{flash.default_batch_heads(False)}, ACCELERATOR_BLOCK={flash.ACCELERATOR_BLOCK}, "
          f"DEFAULT_BLOCK={flash.DEFAULT_BLOCK}\n")  # fmt: skip
    causal = functools.partial(flash.flash_attention, is_causal=True)
    rows = {}  # name: (shape, function)
    for n in blocks:
        f = functools.partial(causal, batch_heads=True, block_q=n, block_k=n)
        rows[f"batch_heads, {n} x {n}"] = (kernel_shape, f)
    one = flash.block_sizes(t, t, batch_heads=False)[0]  # DEFAULT_BLOCK, or T if shorter
    rows[f"one pair at a time, {one} x {one}"] = (
        kernel_shape,
        functools.partial(causal, batch_heads=False),
    )
    dropout = {"is_causal": True, "dropout_rate": 0.1, "dropout_rng": jax.random.key(0)}
    for impl in ("blockwise", "xla"):
        f = functools.partial(dot_product_attention, implementation=impl, **dropout)
        rows[f"{impl}, dropout 0.1"] = (dropout_shape, f)
    print("| setting | [B, T, N, H] | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s | MiB |")
    print("|---|---|---|---|---|---|")
    inputs = {shape: _random_qkv(shape, dtype) for shape in (kernel_shape, dropout_shape)}
    results = {}
    for name, (shape, f) in rows.items():
        bs, ts, ns, hs = shape
        flops = 3.5 * 2 * bs * ns * ts * ts * hs
        try:
            q, k, v = inputs[shape]
            fwd, fwd_bwd, mem = _jax_attention_calls(f, q, k, v)
            tf, tfb = time_call(fwd, jax_sync, repeats), time_call(fwd_bwd, jax_sync, repeats)
        except Exception as e:  # report, go on with the other rows
            note = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            print(f"| {name} | {list(shape)} | {note} | | | |")
            results[name] = {"shape": list(shape), "note": note}
            continue
        print(f"| {name} | {list(shape)} | {1e3 * tf:.2f} | {1e3 * tfb:.2f} "
              f"| {_tflops(flops / tfb)} | {mem / 2**20:.0f} |", flush=True)  # fmt: skip
        results[name] = {"shape": list(shape), "fwd_s": tf, "fwd_bwd_s": tfb, "mib": mem / 2**20}
    return results


def run_long(t: int = 32768) -> dict:
    print(f"\n# Long sequence: causal fwd+bwd, [B=1, T={t}, N=8, H=64]")
    print("| implementation | dtype | seconds | XLA temp GiB | grads finite |")
    print("|---|---|---|---|---|")
    results = {}
    impls = [("blockwise", jnp.float32)]
    impls += [("cudnn", jnp.bfloat16)] if ON_GPU else [("pallas", jnp.bfloat16)] if ON_TPU else []
    for impl, dtype in impls:
        q, k, v = _random_qkv((1, t, 8, 64), dtype)
        f = lambda *a, impl=impl: jnp.sum(
            dot_product_attention(*a, is_causal=True, implementation=impl).astype(jnp.float32)
        )
        grad = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile()
        temp = grad.memory_analysis().temp_size_in_bytes / 2**30
        grads = jax.block_until_ready(grad(q, k, v))  # warm-up
        start = time.perf_counter()
        grads = jax.block_until_ready(grad(q, k, v))
        seconds = time.perf_counter() - start
        finite = all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
        name = jnp.dtype(dtype).name
        print(f"| {impl} | {name} | {seconds:.3f} | {temp:.2f} | {finite} |", flush=True)
        results[impl] = {"dtype": name, "seconds": seconds, "temp_gib": temp, "finite": finite}
    return results


# ------------------------------------------------------------------ LSTM


def run_lstm(repeats: int, shape=(64, 200, 256, 512)) -> dict:
    from benchmarks.lstm import _inputs, flax_calls, jaxattn_calls, torch_calls

    torch, device = _torch()
    b, t, i, h = shape
    xs, probe, lengths = _inputs(b, t, i, h)
    print(f"\n# One LSTM layer, float32, B={b}, T={t}, I={i}, h={h}; grads of weights and xs")
    weights = lstm_ops.init_lstm(jax.random.key(0), i, h)
    x, p, n = jnp.asarray(xs), jnp.asarray(probe), jnp.asarray(lengths)
    picked = lstm_ops._pick(None, [weights], x, [], "run_lstm")
    # Each call returns when its work is done, so time_call needs no sync of its own.
    calls = {
        f"jaxattn auto ({picked})": lambda: jaxattn_calls(xs, probe, lengths, h, None),
        f"jaxattn auto ({picked}), lengths": lambda: jaxattn_calls(
            xs, probe, lengths, h, "lengths"
        ),
        "jaxattn scan": lambda: jaxattn_calls(xs, probe, lengths, h, "scan"),
        **(
            {"jaxattn cudnn": lambda: jaxattn_calls(xs, probe, lengths, h, "cudnn")}
            if ON_GPU
            else {}
        ),
        "flax nn.RNN": lambda: flax_calls(xs, probe, h),
    }
    if torch:
        calls[f"torch nn.LSTM ({device})"] = lambda: torch_calls(xs, probe, h, device=device)
    if ON_GPU:  # the cuDNN path against the scan, values and gradients
        with jax.default_matmul_precision("highest"):
            grads = {
                impl: jax.jit(jax.grad(lambda w, x, impl=impl: jnp.sum(
                    lstm_ops.lstm_scan(w, x, lengths=n, implementation=impl)[0] * p),
                    argnums=(0, 1)))(weights, x)
                for impl in ("cudnn", "scan")
            }  # fmt: skip
        errs = jax.tree.map(_rel_err, grads["cudnn"], grads["scan"])
        print(f"cuDNN vs scan (with lengths), max relative gradient error: "
              f"{max(jax.tree.leaves(errs)):.1e}")  # fmt: skip
    built = {name: make() for name, make in calls.items()}
    no_sync = lambda out=None: None
    timed = {
        name: (time_call(fwd, no_sync, repeats), time_call(fwd_bwd, no_sync, repeats))
        for name, (fwd, fwd_bwd) in built.items()
    }
    ref = next((v for n, v in timed.items() if n.startswith("torch")), None)
    print("| implementation | fwd ms | fwd+bwd ms | fwd+bwd / torch |")
    print("|---|---|---|---|")
    for name, (tf, tfb) in timed.items():
        ratio = f"{tfb / ref[1]:.2f}" if ref else "-"
        print(f"| {name} | {1e3 * tf:.2f} | {1e3 * tfb:.2f} | {ratio} |")
    return {name: {"fwd_s": tf, "fwd_bwd_s": tfb} for name, (tf, tfb) in timed.items()}


def _lstm_shape(text: str) -> tuple[int, int, int, int]:
    """``"64x200x256x512"`` -> ``(64, 200, 256, 512)``: batch, time, input and hidden size."""
    try:
        shape = tuple(int(n) for n in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected B x T x I x h, e.g. 64x200x256x512: {text!r}")
    return shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 1024, 4096; 3 repeats")
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes, 1 repeat: checks that the script runs"
    )
    # nargs="+": a bare --lengths ran the full default lengths, a bare --sections nothing.
    parser.add_argument("--lengths", type=positive_int, nargs="+", help="override the T values")
    parser.add_argument("--repeats", type=positive_int, help="timed rounds (default 7)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--lstm-shapes",
        nargs="+",
        type=_lstm_shape,
        help="LSTM shapes B x T x I x h (default 64x200x256x512, issue 5's)",
    )
    parser.add_argument(
        "--max-dense-gib",
        type=float,
        default=24.0,
        help="skip dense rows whose float32 [B, N, T, T] buffers exceed this",
    )
    add_json_flag(parser)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 7)
    default_lengths = [1024, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    lengths = args.lengths or ([128, 256] if args.smoke else default_lengths)
    # --smoke: the same code paths at sizes a 2-core CPU runs in about a minute in all.
    shrink, tokens, long_t = (8, 1024, 2048) if args.smoke else (1, TOKENS, 32768)
    blocks_t, blocks = (256, (64, 128)) if args.smoke else (4096, (128, 256, 512))
    dropout_shape = (4, 64, 4, 32) if args.smoke else (64, 256, 6, 64)
    lstm_shapes = args.lstm_shapes or [(8, 20, 32, 64) if args.smoke else (64, 200, 256, 512)]
    torch, device = _torch()
    print(
        f"machine: {machine()}; device: {device_name()}; date: {datetime.datetime.now():%F %H:%M}"
    )
    torch_note = torch.__version__ + " on " + device if torch else "absent"
    if ON_TPU:
        torch_note = "not timed on a TPU"
    elif ON_GPU and not torch:
        torch_note += " or without CUDA: no PyTorch rows"
    print(f"jax {jax.__version__}; torch {torch_note}")
    if ON_TPU:
        print("TPU: Pallas rows in place of cuDNN's; no PyTorch rows")
    elif not ON_GPU:
        print("no GPU: the cuDNN rows are skipped; figures only show that the script runs")
    run = {
        "checks": lambda: run_checks(shrink),
        "attention": lambda: run_attention(lengths, repeats, args.max_dense_gib, tokens),
        "blocks": lambda: run_blocks(blocks_t, repeats, blocks, tokens, dropout_shape),
        "long": lambda: run_long(long_t),
        "lstm": lambda: {
            "x".join(map(str, shape)): run_lstm(repeats, shape) for shape in lstm_shapes
        },
    }
    results, failed = {"device": device_name()}, []
    for section in args.sections:
        try:
            results[section] = run[section]()
        except Exception:  # a failed section must not hide the others
            traceback.print_exc()
            results[section] = {"error": traceback.format_exc(limit=1)}
            failed.append(f"section {section} raised (traceback above)")
        write_json(args.json, results)
    # A check over its tolerance or raising is a failure too: exit non-zero, as a test would
    # (gpu_check.sh's one line per check shows only the exit status).
    checks = results.get("checks", {})
    if "error" not in checks:
        bad = [f"{case}: {key}" for case, rows in checks.items() for key, row in rows.items()
               if not row.get("ok")]  # fmt: skip
        if bad:
            failed.append(f"{len(bad)} check(s) failed ({'; '.join(bad)})")
    if failed:
        sys.exit("gpu.py: " + "; ".join(failed))


if __name__ == "__main__":
    main()
