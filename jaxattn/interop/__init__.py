"""Weight conversion between jaxattn and PyTorch / Hugging Face / safetensors.

jaxattn imports without torch, transformers or safetensors: the converters import them only
when called (install them with ``pip install "jaxattn[interop]"``).
"""

from jaxattn.interop.gpt2 import gpt2_config_from_hf, gpt2_from_hf, gpt2_to_hf_state_dict
from jaxattn.interop.safetensors import (
    flatten_with_names,
    load_safetensors,
    read_safetensors_metadata,
    save_safetensors,
)
from jaxattn.interop.torch_lstm import lstm_from_torch, lstm_to_torch_state_dict
from jaxattn.interop.torch_mha import mha_from_torch, mha_to_torch_state_dict

__all__ = [
    "flatten_with_names",
    "gpt2_config_from_hf",
    "gpt2_from_hf",
    "gpt2_to_hf_state_dict",
    "load_safetensors",
    "lstm_from_torch",
    "lstm_to_torch_state_dict",
    "mha_from_torch",
    "mha_to_torch_state_dict",
    "read_safetensors_metadata",
    "save_safetensors",
]
