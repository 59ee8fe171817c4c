"""A seconds-long character GPT run for tests and smoke checks (not for quality).

python train/lm.py --config=train/configs/tiny.py --workdir=DIR
"""

import ml_collections
from configs.mesh import mesh_config  # train/ is on sys.path (the script's dir).
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    config.data_path = ""  # UTF-8 text file; "" = the bundled tinyshakespeare (jaxattn/data).
    config.train_fraction = 0.9  # First 90% of the characters train, the last 10% validate.

    # Model: GPTConfig fields (vocab_size comes from the data).
    config.model = ml_collections.ConfigDict()
    config.model.num_layers = 2  # Two blocks: the layer scan still runs more than once.
    config.model.num_heads = 2  # Attention heads.
    config.model.embed_dim = 16  # Model width D.
    config.model.block_size = 16  # Context length = training window T.
    config.model.mlp_ratio = 4  # MLP width = 4 * embed_dim.
    config.model.dropout = 0.0  # Dropout doubles compile time; the loop tests cover rng resume.
    config.model.use_bias = True  # Exercise the bias leaves too.
    config.model.positions = "learned"  # GPT-2 learned position table.
    config.model.tie_embeddings = True  # Output layer = token embedding (weight tying).
    config.model.dtype = "float32"  # Compute dtype.
    config.model.remat = False  # Recompute block activations in the backward pass.
    # Attention variants, off by default (e.g. --config.model.attention_window=32).
    config.model.num_kv_heads = placeholder(int)  # Fewer key/value heads: grouped-query.
    config.model.attention_window = placeholder(int)  # A token sees itself and W - 1 before.
    config.model.attention_implementation = placeholder(str)  # None: fastest kernel here.
    # Output layer and loss N positions at a time: [B, N, V] logits in memory, not [B, T, V].
    config.model.loss_chunk_size = placeholder(int)  # None: all at once (small vocabularies).
    config.model.rope_base = 10000.0  # Rotary frequency base (with positions="rope").

    # Batches.
    config.batch_size = 4  # Windows per microbatch, all processes and devices together.
    config.grad_accum_steps = 1  # Microbatches per optimizer step.

    # Optimizer.
    config.learning_rate = 1e-2  # Peak learning rate.
    config.min_lr = 1e-3  # Final learning rate.
    config.warmup_steps = 2  # Linear warmup steps.
    config.lr_decay_steps = 20  # Cosine reaches min_lr here.
    config.b1 = 0.9  # Adam beta1.
    config.b2 = 0.99  # Adam beta2.
    config.weight_decay = 0.1  # Decoupled weight decay on matrices and embeddings.
    config.grad_clip = 1.0  # Global gradient-norm clip (0 disables).

    # Loop.
    config.num_steps = 8  # Optimizer steps.
    config.eval_every = 4  # Evaluate every N steps, and at 0 and the end.
    config.eval_batches = 2  # Validation batches per evaluation.
    config.log_every = 2  # Write train metrics every N steps.
    config.checkpoint_every = 4  # Save every N steps (and at the end).
    config.max_to_keep = 3  # Latest checkpoints kept, plus the best by val loss.
    config.keep_best = True  # Also save whenever val loss improves; keep the best.
    config.async_checkpointing = True  # Write checkpoints in the background.
    config.seed = 0  # Initialisation, dropout and batch sampling.

    # Devices: data x fsdp x tensor = the device count (-1: all the others leave).
    config.mesh = mesh_config()
    return config
