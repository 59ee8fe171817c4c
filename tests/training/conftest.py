"""A toy model and dataset for the training-loop tests: noisy linear regression.

Small and fast on purpose (microseconds a step): the loop, not the model, is under test.
"""

import sys
import types

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.training import data, optim
from jaxattn.training.state import create_train_state

D, B = 5, 6  # features, batch rows
W_TRUE = np.linspace(-1.0, 1.0, D).astype(np.float32)[:, None]  # [D, 1]


class _Regression(grain.transforms.RandomMap):
    """Batch i: x ~ N(0, 1) [B, D], y = x W_TRUE [B, 1], seeded by (seed, i)."""

    def random_map(self, element, rng):
        del element
        x = rng.normal(size=(B, D)).astype(np.float32)
        return {"x": x, "y": x @ W_TRUE}


def toy_dataset(seed: int) -> grain.MapDataset:
    return grain.MapDataset.range(sys.maxsize).random_map(_Regression(), seed=seed)


def toy_loss(params, batch, rng):
    """Mean squared error; with a key it adds noise to the prediction (like dropout)."""
    pred = batch["x"] @ params["w"] + params["b"]  # [B, 1]
    if rng is not None:
        pred = pred + 0.01 * jax.random.normal(rng, pred.shape)
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mae": jnp.mean(jnp.abs(pred - batch["y"]))}


def toy_params():
    return {"w": jnp.zeros((D, 1), jnp.float32), "b": jnp.zeros((1,), jnp.float32)}


def toy_state(optimizer=None, seed=0):
    optimizer = optimizer or toy_optimizer()
    return create_train_state(toy_params(), optimizer, jax.random.key(seed))


def toy_optimizer():
    return optim.make_optimizer(3e-2, weight_decay=0.1, grad_clip=1.0)


@pytest.fixture
def toy():
    """The toy problem as a namespace of helpers."""
    return types.SimpleNamespace(
        dataset=toy_dataset,
        Regression=_Regression,
        iterator=lambda seed=0: data.batch_iterator(toy_dataset(seed)),
        loss=toy_loss,
        params=toy_params,
        state=toy_state,
        optimizer=toy_optimizer,
        D=D,
        B=B,
    )
