"""LSTM encoder–decoder, attention "dot", full size (GPU or a long CPU run).

python train/translate.py --config=train/configs/lstm_dot.py --workdir=DIR
"""

from configs.translate_base import base_config  # train/ is on sys.path (the script's dir).


def get_config():
    config = base_config("seq2seq")
    config.model.attention = "dot"
    config.model.num_layers = 2
    config.model.bidirectional_encoder = True
    config.beam_size = 4
    return config
