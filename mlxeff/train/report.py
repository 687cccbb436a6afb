"""What a person watching a training run sees.

A progress bar over the optimizer steps (``mlxeff.progress.bar``: shown on a terminal, quiet for
``--json`` or a redirected stderr) with the loss, learning rate and tokens/s of the last logged
step as its postfix; validation results and the interrupt checkpoint as lines through ``say``,
written around the bar so it is not torn. Without a bar (a log file, ``--json``) the training
steps become lines too, at most one per ``LINE_SECONDS`` plus the last step's, so an unattended
run's log shows its loss and throughput.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional

from ..progress import bar

LINE_SECONDS = 30.0


def say_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class TrainReport:
    """Takes the training loop's records: train steps (``loss``), validations (``valid_loss``) and
    an interruption (``interrupted``)."""

    def __init__(self, total: int, start: int, say: Optional[Callable[[str], None]] = None,
                 show: Optional[bool] = None):
        self.total = total
        self.say = say or say_stderr
        self.bar = bar(total, "training", "step", show=show, initial=start)
        self._line_at = -math.inf

    def __call__(self, rec: dict) -> None:
        if "valid_loss" in rec:
            ppl = rec.get("valid_ppl", math.exp(min(rec["valid_loss"], 700.0)))
            self.note(f"step {rec['step']}/{self.total}  valid loss {rec['valid_loss']:.4f}  "
                      f"ppl {ppl:.2f}")
        elif rec.get("interrupted"):
            if rec.get("checkpoint"):
                self.note(f"interrupted at step {rec['step']}/{self.total}: checkpoint "
                          f"{rec['checkpoint']} (continue with --resume)")
            else:
                self.note("interrupted before the first step: nothing saved")
        elif "loss" in rec:
            shown = {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}",
                     "tok/s": f"{rec['tokens_per_s']:,.0f}"}
            if not self.bar.disable:
                self.bar.set_postfix(shown, refresh=False)
                self.bar.update(rec["step"] - self.bar.n)
                return
            now = time.monotonic()
            if now - self._line_at >= LINE_SECONDS or rec["step"] >= self.total:
                self._line_at = now
                self.say(f"step {rec['step']}/{self.total}  loss {shown['loss']}  lr {shown['lr']}  "
                         f"{shown['tok/s']} tok/s")

    def note(self, text: str) -> None:
        with self.bar.external_write_mode(file=sys.stderr):
            self.say(text)

    def close(self) -> None:
        self.bar.close()
