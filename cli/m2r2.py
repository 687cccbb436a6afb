"""``mlxeff train-m2r2``: train an M2R2 accelerated residual stream for a frozen model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from .common import print_json
from .train_options import TrainingRun, training_options


def register(app: typer.Typer) -> None:
    app.command("train-m2r2")(train_m2r2)


@training_options(defaults=dict(lr=1e-3, min_lr=1e-4, warmup=50, weight_decay=0.0, eval_every=100,
                                eval_tokens=65_536),
                  helps=dict(seed="Seed for the adapters' initialisation and the data order.",
                             eval_every="Validate and checkpoint every N steps (0 = at the end)."),
                  omit=("z_loss", "save_every"), fixed=dict(z_loss=0.0), folder="WORK")
def train_m2r2(
    base: Path = typer.Option(..., "--base", "-b", help="The model directory (mlxeff format, with "
                              "its tokenizer). It stays frozen."),
    rate: float = typer.Option(2.0, "--rate", "-r", help="The fast stream's rate: it runs "
                               "ceil(layers / rate) of the model's blocks, step k aligned with "
                               "depth ~ rate * k."),
    rank: int = typer.Option(8, "--rank", help="Rank of the adapters on each weight matrix."),
    train_files: List[str] = typer.Option(..., "--train", help="Training text: .txt/.txt.gz files "
                                          "or quoted glob patterns; repeat for more."),
    valid_files: Optional[List[str]] = typer.Option(None, "--valid", help="Validation text files."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where the trained fast stream "
                                       "goes (default BASE/m2r2/NAME)."),
    name: Optional[str] = typer.Option(None, "--name", help="NAME for the default --out (default "
                                       "r<RATE>-rank<RANK>)."),
    work: Optional[Path] = typer.Option(None, "--work", help="Checkpoints and token cache "
                                        "(default: a hidden sibling of --out)."),
    align_weight: float = typer.Option(1.0, "--align-weight", help="Weight of the alignment loss "
                                       "(fast state after k steps vs the model's at its target "
                                       "depth)."),
    lm_weight: float = typer.Option(1.0, "--lm-weight", help="Weight of the next-token loss "
                                    "through the shared head."),
    kd_weight: float = typer.Option(1.0, "--kd-weight", help="Weight of KL(model || fast stream) "
                                    "on the next-token distribution (0: the paper's loss)."),
    router_weight: float = typer.Option(0.1, "--router-weight", help="Weight of the router's "
                                        "binary cross-entropy."),
    run: TrainingRun = None,
    keep_work: bool = typer.Option(False, "--keep-work", help="Keep the checkpoints after success."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --out."),
    json_output: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train an M2R2 accelerated residual stream (arXiv 2502.02040) with BASE frozen: low-rank
    adapters on the model's first blocks, trained so that their k-th step matches the model's state
    at depth ~ rate * k, plus a router that predicts when the fast prediction agrees with the
    model's. Saves a directory that `mlxeff generate --m2r2 NAME` loads."""
    from dataclasses import replace

    from mlxeff.errors import MlxeffError
    from mlxeff.techniques.m2r2_train import M2R2LossConfig, run_m2r2_training

    if rate < 1:
        raise MlxeffError(f"--rate must be at least 1, got {rate}")
    if rank < 1:
        raise MlxeffError(f"--rank must be at least 1, got {rank}")
    if run.eval_tokens < run.cfg.seq_len:
        raise MlxeffError(f"--eval-tokens ({run.eval_tokens}) must cover one sequence (--seq-len "
                          f"{run.cfg.seq_len})")
    cfg = replace(run.cfg, save_every=max(run.cfg.eval_every, 0))  # a checkpoint at each validation
    if out is None:
        out = Path(base) / "m2r2" / (name or f"r{rate:g}-rank{rank}")
    say = (lambda msg: print(msg, file=sys.stderr, flush=True))
    summary = run_m2r2_training(
        cfg, base_dir=base, rate=rate, rank=rank, train_files=train_files,
        valid_files=valid_files or [], out=out,
        loss_cfg=M2R2LossConfig(align_weight, lm_weight, kd_weight, router_weight), work=work,
        eval_tokens=run.eval_tokens, cache_dir=run.cache_dir, resume=run.resume, keep_work=keep_work,
        force=force, say=say)
    if json_output:
        print_json(summary)
        return
    first, last = summary.get("valid_initial"), summary.get("valid_final")
    print(f"saved: {summary['out']}  ({summary['steps']} fast steps, {summary['parameters']:,} "
          f"parameters, {summary['tokens_seen']:,} tokens, {summary['wall_time_s']:.1f} s)")
    if first and last:
        for key, label in (("agree", "agreement with the model"), ("align", "alignment"),
                           ("ce", "CE (fast stream)"), ("kd", "KL (model || fast)")):
            print(f"{label:26s} {first[key]:.4f} -> {last[key]:.4f}")
        print(f"{'CE (model)':26s} {last['ce_base']:.4f}")
