"""The argument checks every model's init shares (``jaxattn/models/_config.py``)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxattn.models.gpt import GPTConfig, init_gpt
from jaxattn.models.seq2seq import Seq2SeqConfig, init_seq2seq
from jaxattn.models.transformer import TransformerConfig, init_transformer

INITS = [
    (init_gpt, GPTConfig(vocab_size=13, block_size=11, num_layers=2, num_heads=3, embed_dim=12)),
    (init_seq2seq, Seq2SeqConfig(src_vocab_size=11, tgt_vocab_size=13, embed_dim=5, hidden_size=7)),
    (
        init_transformer,
        TransformerConfig(
            src_vocab_size=11,
            tgt_vocab_size=13,
            embed_dim=12,
            num_heads=3,
            max_len=9,
            num_encoder_layers=1,
            num_decoder_layers=1,
        ),
    ),
]


@pytest.mark.parametrize("init, config", INITS, ids=[init.__name__ for init, _ in INITS])
def test_init_names_a_swapped_config_or_a_bad_rng(init, config):
    """Swapped, init_gpt(config, key) failed as "replace() should be called on dataclass
    instances", init_seq2seq's as "unexpected PRNG key type", init_transformer's as
    "'PRNGKeyArray' object has no attribute 'embed_dim'"; an int seed as "JAX encountered
    invalid PRNG key data": naming neither the function nor the argument."""
    name, kind = init.__name__, type(config).__name__
    with pytest.raises(
        TypeError,
        match=rf"{name}: config must be a {kind}, got PRNGKeyArray; the arguments are "
        rf"{name}\(rng, config\)",
    ):
        init(config, jax.random.key(0))
    for rng, got in [(0, "0"), (None, "None"), (jnp.zeros(2), r"float32 \(2,\)")]:
        with pytest.raises(TypeError, match=rf"{name}: rng must be a PRNG key .*, got {got}$"):
            init(rng, config)
    # Raw uint32 key data (jax.random.PRNGKey) is a key too: the same one as jax.random.key.
    legacy, typed = init(jax.random.PRNGKey(3), config), init(jax.random.key(3), config)
    for a, b in zip(jax.tree.leaves(legacy), jax.tree.leaves(typed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("init, config", INITS, ids=[init.__name__ for init, _ in INITS])
def test_init_takes_raw_keys_of_the_default_prng_implementation(init, config):
    """Under jax_default_prng_impl="rbg" (or "unsafe_rbg"), jax.random.PRNGKey gives [4]
    uint32 key data, which JAX's own functions take: the check refused it as "got uint32
    (4,)", as if only threefry's [2] were key data. (One implementation only: jit's cache
    does not tell raw rbg keys from raw unsafe_rbg ones of the same shape.)"""
    with jax.default_prng_impl("rbg"):
        legacy, typed = init(jax.random.PRNGKey(3), config), init(jax.random.key(3), config)
    for a, b in zip(jax.tree.leaves(legacy), jax.tree.leaves(typed), strict=True):
        np.testing.assert_array_equal(a, b)


def test_check_seed_takes_0_to_2_63_minus_2():
    """The scripts seed validation with seed + 1, which jax.random.key must still take:
    the last seed accepted is 2**63 - 2 (a mutation review found no test at the edge)."""
    from jaxattn.models._config import check_seed

    assert check_seed(0, "seed", "here") == 0 and check_seed(2**63 - 2, "seed", "here") == 2**63 - 2
    jax.random.key(2**63 - 2 + 1)  # seed + 1 of the largest accepted seed still works
    with pytest.raises(ValueError, match=r"here: seed must be an int in \[0, 2\*\*63 - 2\]"):
        check_seed(2**63 - 1, "seed", "here")
    with pytest.raises(ValueError, match="here: seed"):
        check_seed(-1, "seed", "here")


@pytest.mark.parametrize("init, config", INITS, ids=[init.__name__ for init, _ in INITS])
def test_check_weights_refuses_an_integer_leaf_naming_its_path(init, config):
    """One kernel cast to int32 ran silently (gpt.gpt gave finite, wrong logits): the layers
    cast it back to the compute dtype. Every model's weight check shares the refusal."""
    from jaxattn.models import gpt, seq2seq, transformer

    run = {
        init_gpt: lambda w: gpt.gpt(w, jnp.array([[1, 2, 3]]), config),
        init_seq2seq: lambda w: seq2seq.encode(w, np.array([[1, 2]]), np.array([2]), config),
        init_transformer: lambda w: transformer.encode(
            w, np.array([[1, 2]]), np.array([2]), config
        ),
    }[init]
    weights = init(jax.random.key(0), config)
    run(weights)  # float32, and bfloat16 below: any float dtype passes
    run(jax.tree.map(lambda a: a.astype(jnp.bfloat16), weights))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(weights)
    for i in (0, len(leaves) // 2, len(leaves) - 1):
        path = jax.tree_util.keystr(leaves[i][0])
        bad = [leaf.astype(jnp.int32) if j == i else leaf for j, (_, leaf) in enumerate(leaves)]
        with pytest.raises(ValueError, match=rf"weights must be floating.*{re.escape(path)} int32"):
            run(jax.tree_util.tree_unflatten(treedef, bad))
