"""Weak scaling of the GPT train step over device meshes (simulated CPU devices by default).

    python benchmarks/scaling.py                 # 1, 2, 4, 8 simulated CPU devices
    python benchmarks/scaling.py --devices 1 8   # chosen device counts

Each device keeps the ``shakespeare_char_cpu`` batch (12 x 64 tokens), so the global batch
grows with the device count; every count runs in a fresh process (the simulated device
count is fixed when JAX starts); tensor parallelism replicates the batch along ``tensor``,
so its global batch grows only with ``data x fsdp``. On simulated CPU devices all
"devices" share the same cores, so the table shows the SPMD overhead (partitioned
programs, collectives through memory), not a speedup: on real hardware perfect weak
scaling keeps the step time flat and multiplies tokens/s by the device count. On a GPU or
TPU host (``--real``) the same script times the real devices and reports model FLOPs
utilisation (MFU) when ``--peak-tflops`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This checkout's jaxattn and train/configs, not an installed jaxattn: the script's own
# folder (benchmarks/) is what Python puts first on sys.path.
sys.path[:0] = [str(ROOT), str(ROOT / "train")]
PER_DEVICE_ROWS = 12


def meshes(n: int) -> list[tuple[int, int, int]]:
    """Data parallel, FSDP, and (when n is even) 2-way tensor parallel with data on the rest;
    each mesh's sizes multiply to ``n``."""
    out = [(n, 1, 1)]
    if n > 1:
        out.append((1, n, 1))
    if n % 2 == 0:
        out.append((n // 2, 1, 2))
    return out


def model_flops_per_token(n_params: int, layers: int, width: int, context: int) -> float:
    """Forward + backward FLOPs per token: 6 N + 12 L D T (PaLM appendix B; attention)."""
    return 6 * n_params + 12 * layers * width * context


def worker(mesh_shape: tuple[int, int, int], steps: int) -> dict:
    import jax
    import numpy as np
    from configs import shakespeare_char_cpu

    from benchmarks.attention import machine, versions
    from jaxattn.models import gpt
    from jaxattn.models.partitioning import TRANSFORMER_RULES
    from jaxattn.training import sharding
    from jaxattn.training.loop import make_train_step
    from jaxattn.training.optim import optimizer_from_config
    from jaxattn.training.state import create_train_state

    run = shakespeare_char_cpu.get_config()
    model = gpt.GPTConfig(vocab_size=65, **run.model.to_dict())
    # The first n devices: with --real the host may hold more than this mesh uses.
    # (make_mesh names the sizes when there are fewer devices than that.)
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])
    optimizer, _ = optimizer_from_config(run, decay_mask=gpt.weight_decay_mask)
    state, state_sharding = sharding.create_sharded(
        lambda: create_train_state(
            gpt.init_gpt(jax.random.key(0), model), optimizer, jax.random.key(1)
        ),
        TRANSFORMER_RULES,
        mesh,
    )
    batch_sharding = sharding.batch_sharding(mesh)

    def loss_fn(params, batch, rng):
        return gpt.gpt_loss(params, batch["inputs"], batch["targets"], model), {}

    step = make_train_step(
        loss_fn, optimizer, state_sharding=state_sharding, batch_sharding=batch_sharding
    )
    rows = PER_DEVICE_ROWS * mesh.shape["data"] * mesh.shape["fsdp"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 65, (rows, model.block_size + 1)).astype(np.int32)
    batch = sharding.global_batch(
        {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, batch_sharding
    )
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    return {
        "machine": machine(),  # CPU model and cores (lscpu), backend
        "versions": versions(),
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind,
        "mesh": list(mesh_shape),
        "rows": rows,
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "tokens": rows * model.block_size,
        "flops_per_token": model_flops_per_token(
            n_params - model.block_size * model.embed_dim,  # Position table: no matmul.
            model.num_layers,
            model.embed_dim,
            model.block_size,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mesh")
    parser.add_argument("--real", action="store_true", help="use the real devices (GPU/TPU)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per device, for MFU")
    parser.add_argument("--worker", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:  # (0 failed at the end, in the median of no times)
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if min(args.devices) < 1:  # (0 failed in the worker, in JAX's backend start-up)
        parser.error(f"--devices must be >= 1, got {min(args.devices)}")
    # (a negative or NaN peak printed a negative or NaN MFU; 0 leaves the column out)
    if not 0 <= args.peak_tflops < math.inf:
        parser.error(f"--peak-tflops must be a finite number >= 0, got {args.peak_tflops}")
    if args.worker:
        print(json.dumps(worker(tuple(args.worker), args.steps)))
        return

    results = []
    for n in args.devices:
        env = dict(os.environ)
        if not args.real:
            env |= {
                "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
            }
        for shape in meshes(n):
            cmd = [
                sys.executable,
                __file__,
                "--steps",
                str(args.steps),
                "--worker",
                *map(str, shape),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(f"{shape} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    first = results[0]
    print(
        f"\n## weak scaling: shakespeare_char_cpu GPT, {PER_DEVICE_ROWS} x 64 tokens per "
        f"device; {first['machine']} ({first['device_kind']}); {first['versions']}; "
        f"{time.strftime('%Y-%m-%d')}, load {os.getloadavg()[0]:.1f}\n"
    )
    print("\n".join(table(results, args.peak_tflops)))


def table(results: list[dict], peak_tflops: float = 0.0) -> list[str]:
    """The table's lines, one row per worker result. Tokens/s are compared with the
    1-device run, or, when ``--devices`` left it out, with the first row, which the
    column's heading then names."""
    base_row = next((r for r in results if r["devices"] == 1), results[0])
    against = "1 device" if base_row["devices"] == 1 else f"mesh {tuple(base_row['mesh'])}"
    lines = [
        "| devices | mesh (data, fsdp, tensor) | global batch | step ms | tokens/s | "
        f"tokens/s vs {against} | compile s | MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = base_row["tokens"] / base_row["step_s"]
    for r in results:
        tokens_per_s = r["tokens"] / r["step_s"]
        mfu = "—"
        if peak_tflops:
            peak = r["devices"] * peak_tflops * 1e12  # FLOP/s of all the devices
            mfu = f"{tokens_per_s * r['flops_per_token'] / peak:.1%}"
        lines.append(
            f"| {r['devices']} | {tuple(r['mesh'])} | {r['rows']} | {1000 * r['step_s']:.1f} | "
            f"{tokens_per_s:,.0f} | {tokens_per_s / base:.2f} | "
            f"{r['compile_s']:.1f} | {mfu} |"
        )
    return lines


if __name__ == "__main__":
    main()
