"""What kind of checkpoint a path (or hub id) is.

- a file that is a torch zip archive (``.pt``/``.pth``/``.bin``): ``corenet``;
- a directory with ``config.json``: ``mlxeff`` if the config has an ``mlxeff`` section, else ``hf``;
- a path that does not exist but reads ``owner/name``: ``hf`` (a hub id).
"""

from __future__ import annotations

from pathlib import Path

from mlxeff.errors import MlxeffError
from mlxeff.files import read_json

from .hf import is_hub_id

KINDS = ("corenet", "hf", "mlxeff")


def detect(src, source=None) -> str:
    if source is not None and source not in KINDS:
        raise MlxeffError(f"unknown source kind {source!r} (choose corenet, hf or mlxeff)")
    path = Path(src)
    if not path.exists():
        if is_hub_id(str(src)) and source in (None, "hf"):
            return "hf"
        raise MlxeffError("no such file or directory", src)
    if path.is_file():
        kind = "corenet"
        if source not in (None, "corenet"):
            raise MlxeffError(f"a {source} source is a directory, this is a file", src)
        if path.suffix == ".safetensors":
            raise MlxeffError("a lone safetensors file has no config; convert its directory", src)
        return kind
    if not path.is_dir():
        raise MlxeffError("not a regular file or a directory", src)
    if source == "corenet":
        raise MlxeffError("a CoreNet checkpoint is a .pt file, this is a directory", src)
    cfg = path / "config.json"
    if not (cfg.exists() or cfg.is_symlink()):
        pts = sorted(p.name for p in path.glob("*.pt"))
        hint = f" (for a CoreNet checkpoint pass the file, e.g. {pts[0]})" if pts else ""
        raise MlxeffError(f"no config.json{hint}", src)
    try:
        has_section = "mlxeff" in read_json(cfg, what="config.json")
    except MlxeffError:
        has_section = False  # the hf reader reports the broken config with the same message
    detected = "mlxeff" if has_section else "hf"
    return source or detected
