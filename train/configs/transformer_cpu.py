"""Encoder–decoder Transformer sized for a 2-core CPU (< 30 min, full test BLEU).

python train/translate.py --config=train/configs/transformer_cpu.py --workdir=DIR
"""

from configs.translate_base import cpu_config  # train/ is on sys.path (the script's dir).


def get_config():
    config = cpu_config("transformer")  # The LSTM _cpu configs' data and budget.
    config.model.num_heads = 4
    config.model.num_encoder_layers = 2
    config.model.num_decoder_layers = 2
    return config
