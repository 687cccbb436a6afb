"""``mlxeff info``: what a model directory holds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import print_json


def register(app: typer.Typer) -> None:
    app.command("info")(info)


def info(
    model: Optional[Path] = typer.Argument(None, help="An mlxeff model directory (default: the "
                                           "embedded model)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Architecture, parameter count, per-layer table (heads, KV heads, FFN width),
    bits per weight and size on disk."""
    from mlxeff.io import resolve_model_dir
    from mlxeff.summary import model_summary

    s = model_summary(resolve_model_dir(model))
    if json_output:
        print_json(s)
        return
    print(f"model:        {s['path']}")
    if s["description"]:
        print(f"about:        {s['description']}")
    print(f"architecture: {s['architecture']}  (model_dim {s['model_dim']}, head_dim {s['head_dim']}, "
          f"vocab {s['vocab_size']}, {'tied' if s['tied_embeddings'] else 'untied'} embeddings)")
    print(f"parameters:   {s['parameters']:,}  (context {s['context_length']:,} tokens)")
    print(f"bits/weight:  {s['bits_per_weight']:.3f} overall, {s['linear_bits_per_weight']:.3f} in the blocks' linear layers")
    print(f"size on disk: {s['size_on_disk_bytes'] / 1e6:.2f} MB")
    if s["quantization"]:
        methods = sorted({f"{v['method']}" + (f" {v['bits']}-bit" if 'bits' in v else '')
                           + (f" {v['basis']} basis" if 'basis' in v else '') for v in s['quantization'].values()})
        print(f"quantization: {len(s['quantization'])} modules ({', '.join(methods)})")
    if s["artifacts"]:
        print(f"artifacts:    {', '.join(sorted(s['artifacts']))}")
    print(f"{'layer':>5} {'q heads':>7} {'kv heads':>8} {'ffn dim':>7}")
    for row in s["layers"]:
        print(f"{row['layer']:>5} {row['query_heads']:>7} {row['kv_heads']:>8} {row['ffn_dim']:>7}")
