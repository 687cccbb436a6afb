"""Converters: CoreNet ``.pt`` and Hugging Face checkpoints -> the mlxeff format, torch-free.

``convert(src, out, ...)`` is the entry point (``mlxeff convert`` on the command line). Checkpoint
files are read without torch: safetensors through a strict header reader, torch ``.pt``/``.bin``
files through a restricted unpickler that refuses any global outside an allow-list before it runs.
"""

from .pipeline import convert
from .source import detect

__all__ = ["convert", "detect"]
