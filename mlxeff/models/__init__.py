"""Model definitions: the layer-wise scaled decoder and its config builders."""

from .config import (
    ConfigError,
    ModelArgs,
    config_from_hf,
    layerwise_config,
    llama_config,
    make_divisible,
    openelm_config,
)
from .lws import Attention, FeedForward, Model, TransformerBlock

__all__ = [
    "Attention", "ConfigError", "FeedForward", "Model", "ModelArgs", "TransformerBlock",
    "config_from_hf", "layerwise_config", "llama_config", "make_divisible", "openelm_config",
]
