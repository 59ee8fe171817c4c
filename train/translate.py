"""Train an English->Spanish translator (LSTM seq2seq ± attention, or a Transformer).

    python train/translate.py --config=train/configs/lstm_dot_cpu.py --workdir=DIR
    python train/translate.py --config=... --config.num_steps=500
    python train/translate.py --workdir=DIR --translate="let's go" --translate="I am hungry."
    python train/translate.py --workdir=DIR --bleu_only   # score the latest checkpoint

Training reuses the generic loop (``jaxattn.training.loop.fit``): progress bar, val loss,
``DIR/metrics.jsonl``, checkpoints in ``DIR/checkpoints/<step>/``, exact resume with the
same ``--workdir``. The sentencepiece model is trained on the train split only and cached
as ``DIR/spm.model`` (a later run there asking for another ``vocab_size``, or training on
other sentences: another ``data_path``, ``split_seed`` or ``max_train_examples``, is
refused). At the end the run decodes the test split (greedy or beam search), appends
``{"step": ..., "test_bleu": ..., "beam_size": ..., "decode_max_len": ...,
"max_test_examples": ..., "test_sentences": ..., "max_source_len": ..., "test_set": ...,
"translations": FILE}`` (sacrebleu corpus BLEU, the decode settings behind it, the largest
bucket, past which a source scores as an empty translation, and a digest of the scored
pairs) to ``DIR/metrics.jsonl``, writes every test translation to
``DIR/test_translations.tsv`` and, for the LSTM attention models, draws
``DIR/attention.png``. A rerun of a finished run trains nothing and, if ``metrics.jsonl``
has a ``test_bleu`` record of that step with these decode settings and test pairs, prints
it instead of decoding again (anything else is decoded and recorded).

``--translate`` and ``--bleu_only`` take the config from the checkpoint: only the decode
settings (``--config.beam_size``, ``decode_max_len``, ``decode_batch_size``,
``max_test_examples``) may be given, and a ``--config`` file that describes another run is
refused. The run's own file is fine (it names the default workdir), unless the run changed
model or data settings on the command line, which the file then contradicts; leave
``--config`` out then. ``--bleu_only`` appends its own ``test_bleu`` record (with its
settings) and writes its translations to
``DIR/test_translations_step<S>_beam<B>_len<L>_n<N>.tsv`` (S the checkpoint's step, N the
sentences scored), leaving the training run's ``test_translations.tsv`` as it was.
``--translate`` notes, on stderr, the pieces of a sentence outside the sentencepiece
vocabulary (translated as ``<unk>``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from common import (  # train/common.py (this script's directory)
    INTERRUPTED_EXIT_CODE,
    REPORTED_ERRORS,
    abstract_train_state,
    check_config_keys,
    check_model_shapes,
    check_processes_agree,
    check_state_tree,
    checkpoint_config_file,
    checkpoint_config_overrides,
    config_source,
    define_config_file,
    describe_mesh,
    drop_orbax_leftovers,
    enable_compilation_cache,
    exit_if_another_process_failed,
    exit_with_error,
    initialize_distributed,
    latest_checkpoint_metadata,
    model_config,
    new_train_state,
    parse_flags,
    print_once,
    seed_key,
    setup_mesh,
    sigterm_ends_the_process,
    workdir_from_flag,
)
from jax.experimental import multihost_utils

from jaxattn.models import seq2seq, transformer
from jaxattn.models._config import check_seed, check_size
from jaxattn.models.partitioning import SEQ2SEQ_RULES, TRANSFORMER_RULES
from jaxattn.ops.losses import check_label_smoothing
from jaxattn.training import sharding
from jaxattn.training import translation_data as td
from jaxattn.training.checkpoint import (
    Checkpointer,
    IncompatibleCheckpointError,
    check_checkpoints_folder,
    check_writable,
    json_metadata,
)
from jaxattn.training.data import batch_iterator
from jaxattn.training.loop import (
    LoopConfig,
    fit,
    make_eval_step,
    make_train_step,
)
from jaxattn.training.metrics import MetricsWriter, is_remote, read_metrics
from jaxattn.training.optim import optimizer_from_config

_DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "lstm_dot_cpu.py")
_CONFIG = define_config_file(_DEFAULT_CONFIG, "Run config file.")
# --help lists the flags common.py defines for every script (--compilation_cache,
# --distributed, ...) with this script's own; they were only under --helpfull.
flags.adopt_module_key_flags(sys.modules["common"])
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default workdirs/<config>).")
_TRANSLATE = flags.DEFINE_multi_string(
    "translate", None, "Only translate these sentences with the latest checkpoint."
)
_BLEU_ONLY = flags.DEFINE_bool(
    "bleu_only", False, "Only score the latest checkpoint on the test split (BLEU)."
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")

# Each model kind: (config class, init, loss, translate, partition rules, weight-decay mask).
MODELS = {
    "seq2seq": (seq2seq.Seq2SeqConfig, seq2seq.init_seq2seq, seq2seq.seq2seq_loss,
                seq2seq.translate, SEQ2SEQ_RULES, seq2seq.weight_decay_mask),
    "transformer": (transformer.TransformerConfig, transformer.init_transformer,
                    transformer.transformer_loss, transformer.translate, TRANSFORMER_RULES,
                    transformer.weight_decay_mask),
}  # fmt: skip


def build_model(config: ml_collections.ConfigDict, vocab_size: int):
    """Return ``(kind, model config)`` with the vocabulary sizes from the tokenizer."""
    fields = config.model.to_dict()
    kind = fields.pop("kind")
    if kind not in MODELS:
        raise ValueError(f"config.model.kind must be one of {sorted(MODELS)}, got {kind!r}")
    ids = dict(pad_id=td.PAD_ID, bos_id=td.BOS_ID, eos_id=td.EOS_ID)
    sizes = dict(src_vocab_size=vocab_size, tgt_vocab_size=vocab_size)
    where = f"{config_source()} (model.kind={kind!r})"
    return kind, model_config(MODELS[kind][0], fields, where, **sizes, **ids)


# Settings that only shape decoding: a --bleu_only or --translate run, which takes the rest
# of its config from the checkpoint, applies these from the command line.
DECODE_SETTINGS = ("beam_size", "decode_max_len", "decode_batch_size", "max_test_examples")


def check_example_counts(config: ml_collections.ConfigDict, names: tuple[str, ...]) -> None:
    """Refuse a negative ``config.max_*_examples``: as a slice end, ``-n`` would silently
    drop the last n pairs (0 means all)."""
    for name in names:
        check_size(config[name], f"config.{name}", "train/translate.py", minimum=0)


def check_data_settings(config: ml_collections.ConfigDict) -> None:
    """Refuse seeds NumPy cannot use and buckets that cannot hold the train/val pairs
    ``config.max_len`` keeps: the data pipeline would only fail after the workdir and its
    sentencepiece model were made, naming neither setting."""
    check_seed(config.seed, "config.seed", "train/translate.py")
    # (0 was named as the model's src_vocab_size, a key the config does not have)
    check_size(config.vocab_size, "config.vocab_size", "train/translate.py")
    # (else after the folder check; ~ expanded as load_pairs does)
    if config.data_path and not Path(config.data_path).expanduser().is_file():
        raise FileNotFoundError(
            f"translation corpus not found: {config.data_path!r} (config.data_path)"
        )
    check_size(config.split_seed, "config.split_seed", "train/translate.py", minimum=0)
    # (0 would keep every pair, a negative value none)
    check_size(config.max_len, "config.max_len", "train/translate.py")
    buckets = td.check_buckets(config.buckets, "train/translate.py", "config.buckets")
    if config.max_len > buckets[-1]:
        raise ValueError(
            f"config.max_len={config.max_len} keeps train/val pairs longer than the largest "
            f"of config.buckets={buckets}: lower max_len or add a bucket >= {config.max_len}"
        )


def check_decode_settings(config: ml_collections.ConfigDict) -> None:
    """Refuse decoding settings that could only fail after training, with the reason."""
    for name in ("beam_size", "decode_max_len", "decode_batch_size"):
        check_size(config[name], f"config.{name}", "train/translate.py")
    check_example_counts(config, ("max_test_examples",))
    if config.model.kind == "transformer":
        # (a dataclass field's default is its class attribute)
        positions = config.model.get("max_len", transformer.TransformerConfig.max_len)
        if max(config.decode_max_len, config.buckets[-1]) > positions:
            raise ValueError(
                f"config.model.max_len={positions} (the position table) must hold "
                f"config.decode_max_len={config.decode_max_len} and the largest bucket "
                f"{config.buckets[-1]}"
            )


_RESTORE_MODE = "a --bleu_only or --translate run"


def checkpoint_model(meta: dict, where, *, strict: bool = True) -> tuple[str, object] | None:
    """``(kind, model config)`` that a checkpoint's metadata records.

    With ``strict=False`` a model record this version cannot read gives None (the restore's
    own check then decides), but a checkpoint that records no model still raises.

    Raises:
      IncompatibleCheckpointError: no translation run saved it (``lm.py``'s metadata has no
        ``kind``), or (``strict``) its model record does not make a model config.
    """
    kind, fields = meta.get("kind"), meta.get("model")
    if not (isinstance(kind, str) and kind in MODELS and isinstance(fields, dict)):
        raise IncompatibleCheckpointError(
            f"{where} was not saved by train/translate.py: its metadata records no "
            f"translation model (kind {kind!r}, not one of {sorted(MODELS)}); nothing was "
            "restored or overwritten. Use another --workdir."
        )
    try:
        return kind, MODELS[kind][0](**fields)
    except (TypeError, ValueError) as e:
        if not strict:
            return None
        raise IncompatibleCheckpointError(
            f"{where}: its {kind} model record does not make a "
            f"{MODELS[kind][0].__name__} ({type(e).__name__}: {e}); nothing was restored"
        ) from None


def check_resumable(meta: dict, where, changed: list[str], config) -> None:
    """Refuse a checkpoint this run cannot continue, before the workdir gets a
    sentencepiece model: one another script saved, a model of another kind or shapes, or
    an optimizer state of another structure (the restore would refuse it only after the
    data and tokenizer were made, naming one leaf). ``changed``:
    ``latest_checkpoint_metadata``'s ``"key saved -> now"`` lines."""
    record = checkpoint_model(meta, where, strict=False)
    if record is None:
        return  # a record of another version: the restore's own check decides
    kind, saved = record
    # The vocabulary comes from the tokenizer, whose cache checks it: take the saved size.
    now_kind, model = build_model(config, saved.tgt_vocab_size)
    if now_kind != kind:
        raise IncompatibleCheckpointError(
            f"{where} holds a {kind} model, this config a {now_kind} (config.model.kind); "
            "nothing was restored or overwritten. Use another --workdir."
        )
    check_model_shapes(MODELS[kind][1], saved, model, f"{kind} model", where, changed)
    # the whole state's tree: an optimizer state of another structure (grad_clip 0 and not)
    check_state_tree(meta, where, changed, _abstract_state(kind, model, config))


