"""Trained technique artifacts (KV Prediction, M2R2): a directory with a JSON metadata file that
names its kind and format version beside the weights. Reading the metadata and finding the
directory are the same for every kind; what the metadata holds is each technique's own."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from ..errors import MlxeffError
from ..files import read_json


def read_meta(path, *, kind: str, label: str, meta_file: str, format_version: int,
              article: str = "a") -> Tuple[dict, Path]:
    """The metadata of the artifact directory ``path`` (``meta_file`` inside it, read strictly by
    ``files.read_json``) and that file's path, after checking that it is a JSON object of this
    ``kind`` (its ``mlxeff_artifact``) and ``format_version``; ``label`` names the kind in
    messages ("KV prediction")."""
    path = Path(path)
    if not path.is_dir():
        raise MlxeffError(f"no such {label} directory", path)
    file = path / meta_file
    if not file.is_file():
        raise MlxeffError(f"missing {meta_file} (is this {article} {label} directory?)", path)
    meta = read_json(file, expect=None)  # strict and bounded, as every loader reads JSON
    if not isinstance(meta, dict) or meta.get("mlxeff_artifact") != kind:
        raise MlxeffError(f"not {article} {label} artifact (mlxeff_artifact != {kind})", file)
    if meta.get("format_version") != format_version:
        raise MlxeffError(f"unsupported format_version {meta.get('format_version')!r}", file)
    return meta, file


def resolve_dir(path, model_dir, subdir: str) -> Path:
    """``path`` itself, or ``MODEL/<subdir>/<path>`` when only that exists (artifacts saved
    beside the model they were trained for)."""
    p = Path(path)
    if p.is_dir() or model_dir is None:
        return p
    alt = Path(model_dir) / subdir / str(path)
    return alt if alt.is_dir() else p
