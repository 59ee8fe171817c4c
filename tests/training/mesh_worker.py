"""Train a tiny GPT a few steps on several meshes of 8 simulated CPU devices (a subprocess).

Run by ``test_sharding_multidevice.py`` with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; prints one JSON line with the
losses per mesh, and saves the (2, 2, 2) run's state as a checkpoint plus an .npz copy of
its parameters in the directory given as the first argument.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np

from jaxattn.models import gpt
from jaxattn.models.partitioning import TRANSFORMER_RULES
from jaxattn.training import sharding
from jaxattn.training.checkpoint import Checkpointer
from jaxattn.training.loop import make_train_step
from jaxattn.training.optim import make_optimizer
from jaxattn.training.state import create_train_state

CONFIG = gpt.GPTConfig(
    vocab_size=16, block_size=8, num_layers=2, num_heads=4, embed_dim=16, use_bias=True
)
STEPS, ROWS = 3, 8
rng = np.random.default_rng(0)
BATCHES = [
    {
        "inputs": rng.integers(0, 16, (ROWS, 8)).astype(np.int32),
        "targets": rng.integers(0, 16, (ROWS, 8)).astype(np.int32),
    }
    for _ in range(STEPS)
]


def loss_fn(params, batch, rng):
    return gpt.gpt_loss(params, batch["inputs"], batch["targets"], CONFIG), {}


def train(mesh, grad_accum_steps=1):
    optimizer = make_optimizer(1e-2, weight_decay=0.1, grad_clip=1.0)
    state, state_sharding = sharding.create_sharded(
        lambda: create_train_state(
            gpt.init_gpt(jax.random.key(0), CONFIG), optimizer, jax.random.key(1)
        ),
        TRANSFORMER_RULES,
        mesh,
    )
    batch_sharding = sharding.batch_sharding(mesh)
    step = make_train_step(
        loss_fn, optimizer, grad_accum_steps=grad_accum_steps,
        state_sharding=state_sharding, batch_sharding=batch_sharding,
    )  # fmt: skip
    losses = []
    for batch in BATCHES:
        state, metrics = step(state, sharding.global_batch(batch, batch_sharding))
        mean = sharding.to_host(metrics["train_loss"])
        losses.append(float(mean.total / mean.count))
    return state, losses


def main(out_dir: Path) -> None:
    assert jax.device_count() == 8, jax.devices()
    reference, ref_losses = train(sharding.make_mesh(devices=jax.devices()[:1]))
    ref_params = jax.tree.map(np.asarray, reference.params)
    result = {"reference": ref_losses}
    for shape, accum in (((8, 1, 1), 1), ((2, 4, 1), 1), ((2, 2, 2), 1), ((2, 2, 2), 2)):
        state, losses = train(sharding.make_mesh(*shape), accum)
        name = "x".join(map(str, shape)) + f"/accum{accum}"
        diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                             ref_params)  # fmt: skip
        # The key bias's true gradient is zero (it adds q·b_k to every logit of a query, and
        # softmax ignores a shift), so its gradient is rounding noise, which differs with the
        # mesh's reduction order and which Adam scales up to steps of lr·|g|/(|g| + eps).
        compared = [
            diff
            for path, diff in jax.tree_util.tree_flatten_with_path(diffs)[0]
            if jax.tree_util.keystr(path) != ".blocks.attn.b_k"
        ]
        result[name] = {
            "losses": losses,
            "max_param_diff": max(compared),
            "w_q_spec": list(state.params.blocks.attn.w_q.sharding.spec),
            "w_q_shard": list(state.params.blocks.attn.w_q.addressable_shards[0].data.shape),
        }
        if shape == (2, 2, 2) and accum == 1:
            with Checkpointer(out_dir / "checkpoints", async_save=False) as ckpt:
                ckpt.save(STEPS, state, metadata={"config": "mesh_worker"})
            leaves = jax.tree.leaves(jax.tree.map(np.asarray, state.params))
            np.savez(out_dir / "params.npz", *leaves)
    print(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
