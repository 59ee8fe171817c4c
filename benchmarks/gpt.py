"""GPT benchmarks for the nanoGPT CPU Shakespeare config, jaxattn vs PyTorch in one run.

    python benchmarks/gpt.py            # all sections but loss_memory
    python benchmarks/gpt.py --quick    # fewer repetitions
    python benchmarks/gpt.py --sections loss_memory   # one section (section names below)

Sections (each prints a table):
1. train step: one optimizer step (forward, backward, clip, AdamW) of the
   ``shakespeare_char_cpu`` model, batch 12 x 64 tokens: median ms and tokens/s for jaxattn
   (the same jitted step ``train/lm.py`` runs) and for nanoGPT's model in PyTorch
   (``benchmarks/torch_nanogpt.py``), and the projected 2000-step training time.
2. generation: tokens/s at batch 1, jaxattn's KV-cache ``generate`` (with
   ``unroll_layers=True`` and with the default layer scan) against regenerating the whole
   context for every token (jaxattn without a cache, padded to ``block_size``, and
   nanoGPT's ``generate`` loop in PyTorch, which has no cache and runs the growing
   context: the target's baseline), against nanoGPT's model in PyTorch with a KV cache
   (the peer a PyTorch user would write), and against the floor: the token step's weight
   products alone (``weight_products``); each row's time over each cache's.
3. compile time of the jitted train step at depth 4 vs 48 (layers are a ``lax.scan``).
4. matmul: the dense-layer products of one train step (forward ``x W``, input gradient
   ``dy Wᵀ``, weight gradient ``xᵀ dy``; the three query/key/value products in one call),
   XLA:CPU against ``torch.mm``: milliseconds, GFLOP/s and cores used (process CPU time /
   wall time), and their sum over the step: the floor that model code cannot lower.
5. loss_memory (only when named in ``--sections``; compiles, runs nothing): the temporary
   memory XLA plans for ``jax.grad(gpt_loss)`` of a GPT-2-small-sized model (V = 50257,
   12 layers, width 768, batch 8 x 1024 tokens), float32 and bfloat16, with the loss over
   all tokens at once and with ``GPTConfig.loss_chunk_size``.

Step times are medians after warm-up; the two train steps are timed in alternating blocks, and all
rows of a section run in the same process on the same machine at the same
time, so compare ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

# The configs import their shared parts as ``configs.*`` (train/ is on the scripts' path);
# the repository root makes ``benchmarks.torch_nanogpt`` importable however this file runs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from configs import shakespeare_char_cpu

from benchmarks.attention import add_json_flag, machine, write_json  # shared helpers
from benchmarks.attention import timed as timed_stats
from jaxattn.models import gpt
from jaxattn.training.loop import make_train_step
from jaxattn.training.optim import optimizer_from_config
from jaxattn.training.state import create_train_state

VOCAB = 65  # tinyshakespeare's characters


def _torch():
    """The torch module, or None when PyTorch is not installed (its rows are then left out)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def timed(fn, repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn()`` (which must block until its result
    is ready), after one warm-up call."""
    return timed_stats(fn, repeats, slow=math.inf, quiet=0.0)[0]


def timed_interleaved(fns, repeats: int, block: int = 10) -> list[float]:
    """Median seconds of ``repeats`` calls of each of ``fns``, taken in alternating blocks of
    ``block`` calls; the first call of each block is a warm-up and is not counted (PyTorch's
    OpenMP threads may still spin from its previous call). Each ``fn()`` must block until
    its result is ready."""
    times = [[] for _ in fns]
    while len(times[0]) < repeats:
        for fn, samples in zip(fns, times):
            fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def model_config(run: ml_collections.ConfigDict, **changes) -> gpt.GPTConfig:
    return gpt.GPTConfig(vocab_size=VOCAB, **{**run.model.to_dict(), **changes})


def jax_train_step(run, model):
    optimizer, _ = optimizer_from_config(run, decay_mask=gpt.weight_decay_mask)
    params = jax.jit(gpt.init_gpt, static_argnums=1)(jax.random.key(0), model)
    state = create_train_state(params, optimizer, jax.random.key(1))

    def loss_fn(params, batch, rng):
        return gpt.gpt_loss(params, batch["inputs"], batch["targets"], model), {}

    return make_train_step(loss_fn, optimizer), state


def bench_train_step(run, repeats: int) -> list[tuple[str, float]]:
    model = model_config(run)
    rng = np.random.default_rng(0)
    shape = (run.batch_size, model.block_size)
    batches = [
        {
            "inputs": jnp.asarray(rng.integers(0, VOCAB, shape), jnp.int32),
            "targets": jnp.asarray(rng.integers(0, VOCAB, shape), jnp.int32),
        }
        for _ in range(4)
    ]
    step, state = jax_train_step(run, model)
    holder = {"state": state, "i": 0}

    def jax_once():
        holder["state"], metrics = step(holder["state"], batches[holder["i"] % 4])
        holder["i"] += 1
        jax.block_until_ready(metrics)

    for _ in range(5):
        jax_once()
    torch = _torch()
    if torch is None:
        return [("jaxattn (jit, XLA:CPU)", timed(jax_once, repeats))]
    from benchmarks.torch_nanogpt import NanoGPT, make_optimizer

    torch.manual_seed(0)
    net = NanoGPT(VOCAB, model.block_size, model.num_layers, model.num_heads, model.embed_dim)
    opt = make_optimizer(net, run.learning_rate, run.weight_decay, (run.b1, run.b2))
    torch_batches = [
        (
            torch.from_numpy(np.array(b["inputs"])).long(),
            torch.from_numpy(np.array(b["targets"])).long(),
        )
        for b in batches
    ]
    counter = {"i": 0}

    def torch_once():
        x, y = torch_batches[counter["i"] % 4]
        counter["i"] += 1
        loss = net(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), run.grad_clip)
        opt.step()
        loss.item()

    for _ in range(5):
        torch_once()
    # Alternate the two steps so that both see the same load: on a shared machine the load
    # moves the medians of two back-to-back runs by more than the difference between them.
    jax_s, torch_s = timed_interleaved([jax_once, torch_once], repeats)
    return [
        ("jaxattn (jit, XLA:CPU)", jax_s),
        (f"PyTorch {torch.__version__} nanoGPT (eager)", torch_s),
    ]


def weight_products(weights: gpt.GPTWeights, config: gpt.GPTConfig, new_tokens: int):
    """A jitted ``new_tokens``-step loop of only the matrix-vector products that one cached
    token step runs at batch 1: each layer's query, key, value, output, MLP up and MLP down
    matrices and the output layer (the tied embedding, or ``head``), once per token.

    Each product takes the previous one's output, so none is skipped or hoisted out of the
    loop, and the loop reads the same weight bytes per token as ``gpt_decode`` (3.1 MB for
    ``shakespeare_char_cpu``) with little else: a floor under the cached decoder's time per
    token on this machine, set by how fast one core streams the weights. Returns a function
    of no arguments that blocks until the result is ready.
    """
    table = weights.token_embedding.table  # [V, D]
    d = table.shape[1]
    out = table if weights.head is None else weights.head.w.T  # [V, D]
    # Sliced once, outside the loop, as generate(unroll_layers=True) does: a slice of the
    # [L, ...] stacks inside it would be copied on every token. (The cache goes unused.)
    stepped, _ = gpt.unstack_layers(weights, gpt.init_cache(config, 1, 1))
    layers = [(block.attn, block.mlp) for block in stepped.blocks]

    @jax.jit
    def loop(layers, out):
        def token(_, x):  # x: [1, D]
            for attn, mlp in layers:
                q, k, v = (x @ w.reshape(d, -1) for w in (attn.w_q, attn.w_k, attn.w_v))
                heads = q + k.sum() + v.sum()  # (k, v: K·H wide; their sums keep them live)
                x = x + heads @ attn.w_o.reshape(-1, d)
                x = jnp.tanh(x + (x @ mlp.up.w) @ mlp.down.w)  # tanh: bounded, no denormals
            logits = jax.lax.dot_general(x, out, (((1,), (1,)), ((), ())))  # [1, V]
            return x + logits.mean()

        return jax.lax.fori_loop(0, new_tokens, token, jnp.ones((1, d), out.dtype))

    return lambda: jax.block_until_ready(loop(layers, out))


def bench_generation(run, new_tokens: int, repeats: int) -> list[tuple[str, str, float]]:
    """Rows ``(json key, label, seconds per call of new_tokens tokens)``."""
    model = model_config(run)
    weights = jax.jit(gpt.init_gpt, static_argnums=1)(jax.random.key(0), model)
    prompt = jnp.zeros((1, 1), jnp.int32)
    rng = jax.random.key(3)

    def cached(unroll_layers=False):
        out = gpt.generate(
            weights, model, prompt, new_tokens, rng=rng, top_k=200, unroll_layers=unroll_layers
        )
        jax.block_until_ready(out)

    def cached_unrolled():
        cached(unroll_layers=True)

    # Without a cache: a full causal forward pass over the whole context, right-padded to
    # block_size, for every new token: one compiled shape, causality makes the padding
    # harmless. It does more work than nanoGPT's generate, which runs only the tokens so
    # far (1..63 here): 2x the positions (4,032 against 2,016), about 1.6x the time measured
    # at this size. The target is judged against nanoGPT's.
    @jax.jit
    def full_pass_generate(weights, rng):
        tokens = jnp.zeros((1, model.block_size), jnp.int32)

        def step(carry, t):
            tokens, rng = carry
            rng, sub = jax.random.split(rng)
            logits = gpt.gpt(weights, tokens, model)[:, t]
            nxt = jax.random.categorical(sub, logits)
            return (tokens.at[:, t + 1].set(nxt.astype(jnp.int32)), rng), None

        (tokens, _), _ = jax.lax.scan(step, (tokens, rng), jnp.arange(new_tokens))
        return tokens

    def uncached():
        jax.block_until_ready(full_pass_generate(weights, rng))

    floor = weight_products(weights, model, new_tokens)
    for fn in (cached, cached_unrolled, uncached, floor):
        fn()  # compile
    rows = [
        ("cached_unrolled_s", "jaxattn generate, KV cache, unroll_layers=True", cached_unrolled),
        ("cached_scan_s", "jaxattn generate, KV cache (layer scan, the default)", cached),
        ("full_pass_s", "jaxattn, full forward per token, padded to block_size", uncached),
        ("weight_products_s", "floor: the cached step's weight products alone (XLA)", floor),
    ]
    torch = _torch()
    if torch is None:
        return _timed_rows(rows, repeats)
    from benchmarks.torch_nanogpt import NanoGPT

    net = NanoGPT(VOCAB, model.block_size, model.num_layers, model.num_heads, model.embed_dim)
    net.eval()

    def torch_generate():
        net.generate(torch.zeros((1, 1), dtype=torch.long), new_tokens, top_k=200)

    def torch_generate_cached():
        net.generate_cached(torch.zeros((1, 1), dtype=torch.long), new_tokens, top_k=200)

    torch_generate()
    torch_generate_cached()
    label = f"PyTorch {torch.__version__} nanoGPT generate (no cache)"
    rows.append(("torch_no_cache_s", label, torch_generate))
    label = f"PyTorch {torch.__version__} nanoGPT's model with a KV cache (eager)"
    rows.append(("torch_cached_s", label, torch_generate_cached))
    return _timed_rows(rows, repeats)


def _timed_rows(rows, repeats: int) -> list[tuple[str, str, float]]:
    """Time the rows' functions in alternating blocks (as the train steps), so that a slow
    spell of a shared machine does not land on one row alone (e.g. PyTorch's, the
    KV-cache target's denominator)."""
    seconds = timed_interleaved([fn for _, _, fn in rows], repeats, block=2)
    return [(key, label, sec) for (key, label, _), sec in zip(rows, seconds)]


def bench_compile(run) -> list[tuple[str, float]]:
    def compile_seconds(depth: int) -> float:
        model = model_config(run, num_layers=depth)
        step, state = jax_train_step(run, model)
        batch = {
            "inputs": jnp.zeros((run.batch_size, model.block_size), jnp.int32),
            "targets": jnp.zeros((run.batch_size, model.block_size), jnp.int32),
        }
        start = time.perf_counter()
        step.lower(state, batch).compile()
        return time.perf_counter() - start

    # With JAX's persistent cache on (JAX_COMPILATION_CACHE_DIR, as train/ sets one), a
    # rerun would time loading the programs from disk (0.5 s at both depths), not compiling.
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        # A process's first compile is about 15% slower (one-time costs); a discarded
        # 2-layer compile keeps that out of the 4-layer figure, the target's denominator.
        compile_seconds(2)
        depths = (4, 48)
        return [(f"train step compile, {d} layers", compile_seconds(d)) for d in depths]
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def bench_matmul(run, repeats: int) -> list[tuple[str, int, int, float, float, float, float]]:
    """Time each dense-layer product of one step.

    The queries, keys and values are three independent products (``GPTWeights`` keeps
    ``w_q, w_k, w_v`` apart); their row times all three in one call, as one jitted step
    leaves XLA free to run them side by side, and PyTorch's runs them one after another.

    Returns rows (name, count per step, flops, jax s, jax cores, torch s, torch cores);
    ``count`` is how often the row's call occurs in one step.
    """
    m, d = run.batch_size * run.model.block_size, run.model.embed_dim
    layers = run.model.num_layers
    f = 4 * d  # mlp_ratio 4
    # (name, rows, contracted, cols, transposed lhs, independent products, count per step)
    shapes = []
    for name, k, n, parts in (
        ("q, k, v", d, d, 3),
        ("attn out", d, d, 1),
        ("mlp up", d, f, 1),
        ("mlp down", f, d, 1),
    ):
        times = f"{parts} x " if parts > 1 else ""
        shapes += [
            (f"{name}: x W, {times}[{m}x{k}]·[{k}x{n}]", m, k, n, False, parts, layers),
            (f"{name}: dy Wᵀ, {times}[{m}x{n}]·[{n}x{k}]", m, n, k, False, parts, layers),
            (f"{name}: xᵀ dy, {times}[{k}x{m}]·[{m}x{n}]", k, m, n, True, parts, layers),
        ]
    rng = np.random.default_rng(0)
    torch = _torch()
    rows = []
    for name, rows_, inner, cols, transposed, parts, count in shapes:
        lhs_shape = (inner, rows_) if transposed else (rows_, inner)
        lhs = [rng.standard_normal(lhs_shape, np.float32) for _ in range(parts)]
        rhs = [rng.standard_normal((inner, cols), np.float32) for _ in range(parts)]
        dims = (((0,), (0,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
        fn = jax.jit(
            lambda xs, ys, dims=dims: [jax.lax.dot_general(x, y, dims) for x, y in zip(xs, ys)]
        )
        ja, jb = [jnp.asarray(x) for x in lhs], [jnp.asarray(y) for y in rhs]
        jax_s, jax_cores = timed_cores(
            lambda fn=fn, ja=ja, jb=jb: jax.block_until_ready(fn(ja, jb)), repeats
        )
        torch_s = torch_cores = float("nan")
        if torch is not None:
            # The transposed lhs is a strided view, as autograd passes it.
            ta = [torch.from_numpy(x).T if transposed else torch.from_numpy(x) for x in lhs]
            tb = [torch.from_numpy(y) for y in rhs]
            torch_s, torch_cores = timed_cores(
                lambda ta=ta, tb=tb: [torch.mm(x, y) for x, y in zip(ta, tb)], repeats
            )
        flops = 2 * rows_ * inner * cols * parts
        rows.append((name, count, flops, jax_s, jax_cores, torch_s, torch_cores))
    return rows


def timed_cores(fn, repeats: int) -> tuple[float, float]:
    """(median wall seconds, cores used = process CPU time / wall time over all the calls).

    The ratio is taken over the whole span, as in the tables of benchmarks/README.md. Per
    call it differs for PyTorch (1.0 against 1.9 over the span): its OpenMP threads may
    spin between calls, or their CPU time may lag within a sub-millisecond call.
    """
    fn()  # Compile outside the span.
    wall0, cpu0 = time.perf_counter(), time.process_time()
    median = timed(fn, repeats)
    return median, (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def bench_loss_memory() -> list[tuple[str, int | None, float]]:
    """Rows ``(dtype, loss_chunk_size, temp GiB)`` of ``jax.grad(gpt_loss)``'s compiled
    program for GPT-2 small's shapes (nothing is allocated: ``memory_analysis`` of the
    compiled step)."""
    tokens = jax.ShapeDtypeStruct((8, 1024), jnp.int32)
    grad = jax.jit(jax.grad(gpt.gpt_loss), static_argnames="config")
    rows = []
    for dtype in ("float32", "bfloat16"):
        for chunk in (None, 128):  # 128 positions x 8 rows: 1,024 tokens per chunk
            config = gpt.GPTConfig(50257, 1024, 12, 12, 768, dtype=dtype, loss_chunk_size=chunk)
            weights = jax.eval_shape(lambda key, c=config: gpt.init_gpt(key, c), jax.random.key(0))
            compiled = grad.lower(weights, tokens, tokens, config=config).compile()
            rows.append((dtype, chunk, compiled.memory_analysis().temp_size_in_bytes / 2**30))
    return rows


SECTIONS = ("train", "generate", "compile", "matmul", "loss_memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--sections",
        default="train,generate,compile,matmul",
        help=f"comma-separated, of: {','.join(SECTIONS)} (default: all but loss_memory)",
    )
    add_json_flag(parser)
    args = parser.parse_args()
    sections = args.sections.split(",")
    unknown = [name for name in sections if name not in SECTIONS]
    if unknown:  # (a misspelt name ran nothing, silently, and wrote an empty --json)
        parser.error(f"unknown --sections {','.join(unknown)}; the sections: {','.join(SECTIONS)}")
    results = {}
    repeats = 10 if args.quick else 50
    run = shakespeare_char_cpu.get_config()
    print(f"# GPT benchmarks — {machine()}, jax {jax.__version__}, {datetime.date.today()}")
    tokens = run.batch_size * run.model.block_size
    if "train" in sections:
        rows = bench_train_step(run, repeats)
        torch_s = rows[1][1] if len(rows) > 1 else None
        results["train_step"] = {"jaxattn_s": rows[0][1], "torch_s": torch_s}
        print(
            f"\n## train step: shakespeare_char_cpu, "
            f"batch {run.batch_size} x {run.model.block_size}"
        )
        print(f"| implementation | ms/step | tokens/s | {run.num_steps} steps | vs PyTorch |")
        print("|---|---|---|---|---|")
        for name, sec in rows:
            print(
                f"| {name} | {sec * 1e3:.1f} | {tokens / sec:,.0f} | {sec * run.num_steps:.0f} s "
                f"| {'-' if torch_s is None else f'{sec / torch_s:.2f}x'} |"  # (no PyTorch)
            )
    if "generate" in sections:
        new = run.model.block_size - 1
        rows = bench_generation(run, new, max(3, repeats // 5))
        by_key = {key: sec for key, _, sec in rows}
        unrolled, scanned = by_key["cached_unrolled_s"], by_key["cached_scan_s"]
        results["generation"] = {"new_tokens": new} | by_key
        print(f"\n## generation: batch 1, {new} new tokens (context {run.model.block_size})")
        print("| implementation | tokens/s | µs/token | ÷ unrolled cache | ÷ scan cache |")
        print("|---|---|---|---|---|")
        for _, name, sec in rows:
            print(
                f"| {name} | {new / sec:,.0f} | {sec / new * 1e6:.0f} | {sec / unrolled:.1f}x "
                f"| {sec / scanned:.1f}x |"
            )
    if "compile" in sections:
        rows = bench_compile(run)
        results["compile"] = {"4_layers_s": rows[0][1], "48_layers_s": rows[1][1]}
        print("\n## compile time (layers scanned)")
        print("| what | seconds | vs 4 layers |")
        print("|---|---|---|")
        for name, sec in rows:
            print(f"| {name} | {sec:.2f} | {sec / rows[0][1]:.2f}x |")
    if "matmul" in sections:
        rows = bench_matmul(run, repeats)
        print("\n## matmul: the dense-layer products of one train step, float32")
        print(
            "| products | per step | XLA:CPU ms | GFLOP/s | cores | torch.mm ms | GFLOP/s | cores |"
        )
        print("|---|---|---|---|---|---|---|---|")
        totals = [0.0, 0.0]
        for name, count, flops, jax_s, jax_cores, torch_s, torch_cores in rows:
            totals[0] += count * jax_s
            totals[1] += count * torch_s
            print(
                f"| {name} | {count} | {jax_s * 1e3:.2f} | {flops / jax_s / 1e9:.0f} "
                f"| {jax_cores:.1f} | {torch_s * 1e3:.2f} | {flops / torch_s / 1e9:.0f} "
                f"| {torch_cores:.1f} |"
            )
        print(f"| sum over one step | | {totals[0] * 1e3:.1f} | | | {totals[1] * 1e3:.1f} | | |")
        results["matmul"] = {"xla_sum_s": totals[0], "torch_sum_s": totals[1]}
    if "loss_memory" in sections:
        rows = bench_loss_memory()
        print(
            "\n## loss memory: jax.grad(gpt_loss), GPT-2 small shapes (V 50257, 12 x 768), "
            "batch 8 x 1024"
        )
        print("| dtype | loss_chunk_size | temp GiB | vs all at once |")
        print("|---|---|---|---|")
        whole = {}
        for dtype, chunk, gib in rows:
            whole.setdefault(dtype, gib)
            print(f"| {dtype} | {chunk} | {gib:.2f} | {gib / whole[dtype]:.2f}x |")
        results["loss_memory"] = [
            {"dtype": dtype, "loss_chunk_size": chunk, "temp_gib": gib}
            for dtype, chunk, gib in rows
        ]
    write_json(args.json, results)


if __name__ == "__main__":
    main()
