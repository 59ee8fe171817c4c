"""LSTM encoder–decoder, attention "general", full size (GPU or a long CPU run).

python train/translate.py --config=train/configs/lstm_general.py --workdir=DIR
"""

from configs.translate_base import base_config  # train/ is on sys.path (the script's dir).


def get_config():
    config = base_config("seq2seq")
    config.model.attention = "general"
    config.model.num_layers = 2
    config.model.bidirectional_encoder = True
    config.beam_size = 4
    return config
