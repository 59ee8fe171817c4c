"""Train a character-level GPT on tinyshakespeare (or any text file), or sample from one.

    python train/lm.py --config=train/configs/shakespeare_char_cpu.py --workdir=DIR
    python train/lm.py --config=... --config.num_steps=500 --config.eval_every=100
    python train/lm.py --workdir=DIR --sample_only --prompt="ROMEO:" --num_samples=3
    python train/lm.py --workdir=DIR --sample_only --prompt="ROMEO:" --prompt="JULIET:"
    python train/sample.py --workdir=DIR --prompt="ROMEO:"   (the same as --sample_only)

Training shows a progress bar, evaluates, writes ``DIR/metrics.jsonl`` and TensorBoard
events in ``DIR/tb/`` (none for a ``gs://`` DIR), checkpoints to ``DIR/checkpoints/<step>/``,
and prints samples at the end. Running it again with the same ``--workdir`` resumes from
the latest checkpoint (bitwise the same run as an uninterrupted one); SIGTERM or Ctrl-C
saves and exits with status 143, so that a job scheduler sees an unfinished job and can
requeue it. The default workdir is ``workdirs/<config file name>`` (``<name>_<arg>`` for
``--config=FILE:arg``).

Samples come from ``gpt.generate``: a KV cache while the text fits the context, then, as in
nanoGPT, each character drawn from a full pass over the last ``block_size`` characters.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import jax
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
from etils import epath

from jaxattn.models._config import check_seed, check_size
from jaxattn.models.decoding import check_sampling
from jaxattn.models.gpt import GPTConfig, generate, gpt_loss, init_gpt, weight_decay_mask
from jaxattn.models.partitioning import TRANSFORMER_RULES
from jaxattn.training import data, sharding
from jaxattn.training.checkpoint import (
    Checkpointer,
    IncompatibleCheckpointError,
    check_checkpoints_folder,
)
from jaxattn.training.loop import (
    LoopConfig,
    fit,
    make_eval_step,
    make_train_step,
)
from jaxattn.training.optim import optimizer_from_config

_DEFAULT_CONFIG = str(Path(__file__).parent / "configs" / "shakespeare_char_cpu.py")
_CONFIG = define_config_file(_DEFAULT_CONFIG, "Run config file.")
# --help lists the flags common.py defines for every script (--compilation_cache,
# --distributed, ...) with this script's own; they were only under --helpfull.
flags.adopt_module_key_flags(sys.modules["common"])
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default workdirs/<config>).")
_SAMPLE_ONLY = flags.DEFINE_bool("sample_only", False, "Only sample from the latest checkpoint.")
_PROMPT = flags.DEFINE_multi_string(
    "prompt", ["\n"], "Text the samples continue; repeat the flag to sample several prompts."
)
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", 2, "Samples to print per prompt (0: none).", lower_bound=0
)
_SAMPLE_TOKENS = flags.DEFINE_integer("sample_tokens", 500, "Characters per sample.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
_TOP_K = flags.DEFINE_integer(
    "top_k", 200, "Sample among the k most likely characters (0: all).", lower_bound=0
)
# jax.random.key takes an int64: a seed outside failed with a traceback, after training.
_SAMPLE_SEED = flags.DEFINE_integer(
    "sample_seed", 0, "Seed for sampling.", lower_bound=-(2**63), upper_bound=2**63 - 1
)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def make_loss_fn(model: GPTConfig):
    """``loss_fn(params, batch, rng)`` for the loop: dropout iff a key is given."""

    def loss_fn(params, batch, rng):
        loss = gpt_loss(
            params, batch["inputs"], batch["targets"], model, rng=rng, deterministic=rng is None
        )
        return loss, {}

    return loss_fn


def _top_k(model: GPTConfig) -> int | None:
    return min(_TOP_K.value, model.vocab_size) if _TOP_K.value > 0 else None


def _check_sampling(model: GPTConfig, tokenizer: data.CharTokenizer) -> None:
    try:  # (the error named the setting, not the flag to mend)
        check_sampling(temperature=_TEMPERATURE.value)
    except ValueError as e:
        raise ValueError(f"--temperature={_TEMPERATURE.value}: {e}") from None
    check_sampling(top_k=_top_k(model))
    for prompt in _PROMPT.value:
        if not prompt:
            raise ValueError("--prompt must hold at least one character")
        try:
            tokenizer.encode(prompt)
        except ValueError as e:  # a character outside the vocabulary
            # Named as the prompt's: the default "\n" is not in a text without line breaks,
            # and the error named a character the user never typed.
            where = "" if _PROMPT.present else " (the default; pass --prompt=TEXT)"
            raise ValueError(f"--prompt={prompt!r}{where}: {e}") from None


def sample_text(params, model: GPTConfig, tokenizer: data.CharTokenizer, *, rng) -> list[str]:
    """Continue each ``--prompt`` by ``--sample_tokens`` characters, ``--num_samples`` times,
    all in one batch (prompts of different lengths padded, see ``generate``)."""
    _check_sampling(model, tokenizer)
    prompts = [tokenizer.encode(text) for text in _PROMPT.value for _ in range(_NUM_SAMPLES.value)]
    if not prompts:
        return []
    lengths = np.array([len(ids) for ids in prompts])
    batch = np.zeros((len(prompts), lengths.max()), np.int32)  # [B, T0], right-padded
    for row, ids in zip(batch, prompts):
        row[: len(ids)] = ids
    out = generate(
        params, model, batch, _SAMPLE_TOKENS.value, rng=rng, temperature=_TEMPERATURE.value,
        top_k=_top_k(model), prompt_lengths=lengths,
    )  # fmt: skip
    new = _SAMPLE_TOKENS.value
    return [tokenizer.decode(row[: n + new]) for row, n in zip(np.asarray(out), lengths)]


def print_samples(params, model, tokenizer, seed: int) -> None:
    for i, text in enumerate(sample_text(params, model, tokenizer, rng=seed_key(seed))):
        print_once(f"---------- sample {i} ----------\n{text}")


def lm_optimizer(config: ml_collections.ConfigDict):
    """``(optimizer, schedule)`` of ``config``, decaying only nanoGPT's leaves (kernels and
    tables): optax's ``ndim >= 2`` default would also decay the ``[L, D]`` layer-norm stacks."""
    return optimizer_from_config(config, decay_mask=weight_decay_mask)


