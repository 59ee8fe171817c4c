"""Autoregressive decoding for any model: sampling from logits and a cached generation loop.

Shape glossary: B batch, T0 prompt length, t tokens fed in one call, V vocab.

Models plug in through one protocol, a *decode function* closed over their weights::

    decode_fn(tokens [B, t], cache) -> (logits [B, t, V], cache)

It runs ``t`` new tokens at the cache's current position, returns their logits and the cache
with their keys/values written (``gpt.gpt_decode`` is one). ``generate`` prefills the prompt
with a single call, then samples one token per ``lax.scan`` step.

Past the model's context, ``generate_cropped`` continues as nanoGPT's ``generate`` does: the
model sees the last ``context`` tokens, one full pass per new token (with absolute
positions a cache cannot slide along with the window).

Jitting: everything here is traceable. Jit the *caller* with what shapes the program
static (``max_new_tokens``, ``top_k``, whether it is greedy, whether top-p is on) and the
weights, ``temperature`` and ``top_p`` as traced arguments (they only feed arithmetic), building
``decode_fn`` inside, e.g. (what ``gpt.generate`` does)::

    @functools.partial(jax.jit, static_argnames=("max_new_tokens", "greedy"))
    def run(weights, prompt, rng, max_new_tokens, greedy, temperature):
        cache = init_cache(config, prompt.shape[0], prompt.shape[1] + max_new_tokens)
        fn = lambda toks, c: gpt_decode(weights, toks, c, config)
        return generate(fn, cache, prompt, max_new_tokens, rng=rng, greedy=greedy,
                        temperature=temperature)

so it compiles once per prompt shape and program, not per temperature. A traced
``temperature`` cannot choose greedy decoding (that needs the Python value 0, or
``greedy=True``); a traced ``top_p`` always runs the nucleus filter. (Closing a fresh lambda
over the weights *outside* jit and jitting ``generate`` itself would retrace on every call.)

Greedy and beam search for encoder-decoder models live in ``beam_search.py``; their step
function returns log-probabilities and their state rows are gathered by beam index along
``state_batch_axis`` (1 for a ``gpt.KVCache``, whose leaves are ``[L, B, ...]``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.models._config import describe_key, is_key, key_shape
from jaxattn.ops._checks import check_flag, check_size

Array = jax.Array
Cache = Any  # any pytree the decode function understands
DecodeFn = Callable[[Array, Cache], tuple[Array, Cache]]

_TINY = float(np.finfo(np.float32).tiny)
# generate draws all its noise before the loop up to this many numbers (1 MiB of float32).
_UP_FRONT_NOISE = 2**18


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_sampling(
    *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Raise ``ValueError`` for invalid sampling settings (Python values, checked eagerly).

    ``temperature`` and ``top_p`` may be traced scalars (under an outer ``jit``): only their
    shape can be checked then. ``top_k`` must be a Python int: ``lax.top_k`` needs it static.
    """
    for name, value in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if _traced(value):
            if name == "top_k":  # It shapes lax.top_k: static under jit.
                raise ValueError(
                    "top_k must be a Python number, static under jit (static_argnames), got a "
                    "traced value"
                )
            if jnp.ndim(value) != 0 or not jnp.issubdtype(value.dtype, jnp.number):
                raise ValueError(
                    f"{name} must be a number, got a traced {value.dtype} {jnp.shape(value)}"
                )
        if isinstance(value, (bool, np.bool_)):  # True would read as 1.0
            raise ValueError(f"{name} must be a number, got {value!r}")
        # None (but top_p's), a string or an array failed in the comparisons below as a
        # TypeError or "truth value of an array is ambiguous", naming no setting.
        if name != "top_k" and not _traced(value) and not (name == "top_p" and value is None):
            dtype = getattr(value, "dtype", None)
            real = isinstance(value, numbers.Real) or (
                dtype is not None
                and np.ndim(value) == 0
                and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
            )
            if not real:
                shown = f"{dtype} {np.shape(value)}" if dtype is not None else repr(value)
                raise ValueError(f"{name} must be a real number, got {shown}")
    if not _traced(temperature):
        if not temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if 0.0 < temperature < _TINY:  # would flush to 0 in float32
            raise ValueError(
                f"temperature must be 0 (greedy) or at least {_TINY:.3g}, the smallest normal "
                f"float32, got {temperature}"
            )
    # An integral float (2.0) would pass ``int(top_k) == top_k`` but crash ``lax.top_k``.
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
    ):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not _traced(top_p) and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")


