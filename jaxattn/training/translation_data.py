"""Sentence-pair data for translation: corpus, split, sentencepiece, bucketed grain batches.

Shape glossary: B batch, S source time, T target time (both padded to a bucket length L).

Pipeline: ``load_pairs`` reads ``English<TAB>Spanish`` lines (the bundled Tatoeba corpus by
default); ``split_pairs`` shuffles the *distinct source sentences* with a fixed seed and
cuts them into train/val/test, so every translation of one English sentence lands in the
same split (Tatoeba often has several) and the test sources are never seen in training;
``train_sentencepiece`` fits one joint English+Spanish unigram model on the train split
only, with ``pad=0, bos=1, eos=2, unk=3`` (the models' ids), cached in the workdir;
``encode_pairs`` turns pairs into id arrays; ``translation_dataset`` yields batches::

    src [B, L] int32, src_lengths [B] int32,
    tgt_in [B, L] (BOS y_1 .. y_n), tgt_out [B, L] (y_1 .. y_n EOS), tgt_mask [B, L] bool

Every batch holds examples of one length bucket (the smallest ``L`` in ``buckets`` that
fits both the source and ``n + 1``), so jit compiles one shape per bucket. Epoch ``e``'s
batch order is a pure function of ``(seed, e)``: a grain ``MapDataset`` over an unbounded
range of batch indices maps index ``i`` to batch ``i % n`` of epoch ``i // n``. The
iterator state in a checkpoint is that index, so a resumed run sees the same batches.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import grain
import numpy as np

from jaxattn.ops._checks import as_size, check_size, is_real_scalar
from jaxattn.ops.layers import check_token_ids
from jaxattn.training.data import check_process_rows

DEFAULT_CORPUS = "spa-eng.txt.gz"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
# Never inside a target (make_batch adds BOS and EOS); the lowest three ids.
_SPECIAL_IDS = (PAD_ID, BOS_ID, EOS_ID)


class Split(NamedTuple):
    """Train/val/test lists of ``(source, target)`` sentence pairs."""

    train: list[tuple[str, str]]
    val: list[tuple[str, str]]
    test: list[tuple[str, str]]


def default_corpus_path() -> Path:
    """Return the path of the bundled English–Spanish corpus (``jaxattn/data``)."""
    return Path(str(importlib.resources.files("jaxattn").joinpath("data", DEFAULT_CORPUS)))


def load_pairs(path: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """Read ``source<TAB>target`` lines (``.gz`` or plain UTF-8); ``None``/``""``: bundled.

    Raises:
      FileNotFoundError: naming the path (not found, or a folder); ValueError: naming a line
        without exactly one tab, or the path of a file that is empty or not (gzipped) UTF-8
        text.
    """
    path = default_corpus_path() if not path else Path(path).expanduser()  # (as load_text)
    if not path.is_file():  # (a folder was "not found"; named as a folder, as in load_text)
        what = "is a folder, not a file" if path.is_dir() else "not found"
        raise FileNotFoundError(f"translation corpus {what}: {str(path)!r}")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # utf-8-sig: a byte-order mark (editors saving "UTF-8 with BOM") is not part of the
        # first source sentence. Universal newlines: \r\n -> \n.
        with opener(path, "rt", encoding="utf-8-sig") as f:
            # Not splitlines(): it also breaks at U+2028, form feeds and the like inside a line.
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:  # Not gzip, truncated, not UTF-8.
        raise ValueError(f"{path}: cannot read the corpus as UTF-8 text ({e})") from e
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line
    pairs = []
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
            raise ValueError(f"{path}:{number}: expected 'source<TAB>target', got {line!r}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    if not pairs:  # (as load_text: an empty file passed, to fail later naming no file)
        raise ValueError(f"translation corpus {str(path)!r} is empty")
    return pairs


SPLIT_FRACTIONS = (0.9, 0.05)  # split_pairs' default (train, val); test takes the rest


def split_pairs(
    pairs: Sequence[tuple[str, str]], *, seed: int, fractions: tuple[float, float] = SPLIT_FRACTIONS
) -> Split:
    """Split by distinct source sentence: shuffle the sources with ``seed``, cut by fraction.

    ``fractions`` are (train, val) of the distinct sources; test takes the rest. Pairs keep
    their corpus order inside each split.
    """
    # None (or True, 1.5) reached NumPy's generator: None drew a new split on every call.
    seed = check_size(seed, "seed", "split_pairs", minimum=0)
    # (three fractions failed as "too many values to unpack", a None or "0.1" from a config
    # as "'<' not supported", and neither message named split_pairs or fractions)
    given = fractions
    fractions = tuple(fractions) if isinstance(fractions, Iterable) else ()
    if not (len(fractions) == 2 and all(map(is_real_scalar, fractions))):
        fractions = (math.nan, math.nan)  # (refused below)
    train_f, val_f = (float(f) for f in fractions)
    if not (0 < train_f and 0 < val_f and train_f + val_f < 1):
        raise ValueError(
            "split_pairs: fractions must be two numbers (train, val), positive with a sum "
            f"below 1, got {given!r}"
        )
    sources = sorted({s for s, _ in pairs})  # Sorted: independent of the corpus order.
    order = np.random.default_rng(seed).permutation(len(sources))
    n_train, n_val = int(len(sources) * train_f), int(len(sources) * val_f)
    which = np.empty(len(sources), np.int8)
    which[order[:n_train]], which[order[n_train : n_train + n_val]] = 0, 1
    which[order[n_train + n_val :]] = 2
    index = dict(zip(sources, which.tolist()))
    out: tuple[list, list, list] = ([], [], [])
    for pair in pairs:
        out[index[pair[0]]].append(tuple(pair))
    return Split(*out)


def sample(items: Sequence, n: int, *, seed: int) -> list:
    """``n`` of ``items`` drawn at random with ``seed``, kept in their order; all of them
    when ``n`` is 0 or at least ``len(items)``. Nested: with one seed, a smaller ``n``
    draws a subset of a larger one's (the first ``n`` of one permutation).

    Subsets of the validation and test splits are drawn this way, not cut as a prefix:
    the bundled Tatoeba file is sorted by length, so the first N pairs of a split are its
    N shortest (the first 2,000 of 5,994 validation pairs have at most 7 English words;
    the split's longest has 25).
    """
    n = check_size(n, "n", "sample", minimum=0)  # (-k as a slice end drops the last k)
    seed = check_size(seed, "seed", "sample", minimum=0)  # (None: a new draw every call)
    if not n or n >= len(items):
        return list(items)
    keep = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in keep.tolist()]


def _another_live_process(pid_and_rest: str) -> bool:
    """Whether ``"<pid>.partial..."`` names a process other than this one that is running
    (on this host): its partial files are its own training, started seconds before."""
    pid = pid_and_rest.split(".", 1)[0]
    # (0 would ask about this process's group; a pid too large for C's int is no process)
    if not pid.isdigit() or int(pid) in (0, os.getpid()) or int(pid) >= 2**31:
        return False
    try:
        os.kill(int(pid), 0)  # (signal 0: only asks whether it exists)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: running
        return True
    return True


def train_sentencepiece(
    sentences: Iterable[str] | None, model_prefix: str | os.PathLike, *, vocab_size: int
):
    """Train (or load, when ``<model_prefix>.model`` exists) a unigram sentencepiece model.

    Training also writes ``<model_prefix>.json``: the ``vocab_size`` asked for and
    ``sentences_sha256``, the SHA-256 of the training sentences (in order, joined by
    ``"\\n"``), which a later load checks. The hash is checked only when ``sentences`` are
    given (a load with none, as a restore-only run does, takes the cached model as it is)
    and the json records one (a model cached before it did is not checked). ``sentences``
    may be any iterable of str (a generator too: it is read once, into a list) or None.

    The ids are ``pad=0, bos=1, eos=2, unk=3``. ``vocab_size`` is an upper bound on a
    small corpus (``hard_vocab_limit=False``).

    Returns:
      A ``sentencepiece.SentencePieceProcessor``.

    Raises:
      ValueError: ``vocab_size`` is not an int >= 1, ``sentences`` is a str, the cached model
        is unreadable, was trained with another ``vocab_size`` or on other sentences, or
        sentencepiece could not train one (e.g. ``vocab_size`` below the number of distinct
        characters).
    """
    import sentencepiece as spm  # The train extra; only the translation data needs it.

    # A string "64" (a config value) trained and recorded "64", and the next run's 64 was
    # then refused as "trained with vocab_size=64, not 64"; np.int64(64) trained, then
    # failed writing the record; None and 64.0 failed in sentencepiece, naming neither.
    vocab_size = check_size(vocab_size, "vocab_size", "train_sentencepiece")
    if isinstance(sentences, str):  # (its characters would be the sentences)
        raise ValueError(
            f"train_sentencepiece: sentences must be a sequence of str, got a str {sentences!r:.80}"
        )
    # A list: a generator was used up by the training, and the record then held the hash of
    # no sentences, so the next run with the same sentences was refused as "other sentences".
    sentences = [] if sentences is None else list(sentences)

    model_file = Path(f"{model_prefix}.model")
    trained_with = Path(f"{model_prefix}.json")  # the settings the cached model was trained with
    if not model_file.is_file():
        if not sentences:
            raise ValueError("train_sentencepiece: no sentences to train on")
        model_file.parent.mkdir(parents=True, exist_ok=True)
        # Trained under a temporary name, then renamed settings first and model last: a run
        # killed while sentencepiece wrote the model left a cut-off one that every later
        # run refused until it was deleted by hand. (A model without its settings file
        # would be taken as one cached before that file existed, checked less.)
        for leftover in model_file.parent.glob(f".{model_file.stem}.*.partial.*"):
            if not _another_live_process(leftover.name[len(model_file.stem) + 2 :]):
                leftover.unlink(missing_ok=True)  # a killed run's (not one still training)
        staging = model_file.with_name(f".{model_file.stem}.{os.getpid()}.partial")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_prefix=str(staging),
                vocab_size=vocab_size,
                model_type="unigram",
                character_coverage=1.0,
                pad_id=PAD_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                hard_vocab_limit=False,
                num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:  # e.g. a vocab_size below the corpus's character count
            for leftover in model_file.parent.glob(f"{staging.name}.*"):
                leftover.unlink()
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"train_sentencepiece: sentencepiece could not train a vocabulary of "
                f"vocab_size={vocab_size}: {reason}"
            ) from None
        record = {"vocab_size": vocab_size, "sentences_sha256": sentences_sha256(sentences)}
        Path(f"{staging}.json").write_text(json.dumps(record), encoding="utf-8")
        for suffix in (".json", ".vocab", ".model"):  # (os.replace: atomic on one filesystem)
            os.replace(f"{staging}{suffix}", f"{model_prefix}{suffix}")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except RuntimeError as e:  # (a cut-off or overwritten file: a traceback of its parser)
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"train_sentencepiece: {model_file} is not a sentencepiece model ({reason}); "
            "restore it, or delete it (and any checkpoints trained with it) to train anew"
        ) from None
    # A model cached by a run with another vocab_size would otherwise be reused silently.
    # The model itself records only the size reached (below vocab_size on a small corpus).
    record = {}
    if trained_with.is_file():
        try:  # (a run killed while writing it leaves it empty)
            record = json.loads(trained_with.read_text(encoding="utf-8"))
            asked = record["vocab_size"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{trained_with}, the settings {model_file} was trained with, is unreadable "
                f"({type(e).__name__}: {e}): use another workdir, or delete both (and any "
                "checkpoints trained with them) to train a new one"
            ) from None
    else:  # Cached before the settings file existed: only a larger model is surely stale.
        asked = sp.get_piece_size() if sp.get_piece_size() > vocab_size else vocab_size
    if asked != vocab_size:
        raise ValueError(
            f"{model_file} was trained with vocab_size={asked}, not {vocab_size}: use "
            "another workdir, or delete it (and any checkpoints trained with it) to train a "
            "new one"
        )
    # Likewise a model trained on other sentences (another corpus, split or example count).
    if sentences and "sentences_sha256" in record:
        if record["sentences_sha256"] != sentences_sha256(sentences):
            raise ValueError(
                f"{model_file} was trained on other sentences than these {len(sentences):,} "
                "(the training data changed: data_path, split_seed or max_train_examples): "
                f"use another workdir, or delete {model_file} (and any checkpoints trained "
                "with it) to train a new one"
            )
    return sp


def sentences_sha256(sentences: Sequence[str]) -> str:
    """Hex SHA-256 of ``sentences`` in order, joined by ``"\\n"`` (UTF-8)."""
    return hashlib.sha256("\n".join(sentences).encode("utf-8")).hexdigest()


def unknown_pieces(sp, sentence: str) -> list[str]:
    """The pieces of ``sentence`` that ``sp`` encodes as ``<unk>`` (``UNK_ID``), each once,
    in order (as sentencepiece normalised them, without the word-boundary mark)."""
    ids, pieces = sp.encode(sentence), sp.encode(sentence, out_type=str)
    unknown = [p.lstrip("\u2581") for i, p in zip(ids, pieces) if i == UNK_ID]
    return list(dict.fromkeys(p for p in unknown if p))


def encode_pairs(
    sp, pairs: Sequence[tuple[str, str]], *, max_len: int | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Encode pairs to id arrays (no BOS/EOS); drop pairs with ``len(src)`` or
    ``len(tgt) + 1`` above ``max_len`` (None: keep every length), and empty ones."""
    if max_len is not None:
        max_len = check_size(max_len, "max_len", "encode_pairs")  # (0 would keep every pair)
    src = sp.encode([s for s, _ in pairs])
    tgt = sp.encode([t for _, t in pairs])
    keep_src, keep_tgt = [], []
    for s, t in zip(src, tgt):
        if not s or not t or (max_len is not None and pair_length(s, t) > max_len):
            continue
        keep_src.append(np.asarray(s, np.int32))
        keep_tgt.append(np.asarray(t, np.int32))
    return keep_src, keep_tgt


def check_buckets(buckets: Sequence[int], where: str, name: str = "buckets") -> tuple[int, ...]:
    """Return ``buckets`` as a tuple of ints; ``ValueError`` unless they are increasing
    integers >= 1 (one check for the pipeline and the script's early config check)."""
    # (None or one length failed as "TypeError: 'NoneType' object is not iterable", naming
    # neither the setting nor the function; a string's characters as "lengths")
    if isinstance(buckets, (str, bytes)) or not isinstance(buckets, Iterable):
        raise ValueError(
            f"{where}: {name} must be increasing lengths >= 1 (a sequence, e.g. (16, 32)), "
            f"got {buckets!r}"
        )
    buckets = tuple(buckets)
    if (
        not buckets
        or any(as_size(b, minimum=1) is None for b in buckets)
        or list(buckets) != sorted(set(buckets))
    ):
        raise ValueError(f"{where}: {name} must be increasing lengths >= 1, got {buckets}")
    return tuple(int(b) for b in buckets)


def pair_length(src: Sequence[int], tgt: Sequence[int]) -> int:
    """Positions a pair is padded to at least: its source, or its target and one more
    (``tgt_in`` is BOS y_1 .. y_n, ``tgt_out`` y_1 .. y_n EOS), whichever is longer."""
    return max(len(src), len(tgt) + 1)


def bucket_of(length: int, buckets: Sequence[int]) -> int:
    """Index of the smallest bucket length ``>= length``; ValueError if none fits."""
    i = int(np.searchsorted(np.asarray(buckets), length))
    if i == len(buckets):
        raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")
    return i


# The largest id an int32 batch holds, and the integer types that hold no larger one.
_MAX_ID = np.iinfo(np.int32).max
_INT32_SAFE = frozenset(map(np.dtype, (np.int32, np.int16, np.int8, np.uint16, np.uint8)))


def _as_ids(ids, what: str, where: str = "make_batch") -> np.ndarray:
    """``ids`` as a NumPy array, checked before the int32 batch's assignment casts it: a float
    3.5 would become 3, ``True`` 1, the string "5" 5, and an int64 ``2**32 + 5`` wrap to 5.
    (Negative ids are refused afterwards, on the whole batch at once.)"""
    ids = np.asarray(ids)
    if ids.ndim != 1:  # (NumPy's "could not broadcast" named neither the function nor the row)
        raise ValueError(f"{where}: {what} token ids must be 1-D, got shape {ids.shape}")
    if ids.dtype in _INT32_SAFE:  # encode_pairs' int32 rows: one set lookup per row
        return ids
    if ids.dtype.kind not in "iu" and ids.size:  # (an empty list is float64: no id to cast)
        raise ValueError(f"{where}: {what} token ids must be integers, got dtype {ids.dtype}")
    # The other integer types (int64: NumPy's default, a list's) are scanned per row.
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi > _MAX_ID:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{where}: {what} token ids must be in [0, 2**31), got {bad}")
    return ids


def _check_not_negative(ids: np.ndarray, what: str) -> None:
    """Raise naming the first row of the int32 ``ids [B, L]`` with a negative id."""
    if ids.size and ids.min() < 0:  # one pass over the batch, not one per row
        i = int(np.argmax((ids < 0).any(axis=1)))
        raise ValueError(
            f"make_batch: {what} {i} token ids must be in [0, 2**31), got {ids[i].min()}"
        )


def make_batch(
    src: Sequence[np.ndarray], tgt: Sequence[np.ndarray] | None, length: int
) -> dict[str, np.ndarray]:
    """Pad a list of examples to ``[B, length]`` (see the module docstring for the keys).

    With ``tgt=None`` only ``src`` and ``src_lengths`` are returned (for decoding).

    Raises:
      ValueError: a ``length`` that is not an int >= 1, mismatched lists, an example that
        is not 1-D or is longer than ``length``, or ids that are not integers >= 0 (a
        float, a bool or a string, which the int32 batch would cast). The vocabulary bound
        is ``translation_dataset``'s and the models' check.
    """
    # (a float 8.0 failed in NumPy as "'float' object cannot be interpreted as an integer",
    # a negative one as "negative dimensions are not allowed", naming neither)
    length = check_size(length, "length", "make_batch")
    b = len(src)
    if tgt is not None and len(tgt) != b:  # (the targets' rows would silently stay padding)
        raise ValueError(f"make_batch: {b} sources but {len(tgt)} targets")
    out = {"src": np.full((b, length), PAD_ID, np.int32), "src_lengths": np.zeros(b, np.int32)}
    for i, s in enumerate(src):
        s = _as_ids(s, f"source {i}")
        if len(s) > length:
            raise ValueError(
                f"make_batch: source {i} has {len(s)} tokens, more than the length {length}"
            )
        out["src"][i, : len(s)] = s
        out["src_lengths"][i] = len(s)
    _check_not_negative(out["src"], "source")
    if tgt is None:
        return out
    tgt_in = np.full((b, length), PAD_ID, np.int32)
    tgt_out = np.full((b, length), PAD_ID, np.int32)
    for i, t in enumerate(tgt):
        t = _as_ids(t, f"target {i}")
        if len(t) + 1 > length:
            raise ValueError(
                f"make_batch: target {i} has {len(t)} tokens + 1 (BOS or EOS), more than the "
                f"length {length}"
            )
        tgt_in[i, 0], tgt_in[i, 1 : len(t) + 1] = BOS_ID, t
        tgt_out[i, : len(t)], tgt_out[i, len(t)] = t, EOS_ID
    _check_not_negative(tgt_out, "target")
    lengths = np.array([len(t) + 1 for t in tgt])
    out |= {
        "tgt_in": tgt_in,
        "tgt_out": tgt_out,
        "tgt_mask": np.arange(length)[None, :] < lengths[:, None],
    }
    return out


class _BucketedBatches(grain.transforms.Map):
    """Map a global batch index to its batch; epoch ``e``'s plan is seeded by ``(seed, e)``."""

    def __init__(self, src, tgt, lengths, buckets, batch_size, seed, process_rows, name):
        self.src, self.tgt, self.buckets = src, tgt, tuple(buckets)
        self.batch_size, self.seed, self.process_rows = batch_size, seed, process_rows
        # Each example's bucket (the caller checked that the largest holds every length).
        keys = np.searchsorted(np.asarray(buckets), np.asarray(lengths, np.int64))
        self.members = [np.flatnonzero(keys == k) for k in range(len(buckets))]
        self.num_batches = sum(len(m) // batch_size for m in self.members)
        if self.num_batches == 0:
            counts = ", ".join(f"{b}: {len(m)}" for b, m in zip(self.buckets, self.members))
            raise ValueError(
                f"{name}: no bucket holds a full batch of {batch_size} examples "
                f"({len(src)} examples; per bucket length {{{counts}}}); lower batch_size "
                "to at most the largest count, or use fewer buckets"
            )
        self._plan: tuple[int, list] | None = None

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        # Read once: with grain's threads, another epoch's map may replace the cached plan
        # between a check and a second read of self._plan.
        plan = self._plan
        if plan is None or plan[0] != epoch:
            rng = np.random.default_rng((self.seed, epoch))
            batches = []
            for k, members in enumerate(self.members):
                rows = rng.permutation(members)
                full = len(rows) // self.batch_size * self.batch_size  # Drop the remainder.
                batches += [(k, chunk) for chunk in rows[:full].reshape(-1, self.batch_size)]
            order = rng.permutation(len(batches))
            plan = self._plan = (epoch, [batches[j] for j in order])
        return plan[1]

    def map(self, element: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(int(element), self.num_batches)
        k, rows = self._epoch_plan(epoch)[j]
        rows = rows[self.process_rows]  # This process's rows of the global batch.
        return make_batch([self.src[r] for r in rows], [self.tgt[r] for r in rows], self.buckets[k])


def translation_dataset(
    src: Sequence[np.ndarray],
    tgt: Sequence[np.ndarray],
    *,
    batch_size: int,
    buckets: Sequence[int],
    seed: int,
    vocab_size: int,
    process_rows: slice | None = None,
    name: str = "translation data",
) -> grain.MapDataset:
    """Return an unbounded grain dataset of bucketed, per-epoch shuffled batches.

    Args:
      src, tgt: equal-length lists of 1-D id arrays (no BOS/EOS), as from ``encode_pairs``;
        a target holding a pad, BOS or EOS id is refused.
      batch_size: B rows per batch; each epoch drops each bucket's last partial batch.
      buckets: increasing padded lengths; every example must fit the largest.
      seed: integer >= 0; the batch sequence is a pure function of it.
      vocab_size: every id must lie in ``[0, vocab_size)``.
      process_rows: on a multi-process run, the rows of each global batch this process
        loads (``sharding.process_batch_slice``); every process plans the same global
        batches, so all of them pad a step's batch to the same bucket.
      name: what the data is (e.g. "validation split"), put in front of error messages.

    Returns:
      A ``grain.MapDataset``; element ``i`` is the batch dict of the module docstring.

    Raises:
      ValueError: mismatched lists, an example that is not 1-D, unsorted buckets, ids out
        of range, a special id in a target, an example longer than the largest bucket, no
        bucket with a full batch, or a ``process_rows`` that is not a slice selecting some
        row.
    """
    if len(src) != len(tgt):  # (named neither the function nor the data)
        raise ValueError(f"{name}: src and tgt differ in length: {len(src)} vs {len(tgt)}")
    # The checked ints from here on: a 0-d NumPy or JAX integer passes the check, but
    # NumPy's generator and reshape would refuse it at the first batch.
    batch_size = check_size(batch_size, "batch_size", name)
    buckets = check_buckets(buckets, name)
    seed = check_size(seed, "seed", name, minimum=0)
    # (None failed with a TypeError from a comparison; True and 7.0 passed as sizes)
    vocab_size = check_size(vocab_size, "vocab_size", name)
    lengths = []
    for i, (s, t) in enumerate(zip(src, tgt)):  # (which example: the index within it is no help)
        for what, ids in (("source", s), ("target", t)):
            # (one flat list of ids for src failed as "object of type 'int' has no len()")
            if np.ndim(ids) != 1:
                raise ValueError(
                    f"{name}: {what} {i}: token ids must be 1-D (src and tgt are lists of "
                    f"examples), got shape {np.shape(ids)}"
                )
            check_token_ids(ids, vocab_size, f"{name}: {what} {i}: token ids")
        # The batches add BOS and EOS, and decoding never emits pad or BOS: an EOS already
        # in a target trained "y EOS EOS", a pad or BOS a label no decode can produce.
        # (The special ids are the lowest three: a min is 10x faster than np.isin, 0.1
        # against 1.4 s over the 107k training pairs.)
        if len(t) and np.min(t) <= max(_SPECIAL_IDS):
            j = int(np.argmax(np.asarray(t) <= max(_SPECIAL_IDS)))
            raise ValueError(
                f"{name}: target {i}: token ids must not hold pad, BOS or EOS "
                f"{_SPECIAL_IDS} (the batches add BOS and EOS), got {int(t[j])} at index {j}"
            )
        lengths.append(pair_length(s, t))
        if lengths[i] > buckets[-1]:
            raise ValueError(
                f"{name}: example {i} (source {len(s)} tokens, target {len(t)} + EOS) "
                f"exceeds the largest bucket {buckets[-1]}"
            )
    rows = check_process_rows(process_rows, batch_size, name)
    ds = grain.MapDataset.range(sys.maxsize)  # Unbounded: an index per batch.
    batches = _BucketedBatches(list(src), list(tgt), lengths, buckets, batch_size, seed, rows, name)
    return ds.map(batches)


def decode_batches(
    src: Sequence[np.ndarray], *, batch_size: int, buckets: Sequence[int]
) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Group sources by bucket for decoding: ``[(example indices, batch)]`` covering all.

    The last batch of a bucket is filled up with copies of its first row (so every batch
    has B rows and jit sees few shapes); ``indices`` names only the real rows, in order.

    Raises:
      ValueError: a ``batch_size`` or ``buckets`` that ``translation_dataset`` refuses, a
        source whose ids are not integers >= 0, or one longer than the largest bucket.
    """
    batch_size = check_size(batch_size, "batch_size", "decode_batches")
    buckets = check_buckets(buckets, "decode_batches")  # (bucket_of needs them sorted)
    # Here, not in make_batch, which would name a source by its row in a bucket's batch.
    for i, s in enumerate(src):
        s = _as_ids(s, f"source {i}", "decode_batches")
        if s.size and s.min() < 0:
            raise ValueError(
                f"decode_batches: source {i} token ids must be in [0, 2**31), got {s.min()}"
            )
        # (bucket_of's "length 40 exceeds the largest bucket 32" named neither the function
        # nor which of the sources)
        if len(s) > buckets[-1]:
            raise ValueError(
                f"decode_batches: source {i} has {len(s)} tokens, more than the largest "
                f"bucket {buckets[-1]}; leave it out or add a larger bucket"
            )
    keys = np.array([bucket_of(len(s), buckets) for s in src])
    out = []
    for k, length in enumerate(buckets):
        members = np.flatnonzero(keys == k)
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
            out.append((rows, make_batch([src[r] for r in padded], None, length)))
    return out
