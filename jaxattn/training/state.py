"""The training state: everything a resumed run needs besides the data position.

The state is a plain pytree (a NamedTuple of arrays), so it goes through ``jax.jit`` with
donation, through orbax checkpoints, and later through sharding rules, without any
special handling.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any


class TrainState(NamedTuple):
    """Parameters, optimizer state, step counter and PRNG key of a training run."""

    # int32 scalar: optimizer updates applied so far. Also the checkpoint step.
    step: jax.Array
    # The model's parameter pytree (float32 leaves; None allowed for absent biases).
    params: Params
    # optax state of the optimizer (moments, schedule count, ...), same tree as params.
    opt_state: optax.OptState
    # Base PRNG key; it never changes. Step s draws its randomness (dropout) from
    # fold_in(rng, s), so a run resumed at step s sees the same keys as an uninterrupted one.
    rng: jax.Array


def create_train_state(
    params: Params, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """Start a run at step 0: initialise the optimizer state for ``params``.

    Args:
      params: the initial parameter pytree.
      optimizer: an optax gradient transformation (see ``jaxattn.training.optim``).
      rng: a PRNG key (``jax.random.key``) for the per-step randomness.

    Returns:
      A ``TrainState`` at step 0.
    """
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        rng=rng,
    )