def is_greedy(temperature: Any) -> bool:
    """Whether ``temperature`` (checked by ``check_sampling``) asks for greedy decoding: the
    value 0. A traced temperature samples (its value is unknown when the program is built)."""
    return not _traced(temperature) and bool(temperature == 0.0)  # (a concrete Array too)


def top_p_active(top_p: Any) -> bool:
    """Whether the nucleus filter runs for ``top_p``: not None and below 1 (1 keeps every
    token, and skipping the filter keeps them exactly). A traced top_p runs it."""
    return top_p is not None and (_traced(top_p) or bool(top_p < 1.0))


def check_sampling_key(
    rng: Any, temperature: float | Array, where: str, *, greedy: bool = False
) -> None:
    """Raise ``ValueError`` naming ``rng`` when sampling (neither ``greedy`` nor a
    temperature of 0) has no PRNG key: None (fine for greedy decoding) or a plain int seed
    would otherwise fail inside JAX as "unexpected PRNG key type", naming neither."""
    if greedy or is_greedy(temperature):
        return
    if not is_key(rng):
        shown = "a traced value" if _traced(temperature) else temperature
        raise ValueError(
            f"{where}: sampling (temperature={shown}) needs an rng key such as "
            f"jax.random.key(seed), got {describe_key(rng)}"
        )
    # One key, which sampling splits itself: a batch of keys (split(key, B)) failed inside
    # jax.random as "split accepts a single key", naming no argument.
    keys_shape = key_shape(rng)
    if keys_shape != ():
        raise ValueError(
            f"{where}: rng must be one PRNG key, got keys of shape {keys_shape} (it is split "
            "per token here; pass the key they were split from)"
        )


def _check_integer_ids(ids: Array, what: str) -> None:
    # Cast to int32 below: float ids would be truncated (1.7 -> 1), bools read as 0/1.
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{what} must be integer token ids, got dtype {ids.dtype}")


def check_max_new_tokens(max_new_tokens: int) -> int:
    """Return ``max_new_tokens`` as an int; ``ValueError`` unless it is an integer >= 0."""
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, numbers.Integral)
        or max_new_tokens < 0
    ):
        raise ValueError(
            f"generate: max_new_tokens must be an integer >= 0, got {max_new_tokens!r}"
        )
    return int(max_new_tokens)


def check_eos_id(eos_id: int | None, where: str, vocab_size: int | None = None) -> int | None:
    """Return ``eos_id`` as an int (or None); ``ValueError`` unless an integer in ``[0, V)``."""
    if eos_id is None:
        return None
    if isinstance(eos_id, bool) or not isinstance(eos_id, numbers.Integral) or eos_id < 0:
        raise ValueError(f"{where}: eos_id must be an integer >= 0 or None, got {eos_id!r}")
    if vocab_size is not None and eos_id >= vocab_size:
        raise ValueError(f"{where}: eos_id={eos_id} is not in the vocabulary [0, {vocab_size})")
    return int(eos_id)


def _end_rows(token: Array, ended: Array, eos_id: int) -> tuple[Array, Array]:
    """Rows that have ended repeat ``eos_id``; a row ends with its first ``eos_id``.

    ``token, ended: [B]`` -> ``(token, ended)``.
    """
    token = jnp.where(ended, eos_id, token)
    return token, ended | (token == eos_id)


