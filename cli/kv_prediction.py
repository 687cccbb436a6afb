"""``mlxeff train-kv-prediction``: train an auxiliary model and KV predictor for a base model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import print_json
from .train_options import TrainingRun, training_options


def register(app: typer.Typer) -> None:
    app.command("train-kv-prediction")(train_kv_prediction)


@training_options(defaults=dict(lr=1e-3, min_lr=1e-4, warmup=50, eval_every=100, eval_tokens=65_536),
                  helps=dict(seed="Seed for data order.",
                             eval_every="Validate and checkpoint every N steps (0 = at the end)."),
                  omit=("z_loss", "save_every"), fixed=dict(z_loss=0.0), folder="WORK")
def train_kv_prediction(
    base: Path = typer.Option(..., "--base", "-b", help="The base model directory (mlxeff format, "
                              "with its tokenizer). It stays frozen."),
    aux: str = typer.Option("lp-0.5", "--aux", help="The auxiliary model: lp-0.25 / lp-0.5 / "
                            "lp-0.75 (the base with layers removed, CoreNet's layer choice), "
                            "layers:0,2,5 (explicit), or a model directory (a separate smaller "
                            "model with the base's vocabulary)."),
    train_files: List[str] = typer.Option(..., "--train", help="Training text: .txt/.txt.gz files "
                                          "or quoted glob patterns; repeat for more."),
    valid_files: Optional[List[str]] = typer.Option(None, "--valid", help="Validation text files."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where the trained auxiliary "
                                       "model + predictor go (default BASE/kv_prediction/NAME)."),
    name: Optional[str] = typer.Option(None, "--name", help="NAME for the default --out (default: "
                                       "the --aux value, plus -kvW when --kv-weight is given)."),
    work: Optional[Path] = typer.Option(None, "--work", help="Checkpoints and token cache "
                                        "(default: a hidden folder next to --out, or, when --out "
                                        "is inside BASE as by default, a folder in the temporary "
                                        "directory; removed after success; after Ctrl-C or an "
                                        "error kept only if it holds a checkpoint, for --resume)."),
    kv_weight: Optional[float] = typer.Option(None, "--kv-weight", help="lambda, the weight of the "
                                              "KV consistency (L1) loss; default 1/base layers; "
                                              "0 disables it."),
    base_weight: float = typer.Option(1.0, "--base-weight", help="Weight of CE_base (the base's "
                                      "loss when generating from the predicted cache)."),
    aux_weight: float = typer.Option(1.0, "--aux-weight", help="Weight of CE_aux."),
    predictor_init: str = typer.Option("identity", "--predictor-init", help="identity (square "
                                       "maps) or random."),
    run: TrainingRun = None,
    save_dtype: str = typer.Option("base", "--save-dtype", help="Precision of the saved weights: "
                                   "base (the base model's), float32, float16 or bfloat16."),
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep WORK (checkpoints, token "
                                   "cache) after success."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train a KV Prediction auxiliary model and predictor (arXiv 2410.08391) with BASE frozen:
    loss = CE_base (from the predicted cache) + CE_aux + lambda * sum over layers of the L1 error of
    the predicted keys and values. Saves a directory that `mlxeff generate --kv-prediction DIR`
    loads."""
    from dataclasses import replace

    from mlxeff.progress import silenced
    from mlxeff.techniques.kv_prediction_train import KVLossConfig, run_kv_training

    cfg = replace(run.cfg, save_every=run.cfg.eval_every)  # a checkpoint at each validation
    if out is None:
        if name is None:
            name = aux.lower() if "/" not in aux and not Path(aux).exists() else Path(aux).name
            if kv_weight is not None:
                name += f"-kv{kv_weight:g}"
        out = Path(base) / "kv_prediction" / name
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    with silenced(json_output):  # bars off for --json, and back on afterwards (in-process callers)
        summary = run_kv_training(
            cfg, base_dir=base, aux_spec=aux, train_files=train_files, valid_files=valid_files or [],
            out=out, loss_cfg=KVLossConfig(kv_weight=kv_weight, base_weight=base_weight,
                                           aux_weight=aux_weight),
            predictor_init=predictor_init, work=work, eval_tokens=run.eval_tokens,
            cache_dir=run.cache_dir, resume=run.resume, keep_work=keep_work, force=force,
            save_dtype=save_dtype, say=say,
        )
    if json_output:
        print_json(summary)
        return
    first, last = summary.get("valid_initial"), summary.get("valid_final")
    print(f"saved: {summary['out']}  ({summary['aux_parameters']:,} auxiliary + "
          f"{summary['predictor_parameters']:,} predictor parameters, lambda "
          f"{summary['kv_weight']:.4g}, {summary['tokens_seen']:,} tokens, "
          f"{summary['wall_time_s']:.1f} s)")
    if first and last:
        for key, label in (("ce_base", "CE_base (predicted cache)"), ("ce_aux", "CE_aux"),
                           ("kv_l1", "KV L1 (sum over layers)")):
            print(f"{label:26s} {first[key]:.4f} -> {last[key]:.4f}")
        print(f"{'base CE (own cache)':26s} {last['ce_base_own']:.4f}")
