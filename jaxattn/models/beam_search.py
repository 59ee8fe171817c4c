"""Greedy decoding and beam search for any autoregressive model, fixed shapes, jit-able.

Shape glossary: B batch, k beams (``beam_size``), L ``max_len`` generated tokens, V vocab,
R rows fed to the model (B for greedy, B*k for beam search).

A model plugs in through a *step function* closed over its weights (and encoder outputs)::

    step_fn(tokens [R], state) -> (log_probs [R, V], state)

It feeds one token per row (BOS first, then the token chosen at the previous step) and
returns the next token's log-probabilities and its updated state (LSTM carry, KV cache).
``state`` is any pytree whose leaves have the batch on axis ``state_batch_axis`` (leaves
of lower rank, e.g. a cache's scalar write index, are shared by all rows). In beam search
row ``b*k + j`` is beam j of sentence b: beam search repeats ``init_state`` k times and
gathers state rows by beam index with ``gather_rows`` after every step (or calls
``beam_search``'s ``reorder_state``).

Beam search scores a hypothesis ``y`` of ``|y|`` tokens (EOS included) with the GNMT
length penalty (Wu et al., 2016, "Google's Neural Machine Translation System")::

    score(y) = log P(y) / lp(y),   lp(y) = ((5 + |y|) / 6) ** alpha

Each step extends the k live hypotheses by every token. An EOS extension that ranks among
the step's top k candidates (by log P) ends: it leaves the beam with its score and never
grows again. The top k non-EOS extensions stay alive, so the beam stays full. A sentence
is done once it holds k ended hypotheses (as fairseq and Hugging Face's
``early_stopping=True``; a longer hypothesis could in principle still have scored higher
under ``alpha > 0``); hypotheses still alive after L tokens end there without EOS. With
``beam_size=1`` this is exactly ``greedy_decode``. Output sequences exclude BOS, hold EOS
when one was chosen, and are ``pad_id`` after it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxattn.models._config import check_size
from jaxattn.ops._checks import as_size, check_int_scalar
from jaxattn.ops.layers import check_token_ids

Array = jax.Array
State = Any
StepFn = Callable[[Array, State], tuple[Array, State]]


class BeamSearchResult(NamedTuple):
    """Beam search output, best first.

    ``sequences: [B, L]`` and ``scores: [B]`` (the best hypothesis per sentence),
    ``beam_sequences: [B, k, L]`` and ``beam_scores: [B, k]`` (all k, descending score).
    """

    sequences: Array
    scores: Array
    beam_sequences: Array
    beam_scores: Array


def check_length_penalty(value: Any, where: str, max_len: int | None = None) -> Any:
    """Return the GNMT ``alpha`` as a Python float; ``ValueError`` unless it is a finite real
    number >= 0 (with ``inf`` every hypothesis longer than one token would score -0.0,
    leaving only the tie order). It only feeds arithmetic: pass it to a jitted program as a
    traced float32 scalar (as ``translate`` does), so a new value does not recompile.

    With ``max_len`` the penalty of the longest hypothesis must also fit in float32, or it
    becomes inf and ranks as ``inf`` would. A traced value (under an outer ``jit``) cannot
    be inspected and is returned as it is.
    """
    if isinstance(value, jax.core.Tracer):
        return value
    alpha = None
    if not isinstance(value, (bool, np.bool_, str)) and np.ndim(value) == 0:
        try:
            alpha = float(value)
        except (TypeError, ValueError, OverflowError):  # None, an int beyond float's range
            alpha = None
    if alpha is None or not (math.isfinite(alpha) and alpha >= 0.0):
        raise ValueError(f"{where}: length_penalty must be a finite number >= 0, got {value!r}")
    # log of float32's largest value is 88.7; stay clear of it so scores keep their order.
    longest = None if max_len is None else as_size(max_len, minimum=1)  # else refused later
    if longest is not None and alpha * math.log((5 + longest) / 6) > 80.0:
        raise ValueError(
            f"{where}: length_penalty={alpha} is too large for max_len={max_len}: the "
            f"penalty ((5 + {max_len}) / 6) ** {alpha} would exceed float32's range"
        )
    return alpha


def gnmt_length_penalty(length: Array, alpha: float) -> Array:
    """GNMT length penalty ``((5 + length) / 6) ** alpha`` in float32 (Wu et al., 2016)."""
    # alpha in float32 too: a float64 alpha (traced, under x64) made the scores float64,
    # and beam_search's loop carry then changed dtype.
    alpha = jnp.asarray(alpha, jnp.float32)
    return ((5.0 + jnp.asarray(length).astype(jnp.float32)) / 6.0) ** alpha


def forbid_tokens(
    logits: Array, token_ids: tuple[int, ...], what: str = "forbid_tokens: token ids"
) -> Array:
    """Set ``logits[:, id] = -inf`` for each id (e.g. pad and BOS, which are never generated).

    Args:
      logits: ``[R, V]`` logits or log-probabilities.
      token_ids: static ids to forbid, each in ``[0, V)`` (else ``ValueError``).
      what: names the ids in that error.

    Returns:
      ``[R, V]`` float32.
    """
    logits = logits.astype(jnp.float32)
    if not token_ids:
        return logits
    check_token_ids(np.asarray(token_ids), logits.shape[-1], what)  # else silently ignored
    return logits.at[:, jnp.asarray(token_ids, jnp.int32)].set(-jnp.inf)


def gather_rows(tree: State, indices: Array, *, axis: int = 0) -> State:
    """Select rows ``indices`` along ``axis`` of every leaf with more than ``axis`` dims.

    ``out = x.take(indices, axis)``; leaves of rank ``<= axis`` (shared scalars) pass through.

    Args:
      tree: a pytree of arrays.
      indices: ``[R']`` integer row indices.
      axis: the batch axis of the leaves.

    Returns:
      The tree with ``R'`` rows on ``axis``.
    """
    return jax.tree.map(
        lambda x: jnp.take(x, indices, axis=axis) if jnp.ndim(x) > axis else x, tree
    )


def _check_rows(state: State, rows: int, where: str, state_batch_axis: int) -> None:
    for leaf in jax.tree.leaves(state):
        if jnp.ndim(leaf) > state_batch_axis and jnp.shape(leaf)[state_batch_axis] != rows:
            raise ValueError(
                f"{where}: a state leaf of shape {jnp.shape(leaf)} has no {rows} rows on "
                f"state_batch_axis={state_batch_axis}"
            )


def _check_step(
    step_fn: StepFn, tokens: Array, state: State, where: str, state_batch_axis: int
) -> int:
    """Trace ``step_fn`` once (no FLOPs) and return V after checking its output shapes."""
    rows = tokens.shape[0]
    _check_rows(state, rows, where, state_batch_axis)
    log_probs, new_state = jax.eval_shape(step_fn, tokens, state)
    if len(log_probs.shape) != 2 or log_probs.shape[0] != rows or log_probs.shape[1] < 2:
        raise ValueError(
            f"{where}: step_fn must return log_probs [R={rows}, V >= 2], got {log_probs.shape}"
        )
    before = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), state)
    after = jax.tree.map(lambda x: (x.shape, x.dtype), new_state)
    if jax.tree.structure(before) != jax.tree.structure(after) or jax.tree.leaves(
        before
    ) != jax.tree.leaves(after):
        raise ValueError(f"{where}: step_fn changed the state's structure, shapes or dtypes")
    return log_probs.shape[1]


def _first_tokens(
    batch_size: int, max_len: int, bos_id: int | Array, eos_id: int, where: str
) -> Array:
    """Check the arguments; return the first tokens fed, ``[B]`` int32."""
    check_size(batch_size, "batch_size", where)
    check_size(max_len, "max_len", where)
    if eos_id < 0:
        raise ValueError(f"{where}: eos_id must be >= 0, got {eos_id}")
    bos = jnp.asarray(bos_id)
    if bos.shape not in ((), (batch_size,)) or not jnp.issubdtype(bos.dtype, jnp.integer):
        raise ValueError(
            f"{where}: bos_id must be an int or [B={batch_size}] ints, got {bos.shape}"
        )
    return jnp.broadcast_to(bos.astype(jnp.int32), (batch_size,))


def _check_ids(bos_id: int | Array, eos_id: int, pad_id: int, vocab: int, where: str) -> None:
    # An EOS step_fn never emits would silently decode every row to max_len.
    check_token_ids(eos_id, vocab, f"{where}: eos_id")
    check_int_scalar(pad_id, "pad_id", where)  # it fills the int32 output: 2.5 would be 2
    # BOS is only fed in: it may lie past the V tokens step_fn predicts (an input-only
    # token), but a negative id would index the embedding from its end.
    if not isinstance(bos_id, jax.core.Tracer) and np.any(np.asarray(bos_id) < 0):
        raise ValueError(f"{where}: bos_id must be >= 0, got {np.asarray(bos_id).tolist()}")


def greedy_decode(
    step_fn: StepFn,
    init_state: State,
    batch_size: int,
    *,
    max_len: int,
    bos_id: int | Array,
    eos_id: int,
    pad_id: int = 0,
    state_batch_axis: int = 0,
) -> Array:
    """Decode by taking the most likely token at every step: ``y_t = argmax log P(y_t | y_<t)``.

    Stops early (``lax.while_loop``) once every row has produced EOS.

    Args:
      step_fn: ``(tokens [B], state) -> (log_probs [B, V], state)``; logits work too.
      init_state: the state for the BOS step, B rows on ``state_batch_axis``.
      batch_size: B.
      max_len: L, the most tokens generated per row (EOS included).
      bos_id: the first token fed: an int, or ``[B]`` ints (e.g. each prompt's last token
        after prefilling a language model's cache with the rest); ``>= 0``, and it may lie
        past the V tokens ``step_fn`` predicts (a token that is only ever an input).
      eos_id, pad_id: special token ids.
      state_batch_axis: the axis of the state's leaves that holds the rows.

    Returns:
      ``[B, L]`` int32 tokens (no BOS), ``pad_id`` after a row's EOS.
    """
    tokens = _first_tokens(batch_size, max_len, bos_id, eos_id, "greedy_decode")
    vocab = _check_step(step_fn, tokens, init_state, "greedy_decode", state_batch_axis)
    _check_ids(bos_id, eos_id, pad_id, vocab, "greedy_decode")
    out = jnp.full((batch_size, max_len), pad_id, jnp.int32)
    done = jnp.zeros((batch_size,), bool)

    def cond(carry):
        i, _, _, done, _ = carry
        return (i < max_len) & ~jnp.all(done)

    def body(carry):
        i, out, last, done, state = carry
        log_probs, state = step_fn(last, state)
        token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)  # [B]
        token = jnp.where(done, pad_id, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], i, axis=1)
        return i + 1, out, token, done | (token == eos_id), state

    carry = (jnp.zeros((), jnp.int32), out, tokens, done, init_state)
    return jax.lax.while_loop(cond, body, carry)[1]


def beam_search(
    step_fn: StepFn,
    init_state: State,
    batch_size: int,
    *,
    beam_size: int,
    max_len: int,
    bos_id: int | Array,
    eos_id: int,
    length_penalty: float = 0.6,
    pad_id: int = 0,
    state_batch_axis: int = 0,
    reorder_state: Callable[[State, Array], State] | None = None,
) -> BeamSearchResult:
    """Find high-scoring sequences with a beam of ``beam_size`` hypotheses per sentence.

    ``score(y) = log P(y) / ((5 + |y|) / 6) ** alpha`` (GNMT); see the module docstring for
    how hypotheses end. One ``lax.while_loop`` over at most L steps with fixed shapes.

    Args:
      step_fn: ``(tokens [B*k], state) -> (log_probs [B*k, V], state)``; must return
        normalised log-probabilities (e.g. ``jax.nn.log_softmax(logits)``).
      init_state: the state for the BOS step with B rows on ``state_batch_axis``; it is
        repeated to B*k rows (row ``b*k + j`` = sentence b, beam j).
      batch_size: B.
      beam_size: k >= 1.
      max_len: L, the most tokens per hypothesis (EOS included).
      bos_id: the first token fed: an int or ``[B]`` ints (see ``greedy_decode``).
      eos_id, pad_id: special token ids.
      length_penalty: alpha, a finite number >= 0 (0 = rank by log P; GNMT uses 0.6 to 1).
      state_batch_axis: the axis of the state's leaves that holds the rows.
      reorder_state: ``(state, parents [B*k]) -> state``, how the state follows the
        surviving beams after each step (row r continues the hypothesis of row
        ``parents[r]``); None: ``gather_rows`` on ``state_batch_axis``. A model can keep
        its KV cache in place and record the parents instead (``transformer.translate``).

    Returns:
      ``BeamSearchResult(sequences [B, L], scores [B], beam_sequences [B, k, L],
      beam_scores [B, k])``, int32 tokens (no BOS, ``pad_id`` after EOS) and float32
      scores, best first.
    """
    first = _first_tokens(batch_size, max_len, bos_id, eos_id, "beam_search")
    check_size(beam_size, "beam_size", "beam_search")
    length_penalty = check_length_penalty(length_penalty, "beam_search", max_len)
    b, k, steps = batch_size, beam_size, max_len
    # Before the repeat: taking rows 0..B-1 would hide an init_state with other than B rows.
    _check_rows(init_state, b, "beam_search: init_state", state_batch_axis)
    neg_inf = jnp.float32(-jnp.inf)
    state = gather_rows(init_state, jnp.repeat(jnp.arange(b), k), axis=state_batch_axis)
    last = jnp.repeat(first, k)  # [B*k]
    vocab = _check_step(step_fn, last, state, "beam_search", state_batch_axis)
    _check_ids(bos_id, eos_id, pad_id, vocab, "beam_search")
    seqs = jnp.full((b, k, steps), pad_id, jnp.int32)
    # Only beam 0 is live at first, so the k beams do not all extend the same BOS.
    alive_logp = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, neg_inf), (b, 1))  # [B, k]
    ended_scores = jnp.full((b, k), neg_inf)
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]  # [B, 1], int32 like top_k indices

    def done(ended_scores):
        return jnp.all(jnp.isfinite(ended_scores), axis=1)  # [B]: k hypotheses have ended

    def cond(carry):
        i, _, _, _, ended_scores, _, _ = carry
        return (i < steps) & ~jnp.all(done(ended_scores))

    def body(carry):
        i, alive_seqs, alive_logp, ended_seqs, ended_scores, last, state = carry
        log_probs, state = step_fn(last, state)
        logp = alive_logp[:, :, None] + log_probs.astype(jnp.float32).reshape(b, k, vocab)
        # Hypotheses that end now: EOS extensions among the top k of all k*V candidates.
        top_logp, top_idx = jax.lax.top_k(logp.reshape(b, k * vocab), k)  # [B, k]
        top_beam, top_token = top_idx // vocab, top_idx % vocab
        eos_seqs = alive_seqs[rows, top_beam].at[:, :, i].set(eos_id)  # [B, k, L]
        eos_scores = top_logp / gnmt_length_penalty(i + 1, length_penalty)
        eos_scores = jnp.where(top_token == eos_id, eos_scores, neg_inf)
        # The k best non-EOS extensions stay alive, so the beam stays full.
        grow = logp.at[:, :, eos_id].set(neg_inf).reshape(b, k * vocab)
        alive_logp, grow_idx = jax.lax.top_k(grow, k)  # [B, k]
        beam, token = grow_idx // vocab, grow_idx % vocab
        alive_seqs = alive_seqs[rows, beam].at[:, :, i].set(token)  # [B, k, L]
        # After the last step the live hypotheses end too, without EOS.
        cut_scores = alive_logp / gnmt_length_penalty(steps, length_penalty)
        cut_scores = jnp.where(i == steps - 1, cut_scores, neg_inf)
        # A done sentence takes no more hypotheses; the k best of old and new ones stay.
        frozen = done(ended_scores)[:, None]  # [B, 1]
        new_scores = jnp.where(frozen, neg_inf, jnp.concatenate([eos_scores, cut_scores], 1))
        pool_scores = jnp.concatenate([ended_scores, new_scores], axis=1)  # [B, 3k]
        pool_seqs = jnp.concatenate([ended_seqs, eos_seqs, alive_seqs], axis=1)  # [B, 3k, L]
        ended_scores, keep = jax.lax.top_k(pool_scores, k)  # [B, k], descending
        ended_seqs = pool_seqs[rows, keep]  # [B, k, L]
        parents = (rows * k + beam).reshape(-1)  # [B*k]
        if reorder_state is None:
            state = gather_rows(state, parents, axis=state_batch_axis)
        else:
            state = reorder_state(state, parents)
        return i + 1, alive_seqs, alive_logp, ended_seqs, ended_scores, token.reshape(-1), state

    carry = (jnp.zeros((), jnp.int32), seqs, alive_logp, seqs, ended_scores, last, state)
    _, _, _, ended_seqs, ended_scores, _, _ = jax.lax.while_loop(cond, body, carry)
    return BeamSearchResult(ended_seqs[:, 0], ended_scores[:, 0], ended_seqs, ended_scores)


def decode_sequences(
    logits_fn: StepFn,
    init_state: State,
    batch_size: int,
    *,
    beam_size: int,
    max_len: int,
    bos_id: int | Array,
    eos_id: int,
    pad_id: int = 0,
    length_penalty: float = 0.6,
    state_batch_axis: int = 0,
    forbidden: tuple[int, ...] = (),
    reorder_state: Callable[[State, Array], State] | None = None,
) -> Array:
    """Best sequence per row: ``greedy_decode`` when ``beam_size == 1``, else ``beam_search``.

    Args:
      logits_fn: ``(tokens [R], state) -> (logits [R, V], state)``, a model's decode step.
      forbidden: token ids in ``[0, V)`` never generated (e.g. pad and BOS).
      reorder_state: as in ``beam_search`` (greedy decoding does not reorder).
      Others: as in ``beam_search``.

    Returns:
      ``[B, max_len]`` int32 token ids, pad after EOS.
    """
    beam_size = check_size(beam_size, "beam_size", "decode_sequences")  # 1.0 is not greedy
    # Checked for greedy too, which ignores it: a bad value fails whatever the beam size.
    length_penalty = check_length_penalty(length_penalty, "decode_sequences", max_len)

    def step(tokens: Array, state: State) -> tuple[Array, State]:
        logits, state = logits_fn(tokens, state)
        if forbidden:
            logits = forbid_tokens(logits, forbidden, "decode_sequences: forbidden ids")
        return jax.nn.log_softmax(logits), state

    common = dict(
        max_len=max_len,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        state_batch_axis=state_batch_axis,
    )
    if beam_size == 1:
        return greedy_decode(step, init_state, batch_size, **common)
    return beam_search(
        step,
        init_state,
        batch_size,
        beam_size=beam_size,
        length_penalty=length_penalty,
        reorder_state=reorder_state,
        **common,
    ).sequences