def _tempered(shifted: Array, temperature: float | Array) -> Array:
    """``shifted / T`` for ``shifted = logits - max <= 0``, computed as ``shifted * (1 / T)``
    in float32.

    The product, not the quotient: XLA rewrites ``x / T`` for a constant T into it, so the
    draws are those of the static temperature this once was. ``l - max l <= 0`` cannot
    overflow at a tiny T (it may reach -inf, which is right). The maximum itself stays 0 even
    at a traced ``T = 0`` (``0 * inf`` would be NaN): only the tied maxima can then be drawn.
    """
    inverse = 1.0 / jnp.asarray(temperature, jnp.float32)
    return jnp.where(shifted == 0.0, 0.0, shifted * inverse)


def _filter_logits(
    logits: Array, *, temperature: float | Array, top_k: int | None, top_p: float | Array | None
) -> Array:
    """Float32 ``logits`` with the top-k / top-p rejects (at ``temperature``) set to -inf.

    The logits are not divided by the temperature here: ``_pick`` decides how to apply it
    without overflow.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1] k-th largest
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p_active(top_p):
        sorted_logits = -jnp.sort(-logits, axis=-1)  # [B, V] descending
        # softmax(l / T) from l - max(l), which is <= 0, so the division cannot overflow.
        # Rejected (-inf) tokens stay -inf: at T = inf, -inf / inf would be NaN.
        shifted = sorted_logits - sorted_logits[:, :1]
        scaled = jnp.where(sorted_logits > -jnp.inf, _tempered(shifted, temperature), -jnp.inf)
        probs = jax.nn.softmax(scaled, axis=-1)
        # Token i (in sorted order) is needed iff the mass strictly before it is < top_p;
        # the most likely token always is (even for a top_p below float32's smallest
        # normal, which compares as 0 once flushed).
        needed = jnp.cumsum(probs, axis=-1) - probs < jnp.asarray(top_p, jnp.float32)  # [B, V]
        count = jnp.maximum(jnp.sum(needed, axis=-1, keepdims=True), 1)  # [B, 1] >= 1
        threshold = jnp.take_along_axis(sorted_logits, count - 1, axis=-1)  # [B, 1]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def _gumbel(rng: Array, shape: tuple[int, ...]) -> Array:
    """Gumbel(0, 1) noise: ``argmax(logits + noise)`` samples from ``softmax(logits)``."""
    return jax.random.gumbel(rng, shape, jnp.float32)


def _pick(
    logits: Array,
    noise: Array | None,
    *,
    temperature: float | Array,
    top_k: int | None,
    top_p: float | Array | None,
) -> Array:
    """``[B, V]`` -> ``[B]`` int32: ``argmax(filtered logits / T + noise)`` (None: greedy).

    Computed as ``argmax((l - max l) / T + noise)`` over the kept tokens, the same token:
    ``l - max l <= 0`` cannot overflow when divided by a tiny T, and the noise is added at
    full size, so tokens tied for the maximum stay equally likely at any T (``l + T noise``
    lost ``T noise`` to rounding beside a logit of 10 once T < 1e-6). Rejected tokens stay
    -inf even at ``T = inf``, where ``-inf / inf`` would be NaN.
    """
    if noise is None:
        return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
    logits = _filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    kept = logits > -jnp.inf
    top = jnp.max(logits, axis=-1, keepdims=True)
    scaled = jnp.where(kept, _tempered(logits - top, temperature), -jnp.inf)
    return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)


def sample_logits(
    rng: Array,
    logits: Array,
    *,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
    top_p: float | Array | None = None,
    greedy: bool = False,
) -> Array:
    """Draw one token per row from ``softmax(logits / temperature)``, optionally filtered.

    - ``greedy`` or ``temperature == 0``: ``argmax`` (``rng`` unused).
    - ``top_k``: keep the k largest logits (ties with the k-th are kept too).
    - ``top_p`` (nucleus, Holtzman et al., 2020, "The Curious Case of Neural Text
      Degeneration"): keep the smallest set of most likely tokens whose probability (after
      temperature and top-k) sums to ``>= top_p``, plus any token tied with the last one
      kept.

    The draw is the Gumbel-max trick, ``argmax(filtered logits / T + Gumbel noise from
    rng)``, computed as ``(l - max l) / T`` so that a tiny ``T`` cannot overflow and tied
    tokens stay equally likely; ``T = inf`` draws uniformly from the kept tokens.
    Everything is computed in float32. A NaN logit (a diverged model) gives no
    distribution to draw from, and the id that comes out is arbitrary (under ``jit`` it
    cannot raise): check ``jnp.isfinite`` of the logits, or the model, first.

    Args:
      rng: PRNG key.
      logits: ``[B, V]``.
      temperature, top_p: Python numbers, or scalars traced under ``jit``: a traced
        temperature always samples (greedy needs the Python 0, or ``greedy=True``), and a
        traced top_p always runs the nucleus filter.
      top_k: a Python int (``lax.top_k`` needs it static under ``jit``).
      greedy: take the argmax whatever the temperature (static under ``jit``).

    Returns:
      ``[B]`` int32 token ids.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if logits.ndim != 2 or logits.shape[1] == 0:  # (V = 0: no token; an error inside jnp)
        raise ValueError(
            f"sample_logits: logits must be [B, V] with V >= 1, got shape {logits.shape}"
        )
    greedy = check_flag(greedy, "greedy", "sample_logits") or is_greedy(temperature)
    check_sampling_key(rng, temperature, "sample_logits", greedy=greedy)
    noise = None if greedy else _gumbel(rng, logits.shape)
    return _pick(logits, noise, temperature=temperature, top_k=top_k, top_p=top_p)


