"""LSTM encoder–decoder, attention "general", full size (GPU or a long CPU run).

python train/translate.py --config=train/configs/lstm_general.py --workdir=DIR
"""

from configs.translate_base import lstm_config  # train/ is on sys.path (the script's dir).


def get_config():
    return lstm_config("general")
