"""nanoGPT's GPU Shakespeare run: a 6-layer, 384-wide character GPT (~10.7M parameters).

Same settings as nanoGPT's ``config/train_shakespeare_char.py`` (val loss ~1.47 after 5000
steps on a GPU); on a CPU use ``shakespeare_char_cpu.py``.

    python train/lm.py --config=train/configs/shakespeare_char.py --workdir=DIR
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
    config.model.num_layers = 6  # n_layer
    config.model.num_heads = 6  # n_head
    config.model.embed_dim = 384  # n_embd
    config.model.block_size = 256  # Context length = training window T.
    config.model.mlp_ratio = 4  # MLP width = 4 * embed_dim.
    config.model.dropout = 0.2  # The model overfits this small corpus without it.
    config.model.use_bias = False  # nanoGPT train.py's default (bias=False), not overridden.
    config.model.gelu_approximate = False  # nanoGPT's MLP uses nn.GELU(): the exact erf form.
    config.model.positions = "learned"  # GPT-2 learned position table.
    config.model.tie_embeddings = True  # Output layer = token embedding (weight tying).
    config.model.dtype = "float32"  # Compute dtype; "bfloat16" is faster on GPU/TPU.
    config.model.remat = False  # Recompute block activations in the backward pass.
    # Attention variants, off by default (e.g. --config.model.attention_window=32).
    config.model.num_kv_heads = placeholder(int)  # Fewer key/value heads: grouped-query.
    config.model.attention_window = placeholder(int)  # A token sees itself and W - 1 before.
    config.model.attention_implementation = placeholder(str)  # None: fastest kernel here.
    # Output layer and loss N positions at a time: [B, N, V] logits in memory, not [B, T, V].
    config.model.loss_chunk_size = placeholder(int)  # None: all at once (small vocabularies).
    config.model.rope_base = 10000.0  # Rotary frequency base (with positions="rope").

    # Batches.
    config.batch_size = 64  # Windows per microbatch, all processes and devices together.
    config.grad_accum_steps = 1  # Microbatches per optimizer step (batch = 64 * 1).

    # Optimizer: AdamW, warmup + cosine (nanoGPT's get_lr), decay on matrices only.
    config.learning_rate = 1e-3  # Peak learning rate.
    config.min_lr = 1e-4  # Final learning rate (learning_rate / 10).
    config.warmup_steps = 100  # Linear warmup steps (warmup_iters).
    config.lr_decay_steps = 5000  # Cosine reaches min_lr here (lr_decay_iters = max_iters).
    config.b1 = 0.9  # Adam beta1.
    config.b2 = 0.99  # Adam beta2 (higher than GPT-2's 0.95: few tokens per step).
    config.weight_decay = 0.1  # Decoupled weight decay on matrices and embeddings.
    config.grad_clip = 1.0  # Global gradient-norm clip (0 disables).

    # Loop.
    config.num_steps = 5000  # Optimizer steps (max_iters).
    config.eval_every = 250  # Evaluate every N steps (eval_interval), and at 0 and the end.
    config.eval_batches = 200  # Validation batches per evaluation (eval_iters).
    config.log_every = 10  # Write train metrics every N steps (log_interval).
    config.checkpoint_every = 250  # Save every N steps (and at the end, on improvement, SIGTERM).
    config.max_to_keep = 3  # Latest checkpoints kept, plus the best by val loss.
    config.keep_best = True  # Also save whenever val loss improves; keep the best.
    config.async_checkpointing = True  # Write checkpoints in the background.
    config.seed = 1337  # Initialisation, dropout and batch sampling.

    # Devices: data x fsdp x tensor = the device count (-1: all the others leave).
    config.mesh = mesh_config()
    return config