def generate(
    decode_fn: DecodeFn,
    cache: Cache,
    prompt: Array,
    max_new_tokens: int,
    *,
    rng: Array | None = None,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
    top_p: float | Array | None = None,
    eos_id: int | None = None,
    greedy: bool = False,
    keys: Array | None = None,
) -> Array:
    """Extend ``prompt`` by ``max_new_tokens`` tokens sampled with ``sample_logits``.

    The prompt is prefilled with one ``decode_fn`` call; each further token is one
    ``lax.scan`` step feeding the previous sample. The cache must have room for
    ``T0 + max_new_tokens - 1`` positions (the last sample is never fed back).

    With ``eos_id``, a row ends at its first new ``eos_id`` and repeats it from then on;
    the loop (then a ``lax.while_loop``) stops once every row has ended.

    Args:
      decode_fn: ``(tokens [B, t], cache) -> (logits [B, t, V], cache)``.
      cache: the decode function's empty cache.
      prompt: ``[B, T0]`` integer ids, ``T0 >= 1``.
      max_new_tokens: Python int >= 0.
      rng: sampling key, split once per new token; None when greedy or with ``keys``.
      keys: instead of ``rng``, the ``[max_new_tokens]`` keys themselves (raw ``[n, 2]``
        uint32 ones too), new token i drawn with ``keys[i]``: for a caller that draws
        further tokens with the rest of one ``split(rng, n)`` (``gpt.generate`` past the
        model's context). ``split(rng, n)[:m]`` equals ``split(rng, m)`` only under
        ``jax_threefry_partitionable``, so the parts are cut from one split.
      temperature, top_k, top_p, greedy: as in ``sample_logits`` (temperature and top_p may
        be traced).
      eos_id: end-of-sequence id in ``[0, V)``, or None to draw all ``max_new_tokens`` in
        every row.

    Returns:
      ``[B, T0 + max_new_tokens]`` int32.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    eos_id = check_eos_id(eos_id, "generate")
    greedy = check_flag(greedy, "greedy", "generate") or is_greedy(temperature)
    if keys is None:
        check_sampling_key(rng, temperature, "generate", greedy=greedy)
    elif rng is not None:
        raise ValueError("generate: pass rng or keys, not both")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"generate: prompt must be [B, T0] with T0 >= 1, got {prompt.shape}")
    _check_integer_ids(prompt, "generate: prompt")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    prompt = prompt.astype(jnp.int32)
    if max_new_tokens == 0:
        return prompt

    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    logits, cache = decode_fn(prompt, cache)  # [B, T0, V]
    # V is known from the prefill: an eos_id past it is never drawn, and every row silently
    # ran to max_new_tokens (beam_search refuses such an eos_id too).
    check_eos_id(eos_id, "generate", logits.shape[-1])
    # One key per new token, split here: token i is drawn with the noise
    # sample_logits(keys[i], ...) would draw.
    if keys is None and not greedy:
        keys = jax.random.split(rng, max_new_tokens)  # [n]
    keys = _token_keys(keys, max_new_tokens, greedy, "generate")
    noise_shape = (prompt.shape[0], logits.shape[-1])  # [B, V]
    # Each step draws its own [B, V] noise from its key, so the memory stays O(B V) whatever
    # max_new_tokens (drawn up front, [n, B, V] noise took ~4x its size in scratch: 6 GiB
    # for 1,000 tokens at B = 8, V = 50,257). A small draw is made up front all the same,
    # the same noise: one threefry call for the loop instead of one per token (~2.5 of the
    # ~62 us of a cached token of the Shakespeare model at batch 1 on CPU). Threefry keys
    # only: vmapped, they draw each key's numbers; rbg keys draw others.
    up_front = (
        keys is not None
        and max_new_tokens * math.prod(noise_shape) <= _UP_FRONT_NOISE
        and str(jax.random.key_impl(keys)) == "threefry2x32"
    )
    draws = jax.vmap(lambda key: _gumbel(key, noise_shape))(keys) if up_front else keys

    def noise(draw):  # draws[i] -> [B, V]: token i's noise, or its key
        if draw is None:  # greedy
            return None
        return draw if up_front else _gumbel(draw, noise_shape)

    first = _pick(logits[:, -1], noise(None if draws is None else draws[0]), **settings)  # [B]

    def step(carry, draw):  # draw: this token's noise or PRNG key, or None (greedy)
        token, cache = carry
        logits, cache = decode_fn(token[:, None], cache)
        return (_pick(logits[:, -1], noise(draw), **settings), cache), token

    if eos_id is not None:
        # A while_loop that stops once every row has ended, rather than a lax.cond around
        # the model in the scan: XLA does not update the cache in place through a
        # conditional, and copied the whole cache twice per token (unrolled layers).
        first, ended = _end_rows(first, jnp.zeros(first.shape, bool), eos_id)
        new = jnp.full((prompt.shape[0], max_new_tokens), eos_id, jnp.int32)  # [B, n]

        def draw(carry):  # token i from token i - 1
            i, token, cache, ended, new = carry
            (token, cache), _ = step((token, cache), None if draws is None else draws[i])
            token, ended = _end_rows(token, ended, eos_id)
            return i + 1, token, cache, ended, new.at[:, i].set(token)

        going = lambda carry: (carry[0] < max_new_tokens) & ~jnp.all(carry[3])
        carry = (1, first, cache, ended, new.at[:, 0].set(first))
        return jnp.concatenate([prompt, jax.lax.while_loop(going, draw, carry)[-1]], axis=1)

    later = None if draws is None else draws[1:]
    length = max_new_tokens - 1
    (last, _), fed = jax.lax.scan(step, (first, cache), later, length=length)  # fed: [n-1, B]
    return jnp.concatenate([prompt, fed.T, last[:, None]], axis=1)  # [B, T0 + n]


def _token_keys(keys: Array | None, n: int, greedy: bool, where: str) -> Array | None:
    """``keys`` as ``[n]`` typed PRNG keys (None when greedy); raw ``[n, 2]`` uint32 keys (a
    split ``jax.random.PRNGKey``) become typed keys of the default implementation."""
    if greedy:
        return None
    if keys is not None and not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    if keys is None or keys.shape != (n,):
        shape = None if keys is None else keys.shape
        raise ValueError(f"{where}: sampling needs keys of shape ({n},), got {shape}")
    return keys


def generate_cropped(
    next_logits_fn: Callable[[Array, Array], Array],
    tokens: Array,
    max_new_tokens: int,
    *,
    context: int,
    keys: Array | None,
    temperature: float | Array = 1.0,
    top_k: int | None = None,
    top_p: float | Array | None = None,
    eos_id: int | None = None,
    ended: Array | None = None,
    greedy: bool = False,
) -> Array:
    """Extend ``tokens`` by ``max_new_tokens``, each drawn from a pass over the last ``context``.

    nanoGPT's ``generate`` once the sequence outgrows the model: token ``j`` is sampled from
    ``next_logits_fn(sequence[:, j - context : j], j - context)``. One ``fori_loop`` step
    per token over a fixed ``[B, T0 + max_new_tokens]`` buffer, so it compiles once.

    Args:
      next_logits_fn: ``(window [B, context], offset) -> [B, V]`` logits of the token after
        the window; ``offset`` (integer scalar, traced) is the window's first index in the
        sequence, for models that place rows by it (``gpt.generate``'s padded prompts).
      tokens: ``[B, T0]`` integer ids, ``T0 >= context`` (a shorter sequence still fits the
        model: ``generate`` with a cache serves it).
      max_new_tokens: Python int >= 0.
      context: the model's context length (window size), >= 1.
      keys: ``[max_new_tokens]`` PRNG keys (raw ``[max_new_tokens, 2]`` uint32 ones, from
        ``jax.random.PRNGKey``, too), new token i drawn as ``sample_logits(keys[i], ...)``
        would; ``None`` only when greedy (``temperature == 0`` or ``greedy``).
      temperature, top_k, top_p, greedy: as in ``sample_logits`` (temperature and top_p may
        be traced).
      eos_id: as in ``generate`` (in ``[0, V)``): a row ends at its first new ``eos_id`` and
        repeats it; once all have ended, the remaining steps skip the model.
      ended: ``[B]`` bool, rows that have ended already (a cached part before this one drew
        their ``eos_id``); default none.

    Returns:
      ``[B, T0 + max_new_tokens]`` int32.
    """
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    eos_id = check_eos_id(eos_id, "generate_cropped")
    if ended is not None and eos_id is None:
        raise ValueError("generate_cropped: ended= needs an eos_id")
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    tokens = jnp.asarray(tokens)
    context = check_size(context, "context", "generate_cropped")
    _check_integer_ids(tokens, "generate_cropped: tokens")
    if tokens.ndim != 2 or not 1 <= context <= tokens.shape[1]:
        raise ValueError(
            f"generate_cropped: tokens must be [B, T0] with T0 >= context={context} >= 1, got "
            f"{tokens.shape}"
        )
    greedy = check_flag(greedy, "greedy", "generate_cropped") or is_greedy(temperature)
    keys = _token_keys(keys, max_new_tokens, greedy, "generate_cropped")
    b, t0 = tokens.shape
    out = jnp.concatenate([tokens.astype(jnp.int32), jnp.zeros((b, max_new_tokens), jnp.int32)], 1)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)

    def draw(i, out):  # -> token [B] at position t0 + i
        offset = t0 + i - context
        logits = next_logits_fn(jax.lax.dynamic_slice(out, (0, offset), (b, context)), offset)
        check_eos_id(eos_id, "generate_cropped", logits.shape[-1])  # (V: known when traced)
        noise = None if greedy else _gumbel(keys[i], logits.shape)
        return _pick(logits, noise, **settings)  # [B]

    def step(i, carry):
        out, ended = carry
        if eos_id is None:
            token = draw(i, out)
        else:
            skip = lambda i, out: jnp.full((b,), eos_id, jnp.int32)  # all ended: no model call
            token = jax.lax.cond(jnp.all(ended), skip, draw, i, out)
            token, ended = _end_rows(token, ended, eos_id)
        return jax.lax.dynamic_update_slice(out, token[:, None], (0, t0 + i)), ended

    if eos_id is not None and ended is None:
        ended = jnp.zeros((b,), bool)
    elif ended is not None and (jnp.shape(ended) != (b,) or jnp.result_type(ended) != jnp.bool_):
        raise ValueError(
            f"generate_cropped: ended must be [B] = ({b},) bool, got "
            f"{jnp.result_type(ended)} {jnp.shape(ended)}"
        )
    out, _ = jax.lax.fori_loop(0, max_new_tokens, step, (out, ended))
    return out