def _abstract_state(model: GPTConfig, config: ml_collections.ConfigDict):
    return abstract_train_state(init_gpt, model, lm_optimizer(config)[0])


def train(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
    for name in ("batch_size", "grad_accum_steps"):  # (rows = their product, used first)
        check_size(config[name], f"config.{name}", "train/lm.py")
    # (grain refuses a negative seed only at the first batch, jax.random.key one above
    # 2**63 - 1 only after the workdir is made)
    check_seed(config.seed, "config.seed", "train/lm.py")
    text = data.load_text(config.data_path)
    tokenizer = data.CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    train_ids, val_ids = data.train_val_split(ids, config.train_fraction)
    model = model_config(GPTConfig, config.model.to_dict(), vocab_size=tokenizer.vocab_size)
    meta = latest_checkpoint_metadata(
        workdir,
        config,
        check=lambda meta, where, changed: _check_resumable(
            meta, where, changed, model, tokenizer, config
        ),
    )
    if _NUM_SAMPLES.value > 0:  # Fail now, not after training.
        _check_sampling(model, tokenizer)
    # Settings errors (loop, mesh, batch split, optimizer, data splits) before the workdir
    # is created.
    loop = LoopConfig.from_config(config, progress=_PROGRESS.value)
    mesh, batch_sharding = setup_mesh(config)
    rows = config.batch_size * config.grad_accum_steps
    # config.batch_size first: it is what the user sets, and if it splits so does rows.
    val_rows = sharding.process_batch_slice(batch_sharding, config.batch_size, "config.batch_size")
    train_rows = sharding.process_batch_slice(batch_sharding, rows)
    optimizer, schedule = lm_optimizer(config)
    train_ds = data.lm_dataset(
        train_ids, batch_size=rows, seq_len=model.block_size, seed=config.seed,
        vocab_size=tokenizer.vocab_size, name="train split",
        process_rows=train_rows,
    )  # fmt: skip
    val_ds = data.lm_dataset(
        val_ids, batch_size=config.batch_size, seq_len=model.block_size, seed=config.seed + 1,
        vocab_size=tokenizer.vocab_size,
        name=f"validation split (the last {(1 - config.train_fraction) * 100:.3g}% of the text)",
        process_rows=val_rows,
    )  # fmt: skip
    if meta is None or meta["step"] < config.num_steps:  # (a finished run only samples)
        # (creating workdir) before anything is built
        check_checkpoints_folder(workdir / "checkpoints")

    init_rng, train_rng = jax.random.split(seed_key(config.seed))
    # Built straight into its shardings: each device only ever holds its own shards. A
    # resumed run builds none: fit restores into the shapes (no second copy of the state).
    state, state_sharding = sharding.create_sharded(
        functools.partial(new_train_state, init_gpt, model, optimizer, init_rng, train_rng),
        TRANSFORMER_RULES,
        mesh,
        abstract=meta is not None,
    )
    params = state.params
    loss_fn = make_loss_fn(model)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print_once(
        f"data: {len(text):,} characters, vocabulary {tokenizer.vocab_size}, "
        f"train {len(train_ids):,} / val {len(val_ids):,}\n"
        f"model: GPT {model.num_layers} layers, {model.num_heads} heads{_attention_note(model)}, "
        f"width {model.embed_dim}, context {model.block_size}: {n_params / 1e6:.2f}M parameters"
        f"{_loss_note(model)}\n"
        f"{describe_mesh(mesh)}\n"
        f"workdir: {workdir}",
        flush=True,
    )
    train_step = make_train_step(
        loss_fn, optimizer, grad_accum_steps=config.grad_accum_steps, learning_rate_fn=schedule,
        state_sharding=state_sharding, batch_sharding=batch_sharding,
    )  # fmt: skip
    eval_step = make_eval_step(
        loss_fn, params_sharding=state_sharding.params, batch_sharding=batch_sharding
    )
    result = fit(
        state,
        train_step,
        data.batch_iterator(train_ds),
        workdir=workdir,
        loop=loop,
        batch_sharding=batch_sharding,
        eval_step=eval_step,
        eval_data=lambda: data.batch_iterator(val_ds),
        tokens_per_step=rows * model.block_size,
        metadata={
            "config": config.to_dict(),
            "model": dataclasses.asdict(model),
            "vocab": tokenizer.chars,
        },
    )
    sigterm_ends_the_process()  # (the loop's checkpoints are saved: sampling/decoding now)
    if result.interrupted:
        print_once(f"Stopped at step {result.step}; run the same command again to resume.")
        sys.exit(INTERRUPTED_EXIT_CODE)
    val_loss = result.last_eval.get("val_loss")
    print_once(
        f"Done: step {result.step}" + ("" if val_loss is None else f", val loss {val_loss:.4f}")
    )
    params = sharding.gather_params(result.state.params)  # Every process: the whole model.
    if _NUM_SAMPLES.value > 0 and jax.process_index() == 0:
        print_samples(params, model, tokenizer, _SAMPLE_SEED.value)


def _attention_note(model: GPTConfig) -> str:
    """`` (1 K/V head, window 32)`` for grouped-query or sliding-window attention, else ''."""
    notes = []
    if model.kv_heads != model.num_heads:
        notes.append(f"{model.kv_heads} K/V head" + ("s" if model.kv_heads > 1 else ""))
    if model.attention_window is not None:
        notes.append(f"window {model.attention_window}")
    return f" ({', '.join(notes)})" if notes else ""


def _loss_note(model: GPTConfig) -> str:
    """``, loss in chunks of 128 positions`` when ``loss_chunk_size`` is set, else ''."""
    chunk = model.loss_chunk_size
    return "" if chunk is None else f", loss in chunks of {chunk} positions"


def _check_resumable(
    meta,
    where,
    changed: list[str],
    model: GPTConfig,
    tokenizer: data.CharTokenizer,
    config: ml_collections.ConfigDict,
) -> None:
    """Refuse a checkpoint this run cannot continue, naming why, before anything is built.

    One trained on other characters would decode wrongly even if the shapes matched; one of
    another model size, or whose optimizer state has another structure (``grad_clip`` 0 and
    not), would fail in the restore, naming only a leaf, after a note that called it a
    resumed run. One saved by another script (no vocabulary recorded) failed naming a leaf
    and every setting of the other script's config, as if a resume without them could work.
    ``changed``: the settings that differ from the checkpoint's
    (``latest_checkpoint_metadata``'s note).
    """
    saved = meta.get("vocab")
    if saved is None:  # (every run of this script records it) e.g. translate.py's workdir
        raise IncompatibleCheckpointError(
            f"{where} holds no character GPT of train/lm.py: its metadata records no "
            "vocabulary (another script's run?); nothing was restored or overwritten. Use "
            "another --workdir."
        )
    if saved != tokenizer.chars:
        # Most often a resume that left out (or mistyped) the run's --config.data_path: say
        # which text the checkpoint learned, so that "another --workdir" is not the only way.
        saved_path = (meta.get("config") or {}).get("data_path")
        hint = "Use another --workdir."
        if isinstance(saved_path, str) and saved_path != config.data_path:

            def name(path: str) -> str:
                return repr(path) if path else "'' (the bundled tinyshakespeare)"

            hint = (
                f"It was trained on data_path {name(saved_path)}, this run reads "
                f"{name(config.data_path)}: to resume it, pass --config.data_path="
                f"{saved_path}; else use another --workdir."
            )
        raise IncompatibleCheckpointError(
            f"{where} was trained on a different character vocabulary "
            f"({len(saved)} characters, this data has {tokenizer.vocab_size}); nothing was "
            f"restored or overwritten. {hint}"
        )
    try:
        saved_model = GPTConfig(**meta["model"])
    except (KeyError, TypeError, ValueError):
        saved_model = None  # no record, another script's, or one of another version
    if saved_model is not None:
        check_model_shapes(init_gpt, saved_model, model, "GPT", where, changed)
    # the whole state's tree, as the restore will check it (shapes only: no compute)
    check_state_tree(meta, where, changed, _abstract_state(model, config))


def _saved_run(meta, where) -> tuple[ml_collections.ConfigDict, GPTConfig, data.CharTokenizer]:
    """The config, model and vocabulary a checkpoint of this script records.

    Raises:
      IncompatibleCheckpointError: another script's checkpoint (translate.py's), or one
        without those records.
    """
    try:
        config = ml_collections.ConfigDict(meta["config"])
        return config, GPTConfig(**meta["model"]), data.CharTokenizer(meta["vocab"])
    except (KeyError, TypeError, ValueError) as e:
        raise IncompatibleCheckpointError(
            f"{where} holds no character GPT of train/lm.py: its metadata has no GPT config "
            f"and vocabulary ({type(e).__name__}: {e}); another script's run?"
        ) from None


# What --sample_only takes from the command line over the checkpoint's config: the attention
# kernel changes no weight, and one of the machine that trained (cuDNN's, on a GPU) may not
# run on the one that samples.
_SAMPLE_OVERRIDES = ("model.attention_implementation",)


def sample(workdir: epath.Path) -> None:
    """Load the latest checkpoint in ``workdir`` and print samples."""
    # (the others describe another run: refuse rather than ignore them)
    overrides = checkpoint_config_overrides("--sample_only", _SAMPLE_OVERRIDES)
    if _NUM_SAMPLES.value == 0:
        raise ValueError("--sample_only with --num_samples=0 has nothing to do")
    with Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        meta = ckpt.read_metadata()
        where = ckpt.step_dir(ckpt.latest_step())
        # (first: a --config file would be refused as another run's, hinting at leaving it out)
        config, model, tokenizer = _saved_run(meta, where)
        # A --config file of another run would otherwise be ignored without a word.
        checkpoint_config_file("--sample_only", meta, where, _SAMPLE_OVERRIDES)
        model = dataclasses.replace(
            model, **{key.removeprefix("model."): value for key, value in overrides.items()}
        )
        _check_sampling(model, tokenizer)
        state, _ = ckpt.restore(_abstract_state(model, config))
    # Every process restores and samples (the same tokens); process 0 prints.
    print_once(f"Sampling from {ckpt.step_dir(int(state.step))}")
    print_samples(state.params, model, tokenizer, _SAMPLE_SEED.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO.
    drop_orbax_leftovers()
    try:
        # A local folder or gs://bucket/... (TPU pods).
        workdir = epath.Path(workdir_from_flag(_WORKDIR.value))
        enable_compilation_cache()
        initialize_distributed()
        # (sampling takes its config from the checkpoint: only training's is compared)
        check_processes_agree(
            {"--workdir": _WORKDIR.value, "--sample_only": _SAMPLE_ONLY.value},
            None if _SAMPLE_ONLY.value else config,
        )
        if _SAMPLE_ONLY.value:
            sigterm_ends_the_process()  # (nothing to save: SIGTERM stops it at once)
            sample(workdir)
        else:
            check_config_keys(config, _DEFAULT_CONFIG)
            train(config, workdir)
    except REPORTED_ERRORS as e:
        exit_with_error(e)
    except RuntimeError:  # (a collective's: another process may have stopped with an error)
        exit_if_another_process_failed()
        raise


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
