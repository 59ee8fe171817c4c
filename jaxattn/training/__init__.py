"""Model-agnostic training: a loss function, parameters and data in; a trained state out.

Import the modules directly (this package re-exports nothing, so importing one module
does not pull in the others' dependencies):

- ``state``: ``TrainState`` and ``create_train_state``.
- ``optim``: AdamW with nanoGPT's warmup + cosine schedule, matrix-only weight decay and
  global-norm clipping.
- ``loop``: jitted ``make_train_step`` / ``make_eval_step`` and ``fit`` (progress bar,
  evaluation, metrics, checkpoints, exact resume, NaN guard, save on SIGTERM).
- ``checkpoint``: orbax ``CheckpointManager`` wrapper with tree-compatibility checks.
- ``data``: character tokenizer and a deterministic, resumable grain pipeline.
- ``metrics``: host-reduced means, ``metrics.jsonl`` and TensorBoard output.
- ``sharding``: the device mesh (``data``, ``fsdp``, ``tensor`` axes), partition rules, and
  state and batch shardings, one or many hosts.
- ``translation_data``: sentence pairs, their split, sentencepiece and bucketed batches.
"""
