"""Logical axis names of the models' parameters, for sharding them over a device mesh.

A rule is ``(path regex, logical names of the leaf's trailing axes)``; the first rule whose
regex matches a leaf's ``/``-joined path (``blocks/attn/w_q``) names its axes, and leaves
no rule matches are replicated. ``jaxattn.training.sharding`` maps the logical names to
mesh axes (``embed`` -> ``fsdp``; ``heads``, ``kv_heads``, ``mlp``, ``vocab`` ->
``tensor``). The names describe the weights, not a mesh, so a model file never mentions
devices.

Logical names: ``vocab`` (V), ``embed`` (D, the residual width), ``heads`` (N query
heads), ``kv_heads`` (K), ``mlp`` (F, the hidden width of the feed-forward layer).
Leading axes not named by a rule (the stacked ``[L]`` layer axis) are never split.
"""

from __future__ import annotations

# GPT (models/gpt.py) and the encoder-decoder Transformer (models/transformer.py) share
# the ops' weight names, so one rule set covers both: self- and cross-attention match
# "attn/", the token, source and target tables "embedding/table".
TRANSFORMER_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"position_embedding/table$", (None, "embed")),  # [T, D]
    (r"embedding/table$", ("vocab", "embed")),  # [V, D]
    (r"attn/w_q$", ("embed", "heads", None)),  # [D, N, H]
    (r"attn/w_[kv]$", ("embed", "kv_heads", None)),  # [D, K, H]
    (r"attn/w_o$", ("heads", None, "embed")),  # [N, H, D]
    (r"attn/b_q$", ("heads", None)),  # [N, H]
    (r"attn/b_[kv]$", ("kv_heads", None)),  # [K, H]
    (r"mlp/up/w$", ("embed", "mlp")),  # [D, F]
    (r"mlp/up/b$", ("mlp",)),  # [F]
    (r"mlp/down/w$", ("mlp", "embed")),  # [F, D]
    (r"(^|/)head/w$", ("embed", "vocab")),  # [D, V]
)

# The LSTM encoder-decoder (models/seq2seq.py): the vocabulary-sized tables and output
# layer split; the LSTM matrices stay whole, because each of the T sequential steps would
# otherwise gather them again.
SEQ2SEQ_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r"embedding/table$", ("vocab", "embed")),  # [V, E]
    (r"(^|/)output/w$", ("embed", "vocab")),  # [h, V]
    (r"(^|/)output/b$", ("vocab",)),  # [V]
)
