"""jaxattn: sequence models with attention as pure JAX functions.

Layers, bottom up (arrows point down only):

- ``jaxattn.ops``: the math, once: LSTM scans, attention scores, multi-head attention,
  masks, positions, basic layers. Pure functions over arrays and NamedTuples of weights.
- ``jaxattn.models``: whole models (GPT, Seq2Seq, Transformer) and decoding.
- ``jaxattn.nn``: thin Flax NNX modules owning the same weight pytrees.
- ``jaxattn.training``: a model-agnostic optax/orbax/grain training loop.
"""

__version__ = "0.1.0"
