"""Character-level text data: tokenizer, train/val split, and a deterministic grain pipeline.

Shape glossary: B batch, T sequence length (the model's block size).

The pipeline follows nanoGPT's ``get_batch``: each batch holds B windows of T + 1
consecutive tokens at uniformly random offsets; ``inputs`` are the first T tokens of each
window and ``targets`` the last T (the same window shifted by one). It is a grain
``MapDataset`` over an unbounded range of batch indices, and batch ``i`` draws its
offsets from a generator seeded by ``(seed, i)``. So the batch sequence is a pure function
of the seed, and the iterator state saved in a checkpoint is just the next index: a
resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import importlib.resources
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import grain
import numpy as np

from jaxattn.ops._checks import check_size, is_real_scalar
from jaxattn.ops.layers import check_token_ids

DEFAULT_TEXT = "tinyshakespeare.txt"


def default_text_path(name: str = DEFAULT_TEXT) -> Path:
    """Return the path of a text file shipped in ``jaxattn/data`` (tinyshakespeare)."""
    path = importlib.resources.files("jaxattn").joinpath("data", name)
    return Path(str(path))


def load_text(path: str | os.PathLike | None = None) -> str:
    """Read a UTF-8 text file (``~`` expanded, a leading byte-order mark dropped, ``\r\n``
    read as ``\n``); ``None`` or ``""`` means the bundled tinyshakespeare.

    Raises:
      FileNotFoundError: naming the path when it does not exist (or is a folder).
      ValueError: naming the path when it is empty or not UTF-8.
    """
    # (~ expanded: the shell leaves it in --config.data_path=~/x.txt, not at a word's start)
    path = default_text_path() if not path else Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"text data file {what}: {str(path)!r}")
    try:
        # utf-8-sig: a byte-order mark (editors saving "UTF-8 with BOM") is not a character
        # of the text; kept, it became a vocabulary entry and the first training token.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        # The decoder counts from after a byte-order mark; the message, from the file's start.
        offset = e.start + path.stat().st_size - len(e.object)
        raise ValueError(
            f"text data file {str(path)!r} is not UTF-8: byte {e.object[e.start]:#04x} at "
            f"offset {offset}"
        ) from e
    if not text:
        raise ValueError(f"text data file {str(path)!r} is empty")
    return text


class CharTokenizer:
    """Map each distinct character to an id: the vocabulary is the sorted distinct characters.

    Example::

        tok = CharTokenizer.from_text("hello")   # vocab "ehlo"
        tok.encode("hole")                       # array([1, 3, 2, 0], dtype=int32)
        tok.decode([1, 3, 2, 0])                 # "hole"
    """

    def __init__(self, chars: str | Sequence[str]):
        # Bytes (a file read in binary mode) iterate as ints: they failed as "object of type
        # 'int' has no len()", an int as "'int' object is not iterable".
        if isinstance(chars, (bytes, bytearray)) or not isinstance(chars, Iterable):
            raise TypeError(
                f"CharTokenizer: chars must be a str (or a sequence of 1-character strs), got "
                f"a {type(chars).__name__}"
                + (" (decode it first)" if isinstance(chars, bytes) else "")
            )
        # (a str's items are characters: a whole corpus skips the per-item check)
        items = chars if isinstance(chars, str) else list(chars)
        if not items or (
            not isinstance(chars, str) and any(not isinstance(c, str) or len(c) != 1 for c in items)
        ):
            raise ValueError(
                f"CharTokenizer: vocabulary must be non-empty single characters, got {items!r:.200}"
            )
        vocab = sorted(set(items))
        self.chars: str = "".join(vocab)
        # Code points, sorted, so encoding is one vectorised searchsorted.
        self._codes = np.array([ord(c) for c in vocab], dtype=np.int64)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Build the vocabulary of ``text``."""
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Return the ids of ``text`` as int32 ``[len(text)]``.

        Raises:
          ValueError: naming the first character not in the vocabulary and its position.
        """
        if not isinstance(text, str):  # (bytes failed as "'bytes' object has no attribute")
            raise TypeError(
                f"CharTokenizer.encode: text must be a str, got a {type(text).__name__}"
            )
        # surrogatepass: a lone surrogate (text read with errors="surrogateescape") is one
        # character the constructor accepts, so encode must take it too.
        raw = text.encode("utf-32-le", "surrogatepass")
        codes = np.frombuffer(raw, dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codes, codes)
        known = self._codes[np.minimum(ids, len(self._codes) - 1)] == codes
        if not known.all():
            pos = int(np.argmin(known))
            raise ValueError(
                f"character {text[pos]!r} at position {pos} is not in the vocabulary "
                f"of {self.vocab_size} characters"
            )
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Return the text of 1-D ``ids``.

        Raises:
          ValueError: naming the first id outside ``[0, vocab_size)``.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"CharTokenizer.decode: ids must be 1-D, got shape {ids.shape}")
        if ids.size == 0:
            return ""  # (np.asarray([]) is float64, which the id check would refuse)
        # (the check's own "token ids must lie in [0, 65)" named no function)
        check_token_ids(ids, self.vocab_size, "CharTokenizer.decode: token ids")
        return "".join(self.chars[i] for i in ids.tolist())


def train_val_split(ids: np.ndarray, train_fraction: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """Split a token stream: the first ``int(n * train_fraction)`` tokens train, the rest val."""
    # (None, or a string from a config, failed as "'<' not supported between instances")
    if not (is_real_scalar(train_fraction) and 0.0 < train_fraction < 1.0):
        raise ValueError(
            f"train_val_split: train_fraction must be a number in (0, 1), got {train_fraction!r}"
        )
    n = int(len(ids) * train_fraction)
    return ids[:n], ids[n:]


def check_process_rows(process_rows: slice | None, batch_size: int, where: str) -> slice:
    """Return ``process_rows`` (None: every row) as the slice of a batch's rows it is;
    ``ValueError`` naming ``where`` unless it is a slice that selects at least one row of a
    batch of ``batch_size`` (one check for both pipelines)."""
    rows = slice(None) if process_rows is None else process_rows
    try:  # (an int failed as "object of type 'int' has no len()", naming nothing)
        count = len(range(batch_size)[rows]) if isinstance(rows, slice) else None
    except (TypeError, ValueError):  # a slice of floats or strings, or a step of 0
        count = None
    if count is None:
        raise ValueError(
            f"{where}: process_rows must be a slice of a batch's rows (from "
            f"sharding.process_batch_slice) or None, got {process_rows!r}"
        )
    if count == 0:
        raise ValueError(f"{where}: process_rows {rows} selects no row of a batch of {batch_size}")
    return rows


class _RandomWindows(grain.transforms.RandomMap):
    """Map a batch index to B random windows of T + 1 tokens (nanoGPT's get_batch)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, rows: slice):
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rows = rows

    def random_map(self, element: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        del element  # The generator is already seeded by (seed, index).
        # Offsets in [0, n - T): the window [o, o + T] (T + 1 tokens) always fits.
        offsets = rng.integers(0, len(self.tokens) - self.seq_len, size=self.batch_size)
        offsets = offsets[self.rows]  # This process's rows of the global batch.
        windows = self.tokens[offsets[:, None] + np.arange(self.seq_len + 1)]  # [B, T + 1]
        return {"inputs": windows[:, :-1], "targets": windows[:, 1:]}


def lm_dataset(
    tokens: np.ndarray,
    *,
    batch_size: int,
    seq_len: int,
    seed: int,
    vocab_size: int,
    process_rows: slice | None = None,
    name: str = "token stream",
) -> grain.MapDataset:
    """Return an unbounded grain dataset of random-window LM batches.

    Args:
      tokens: 1-D integer token stream ``[n]`` with ``n > seq_len``.
      batch_size: B, windows per batch.
      seq_len: T, tokens per window (the model's block size).
      seed: integer >= 0; the batch sequence is a pure function of it.
      vocab_size: every id must lie in ``[0, vocab_size)``.
      process_rows: on a multi-process run, the rows of each global batch this process
        loads (``sharding.process_batch_slice``). Every process draws the same B offsets,
        so the global batch is the same for any number of processes.
      name: what ``tokens`` are, for error messages (e.g. "validation split").

    Returns:
      A ``grain.MapDataset`` whose element ``i`` is
      ``{"inputs": [B, T] int32, "targets": [B, T] int32}``, ``targets[:, t] ==
      inputs[:, t + 1]`` for ``t < T - 1``.

    Raises:
      ValueError: bad shapes, a negative seed, a stream too short for one window, an id
        out of range, or a ``process_rows`` that is not a slice selecting some row.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:  # (named neither the function nor the data)
        raise ValueError(f"lm_dataset: the {name}'s tokens must be 1-D, got shape {tokens.shape}")
    # The checked ints from here on: a 0-d NumPy or JAX integer passes the check, but
    # grain's generator and NumPy's shapes would refuse it at the first batch.
    batch_size = check_size(batch_size, "batch_size", name)
    seq_len = check_size(seq_len, "seq_len", name)
    seed = check_size(seed, "seed", name, minimum=0)
    # (None failed with a TypeError from a comparison; True and 7.0 passed as sizes)
    vocab_size = check_size(vocab_size, "vocab_size", name)
    if len(tokens) <= seq_len:
        raise ValueError(
            f"the {name} holds {len(tokens)} tokens, too short for one window of "
            f"seq_len + 1 = {seq_len + 1} tokens"
        )
    check_token_ids(tokens, vocab_size, f"{name}: token ids")
    rows = check_process_rows(process_rows, batch_size, name)
    tokens = tokens.astype(np.int32)
    ds = grain.MapDataset.range(sys.maxsize)  # Unbounded: an index per batch.
    return ds.random_map(_RandomWindows(tokens, batch_size, seq_len, rows), seed=seed)


def batch_iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
    """Return a checkpointable iterator over ``dataset``, read in the calling thread.

    The data are in memory and a batch costs microseconds, so grain's reader threads would
    only compete with XLA for the CPU cores (grain recommends ``num_threads=0`` then).
    """
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(dataset.to_iter_dataset(options))
