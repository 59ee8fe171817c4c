"""Encoder–decoder Transformer, full size (GPU or a long CPU run).

python train/translate.py --config=train/configs/transformer.py --workdir=DIR
"""

from configs.translate_base import base_config  # train/ is on sys.path (the script's dir).


def get_config():
    config = base_config("transformer")
    config.model.embed_dim = 512
    config.model.num_heads = 8
    config.model.num_encoder_layers = 6
    config.model.num_decoder_layers = 6
    config.learning_rate = 7e-4
    config.warmup_steps = 4000
    config.beam_size = 4
    return config
