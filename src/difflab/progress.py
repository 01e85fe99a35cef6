"""Progress of every step that takes more than a few seconds, named by its stage (train,
autoencoder, classifier, eval-classifier, encode latents, sample, evaluate ...).

On a terminal it is a tqdm bar, with log lines written around it rather than into it
(tqdm.contrib.logging); elsewhere (a SLURM .out file, a pipe) a bar's carriage returns would
leave one line per update, so it is a plain log line every `PLAIN_EVERY_S` seconds and one at the
end instead."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator, Optional

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("difflab.progress")

PLAIN_EVERY_S = 30.0


class PlainProgress:
    """tqdm's update/set_postfix as a log line at most every PLAIN_EVERY_S seconds."""

    def __init__(self, stage: str, total: int, initial: int = 0, unit: str = "it"):
        self.stage, self.total, self.n, self.unit = stage, total, initial, unit
        self.start = self.last = time.perf_counter()
        self.postfix, self.closed = "", False

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= PLAIN_EVERY_S:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n > 0 and not self.closed:
            self._line()
        self.closed = True

    def _line(self) -> None:
        self.last = now = time.perf_counter()
        elapsed = now - self.start
        left = f", about {elapsed / self.n * (self.total - self.n):.0f} s left" if 0 < self.n < self.total else ""
        log.info("%s: %d/%d %s (%.0f%%) in %.0f s%s%s", self.stage, self.n, self.total, self.unit,
                 100 * self.n / max(self.total, 1), elapsed, left, f"; {self.postfix}" if self.postfix else "")


@contextlib.contextmanager
def progress(stage: str, total: int, enabled: bool = True, initial: int = 0, unit: str = "it",
             tty: Optional[bool] = None) -> Iterator[tqdm | PlainProgress]:
    """A bar for `total` units of `stage`; disabled, one that shows nothing."""
    on_terminal = sys.stderr.isatty() if tty is None else tty
    if enabled and not on_terminal:
        bar: tqdm | PlainProgress = PlainProgress(stage, total, initial, unit)
        try:
            yield bar
        finally:
            bar.close()
        return
    with logging_redirect_tqdm() if enabled else contextlib.nullcontext():
        bar = tqdm(total=total, initial=initial, desc=stage, unit=unit, disable=not enabled, dynamic_ncols=True,
                   leave=False, file=sys.stderr)
        try:
            yield bar
        finally:
            bar.close()
