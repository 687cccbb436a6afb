"""A model directory's vital statistics (``mlxeff info``)."""

from __future__ import annotations

from pathlib import Path

from mlx.utils import tree_flatten

from .io import load_model


def model_description(path) -> str:
    """The first paragraph of the directory's README.md (its title skipped), on one line; "" if none.

    The shipped model says what it is this way, and so can any directory a user writes one for."""
    readme = Path(path) / "README.md"
    if not readme.is_file():
        return ""
    paragraph = []
    for line in readme.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        if not line:
            if paragraph:
                break
            continue
        paragraph.append(line)
    return " ".join(paragraph)


def model_summary(path) -> dict:
    path = Path(path)
    model = load_model(path, lazy=True)
    args = model.args
    stored = {k: v.nbytes * 8 for k, v in tree_flatten(model.parameters())}
    logical = args.num_parameters()
    linear_logical = sum(
        d * args.model_dim
        for q, kv, f in zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims)
        for d in ((q + 2 * kv) * args.head_dim, q * args.head_dim, 2 * f, f)
    )
    linear_stored = sum(
        bits for k, bits in stored.items()
        if ".layers." in k and any(p in k for p in ("qkv_proj", "out_proj", "proj_1", "proj_2"))
    )
    meta = getattr(model, "mlxeff_meta", {}) or {}
    return {
        "path": str(path),
        "description": model_description(path),
        "architecture": "openelm" if args.normalize_qk_projections else "llama-family (openelm layout)",
        "model_dim": args.model_dim,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "num_layers": args.num_transformer_layers,
        "tied_embeddings": args.share_input_output_layers,
        "context_length": args.max_context_length,
        "parameters": logical,
        "bits_per_weight": sum(stored.values()) / logical,
        "linear_bits_per_weight": linear_stored / linear_logical,
        "size_on_disk_bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "quantization": meta.get("quantization") or {},
        "artifacts": meta.get("artifacts") or {},
        "layers": [
            {"layer": i, "query_heads": q, "kv_heads": kv, "ffn_dim": f}
            for i, (q, kv, f) in enumerate(zip(args.num_query_heads, args.num_kv_heads, args.ffn_dims))
        ],
    }
