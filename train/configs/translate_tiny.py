"""A seconds-long translation run for tests and smoke checks (not for quality).

python train/translate.py --config=train/configs/translate_tiny.py --workdir=DIR
python train/translate.py --config=train/configs/translate_tiny.py:transformer --workdir=DIR

The argument after ``:`` picks the model: an LSTM attention name ("none", "dot",
"general", "additive"; default "dot") or "transformer".
"""

from configs.translate_base import base_config  # train/ is on sys.path (the script's dir).


def get_config(arg: str = "dot"):
    config = base_config("transformer" if arg == "transformer" else "seq2seq")
    config.max_train_examples = 2000  # Short sentences: the corpus starts with them.
    config.max_eval_examples = 64
    config.max_test_examples = 24
    config.vocab_size = 300
    config.max_len = 16
    config.buckets = (16,)  # One bucket: one compiled shape per step function.
    if arg == "transformer":
        config.model.embed_dim = 16
        config.model.num_heads = 2
        config.model.num_encoder_layers = 1
        config.model.num_decoder_layers = 1
        config.model.dropout = 0.0
        config.model.max_len = 16
    else:
        config.model.embed_dim = 16
        config.model.hidden_size = 16
        config.model.attention = arg
        config.model.dropout = 0.0
    config.batch_size = 8
    config.warmup_steps = 2
    config.lr_decay_steps = 20
    config.num_steps = 6
    config.eval_every = 3
    config.eval_batches = 2
    config.log_every = 2
    config.checkpoint_every = 3
    config.decode_max_len = 16
    config.decode_batch_size = 8
    return config
