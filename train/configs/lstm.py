"""LSTM encoder–decoder, attention "none", full size (GPU or a long CPU run).

python train/translate.py --config=train/configs/lstm.py --workdir=DIR
"""

from configs.translate_base import lstm_config  # train/ is on sys.path (the script's dir).


def get_config():
    return lstm_config("none")