def apply_decode_overrides(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The checkpoint's ``config`` with the command line's ``DECODE_SETTINGS`` overrides.

    Any other ``--config.*`` override would describe another run: it is an error rather
    than silently ignored.
    """
    overrides = checkpoint_config_overrides(_RESTORE_MODE, DECODE_SETTINGS)
    config = config.copy_and_resolve_references()
    for name, value in overrides.items():
        config[name] = value
    return config


def make_loss_fn(kind: str, model, label_smoothing: float):
    """``loss_fn(params, batch, rng) -> (loss, {})`` for the loop: dropout iff a key is given."""
    loss = MODELS[kind][2]

    def loss_fn(params, batch, rng):
        value = loss(params, batch, model, rng=rng, deterministic=rng is None,
                     label_smoothing=label_smoothing)  # fmt: skip
        return value, {}

    return loss_fn


def target_tokens(batch) -> jax.Array:
    """The target tokens a batch's loss averages over: the evaluation weighs each batch's
    mean loss by them, so ``val_loss`` is the mean over the target tokens of the
    ``eval_batches`` batches it reads (bucketed batches hold different numbers), not over
    every validation pair (each bucket's last partial batch is dropped, and a short
    evaluation reads only the first batches)."""
    return jnp.sum(batch["tgt_mask"])


def positions_per_step(batch) -> int:
    """Source and target positions a step runs, padding included, for tokens/s (shapes only:
    the loop counts without waiting for the device)."""
    return batch["src"].size + batch["tgt_in"].size


def translate_optimizer(config: ml_collections.ConfigDict, kind: str):
    """``(optimizer, schedule)`` of ``config``, decaying only the model's matrices and tables
    (its ``weight_decay_mask``): optax's ``ndim >= 2`` default would also decay the
    Transformer's stacked ``[L, D]`` layer-norm scales and ``[L, N, H]`` biases."""
    return optimizer_from_config(config, decay_mask=MODELS[kind][5])


def _abstract_state(kind, model, config):
    optimizer, _ = translate_optimizer(config, kind)
    return abstract_train_state(MODELS[kind][1], model, optimizer)


def translate_ids(params, kind, model, config, sources: list[np.ndarray]) -> list[list[int]]:
    """Decode id arrays in bucketed batches; return each hypothesis's ids before EOS."""
    out: list[list[int]] = [[] for _ in sources]
    batches = td.decode_batches(
        sources, batch_size=config.decode_batch_size, buckets=tuple(config.buckets)
    )
    for rows, batch in batches:
        ids = MODELS[kind][3](
            params, model, batch["src"], batch["src_lengths"],
            beam_size=config.beam_size, max_len=config.decode_max_len,
        )  # fmt: skip
        ids = np.asarray(ids)
        for r, row in zip(rows, ids):
            row = row.tolist()
            out[r] = row[: row.index(td.EOS_ID)] if td.EOS_ID in row else row
    return out


def _decode_shared(params, kind, model, config, sources: list[np.ndarray]) -> list[list[int]]:
    """``translate_ids`` with the sources dealt round-robin to the processes; every process
    gets every hypothesis back (a collective: all processes call it).

    Each decodes its share on its own devices, so no process idles through the others'
    decoding (JAX's shutdown barrier gives up on a process after 300 s).
    """
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return translate_ids(params, kind, model, config, sources)
    mine = translate_ids(params, kind, model, config, sources[index::count])
    rows = -(-len(sources) // count)
    packed = np.full((rows, config.decode_max_len), -1, np.int32)  # -1: past the hypothesis
    for r, ids in enumerate(mine):
        packed[r, : len(ids)] = ids
    every = np.asarray(multihost_utils.process_allgather(packed))  # [processes, rows, L]
    out: list[list[int]] = [[] for _ in sources]
    for process in range(count):
        for r, i in enumerate(range(process, len(sources), count)):
            out[i] = [int(t) for t in every[process, r] if t >= 0]
    return out


def test_bleu(params, kind, model, config, sp, test_pairs) -> tuple[float, list[str]]:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) over every test pair.

    A source longer than the largest bucket (64 pieces by default; none in the corpus) is
    not decoded and scores as an empty translation, so no pair leaves the score. On a
    multi-process run every process decodes a share (a collective: all must call it).
    """
    import sacrebleu

    encoded = [np.asarray(sp.encode(s), np.int32) for s, _ in test_pairs]
    keep = [i for i, ids in enumerate(encoded) if 0 < len(ids) <= config.buckets[-1]]
    ids = _decode_shared(params, kind, model, config, [encoded[i] for i in keep])
    hyps = [""] * len(test_pairs)
    for i, h in zip(keep, ids):
        hyps[i] = sp.decode(h)
    refs = [target for _, target in test_pairs]
    return sacrebleu.corpus_bleu(hyps, [refs]).score, hyps


def output_labels(sp, hypothesis, decode_max_len: int) -> list[str]:
    """Row labels of a hypothesis's attention map: its pieces, then ``</s>`` if it ended
    with EOS. ``hypothesis`` holds the ids before EOS (``translate_ids``); one of
    ``decode_max_len`` ids was cut there and has no EOS row."""
    pieces = [sp.id_to_piece(int(i)) for i in hypothesis]
    return [*pieces, "</s>"] if len(hypothesis) < decode_max_len else pieces


def plot_attention(params, model, sp, sentences: list[str], path: Path, config) -> bool:
    """Heat-map of the LSTM attention weights for the test decode's translations
    (``config.beam_size``) of ``sentences``; a sentence that no bucket holds (which
    ``test_bleu`` did not decode either) is left out. Returns whether it drew one."""
    src = [np.asarray(sp.encode(s), np.int32) for s in sentences]
    src = [ids for ids in src if 0 < len(ids) <= config.buckets[-1]]
    if not src:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hyps = [np.asarray(h, np.int32) for h in translate_ids(params, "seq2seq", model, config, src)]
    # Teacher-force the model on its own output: one padded batch, one compiled call.
    length = max(max(len(s) for s in src), max(len(h) for h in hyps) + 1)
    batch = td.make_batch(src, hyps, length)
    logits_fn = jax.jit(seq2seq.seq2seq_logits, static_argnames="config")
    _, attn = logits_fn(params, batch["src"], batch["src_lengths"], batch["tgt_in"], config=model)
    attn = np.asarray(attn)  # [B, T, S]
    fig, axes = plt.subplots(1, len(src), figsize=(4.5 * len(src), 4.5), squeeze=False)
    for ax, s, h, a in zip(axes[0], src, hyps, attn):
        rows = output_labels(sp, h, config.decode_max_len)
        ax.imshow(a[: len(rows), : len(s)], cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(s)), [sp.id_to_piece(int(i)) for i in s], rotation=90)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("source")
        ax.set_ylabel("output")
    fig.suptitle(f"{model.attention} attention")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _corpus_name(config) -> str:
    return repr(config.data_path) if config.data_path else "the bundled corpus"


def split_corpus(config) -> td.Split:
    """The corpus's train/val/test split; refused if train or validation is empty."""
    pairs = td.load_pairs(config.data_path)
    split = td.split_pairs(pairs, seed=config.split_seed, fractions=td.SPLIT_FRACTIONS)
    corpus = _corpus_name(config)
    if not (split.train and split.val):  # (sentencepiece said "no sentences to train on")
        train_f, val_f = td.SPLIT_FRACTIONS
        percents = "/".join(f"{100 * f:g}" for f in (train_f, val_f, 1 - train_f - val_f))
        raise ValueError(
            f"{corpus} (config.data_path) is too small: its {len(pairs):,} pairs split "
            f"{percents} by English sentence leave {len(split.train):,} train and "
            f"{len(split.val):,} validation pairs; each split needs some"
        )
    return split


def check_batch_fits(config, split: td.Split) -> None:
    """Refuse a ``batch_size`` larger than the train or validation pairs used: max_len
    and the buckets only drop pairs, so no batch could be filled. (The dataset says so
    too, but only after the sentencepiece model is trained, tens of seconds.)"""
    val_count = len(td.sample(split.val, config.max_eval_examples, seed=config.split_seed))
    for name, count, limit in (
        ("train", len(split.train[: config.max_train_examples or None]), "max_train_examples"),
        ("validation", val_count, "max_eval_examples"),
    ):
        if config.batch_size > count:
            raise ValueError(
                f"config.batch_size={config.batch_size} is more than the {count:,} {name} "
                f"pairs of {_corpus_name(config)} (config.{limit}={config[limit]}): no "
                "batch could be filled; lower batch_size"
            )


def load_data(config, workdir: Path, split: td.Split | None = None):
    """Train/load the workdir's sentencepiece model, encode train and val (of ``split``,
    by default ``split_corpus(config)``)."""
    split = split_corpus(config) if split is None else split
    corpus = _corpus_name(config)
    train_pairs, sentences = _tokenizer_sentences(config, split)
    # Process 0 trains and caches the model; the others then load the same file.
    refused = None
    if jax.process_index() == 0:
        try:
            sp = td.train_sentencepiece(sentences, workdir / "spm", vocab_size=config.vocab_size)
        except ValueError as e:  # e.g. a cached model of other settings: every process
            refused = e  # refuses it after the barrier, or the others would wait there
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("sentencepiece model written")
    if refused is not None:
        raise refused
    if jax.process_index() != 0:
        sp = td.train_sentencepiece(sentences, workdir / "spm", vocab_size=config.vocab_size)
    train = td.encode_pairs(sp, train_pairs, max_len=config.max_len)
    # Random subsets (seeded), not prefixes: the corpus is sorted by length. Validation
    # draws from the pairs that fit max_len, so the count asked for is the count used.
    val_src, val_tgt = td.encode_pairs(sp, split.val, max_len=config.max_len)
    for name, kept, total in (("train", train[0], train_pairs), ("validation", val_src, split.val)):
        if not kept:  # (the dataset would only say that no bucket holds a batch)
            raise ValueError(
                f"config.max_len={config.max_len} drops all {len(total):,} {name} pairs of "
                f"{corpus}: each is longer than that in the {sp.get_piece_size()}-piece "
                "sentencepiece vocabulary (source tokens, or target tokens + EOS); raise "
                "max_len (and config.buckets) or vocab_size"
            )
    keep = td.sample(range(len(val_src)), config.max_eval_examples, seed=config.split_seed)
    val = [val_src[i] for i in keep], [val_tgt[i] for i in keep]
    return sp, split, train, val, bleu_pairs(split, config)


def _tokenizer_sentences(config, split: td.Split) -> tuple[list, list[str]]:
    """``(train pairs used, their sentences)``: what the sentencepiece model trains on."""
    train_pairs = split.train[: config.max_train_examples or None]
    return train_pairs, [s for pair in train_pairs for s in pair]


def check_cached_tokenizer(config, workdir: Path, split: td.Split) -> None:
    """Refuse the workdir's cached sentencepiece model when it was trained with other
    settings (``vocab_size``, or other sentences: corpus, split, example count), as
    ``load_data`` would, but before a resumed run's note on the changed settings (which
    called the run resumed, then refused it). Only loads: with no cached model, nothing."""
    if (workdir / "spm.model").is_file():
        sentences = _tokenizer_sentences(config, split)[1]
        td.train_sentencepiece(sentences, workdir / "spm", vocab_size=config.vocab_size)


def bleu_pairs(split: td.Split, config) -> list[tuple[str, str]]:
    """The test pairs scored for BLEU: all, or ``max_test_examples`` drawn at random."""
    return td.sample(split.test, config.max_test_examples, seed=config.split_seed)


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    check_data_settings(config)
    # The model fields' errors (a field of another kind of model included) before the
    # workdir and its sentencepiece model are made (the vocabulary's size is only an upper
    # bound here; the real one comes from the tokenizer).
    kind, _ = build_model(config, config.vocab_size)
    check_decode_settings(config)  # before training, not after it
    check_example_counts(config, ("max_train_examples", "max_eval_examples"))
    # The loss checks it only when it first runs, inside fit: after the workdir and its
    # sentencepiece model are made.
    check_label_smoothing(config.label_smoothing, "train/translate.py")
    # Settings errors (loop, mesh, batch split, optimizer) before the corpus is split (~1 s)
    # and the workdir is created.
    loop = LoopConfig.from_config(config, progress=_PROGRESS.value)
    mesh, batch_sharding = setup_mesh(config)
    # (None failed with a TypeError, 0 only in the dataset, after the sentencepiece model)
    check_size(config.batch_size, "config.batch_size", "train/translate.py")
    process_rows = sharding.process_batch_slice(
        batch_sharding, config.batch_size, "config.batch_size"
    )
    optimizer, schedule = translate_optimizer(config, kind)
    split = split_corpus(config)

    def check(meta, where, changed):
        check_resumable(meta, where, changed, config)
        if changed:  # (unchanged, load_data's own check of the tokenizer comes soon enough)
            check_cached_tokenizer(config, workdir, split)

    meta = latest_checkpoint_metadata(  # notes changes; refuses another model
        workdir, config, also_free=DECODE_SETTINGS, check=check
    )
    check_batch_fits(config, split)  # (the split's sizes) before the workdir is created
    # A finished run may sit in a read-only folder: it only reads its checkpoint and, when
    # its BLEU is recorded, metrics.jsonl (probed below before it decodes to record one).
    if meta is None or meta["step"] < config.num_steps:
        check_checkpoints_folder(workdir / "checkpoints")  # (creating workdir) before anything
    sp, split, (train_src, train_tgt), (val_src, val_tgt), test_pairs = load_data(
        config, workdir, split
    )
    vocab = sp.get_piece_size()
    kind, model = build_model(config, vocab)
    init_rng, train_rng = jax.random.split(seed_key(config.seed))
    init = MODELS[kind][1]
    # Built straight into its shardings: each device only ever holds its own shards. A
    # resumed run builds none: fit restores into the shapes (no second copy of the state).
    state, state_sharding = sharding.create_sharded(
        functools.partial(new_train_state, init, model, optimizer, init_rng, train_rng),
        MODELS[kind][4],
        mesh,
        abstract=meta is not None,
    )
    params = state.params
    loss_fn = make_loss_fn(kind, model, config.label_smoothing)
    buckets = tuple(config.buckets)
    data_kw = dict(
        batch_size=config.batch_size, buckets=buckets, vocab_size=vocab,
        process_rows=process_rows,
    )  # fmt: skip
    train_ds = td.translation_dataset(
        train_src, train_tgt, seed=config.seed, name="train split", **data_kw
    )
    val_ds = td.translation_dataset(
        val_src, val_tgt, seed=config.seed + 1, name="validation split", **data_kw
    )
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print_once(
        f"data: {len(split.train):,}/{len(split.val):,}/{len(split.test):,} train/val/test "
        f"pairs; using {len(train_src):,} train, {len(val_src):,} val, {len(test_pairs):,} "
        f"test; sentencepiece vocab {vocab}\n"
        f"model: {kind} {json.dumps(json_metadata(config.model.to_dict()))}: "
        f"{n_params / 1e6:.2f}M params\n"
        f"{describe_mesh(mesh)}\n"
        f"workdir: {workdir}",
        flush=True,
    )
    train_step = make_train_step(
        loss_fn, optimizer, learning_rate_fn=schedule,
        state_sharding=state_sharding, batch_sharding=batch_sharding,
    )  # fmt: skip
    eval_step = make_eval_step(
        loss_fn, weight_fn=target_tokens, params_sharding=state_sharding.params,
        batch_sharding=batch_sharding,
    )  # fmt: skip
    result = fit(
        state,
        train_step,
        batch_iterator(train_ds),
        workdir=workdir,
        loop=loop,
        batch_sharding=batch_sharding,
        eval_step=eval_step,
        eval_data=lambda: batch_iterator(val_ds),
        tokens_per_step=positions_per_step,
        metadata={"config": config.to_dict(), "kind": kind, "model": dataclasses.asdict(model)},
    )
    sigterm_ends_the_process()  # (the loop's checkpoints are saved: sampling/decoding now)
    if result.interrupted:
        print_once(f"Stopped at step {result.step}; run the same command again to resume.")
        sys.exit(INTERRUPTED_EXIT_CODE)
    if result.trained_steps == 0:
        if report_recorded_bleu(workdir, result.step, config, test_pairs):
            return  # (every process: none decodes)
        check_writable(workdir)  # the score and translations to write: before decoding
    params = sharding.gather_params(result.state.params)  # Every process: the whole model.
    t0 = time.perf_counter()
    bleu, hyps = test_bleu(params, kind, model, config, sp, test_pairs)  # (all processes)
    if jax.process_index() != 0:
        return  # Process 0 reports.
    record_test_bleu(workdir, result.step, bleu, config, test_pairs, hyps)
    print(f"Done: step {result.step}, test BLEU {bleu:.2f} on {len(hyps)} sentences "
          f"({time.perf_counter() - t0:.1f} s to decode)")  # fmt: skip
    for (s, r), h in list(zip(test_pairs, hyps))[:3]:
        print(f"  {s}  ->  {h}   (reference: {r})")
    if kind == "seq2seq" and model.attention != "none":
        if plot_attention(params, model, sp, [s for s, _ in test_pairs[:3]],
                          workdir / "attention.png", config):  # fmt: skip
            print(f"Attention heat-map: {workdir / 'attention.png'}")


def _restore(workdir: Path):
    """The latest checkpoint's ``(config, kind, model, params, step)`` and sentencepiece."""
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        meta = ckpt.read_metadata()
        where = ckpt.step_dir(ckpt.latest_step())
        kind, model = checkpoint_model(meta, where)  # (lm.py's: a KeyError, not named)
        # A --config file of another run would otherwise be silently ignored.
        checkpoint_config_file(_RESTORE_MODE, meta, where, DECODE_SETTINGS)
        config = ml_collections.ConfigDict(meta["config"])
        spm_model = workdir / "spm.model"
        if not spm_model.is_file():  # (train_sentencepiece: "no sentences to train on")
            raise FileNotFoundError(
                f"{spm_model} not found: {_RESTORE_MODE} needs the sentencepiece model that "
                f"the run saved beside {where}"
            )
        state, _ = ckpt.restore(_abstract_state(kind, model, config))
    config = apply_decode_overrides(config)
    check_decode_settings(config)
    sp = td.train_sentencepiece([], workdir / "spm", vocab_size=config.vocab_size)
    return config, kind, model, state.params, int(state.step), sp


def record_test_bleu(
    workdir: Path, step: int, bleu: float, config, test_pairs, hyps, *, rescore: bool = False
) -> Path:
    """Append ``{"step": step, "time": ..., "test_bleu": bleu}`` with the decode settings
    that produced it to ``DIR/metrics.jsonl``, and write every scored translation (source,
    reference, hypothesis; one pair a line, in test-split order) to
    ``DIR/test_translations.tsv``, or for a ``rescore`` (``--bleu_only``) to a file named
    after its step and settings, so the training run's stays. Returns the file."""
    name = "test_translations.tsv"
    if rescore:
        name = (
            f"test_translations_step{step}_beam{config.beam_size}_len{config.decode_max_len}"
            f"_n{len(test_pairs)}.tsv"
        )
    lines = "".join(f"{s}\t{r}\t{h}\n" for (s, r), h in zip(test_pairs, hyps))
    (workdir / name).write_text(lines, encoding="utf-8")
    with MetricsWriter(workdir, tensorboard=False) as writer:
        record = {"test_bleu": bleu} | bleu_settings(config, test_pairs) | {"translations": name}
        writer.write(step, record)
    return workdir / name


def bleu_settings(config, test_pairs) -> dict:
    """The decode settings a ``test_bleu`` record names (``decode_batch_size`` only groups
    the sentences), and which test pairs it scored."""
    scored = json.dumps([list(pair) for pair in test_pairs], ensure_ascii=False)
    return {
        "beam_size": config.beam_size, "decode_max_len": config.decode_max_len,
        "max_test_examples": config.max_test_examples,  # 0: all
        "test_sentences": len(test_pairs),
        # Longer sources are not decoded and score as empty translations (test_bleu).
        "max_source_len": config.buckets[-1],
        # The pairs themselves: another sample of the split is another test set.
        "test_set": hashlib.sha256(scored.encode("utf-8")).hexdigest()[:16],
    }  # fmt: skip


def report_recorded_bleu(workdir: Path, step: int, config, test_pairs) -> bool:
    """Print the ``test_bleu`` record of ``step`` with ``config``'s decode settings in
    ``DIR/metrics.jsonl``, if there is one; returns whether there was, the same on every
    process (a collective: all must call it).

    A rerun of a finished run trains nothing: decoding again would only append the same
    score (and write the same translations). Other settings, another largest bucket or
    other test pairs are a new measurement, and so is a record from before the pairs
    were named (``test_set``).
    """
    found, name = None, None
    path = workdir / "metrics.jsonl"
    if jax.process_index() == 0 and path.is_file():
        settings = bleu_settings(config, test_pairs).items()
        records = [r for r in read_metrics(path) if "test_bleu" in r]
        same = [r for r in records if r["step"] == step and r.items() >= settings]
        found = same[-1] if same else None
        # Its translations file, unless a later decode (other settings) wrote over it (or
        # an older version's record names none).
        if found is not None and "translations" in found:
            writers = [r for r in records if r.get("translations") == found["translations"]]
            if writers[-1] is found and (workdir / found["translations"]).is_file():
                name = found["translations"]  # (not if deleted since)
    recorded = found is not None
    if jax.process_count() > 1:  # (process 0's answer: the others' view of the file may lag)
        recorded = bool(multihost_utils.broadcast_one_to_all(np.int32(recorded)))
    if found is not None:
        print(
            f"Done: step {step}, test BLEU {found['test_bleu']:.2f} on {len(test_pairs)} "
            f"sentences (beam_size {config.beam_size}, decode_max_len "
            f"{config.decode_max_len}), as recorded in {path}: nothing trained, not decoded "
            "again" + (f"; translations: {workdir / name}" if name else "")
        )
    return recorded


def translate_only(workdir: Path, sentences: list[str]) -> None:
    """Load the latest checkpoint in ``workdir`` and print a translation per sentence."""
    config, kind, model, params, _, sp = _restore(workdir)
    src = [np.asarray(sp.encode(s), np.int32) for s in sentences]
    for sentence, ids in zip(sentences, src):
        if not 0 < len(ids) <= config.buckets[-1]:
            raise ValueError(
                f"--translate={sentence!r} has {len(ids)} tokens; each sentence needs 1 to "
                f"{config.buckets[-1]} (the largest of config.buckets)"
            )
    for sentence in sentences:
        unknown = td.unknown_pieces(sp, sentence)
        if unknown:
            pieces = ", ".join(map(repr, unknown))
            print_once(f"note: --translate={sentence!r}: {pieces} not in the sentencepiece "
                       "vocabulary, translated as <unk>", file=sys.stderr)  # fmt: skip
    for s, ids in zip(sentences, translate_ids(params, kind, model, config, src)):
        print_once(f"{s} -> {sp.decode(ids)}")  # (every process translates; 0 prints)


def bleu_only(workdir: Path) -> None:
    """Score the latest checkpoint on the test split again; append it to metrics.jsonl
    and write its translations next to, not over, the training run's."""
    config, kind, model, params, step, sp = _restore(workdir)
    # The score and translations to write: before decoding (minutes for a whole test split).
    check_writable(workdir)
    scored = bleu_pairs(split_corpus(config), config)
    bleu, hyps = test_bleu(params, kind, model, config, sp, scored)  # (all processes)
    if jax.process_index() == 0:
        path = record_test_bleu(workdir, step, bleu, config, scored, hyps, rescore=True)
        print(f"step {step}: test BLEU {bleu:.2f} on {len(hyps)} sentences (beam_size "
              f"{config.beam_size}, decode_max_len {config.decode_max_len}); translations: "
              f"{path}")  # fmt: skip


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO.
    if is_remote(_WORKDIR.value or ""):
        # Path() would fold gs://bucket into gs:/bucket, a local folder on each host.
        raise app.UsageError(
            f"--workdir={_WORKDIR.value}: translate.py writes its sentencepiece model and "
            "outputs with local file I/O; give it a local or shared-filesystem folder (lm.py "
            "takes gs://)"
        )
    drop_orbax_leftovers()
    try:
        if _TRANSLATE.value and _BLEU_ONLY.value:  # (one would be ignored)
            raise ValueError("--translate and --bleu_only are two runs: give one")
        workdir = Path(workdir_from_flag(_WORKDIR.value))
        enable_compilation_cache()
        initialize_distributed()
        # (--translate and --bleu_only take the config from the checkpoint)
        modes = {"--translate": _TRANSLATE.value, "--bleu_only": _BLEU_ONLY.value}
        check_processes_agree(
            {"--workdir": _WORKDIR.value, **modes},
            None if any(modes.values()) else _CONFIG.value,
        )
        if _TRANSLATE.value or _BLEU_ONLY.value:
            sigterm_ends_the_process()  # (nothing to save: SIGTERM stops it at once)
        if _TRANSLATE.value:
            translate_only(workdir, _TRANSLATE.value)
        elif _BLEU_ONLY.value:
            bleu_only(workdir)
        else:
            check_config_keys(_CONFIG.value, _DEFAULT_CONFIG)
            train(_CONFIG.value, workdir)
    except REPORTED_ERRORS as e:
        exit_with_error(e)
    except RuntimeError:  # (a collective's: another process may have stopped with an error)
        exit_if_another_process_failed()
        raise


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
