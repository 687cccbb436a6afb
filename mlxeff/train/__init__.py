"""Training: one loop for base models, auxiliary models + predictors and adapters.

Modules, one job each:

- ``config``: ``TrainConfig`` (every setting, validated; the CLI's training options come from it);
- ``losses``: next-token cross-entropy with OpenELM's z-loss, validation NLL;
- ``optimizer``: AdamW (decay on matrices only), warm-up + cosine schedule;
- ``step``: one optimizer step (accumulation, clipping, fp32 masters, ``mx.compile``);
- ``checkpoints``: atomic checkpoints, resume checks;
- ``loop``: ``train_loop`` (logging, validation, periodic/automatic/Ctrl-C checkpoints, resume);
- ``report``: the progress bar and the lines a person sees;
- ``corpus``: text files -> cached tokens -> packed batches and validation windows;
- ``lm``: ``run_training``, language-model training from text files (``mlxeff train``).

KV Prediction's run (``mlxeff.techniques.kv_prediction_train``) uses ``config``, ``corpus`` and
``loop`` the same way.
"""

from .checkpoints import (CKPT_PREFIX, check_compatible, list_checkpoints, model_signature,
                          read_checkpoint, save_checkpoint)
from .config import DTYPES, RESUMABLE_FIELDS, TrainConfig
from .lm import build_args, init_model, run_training
from .loop import LogRecorder, train_loop
from .losses import cross_entropy_terms, lm_loss, valid_loss_fn
from .optimizer import current_lr, lr_schedule, make_optimizer

__all__ = [
    "CKPT_PREFIX", "DTYPES", "LogRecorder", "RESUMABLE_FIELDS", "TrainConfig", "build_args", "check_compatible",
    "cross_entropy_terms", "current_lr", "init_model", "list_checkpoints", "lm_loss",
    "lr_schedule", "make_optimizer", "model_signature", "read_checkpoint", "run_training",
    "save_checkpoint", "train_loop", "valid_loss_fn",
]
