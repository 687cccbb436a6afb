"""Weight formats: per-layer quantization specs and the registry that applies them.

``spec`` holds the registry and ``apply_quantization_spec`` (the one way compressed modules are
built, on load and when quantizing); each format module registers its builder on import:
``affine`` (MLX's group-wise affine quantization) and ``seedlm`` (arXiv 2410.10714, packed format
in ``seedlm_format``).
"""

from .spec import SPEC_BUILDERS, apply_quantization_spec, register_method, validate_quantized
from . import affine, seedlm  # noqa: E402,F401  (register their builders)

__all__ = ["SPEC_BUILDERS", "apply_quantization_spec", "register_method", "validate_quantized"]
