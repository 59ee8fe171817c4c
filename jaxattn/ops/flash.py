"""Blockwise ("flash") attention: online softmax over key blocks, O(T) memory.

Shape glossary: B batch, T query time, S key time, N query heads, K key/value heads
(``N % K == 0``), G = N // K query heads per key/value head, H head dim (Hv for values).
Inside the kernel: Z = B K (batch, key/value head) pairs, R = G bq rows of a query block
(the G query heads that share a key/value head, stacked), C = bk columns of a key block.

The queries are cut into blocks of ``bq`` rows and the keys into blocks of ``bk``. For each
query block a loop over key blocks keeps a running row max ``m``, normaliser ``l`` and
unnormalised output ``acc`` (Rabe & Staats, 2021, "Self-attention Does Not Need O(n²)
Memory"; Dao et al., 2022, "FlashAttention")::

    s = q_i k_jᵀ (scaled) + bias, masked entries -inf
    m' = max(m, rowmax s);  p = exp(s - m');  l = l e^{m - m'} + rowsum p
    acc = acc e^{m - m'} + p v_j;             out_i = acc / l

The backward pass (a ``jax.custom_vjp``) recomputes ``p = exp(s - m - log l)`` block by
block from (q, k, v, out, m, log l) instead of storing the [T, S] probabilities
(FlashAttention-2, Dao, 2023): with ``D = rowsum(dout * out)``, ``dv_j += pᵀ dout_i``,
``ds = p (dout_i v_jᵀ - D)``, ``dk_j += dsᵀ q_i``, ``dq_i += ds k_j``. Memory is O(B N T H)
in both directions. FlashAttention-2 keeps the one sum ``m + log l``; kept apart, a row
whose every visible logit carries a huge negative bias (float32's ``finfo.min``, -1e9)
keeps its ``log l``, which the sum would round away (its gradients then came out l times
too large).

Attention dropout multiplies ``p`` by ``keep / (1 - rate)`` in the product with v only (the
normaliser ``l`` counts every key, as in ``softmax(s) * keep / (1 - rate) @ v``; ``p keep``
enters the product and ``1 / (1 - rate)`` the float32 output, so that in bfloat16 ``D``
below sees only the rounding of ``p``, as without dropout); then
``dv_j += (p keep)ᵀ dout_i / (1 - rate)`` and ``dp`` takes the same multiplier, while ``D``
is unchanged (``rowsum(dp p) = rowsum(dout * out)`` still). ``keep`` is a hash of each
entry's (row, key) position (``jaxattn.ops.masks.attention_dropout_keep``), so each tile's
mask is rebuilt in the backward instead of stored, and it is the mask that the einsum path
draws whole for the same key.

Causal masking skips every block it hides entirely and masks only blocks that straddle the
diagonal; key and query padding (T, S not multiples of the block) is masked the same way.
With equal query and key blocks and S - T a whole number of blocks (causal self-attention)
the straddling tiles are exactly the diagonal ones: their mask is one constant tile, and in
the per-head layout each is computed as its first half of rows against its first half of
keys plus its second half of rows against all keys, since the top-right quarter is hidden
(3/4 of the work: at T = 4 blocks the 10 tiles of a head cost 9). A sliding window
(``local_window_size``) skips the blocks below its lower edge (and above its upper edge)
in the same way and masks the tiles its edges cross, so a causal window of W keys visits
about ``T / bq * (W / bk + 2)`` tiles per head instead of about ``T² / (2 bq bk)``.
A query row with nothing to attend to gets output 0, zero gradients and ``log l = 0``,
as in the einsum path of ``jaxattn.ops.attention``. Queries are the last T of the S key
positions (``jaxattn.ops.masks.causal_mask``).

Layout and speed (measured on a 2-core CPU, see ``benchmarks/README.md``): on CPU the loops
run over the Z (batch, key/value head) pairs, then query blocks, then key blocks, on 2-D tiles:
a pair's query-side blocks are ``[nq, R, H]`` (one matmul serves the G query heads of a
key/value head: GQA without copying K/V), its key-side blocks ``[nk, C, H]``, each cut from
the ``[B, T, N, H]`` / ``[B, S, K, H]`` inputs when the loop reaches the pair. Tiles of
512 x 512 are about the smallest whose matmuls XLA:CPU splits over two cores, and still fit
a core's L2 cache; batching all heads into each tile instead keeps every matmul on one
core. The backward works on transposed tiles ``[C, R]`` and keeps ``dqᵀ``, so all five
matmuls are plain or ``A Bᵀ`` products (a transposed left operand falls back to a slower
kernel).

On GPU and TPU that order is the wrong one: every tile step is a handful of small kernel
launches, and one head at a time on an H200 ran 86-141x slower than PyTorch SDPA (243 ms
at T = 1024 with 512 (batch, head) pairs). There (``batch_heads=True``, the default off
CPU without a bias) the Z pairs are ``vmap``-ed instead, so each tile step is one batched
product ``[Z, R, H]·[Z, C, H]ᵀ`` over all heads, on ``ACCELERATOR_BLOCK`` tiles: Z times
fewer sequential steps at one block size, the same arithmetic, and memory still linear in
T (Z tiles live at a time; masks shared across heads are not copied per head). On an
H200 (2026-12-04) it ran causal [8, 4096, 16, 128] in bfloat16, fwd+bwd, in 26.4 ms against
432 ms one pair at a time (cuDNN: about 4 ms); on CPU it is the slower order.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxattn.ops._checks import as_size, check_flag, forward_mode_hint, jit_when_eager
from jaxattn.ops.layers import as_array, check_dropout_key, check_dropout_rate, float32_or_wider
from jaxattn.ops.masks import (
    attention_dropout_keep,
    check_local_window,
    dropout_scale,
    dropout_seed,
)

Array = jax.Array

# Block edge when the caller does not choose one: 512 x 512 tiles per head were fastest on
# CPU at T = 2048..8192 (benchmarks/README.md). Blocks never exceed the length rounded to 8.
DEFAULT_BLOCK = 512
# Block edge with ``batch_heads`` (the GPU/TPU layout). On an H200 (bfloat16, causal
# [8, 4096, 16, 128], fwd+bwd) 512 tiles took 26.4 ms, 256 tiles 38.3 and 128 tiles 78.1;
# each tile step holds Z tiles: [Z, 512, 512] float32 is 512 MiB for Z = 512 (B = 32,
# N = 16), and the run above peaked at 1,559 MiB against 1,294 with 256 tiles.
ACCELERATOR_BLOCK = 512


class _Plan(NamedTuple):
    """Static sizes of one call (hashable: the custom_vjp's non-differentiable argument)."""

    t: int
    s: int
    bq: int
    bk: int
    causal: bool
    scale: float  # 1.0 with a traced scale, which rides along as an array (``_flash``)
    batch_heads: bool  # vmap over (batch, kv-head) pairs instead of looping over them
    dropout_rate: float = 0.0  # on the probabilities; the key rides along as an array
    # A sliding window: query row r (key position r + S - T) sees keys at most ``left``
    # before it and ``right`` after it; None = unbounded (``right`` is None when causal).
    left: int | None = None
    right: int | None = None
    # Scale each float32 logit tile instead of q: for a bfloat16 or float16 q and a scale
    # that is not a power of two, q * scale in q's dtype rounds every element (about 10x
    # the einsum path's error at H = 128). Otherwise q is scaled once per block, exactly.
    # Always with a traced scale (it may be anything).
    scale_logits: bool = False

    @property
    def upper(self) -> int | None:
        """How far past its own position a query may see: 0 causal, ``right``, or None."""
        return 0 if self.causal else self.right

    @property
    def diagonal_edges(self) -> bool:
        """Causal with equal blocks and S - T a whole number of blocks, and no window edge
        inside a diagonal tile: then a query block's only tile that the causal mask partly
        hides is its diagonal one, with the same pattern every time."""
        aligned = self.bq == self.bk and (self.s - self.t) % self.bk == 0
        return self.causal and aligned and (self.left is None or self.left >= self.bq - 1)

    @property
    def split_diagonal(self) -> bool:
        """Compute each diagonal tile as two products over half its rows: 3/4 of the work.
        Per-head layout only (timed on CPU; the batched layout keeps whole tiles)."""
        return self.diagonal_edges and self.bq % 2 == 0 and not self.batch_heads

    @property
    def nq(self) -> int:
        return -(-self.t // self.bq)

    @property
    def nk(self) -> int:
        return -(-self.s // self.bk)


# ----------------------------------------------------------------------------------------
# Layout: [B, T, N, H] <-> per-head blocks
# ----------------------------------------------------------------------------------------


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _q_blocks(x: Array, num_kv: int, bq: int) -> Array:
    """``[B, T, N, H]`` -> ``[B*K, nq, G*bq, H]`` (rows ordered head-major, then time)."""
    b, t, n, h = x.shape
    nq = -(-t // bq)
    x = _pad_axis(x, 1, nq * bq).reshape(b, nq, bq, num_kv, n // num_kv, h)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(b * num_kv, nq, -1, h)  # [Z, nq, R, H]


def _q_unblock(x: Array, batch: int, num_heads: int, t: int) -> Array:
    """Inverse of ``_q_blocks``: ``[B*K, nq, G*bq, H]`` -> ``[B, T, N, H]``."""
    z, nq, r, h = x.shape
    kh = z // batch
    g = num_heads // kh
    x = x.reshape(batch, kh, nq, g, r // g, h).transpose(0, 2, 4, 1, 3, 5)  # [B, nq, bq, K, G, H]
    return x.reshape(batch, -1, num_heads, h)[:, :t]


def _k_blocks(x: Array, bk: int) -> Array:
    """``[B, S, K, H]`` -> ``[B*K, nk, bk, H]``."""
    b, s, kh, h = x.shape
    nk = -(-s // bk)
    x = _pad_axis(x, 1, nk * bk).reshape(b, nk, bk, kh, h)
    return x.transpose(0, 3, 1, 2, 4).reshape(b * kh, nk, bk, h)  # [Z, nk, C, H]


def _k_unblock(x: Array, batch: int, s: int) -> Array:
    """Inverse of ``_k_blocks``."""
    z, nk, c, h = x.shape
    x = x.reshape(batch, z // batch, nk, c, h).transpose(0, 2, 3, 1, 4)  # [B, nk, C, K, H]
    return x.reshape(batch, nk * c, z // batch, h)[:, :s]


def _blocks(x: Array, side: str, num_kv: int, p: _Plan) -> Array:
    """Every head's blocks of ``x``: a "q"-side ``[B, T, N, D]`` array -> ``[Z, nq, R, D]``,
    a "k"-side ``[B, S, K, D]`` one -> ``[Z, nk, C, D]``; "z" arrays are ``[Z, ...]``."""
    if side == "q":
        return _q_blocks(x, num_kv, p.bq)
    return _k_blocks(x, p.bk) if side == "k" else x


def _unblock(y: Array, side: str, shape: tuple[int, ...]) -> Array:
    """Inverse of ``_blocks`` for an array of final ``shape``."""
    if side == "q":
        return _q_unblock(y, shape[0], shape[2], shape[1])
    return _k_unblock(y, shape[0], shape[1]) if side == "k" else y


def _pair_slot(side: str, heads: int, z, num_kv: int) -> tuple[int, tuple]:
    """``(G, start)``: pair z's heads in a "q"- or "k"-side ``[B, L, heads, D]`` array (the
    G query heads of key/value head z % K, or that one head) and where they begin."""
    g = heads // num_kv if side == "q" else 1
    return g, (z // num_kv, 0, (z % num_kv) * g, 0)


def _head_blocks(x: Array, side: str, z, num_kv: int, p: _Plan) -> Array:
    """Pair ``z = b K + k``'s blocks of ``x``, ``_blocks(x, side, num_kv, p)[z]``, cut from x
    itself: ``[nq, R, D]`` ("q"), ``[nk, C, D]`` ("k"), ``x[z]`` ("z")."""
    if side == "z":
        return x[z]
    _, length, heads, d = x.shape
    g, start = _pair_slot(side, heads, z, num_kv)
    xz = lax.dynamic_slice(x, start, (1, length, g, d))[0]  # [L, G, D]
    block = p.bq if side == "q" else p.bk
    n = -(-length // block)
    xz = _pad_axis(xz, 0, n * block).reshape(n, block, g, d)
    return xz.transpose(0, 2, 1, 3).reshape(n, g * block, d)  # rows: head-major, then time


def _put_head(out: Array, y: Array, side: str, z, num_kv: int) -> Array:
    """Write pair ``z``'s blocks ``y`` (as ``_head_blocks`` returns them) into ``out``
    (``[B, T, N, D]``, ``[B, S, K, D]`` or ``[Z, ...]``), dropping padding rows."""
    if side == "z":
        return out.at[z].set(y.astype(out.dtype))
    _, length, heads, d = out.shape
    g, start = _pair_slot(side, heads, z, num_kv)
    n, rows = y.shape[:2]
    y = y.reshape(n, g, rows // g, d).transpose(0, 2, 1, 3).reshape(-1, g, d)[:length]
    return lax.dynamic_update_slice(out, y[None].astype(out.dtype), start)


def _pair_blocks(x: Array, num_kv: int, plan: _Plan, transposed: bool, fill) -> Array:
    """Cut a mask or bias ``[b, n, t, s]`` (each dim full or 1) into (query, key) tiles.

    Returns ``[b, K|1, nq|1, nk|1, G|1, bq|1, bk|1]``, or with ``transposed`` the tiles of
    its transpose ``[b, K|1, nk|1, nq|1, bk|1, G|1, bq|1]``; padding is ``fill``. Broadcast
    dims stay 1, so a ``[B, 1, 1, S]`` padding mask costs O(B S).
    """
    b, n, t, s = x.shape
    kh, g = (num_kv, n // num_kv) if n > 1 else (1, 1)
    bq, nq = (plan.bq, plan.nq) if t > 1 else (1, 1)
    bk, nk = (plan.bk, plan.nk) if s > 1 else (1, 1)
    x = _pad_axis(_pad_axis(x, 2, nq * bq, fill), 3, nk * bk, fill)
    x = x.reshape(b, kh, g, nq, bq, nk, bk)
    if transposed:
        return x.transpose(0, 1, 5, 3, 6, 2, 4)  # [b, K, nk, nq, bk, G, bq]
    return x.transpose(0, 1, 3, 5, 2, 4, 6)  # [b, K, nq, nk, G, bq, bk]


def _pair_unblock_t(x: Array, shape: tuple[int, ...]) -> Array:
    """Inverse of ``_pair_blocks(..., transposed=True)`` back to ``shape = [b, n, t, s]``."""
    b, kh, nk, nq, bk, g, bq = x.shape
    x = x.transpose(0, 1, 5, 3, 6, 2, 4).reshape(b, kh * g, nq * bq, nk * bk)
    return x[:, :, : shape[2], : shape[3]]


def _head_tiles(blocks: Array | None, z, num_kv: int) -> Array | None:
    """The tiles of flat head ``z = b K + k`` (index 0 along broadcast axes)."""
    if blocks is None:
        return None
    b = z // num_kv if blocks.shape[0] > 1 else 0
    return blocks[b, z % num_kv if blocks.shape[1] > 1 else 0]


def _each_head(fn, inputs, tiles, outputs, batch: int, num_kv: int, p: _Plan, carry=None):
    """Run ``fn`` on every flat head ``z = b K + k`` and assemble what it returns.

    ``inputs`` are ``(array, side)`` pairs (sides as in ``_blocks``): head z sees
    ``_blocks(array, side, ...)[z]``. ``tiles`` are mask/bias tiles ``[b|1, K|1, ...]``
    (or None). ``outputs`` are ``(side, shape, dtype)`` of the assembled results, one per
    block array that ``fn(z, carry, *blocks, *tiles) -> (carry, blocks_out)`` returns.
    Returns ``(carry, results)``.

    Without ``p.batch_heads``, or with a ``carry`` (which only a loop can thread), a loop
    runs one head at a time: it cuts each head's blocks out of the inputs and writes its
    results in place, so no whole q, k, v, dout or output is copied into the block layout
    (on CPU those copies, into freshly mapped memory, took about a tenth of the forward's
    time; the small row statistics ``[Z, nq, R]`` are passed in that layout).
    With ``p.batch_heads``, two nested ``vmap``s over b and k run all heads at once on
    arrays in the block layout; a tile axis of size 1 stays unmapped there, so a mask or
    bias shared across heads is never copied per head.
    """
    if carry is not None or not p.batch_heads:

        def body(z, state):
            carry, results = state
            blocks = (_head_blocks(x, side, z, num_kv, p) for x, side in inputs)
            carry, ys = fn(z, carry, *blocks, *(_head_tiles(t, z, num_kv) for t in tiles))
            results = tuple(
                _put_head(r, y, side, z, num_kv) for r, y, (side, _, _) in zip(results, ys, outputs)
            )
            return carry, results

        init = tuple(jnp.zeros(shape, dtype) for _, shape, dtype in outputs)
        return lax.fori_loop(0, batch * num_kv, body, (carry, init))

    def by_b_and_k(x: Array, side: str) -> Array:  # [B, K, ...] blocks
        blocks = _blocks(x, side, num_kv, p)
        return blocks.reshape(batch, num_kv, *blocks.shape[1:])

    arrays = tuple(by_b_and_k(x, side) for x, side in inputs)
    z = jnp.arange(batch * num_kv).reshape(batch, num_kv)

    def unbroadcast(t):  # -> (t without its size-1 b and k axes, b's vmap axis, k's vmap axis)
        if t is None:
            return None, None, None
        b_axis, k_axis = (None if d == 1 else 0 for d in t.shape[:2])
        index = tuple(slice(None) if axis == 0 else 0 for axis in (b_axis, k_axis))
        return t[index], b_axis, k_axis

    squeezed, outer, inner = zip(*map(unbroadcast, tiles))
    mapped = (0,) * (1 + len(arrays))
    one = lambda z, *args: fn(z, None, *args)[1]
    over_k = jax.vmap(one, in_axes=(*mapped, *inner))
    over_bk = jax.vmap(over_k, in_axes=(*mapped, *outer))
    ys = over_bk(z, *arrays, *squeezed)
    return None, tuple(
        _unblock(y.reshape(batch * num_kv, *y.shape[2:]), side, shape).astype(dtype)
        for y, (side, shape, dtype) in zip(ys, outputs)
    )


def _tile(tiles: Array | None, i, j) -> Array | None:
    """Tile (i, j) of one head's ``[n_i|1, n_j|1, ...]`` tiles."""
    if tiles is None:
        return None
    return tiles[i if tiles.shape[0] > 1 else 0, j if tiles.shape[1] > 1 else 0]


# ----------------------------------------------------------------------------------------
# Which key blocks a query block sees, and vice versa
# ----------------------------------------------------------------------------------------


def _key_range(i, p: _Plan):
    """Key blocks ``[a, b)`` of query block i need no mask; ``[lo, a)`` (a window's lower
    edge) and ``[b, end)`` (the causal diagonal or a window's upper edge, and padding) need
    one; the rest are hidden from every row of the block."""
    whole = p.s // p.bk  # key blocks without padding columns
    first_row, last_row = i * p.bq, jnp.minimum(i * p.bq + p.bq, p.t) - 1
    if p.upper is None:
        b, end = whole, p.nk
    else:  # row r (key position r + S - T) sees key c <= r + S - T + upper
        shift = p.s - p.t + p.upper
        b = jnp.clip((first_row + shift + 1) // p.bk, 0, whole)
        end = jnp.clip((last_row + shift) // p.bk + 1, 0, p.nk)
    if p.left is None:
        return 0, 0, b, end
    # Row r sees key c >= r + S - T - left.
    shift = p.s - p.t - p.left
    lo = jnp.clip((first_row + shift) // p.bk, 0, p.nk)
    end = jnp.maximum(end, lo)
    a = jnp.clip(-(-(last_row + shift) // p.bk), lo, end)
    return lo, a, jnp.clip(b, a, end), end


def _query_range(j, p: _Plan):
    """Query blocks ``[a, b)`` see all of key block j unmasked; ``[start, a)`` (the causal
    diagonal or a window's upper edge, or any block when j holds padding columns) and
    ``[b, end)`` (a window's lower edge) need a mask; the rest see none of it."""
    padded = (j + 1) * p.bk > p.s  # the last key block holds padding columns
    first_col = j * p.bk
    if p.upper is None:
        start, a = 0, 0
    else:  # row r sees key c <= r + S - T + upper
        shift = p.s - p.t + p.upper
        start = jnp.where(
            first_col - shift > p.t - 1, p.nq, jnp.clip((first_col - shift) // p.bq, 0, p.nq)
        )
        a = jnp.maximum(jnp.clip(-(-(first_col + p.bk - 1 - shift) // p.bq), 0, p.nq), start)
    if p.left is None:
        return start, jnp.where(padded, p.nq, a), p.nq, p.nq
    # Row r sees key c >= r + S - T - left; the last block's last row is T - 1.
    shift = p.s - p.t - p.left
    last_col = jnp.minimum(first_col + p.bk, p.s) - 1
    end = jnp.clip((last_col - shift) // p.bq + 1, start, p.nq)
    a = jnp.where(padded, end, jnp.minimum(a, end))
    all_rows = p.t - 1 + shift <= first_col
    b = jnp.where(all_rows, p.nq, (first_col - shift + 1) // p.bq)
    return start, a, jnp.clip(b, a, end), end


def _visible(i, j, rows: int, p: _Plan, transposed: bool) -> Array:
    """Causal, window and padding visibility of tile (i, j): ``[R, C]``, or ``[C, R]``
    transposed."""
    shape = (p.bk, rows) if transposed else (rows, p.bk)
    row_axis, col_axis = (1, 0) if transposed else (0, 1)
    # int32 like the iotas: with jax_enable_x64 the loop indices may be int64.
    i, j = (jnp.asarray(x).astype(jnp.int32) for x in (i, j))
    row = i * p.bq + lax.broadcasted_iota(jnp.int32, shape, row_axis) % p.bq
    col = j * p.bk + lax.broadcasted_iota(jnp.int32, shape, col_axis)
    position = row + (p.s - p.t)  # of the query row among the keys
    visible = col < p.s
    if p.upper is not None:
        visible &= col <= position + p.upper
    if p.left is not None:
        visible &= col >= position - p.left
    return visible


def _diagonal_visible(g: int, bq: int, transposed: bool) -> Array:
    """True where a diagonal tile's key c <= query row's time r % bq: ``[G bq, bq]`` (``[bq,
    G bq]`` transposed). A constant, so edge tiles skip ``_visible``'s index math. Boolean,
    not a 0 / -inf bias: run eagerly (a ``jax.vjp`` outside ``jit``), a -inf constant was
    an "invalid value (inf)" error under ``jax.debug_infs``; ``_mask_diagonal`` makes the
    bias inside the traced tile loop, where XLA folds it to the same constant."""
    time = np.arange(g * bq) % bq
    tile = np.arange(bq)[None, :] <= time[:, None]
    return jnp.asarray(tile.T if transposed else tile)


def _half_rows(x: Array, g: int, first: bool, axis: int = 0) -> Array:
    """The first or second half of each query head's time rows of ``x`` along ``axis``
    (rows ordered ``[G, bq]``, as in a query block): ``G bq`` -> ``G bq / 2``."""
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape(g, 2, x.shape[0] // (2 * g), *x.shape[1:])[:, 0 if first else 1]
    return jnp.moveaxis(x.reshape(-1, *x.shape[2:]), 0, axis)


def _merge_halves(first: Array, second: Array, g: int, axis: int = 0) -> Array:
    """Inverse of ``_half_rows``: interleave the two halves back per query head."""
    first, second = (jnp.moveaxis(x, axis, 0) for x in (first, second))
    halves = [x.reshape(g, 1, x.shape[0] // g, *x.shape[1:]) for x in (first, second)]
    x = jnp.concatenate(halves, axis=1)
    return jnp.moveaxis(x.reshape(-1, *x.shape[3:]), 0, axis)


def _diagonal_halves(h: int) -> tuple:
    """``(first, rows, keys)`` of a diagonal tile's two products: the first ``h`` time rows
    against the first ``h`` keys (the other keys are hidden from them), then the second
    half of the rows against all keys."""
    return (True, slice(0, h), slice(0, h)), (False, slice(h, None), slice(None))


def _part_tile(tile: Array | None, rows: slice, cols: slice, transposed: bool) -> Array | None:
    """Rows (time within the block) and columns (keys) of a mask or bias tile
    ``[G|1, bq|1, C|1]`` (``[C|1, G|1, bq|1]``); broadcast axes stay whole."""
    if tile is None:
        return None
    pick = lambda sl, d: sl if d > 1 else slice(None)
    if transposed:
        return tile[pick(cols, tile.shape[0]), :, pick(rows, tile.shape[2])]
    return tile[:, pick(rows, tile.shape[1]), pick(cols, tile.shape[2])]


def _mask_diagonal(s: Array, diag_visible, mask_tile, bias_tile, g: int, transposed: bool) -> Array:
    """``_mask_and_bias`` of a diagonal tile whose causal mask is ``diag_visible``."""
    if bias_tile is None:  # adding the -inf is cheaper than a select (a bias may be +inf)
        diag_bias = jnp.where(diag_visible, 0.0, -jnp.inf).astype(s.dtype)
        return _mask_and_bias(s + diag_bias, None, mask_tile, None, g, transposed)
    return _mask_and_bias(s, diag_visible, mask_tile, bias_tile, g, transposed)


def _mask_logits(s, i, j, edge: bool, diag_visible, mask_tile, bias_tile, rows, g, p, transposed):
    """Mask and bias the logits of tile (i, j). An edge tile (one the causal diagonal, a
    window edge or padding crosses) takes ``diag_visible`` when given, else ``_visible``."""
    if edge and diag_visible is not None:
        return _mask_diagonal(s, diag_visible, mask_tile, bias_tile, g, transposed)
    vis = _visible(i, j, rows, p, transposed) if edge else None
    return _mask_and_bias(s, vis, mask_tile, bias_tile, g, transposed)


def _mask_and_bias(s: Array, vis, mask_tile, bias_tile, g: int, transposed: bool) -> Array:
    """Add a bias tile, then set entries that are not visible to -inf.

    ``s`` is ``[R, C]`` (``[C, R]`` transposed) and ``vis`` the same shape or None. Mask
    and bias tiles are ``[G|1, bq|1, C|1]`` (``[C|1, G|1, bq|1]``), so ``[B, 1, 1, S]``
    padding masks and per-head biases broadcast without copies.
    """
    if mask_tile is None and bias_tile is None:
        return s if vis is None else jnp.where(vis, s, -jnp.inf)
    shape = s.shape
    split = (shape[0], g, shape[1] // g) if transposed else (g, shape[0] // g, shape[1])
    x = s.reshape(split)  # [G, bq, C] or [C, G, bq]
    if bias_tile is not None:
        x = x + bias_tile.astype(x.dtype)
    keep = mask_tile
    if vis is not None:
        vis = vis.reshape(split)
        keep = vis if keep is None else keep & vis
    if keep is not None:
        x = jnp.where(keep, x, -jnp.inf)
    return x.reshape(shape)


def _add_tile(acc: Array, index: tuple, tile: Array) -> Array:
    """Sum ``tile`` over the axes that ``acc``'s tiles broadcast, then add it at ``index``."""
    target = acc.shape[len(index) :]
    axes = tuple(a for a, (n, m) in enumerate(zip(target, tile.shape)) if n == 1 and m > 1)
    tile = jnp.sum(tile, axis=axes, keepdims=True)
    index = tuple(i if d > 1 else 0 for i, d in zip(index, acc.shape))
    return acc.at[index].add(tile)


def _row_ids(z, i, g: int, p: _Plan) -> Array:
    """The dropout row numbers ``(b N + n) T + t`` (``attention_dropout_keep``) of query
    block i of pair ``z = b K + k``: ``[R]``, rows ordered ``[G, bq]`` (head n = k G + g,
    so b N + n = z G + g)."""
    heads = jnp.asarray(z).astype(jnp.uint32) * g + jnp.arange(g, dtype=jnp.uint32)
    times = jnp.asarray(i).astype(jnp.uint32) * p.bq + jnp.arange(p.bq, dtype=jnp.uint32)
    return (heads[:, None] * p.t + times[None, :]).reshape(-1)


def _dropout_multiplier(
    seed, rows, j, num_cols: int, p: _Plan, transposed: bool, dtype, scaled: bool = True
):
    """``1 / (1 - rate)`` in ``dtype`` on the kept entries of tile j's first ``num_cols``
    keys, 0 on the dropped ones: ``[R, C]`` (``[C, R]`` transposed); None without dropout.
    ``scaled=False``: 1 on the kept entries instead (the forward applies ``1 / (1 - rate)``
    to its float32 output, see ``_forward``)."""
    if seed is None:
        return None
    keep = attention_dropout_keep(
        seed,
        rows,
        j * p.bk,
        num_cols,
        p.dropout_rate,
        col_axis=0 if transposed else -1,
        even_start=p.bk % 2 == 0,
    )
    if not scaled:
        return keep.astype(dtype)
    return dropout_scale(keep, p.dropout_rate, dtype)


# ----------------------------------------------------------------------------------------
# Forward and backward kernels of one (batch, key/value head) pair, looped or vmapped over all
# ----------------------------------------------------------------------------------------


def _forward(q, k, v, mask, bias, seed, scale, p: _Plan) -> tuple[Array, tuple[Array, ...]]:
    """Online-softmax attention -> (out ``[B, T, N, Hv]`` float32, (m, log l)); float64
    throughout for float64 inputs (``float32_or_wider``).

    ``scale``: None (``p.scale``), or a traced 0-d float32 (float64) array that each logit
    tile is multiplied by (``p.scale_logits``).

    With dropout (``seed``, ``p.dropout_rate``) the normaliser ``l`` sums the probabilities
    before dropout and only the product with v sees the dropped ones, as in
    ``softmax(s) * keep / (1 - rate) @ v``.

    ``m`` (each row's logit max; 0 for a row that sees no key) and ``log l`` (its log
    normaliser; 0 for such a row) are float32 ``[B*K, nq, R]``. A traced ``scale`` adds
    a third: each row's mean unscaled logit ``sum(p q kᵀ)`` (0 for a row that sees no
    key), which ``_backward`` takes from the logits in its ``dscale``.
    """
    b, _, n, _ = q.shape
    kh, hv = k.shape[2], v.shape[3]
    g, rows = n // kh, (n // kh) * p.bq
    wide = float32_or_wider(q.dtype)  # softmax statistics and accumulators
    masks = None if mask is None else _pair_blocks(mask, kh, p, False, False)
    biases = None if bias is None else _pair_blocks(bias, kh, p, False, 0)

    diag_visible = _diagonal_visible(g, p.bq, False) if p.diagonal_edges else None
    traced = scale is not None
    scale = p.scale if scale is None else scale

    def update(s, raw, vj, drop, m, denom, acc, *mean):  # one online-softmax step, s [R, C]
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        # A row that has seen only -inf keeps m = -inf; subtracting 0 then gives 0.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        probs = jnp.exp(s - m_safe[:, None])  # [R, C]
        alpha = jnp.exp(m - m_safe)
        denom = denom * alpha + jnp.sum(probs, axis=-1)
        kept = probs if drop is None else probs * drop
        pv = jnp.dot(kept.astype(v.dtype), vj, preferred_element_type=wide)
        if not mean:
            return m_new, denom, acc * alpha[:, None] + pv
        # A traced scale's sum(p q kᵀ) (masked entries: p = 0, raw q kᵀ finite).
        mean = mean[0] * alpha + jnp.sum(probs * raw, axis=-1)
        return m_new, denom, acc * alpha[:, None] + pv, mean

    def logits(qi, kj):  # [R, H], [C, H] -> the scaled logits [R, C], float32, and unscaled
        s = jnp.einsum("rh,ch->rc", qi, kj, preferred_element_type=wide)
        return s * scale if p.scale_logits else s, s

    def head(z, carry, qz, kz, vz, mz, bz):  # carry: unused, passed through
        # qz [nq, R, H], kz [nk, C, H], vz [nk, C, Hv]; mz, bz: this pair's tiles or None
        if not p.scale_logits:
            qz = qz * jnp.asarray(p.scale, qz.dtype)

        def query_block(i):
            qi = qz[i]
            row_ids = None if seed is None else _row_ids(z, i, g, p)

            def step(j, carry, edge, band=False):
                s, raw = logits(qi, kz[j])
                tiles = _tile(mz, i, j), _tile(bz, i, j)
                diagonal = None if band else diag_visible  # a window's edge: _visible
                s = _mask_logits(s, i, j, edge, diagonal, *tiles, rows, g, p, False)
                drop = _dropout_multiplier(seed, row_ids, j, p.bk, p, False, wide, False)
                return update(s, raw, vz[j], drop, *carry)

            def diagonal_step(j, carry):
                # The top-right quarter is hidden: two products (_diagonal_halves).
                h = p.bq // 2
                tiles = _tile(mz, i, j), _tile(bz, i, j)
                halves = []
                for first, rows_in, keys in _diagonal_halves(h):
                    s, raw = logits(_half_rows(qi, g, first), kz[j][keys])
                    edge = _half_rows(diag_visible, g, first)[:, keys]
                    mask_tile, bias_tile = (_part_tile(t, rows_in, keys, False) for t in tiles)
                    s = _mask_diagonal(s, edge, mask_tile, bias_tile, g, False)
                    state = (_half_rows(x, g, first) for x in carry)
                    drop = None if seed is None else _half_rows(row_ids, g, first)
                    drop = _dropout_multiplier(seed, drop, j, s.shape[1], p, False, wide, False)
                    halves.append(update(s, raw, vz[j][keys], drop, *state))
                return tuple(_merge_halves(a, b, g) for a, b in zip(*halves))

            lo, a, b, end = _key_range(i, p)
            init = (
                jnp.full((rows,), -jnp.inf, wide),
                jnp.zeros((rows,), wide),
                jnp.zeros((rows, hv), wide),
            )
            carry = (*init, jnp.zeros((rows,), wide)) if traced else init
            if p.left is not None:
                carry = lax.fori_loop(lo, a, partial(step, edge=True, band=True), carry)
            carry = lax.fori_loop(a, b, partial(step, edge=False), carry)
            edge_step = diagonal_step if p.split_diagonal else partial(step, edge=True)
            m, denom, acc, *mean = lax.fori_loop(b, end, edge_step, carry)
            out = acc / jnp.where(denom > 0, denom, 1.0)[:, None]  # empty rows: 0 / 1
            if seed is not None:
                # 1 / (1 - rate) here, in float32, not on each kept p before it is rounded
                # to v's dtype: p keep / (1 - rate) rounded to bfloat16 is off by up to 2^-9
                # even where p = 1, and the backward's delta = rowsum(dout * out) then
                # disagreed with its exact rowsum(dp p), giving a one-key row nonzero dq, dk.
                out = out * jnp.asarray(1.0 / (1.0 - p.dropout_rate), wide)
            row_max = jnp.where(denom > 0, m, 0.0)
            # A row that sees no key: its logits are -inf in the backward too, so
            # exp(s - 0 - 0) = 0 there. (Not +inf: a residual that jax.debug_infs reported.)
            log_l = jnp.where(denom > 0, jnp.log(denom), 0.0)
            mean = [x / jnp.where(denom > 0, denom, 1.0) for x in mean]
            return out, row_max, log_l, *mean  # out in float32: the backward's delta reads it

        return carry, lax.map(query_block, jnp.arange(p.nq))  # [nq, R, Hv], 2 (3) x [nq, R]

    inputs = ((q, "q"), (k, "k"), (v, "k"))
    stat = ("z", (b * kh, p.nq, rows), wide)
    outputs = (("q", (b, p.t, n, hv), wide), stat, stat) + ((stat,) if traced else ())
    _, (out, *stats) = _each_head(head, inputs, (masks, biases), outputs, b, kh, p)
    return out, tuple(stats)


def _backward(q, k, v, mask, bias, seed, scale, out, stats, dout, p: _Plan):
    """Recompute probabilities tile by tile -> (dq, dk, dv, dbias or None, dscale or None).

    A traced ``scale`` (see ``_forward``) gets ``dscale = sum(ds * q kᵀ)`` over all tiles
    (``ds``: the gradient of the scaled logits), summed in float32 from each tile's float32
    ``ds`` as ``sum(ds * (q kᵀ - mean))``, ``mean`` each row's mean unscaled logit (the
    third of ``stats``): the same sum, since each row of ``ds`` sums to 0, but the error of
    ``delta`` (bfloat16 rounds p before the product with v) no longer multiplies the large
    logits. Where the sum cancels (bfloat16, H = 64..128, peaked rows) ``sum(ds q kᵀ)``
    came out 1-40% off, ``sum(q * ds k)`` (``ds`` rounded to bfloat16 too) 1-95% and the
    einsum path 0.02-0.7%; this sum, 1e-5 or better."""
    b, _, n, h = q.shape
    kh, hv = k.shape[2], v.shape[3]
    g, rows = n // kh, (n // kh) * p.bq
    wide = float32_or_wider(q.dtype)
    delta = jnp.sum(out.astype(wide) * dout.astype(wide), axis=-1, keepdims=True)  # [B, T, N, 1]
    delta = _q_blocks(delta, kh, p.bq)[..., 0]  # [Z, nq, R]
    masks = None if mask is None else _pair_blocks(mask, kh, p, True, False)
    biases = None if bias is None else _pair_blocks(bias, kh, p, True, 0)

    diag_visible = _diagonal_visible(g, p.bq, True) if p.diagonal_edges else None
    traced = scale is not None
    scale = p.scale if scale is None else scale

    def tile_grads(st, drop_t, ktj, vj, qi, doi, max_i, log_l_i, delta_i):
        """A transposed tile's logits [C, R] -> (dqᵀ [H, R], dk [C, H], dv [C, Hv], dsᵀ).

        With dropout (``drop_t``: 1 / (1 - rate) or 0 per entry) the forward multiplied v by
        the dropped probabilities, so dv and dp see the multiplier; ``delta`` = rowsum(dout
        out) is still rowsum(dp p) over the probabilities before dropout."""
        pt = jnp.exp(st - max_i[None, :] - log_l_i[None, :])  # [C, R]
        dpt = jnp.einsum("ch,rh->cr", vj, doi, preferred_element_type=wide)
        if drop_t is not None:
            dpt = dpt * drop_t
        dst = pt * (dpt - delta_i[None, :])  # d loss / d logits, transposed
        kept = pt if drop_t is None else pt * drop_t
        dv = jnp.dot(kept.astype(dout.dtype), doi, preferred_element_type=wide)
        ds_in = dst.astype(q.dtype)
        dk = jnp.dot(ds_in, qi, preferred_element_type=wide)
        dqt = jnp.dot(ktj, ds_in, preferred_element_type=wide)  # [H, R]
        return dqt, dk, dv, dst

    def logits_t(kj, qi):  # [C, H], [R, H] -> the scaled logits, transposed [C, R]
        st = jnp.einsum("ch,rh->cr", kj, qi, preferred_element_type=wide)
        return st * scale if p.scale_logits else st, st  # (and unscaled, for dscale)

    def add_dscale(dscale, dst, raw_t, mean_i):  # a traced scale's sum(ds (q kᵀ - mean))
        if dscale is None:  # a Python scale
            return None
        return dscale + jnp.sum(dst * (raw_t - mean_i[None, :]))  # masked entries: ds = 0

    def head(z, dbias, qz, doz, maxz, log_lz, deltaz, kz, vz, *rest):
        *meanz, mz, bz = rest  # meanz: [a traced scale's mean unscaled logits] or []
        meanz = meanz[0] if meanz else None
        if not p.scale_logits:
            qz = qz * jnp.asarray(p.scale, qz.dtype)  # so dk = dsᵀ (scale q) carries it
        ktz = jnp.swapaxes(kz, 1, 2)  # [nk, H, C]: dqᵀ = kᵀ dsᵀ is then a plain matmul

        def key_block(carry, j):
            kj, vj = kz[j], vz[j]

            def step(i, carry, edge, band=False):
                dqt, dk, dv, dbias, dscale = carry
                qi, doi = qz[i], doz[i]
                # Transposed tiles [C, R]: dk and dv then contract over the minor axis.
                st, raw_t = logits_t(kj, qi)
                tiles = _tile(mz, j, i), _tile(bz, j, i)
                diagonal = None if band else diag_visible  # a window's edge: _visible
                st = _mask_logits(st, i, j, edge, diagonal, *tiles, rows, g, p, True)
                stats_i = maxz[i], log_lz[i], deltaz[i]
                row_ids = None if seed is None else _row_ids(z, i, g, p)
                drop_t = _dropout_multiplier(seed, row_ids, j, p.bk, p, True, wide)
                dqt_i, dk_i, dv_i, dst = tile_grads(st, drop_t, ktz[j], vj, qi, doi, *stats_i)
                if dbias is not None:
                    dbias = _add_tile(dbias, (z // kh, z % kh, j, i), dst.reshape(-1, g, p.bq))
                dscale = add_dscale(dscale, dst, raw_t, None if meanz is None else meanz[i])
                return dqt.at[i].add(dqt_i), dk + dk_i, dv + dv_i, dbias, dscale

            def diagonal_step(i, carry):
                # As in the forward, two products over half the query rows each.
                dqt, dk, dv, dbias, dscale = carry
                c = p.bk // 2
                tiles = _tile(mz, j, i), _tile(bz, j, i)
                grads = []
                for first, rows_in, keys in _diagonal_halves(c):
                    half = partial(_half_rows, g=g, first=first)
                    qh = half(qz[i])
                    st, raw_t = logits_t(kj[keys], qh)
                    edge = _half_rows(diag_visible, g, first, axis=1)[keys]
                    mask_tile, bias_tile = (_part_tile(t, rows_in, keys, True) for t in tiles)
                    st = _mask_diagonal(st, edge, mask_tile, bias_tile, g, True)
                    row_ids = None if seed is None else half(_row_ids(z, i, g, p))
                    drop_t = _dropout_multiplier(seed, row_ids, j, st.shape[0], p, True, wide)
                    grads.append(
                        tile_grads(
                            st,
                            drop_t,
                            ktz[j][:, keys],
                            vj[keys],
                            qh,
                            half(doz[i]),
                            half(maxz[i]),
                            half(log_lz[i]),
                            half(deltaz[i]),
                        )
                    )
                    mean_i = None if meanz is None else half(meanz[i])
                    dscale = add_dscale(dscale, grads[-1][3], raw_t, mean_i)
                (dqt_a, dk_a, dv_a, dst_a), (dqt_b, dk_b, dv_b, dst_b) = grads
                if dbias is not None:  # the tile's dsᵀ, zero where both halves skipped
                    dst = _merge_halves(jnp.pad(dst_a, ((0, c), (0, 0))), dst_b, g, axis=1)
                    dbias = _add_tile(dbias, (z // kh, z % kh, j, i), dst.reshape(-1, g, p.bq))
                # Each half into its own rows of dqᵀ [nq, H, G bq] seen as [nq, H, G, 2, bq / 2]
                # (a merged tile would be transposed, and its products with it).
                halves = dqt.reshape(p.nq, h, g, 2, c)
                halves = halves.at[i, :, :, 0].add(dqt_a.reshape(h, g, c))
                dqt = halves.at[i, :, :, 1].add(dqt_b.reshape(h, g, c)).reshape(dqt.shape)
                dk, dv = (dk + dk_b).at[:c].add(dk_a), (dv + dv_b).at[:c].add(dv_a)
                return dqt, dk, dv, dbias, dscale

            dqt, dbias, dscale = carry
            start, a, b, end = _query_range(j, p)
            zeros = (jnp.zeros((p.bk, h), wide), jnp.zeros((p.bk, hv), wide))
            edge_step = diagonal_step if p.split_diagonal else partial(step, edge=True)
            carry = lax.fori_loop(start, a, edge_step, (dqt, *zeros, dbias, dscale))
            carry = lax.fori_loop(a, b, partial(step, edge=False), carry)
            if p.left is not None:
                carry = lax.fori_loop(b, end, partial(step, edge=True, band=True), carry)
            dqt, dk, dv, dbias, dscale = carry
            return (dqt, dbias, dscale), (dk, dv)

        dqt0 = jnp.zeros((p.nq, h, rows), wide)
        dscale0 = jnp.zeros((), wide) if traced else None  # this pair's share of dscale
        carry = (dqt0, dbias, dscale0)
        (dqt, dbias, dscale), (dk, dv) = lax.scan(key_block, carry, jnp.arange(p.nk))
        dk = dk * scale if p.scale_logits else dk
        dq = jnp.swapaxes(dqt, 1, 2) * scale
        return dbias, (dq, dk, dv) if dscale is None else (dq, dk, dv, dscale)

    row_max, log_l, *mean = stats
    inputs = ((q, "q"), (dout, "q"), (row_max, "z"), (log_l, "z"), (delta, "z"), (k, "k"), (v, "k"))
    inputs += tuple((x, "z") for x in mean)  # a traced scale's mean unscaled logits
    outputs = (("q", q.shape, q.dtype), ("k", k.shape, k.dtype), ("k", v.shape, v.dtype))
    if traced:
        outputs += (("z", (b * kh,), wide),)  # each pair's share of dscale
    # The bias gradient sums over heads that share bias tiles: a loop carries it.
    dbias0 = None if biases is None else jnp.zeros(biases.shape, wide)
    dbias, grads = _each_head(head, inputs, (masks, biases), outputs, b, kh, p, dbias0)
    if dbias is not None:
        dbias = _pair_unblock_t(dbias, bias.shape).astype(bias.dtype)
    dscale = jnp.sum(grads[3]) if traced else None
    return (*grads[:3], dbias, dscale)


@partial(jax.custom_vjp, nondiff_argnums=(7,))
def _flash(q, k, v, mask, bias, seed, scale, plan: _Plan) -> Array:
    """``scale``: None (``plan.scale``) or a traced 0-d float32 (float64) array, which gets
    a gradient like q, k, v and the bias."""
    return _forward(q, k, v, mask, bias, seed, scale, plan)[0].astype(q.dtype)


def _flash_fwd(q, k, v, mask, bias, seed, scale, plan):
    # The backward's delta = rowsum(dout * out) from the float32 output: from the output
    # rounded to bfloat16, its error swamps ds = p (dp - delta) where a row's attention is
    # peaked (dq and dk ~10x the einsum path's error). Costs 2 bytes more per element in
    # bfloat16 (the output only, O(T)); nothing in float32.
    out, stats = _forward(q, k, v, mask, bias, seed, scale, plan)
    return out.astype(q.dtype), (q, k, v, mask, bias, seed, scale, out, stats)


def _flash_bwd(plan, residuals, dout):
    q, k, v, mask, bias, seed, scale, out, stats = residuals
    dq, dk, dv, dbias, dscale = _backward(q, k, v, mask, bias, seed, scale, out, stats, dout, plan)
    return dq, dk, dv, None, dbias, None, dscale  # none for the boolean mask or the seed


_flash.defvjp(_flash_fwd, _flash_bwd)
# Run eagerly, the custom_vjp and its tile loops were traced and compiled anew on every call
# (about a second each).
_flash_eager = jit_when_eager(_flash, static_argnums=(7,))


# ----------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------


def _broadcast_rank4(where: str, name: str, x: Array, target: tuple[int, ...]) -> Array:
    """Left-pad ``x`` to rank 4 and check it broadcasts to ``target = (B, N, T, S)``."""
    if x.ndim > 4 or any(d not in (1, t) for d, t in zip(x.shape[::-1], target[::-1])):
        raise ValueError(
            f"{where}: {name} of shape {x.shape} does not broadcast to [B, N, T, S] = {target}"
        )
    return x.reshape((1,) * (4 - x.ndim) + x.shape)


def as_qkv(q: Any, k: Any, v: Any, where: str) -> tuple[Array, Array, Array]:
    """``(q, k, v)`` as JAX arrays, a None among them named (JAX's "None is not a valid
    value for jnp.array" named neither the function nor the argument)."""
    what = "an array [B, T|S, heads, head_dim]"
    return tuple(as_array(x, name, where, what=what) for name, x in (("q", q), ("k", k), ("v", v)))


def check_attention_inputs(
    where: str, q: Array, k: Array, v: Array, mask: Array | None, bias: Array | None
) -> tuple[Array | None, Array | None]:
    """Validate attention inputs; return ``(mask, bias)`` as rank-4 arrays (or None).

    Shared by every attention entry point, so each reports bad input the same way.

    Args:
      where: the public function's name, put in front of each message.
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]``; one float dtype,
        ``N % K == 0``, ``B, T, S, N, H, Hv > 0``.
      mask: boolean, broadcastable to ``[B, N, T, S]``.
      bias: float, broadcastable to ``[B, N, T, S]``.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"{where}: q [B, T, N, H], k, v [B, S, K, H] must be rank 4, got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    (b, t, n, h), (s, kh) = q.shape, k.shape[1:3]
    if k.shape[0] != b or k.shape[3] != h or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{where}: expected q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], "
            f"got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if kh == 0 or n % kh:
        raise ValueError(
            f"{where}: query heads N={n} must be a multiple of key/value heads K={kh} "
            f"(N % K == 0), got q {q.shape}, k {k.shape}"
        )
    if t == 0 or s == 0:
        raise ValueError(f"{where}: empty sequence: q {q.shape}, k {k.shape}")
    if n == 0 or h == 0:  # (h would divide the default scale 1/sqrt(H))
        raise ValueError(f"{where}: no query heads or an empty head dim: q {q.shape}, k {k.shape}")
    if b == 0 or v.shape[3] == 0:  # (the kernels' reshapes cannot infer a -1 next to a 0)
        raise ValueError(f"{where}: empty batch or value head dim: q {q.shape}, v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{where}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"{where}: q, k, v must be floating point, got {q.dtype}")
    target = (b, n, t, s)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise ValueError(f"{where}: mask must be boolean, got {mask.dtype}")
        mask = _broadcast_rank4(where, "mask", mask, target)
    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"{where}: bias must be float, got {bias.dtype}")
        bias = _broadcast_rank4(where, "bias", bias, target)
    return mask, bias


def check_attention_dropout(where: str, rate: float, rng: Array | None) -> Array | None:
    """Validate attention dropout; return its ``dropout_seed`` (None when ``rate`` is 0).

    Shared by every attention entry point: ``0 <= rate < 1`` and a key when ``rate > 0``.
    """
    check_dropout_rate(rate, f"{where}: dropout_rate")
    check_dropout_key(rng, rate > 0.0, f"{where}: dropout_rate={rate}", "a dropout_rng key")
    return dropout_seed(rng) if rate > 0.0 else None


def check_scale(scale: Any, where: str) -> None:
    """``scale``: None, or a real scalar (a number, a 0-d array, a tracer), finite when
    concrete. (An ``[S]`` array broadcast per key on the einsum path and failed on the
    blockwise one, so a call's fate hung on the sequence length.)"""
    if scale is None:
        return
    # np.ndim, np.shape: JAX's warn (DeprecationWarning) for a list.
    if isinstance(scale, (str, bytes, bool)) or np.ndim(scale) != 0:
        raise ValueError(
            f"{where}: scale must be a real scalar (a number or a 0-d array), got "
            f"{type(scale).__name__} of shape {np.shape(scale)}"
        )
    dtype = jnp.result_type(scale)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{where}: scale must be a real number, got dtype {dtype}")
    if not isinstance(scale, jax.core.Tracer) and not math.isfinite(float(scale)):
        raise ValueError(f"{where}: scale must be finite, got {float(scale)}")


def fold_traced_scale(q: Array, scale: Any) -> tuple[Array, float | None]:
    """``(q, scale)`` for a kernel that needs a Python-number scale (cuDNN's and Pallas',
    in ``jaxattn.ops.attention``; ``flash_attention`` takes a traced scale as it is).

    A traced scale (a learned temperature under ``jit`` or ``grad``) cannot be baked into
    such a kernel; it is multiplied into ``q`` here instead, where autodiff sees it, and
    the kernel runs with scale 1. Any other scale passes through unchanged. (In bfloat16
    the rounded product costs accuracy: the blockwise kernel's error against float64 went
    from 0.0017 to 0.0032 at H = 128.)

    The product is taken in float32 (float64 for float64 q) and then rounded once to q's
    dtype: in bfloat16 the scale itself would be rounded first (up to 0.4% off), and
    the scale's gradient, ``sum(dq * q)`` over every element, summed in bfloat16 (2% off
    at [2, 64, 4, 128]).
    """
    if isinstance(scale, jax.core.Tracer):
        wide = float32_or_wider(q.dtype)
        return (q.astype(wide) * scale.astype(wide)).astype(q.dtype), 1.0
    return q, scale


def default_batch_heads(has_bias: bool = False) -> bool:
    """The loop order for this backend: over heads on CPU, all heads batched on GPU/TPU.

    With a bias the backward loops over the heads in either order (heads that share bias
    tiles add into the same bias gradient), so the per-head order is kept there too.
    """
    return jax.default_backend() != "cpu" and not has_bias


def block_sizes(
    t: int,
    s: int,
    block_q: int | None = None,
    block_k: int | None = None,
    batch_heads: bool = False,
):
    """Return the ``(block_q, block_k)`` used for T queries and S keys.

    Defaults are ``DEFAULT_BLOCK`` (``ACCELERATOR_BLOCK`` with ``batch_heads``), shrunk to
    the sequence length rounded up to 8.
    """
    default = ACCELERATOR_BLOCK if batch_heads else DEFAULT_BLOCK
    bq = default if block_q is None else as_size(block_q, 1)
    bk = default if block_k is None else as_size(block_k, 1)
    if bq is None or bk is None:  # (tile shapes: a float or a tracer fails deep in lax)
        raise ValueError(
            f"flash_attention: block_q and block_k must be ints >= 1 (or None), got "
            f"{block_q!r}, {block_k!r}"
        )
    round8 = lambda x: -(-x // 8) * 8
    return min(bq, round8(t)), min(bk, round8(s))


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: Array | None = None,
    bias: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    batch_heads: bool | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
) -> Array:
    """Blockwise attention ``softmax(scale · q kᵀ + bias, mask) v`` in O(T) memory.

    The same function as ``dot_product_attention(..., implementation="xla")`` (Dao et al.,
    2022; Rabe & Staats, 2021), computed tile by tile with an online softmax; the gradient
    recomputes the tiles. Softmax statistics and accumulators are float32 (float64 for
    float64 inputs); the matmuls run in the inputs' dtype. q is scaled in its dtype when
    that is exact (float32, or a power-of-two scale such as H = 64's 1/8), else each
    float32 logit tile is.

    Args:
      q: ``[B, T, N, H]`` queries.
      k: ``[B, S, K, H]`` keys, ``N % K == 0``; query head n reads key head ``n // (N // K)``.
      v: ``[B, S, K, Hv]`` values (same dtype as q and k).
      mask: boolean, broadcastable to ``[B, N, T, S]``; True = attend. Cut into tiles, so a
        ``[B, 1, 1, S]`` padding mask costs O(B S).
      bias: float, broadcastable to ``[B, N, T, S]``, added to the scaled logits
        (differentiable).
      is_causal: also hide key ``s > t + S - T`` (queries are the last T key positions);
        tiles above the diagonal are skipped.
      scale: logit scale, default ``1/sqrt(H)``. A traced value (e.g. a learned
        temperature) enters the kernel as a float32 array that multiplies each float32
        logit tile (as accurate as a Python number in bfloat16) and gets a gradient.
      block_q: query rows per tile (default ``DEFAULT_BLOCK``, or ``ACCELERATOR_BLOCK``
        with ``batch_heads``).
      block_k: keys per tile (same default).
      batch_heads: run all (batch, kv-head) pairs in each tile step (``vmap``) instead of
        one pair at a time. None: True off CPU when there is no bias
        (``default_batch_heads``). The same function either way (to rounding, where the
        default block sizes above differ); with a bias the backward still loops over the
        pairs, on this layout's tiles.
      dropout_rate: dropout on the attention probabilities (after the softmax; the
        normaliser counts every key). Each tile's mask is hashed from the entries'
        positions (``jaxattn.ops.masks.attention_dropout_keep``) and rebuilt in the
        backward, so no ``[T, S]`` mask is stored; for one key it drops the same entries
        as the einsum path, at any block size and in either loop order.
      dropout_rng: PRNG key, required when ``dropout_rate > 0``.
      local_window_size: ``(left, right)`` or one int for both: query t (key position
        ``t + S - T``) also hides keys more than ``left`` before it or ``right`` after it
        (``jaxattn.ops.masks.local_window_mask``; with ``is_causal`` only ``left``
        counts). Tiles outside the window are skipped, so a causal window of W keys costs
        O(T W), not O(T S).

    Returns:
      ``[B, T, N, Hv]`` in q's dtype; rows with nothing to attend to are 0.

    Differentiable in reverse mode (``jax.grad``, ``jax.vjp``): the gradient is a
    ``jax.custom_vjp``, so ``jax.jvp`` of the attention itself needs the einsum path
    (``dot_product_attention(..., implementation="xla")``). Forward-over-reverse second
    derivatives (``jax.jvp`` of ``jax.grad``, ``jax.hessian``) work; reverse-over-reverse
    (``jax.grad`` of ``jax.grad``) does not, since the backward's tile loops have traced
    bounds (each key block's first and last query tile, causal or not) and JAX
    differentiates such loops only forward: JAX then raises "Reverse-mode differentiation
    does not work for lax.while_loop or lax.fori_loop with dynamic start/stop values".
    """
    q, k, v = as_qkv(q, k, v, "flash_attention")
    mask, bias = check_attention_inputs("flash_attention", q, k, v, mask, bias)
    seed = check_attention_dropout("flash_attention", dropout_rate, dropout_rng)
    check_scale(scale, "flash_attention")
    is_causal = check_flag(is_causal, "is_causal", "flash_attention")
    if batch_heads is not None:
        batch_heads = check_flag(batch_heads, "batch_heads", "flash_attention")
    window = check_local_window(local_window_size, "flash_attention")
    t, s, h = q.shape[1], k.shape[1], q.shape[3]
    left = right = None
    if window is not None:  # a side that hides nothing is dropped: the plain plan's tiles
        left = window[0] if window[0] < s - 1 else None
        right = window[1] if window[1] < t - 1 and not is_causal else None
    if batch_heads is None:
        batch_heads = default_batch_heads(bias is not None)
    bq, bk = block_sizes(t, s, block_q, block_k, batch_heads)
    rate = float(dropout_rate) if seed is not None else 0.0
    traced_scale = None
    if isinstance(scale, jax.core.Tracer):  # an operand of the kernel, not part of the plan
        traced_scale = jnp.asarray(scale).astype(float32_or_wider(q.dtype))
        scale, scale_logits = 1.0, True
    else:
        scale = 1.0 / math.sqrt(h) if scale is None else float(scale)
        # frexp's mantissa is +-0.5 exactly for a power of two (scaling by one is then exact).
        scale_logits = q.dtype.itemsize < 4 and abs(math.frexp(scale)[0]) != 0.5
    plan = _Plan(
        t, s, bq, bk, bool(is_causal), scale, bool(batch_heads), rate, left, right, scale_logits
    )
    with forward_mode_hint(
        "flash_attention (dot_product_attention's 'blockwise' kernel)",
        "use dot_product_attention(..., implementation='xla'); jax.jvp of jax.grad "
        "(jax.hessian) does work",
    ):
        return _flash_eager(q, k, v, mask, bias, seed, traced_scale, plan)
