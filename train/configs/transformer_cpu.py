"""Encoder–decoder Transformer sized for a 2-core CPU (< 30 min, full test BLEU).

python train/translate.py --config=train/configs/transformer_cpu.py --workdir=DIR
"""

from configs.translate_base import base_config  # train/ is on sys.path (the script's dir).


def get_config():
    config = base_config("transformer")
    config.vocab_size = 4000  # Joint English+Spanish sentencepiece pieces.
    config.max_len = 24  # Train/val pairs up to 24 tokens (+ EOS): nearly all of the corpus.
    config.buckets = (8, 12, 16, 24, 64)  # 64 only holds long test sources.
    config.model.embed_dim = 128
    config.model.num_heads = 4
    config.model.num_encoder_layers = 2
    config.model.num_decoder_layers = 2
    config.batch_size = 64
    config.num_steps = 5000  # The LSTM _cpu configs' budget: same steps and batch.
    config.lr_decay_steps = 5000
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.max_eval_examples = 2000
    config.max_test_examples = 0  # BLEU on the whole test split (5,945 pairs).
    config.beam_size = 4  # Beam search with the GNMT length penalty.
    return config
