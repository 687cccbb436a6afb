"""mlxeff: efficiency techniques for layer-wise scaled language models on MLX."""

__version__ = "0.1.0"

from .errors import MlxeffError
from .io import load, save
from .models import Model, ModelArgs, layerwise_config, openelm_config
from .generate import generate, stream_generate  # noqa: E402  (rebinds the name to the function)


__all__ = ["Model", "ModelArgs", "MlxeffError", "generate", "load", "layerwise_config",
           "openelm_config", "save", "stream_generate"]
