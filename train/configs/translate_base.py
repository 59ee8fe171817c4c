"""Shared defaults of the translation configs (``train/translate.py``); not a run config.

Each ``train/configs/<name>.py`` calls ``base_config()`` and changes what differs.
"""

import ml_collections
from configs.mesh import mesh_config  # train/ is on sys.path (the script's dir).
from ml_collections.config_dict import placeholder


def base_config(kind: str = "seq2seq") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data.
    config.data_path = ""  # English<TAB>Spanish lines (.gz ok); "" = bundled Tatoeba spa-eng.
    config.split_seed = 0  # Distinct English sentences split 90/5/5 train/val/test.
    # The first N train pairs (0: all): the bundled corpus is sorted by length, so these
    # are the N shortest.
    config.max_train_examples = 0
    # Validation pairs used (0: all that fit max_len), drawn at random with split_seed.
    config.max_eval_examples = 0
    config.max_test_examples = 0  # Test pairs decoded for BLEU (0: all), drawn likewise.
    config.vocab_size = 8000  # Joint English+Spanish sentencepiece vocabulary (upper bound).
    config.max_len = 64  # Drop train/val pairs longer than this many tokens (+ EOS).
    config.buckets = (8, 12, 16, 24, 32, 64)  # Padded lengths: one compiled shape each.

    # Model: Seq2SeqConfig or TransformerConfig fields (vocab sizes and ids from the data).
    config.model = ml_collections.ConfigDict()
    config.model.kind = kind  # "seq2seq" (LSTM) or "transformer".
    if kind == "seq2seq":
        config.model.embed_dim = 256  # E.
        config.model.hidden_size = 512  # h.
        config.model.num_layers = 1  # LSTM layers, encoder and decoder.
        config.model.bidirectional_encoder = False  # The seed's one-way encoder.
        config.model.attention = "dot"  # "none", "dot", "general" or "additive".
        config.model.dropout = 0.2  # Embeddings, between layers, before the output layer.
    else:
        config.model.embed_dim = 256  # D.
        config.model.num_heads = 4  # N.
        config.model.num_encoder_layers = 3  # Encoder blocks.
        config.model.num_decoder_layers = 3  # Decoder blocks.
        config.model.mlp_ratio = 4  # F = 4 D.
        config.model.dropout = 0.1  # Embeddings, attention probabilities, residual branches.
        config.model.max_len = 64  # Position table length (>= largest bucket, decode_max_len).
        # Output layer and loss N target positions at a time: [B, N, V] logits in memory.
        config.model.loss_chunk_size = placeholder(int)  # None: all at once.

    # Batches and loss.
    config.batch_size = 64  # Sentence pairs per step, all processes and devices together.
    config.label_smoothing = 0.1  # eps: targets (1 - eps) one-hot + eps / V (val_loss too).

    # Optimizer.
    config.learning_rate = 2e-3  # Peak learning rate.
    config.min_lr = 1e-4  # Final learning rate.
    config.warmup_steps = 200  # Linear warmup steps.
    config.lr_decay_steps = 20_000  # Cosine reaches min_lr here.
    config.b1 = 0.9  # Adam beta1.
    config.b2 = 0.98  # Adam beta2.
    config.weight_decay = 0.01  # Decoupled weight decay.
    config.grad_clip = 1.0  # Global gradient-norm clip (0 disables).

    # Loop.
    config.num_steps = 20_000  # Optimizer steps.
    config.eval_every = 1000  # Evaluate every N steps, and at 0 and the end.
    config.eval_batches = 20  # Validation batches per evaluation.
    config.log_every = 100  # Write train metrics every N steps.
    config.checkpoint_every = 2000  # Save every N steps (and at the end).
    config.max_to_keep = 2  # Latest checkpoints kept, plus the best by val loss.
    config.keep_best = True  # Also save whenever val loss improves.
    config.async_checkpointing = True  # Write checkpoints in the background.
    config.seed = 0  # Initialisation, dropout and batch order.

    # Test decoding.
    config.beam_size = 1  # 1: greedy; k > 1: beam search with the GNMT length penalty.
    config.decode_max_len = 64  # Most output tokens (EOS included).
    config.decode_batch_size = 128  # Test sentences per decoding batch.

    # Devices: data x fsdp x tensor = the device count (-1: all the others leave).
    config.mesh = mesh_config()
    return config


def cpu_config(kind: str) -> ml_collections.ConfigDict:
    """The data and training budget every ``*_cpu`` config shares (< 30 min on 2 cores), so
    that only the model differs between the rows of the BLEU table."""
    config = base_config(kind)
    config.vocab_size = 4000  # Joint English+Spanish sentencepiece pieces.
    # Train/val pairs with sources up to 24 tokens and targets up to 23 (+ EOS): nearly all.
    config.max_len = 24
    config.buckets = (8, 12, 16, 24, 64)  # 64 only holds long test sources.
    config.model.embed_dim = 128
    config.batch_size = 64
    # 5000 steps (~3 epochs); 0.14-0.2 s/step in quiet stretches of the 2-core CPU: ~15 min.
    config.num_steps = 5000
    config.lr_decay_steps = 5000
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.max_eval_examples = 2000  # Of 5,994 validation pairs, drawn at random.
    config.max_test_examples = 0  # BLEU on the whole test split (5,945 pairs).
    config.beam_size = 4  # Beam search with the GNMT length penalty for the test BLEU.
    return config


def lstm_cpu_config(attention: str) -> ml_collections.ConfigDict:
    """The LSTM encoder-decoder sized for a 2-core CPU, any attention (``cpu_config``'s
    budget)."""
    config = cpu_config("seq2seq")
    config.model.attention = attention
    config.model.hidden_size = 256
    config.model.dropout = 0.1
    return config


def lstm_config(attention: str) -> ml_collections.ConfigDict:
    """The full-size LSTM encoder-decoder (GPU or a long CPU run), any attention."""
    config = base_config("seq2seq")
    config.model.attention = attention
    config.model.num_layers = 2
    config.model.bidirectional_encoder = True
    config.beam_size = 4
    return config
