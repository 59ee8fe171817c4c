"""LSTM encoder–decoder, attention "general", sized for a 2-core CPU (< 30 min, full test BLEU).

python train/translate.py --config=train/configs/lstm_general_cpu.py --workdir=DIR
"""

from configs.translate_base import lstm_cpu_config  # train/ is on sys.path (the script's dir).


def get_config():
    return lstm_cpu_config("general")
