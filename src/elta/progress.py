"""Progress of long work: a bar on a terminal, a log line every half minute elsewhere (logs, batch jobs)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

log = logging.getLogger("elta.progress")

LOG_EVERY_S = 30.0


class _LogLines:
    """The part of tqdm's interface elta uses, reporting through logging: ``desc: n/total unit (p %), rate, ETA``."""

    def __init__(
        self, iterable, desc: str, total: int | None, unit: str, initial: int, every_s: float
    ) -> None:
        self.iterable, self.desc, self.unit, self.every_s = iterable, desc, unit, every_s
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start_n = initial
        self.started = self.last = time.monotonic()
        self.postfix = ""
        self.reported = initial  # the count of the last line written

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._report(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        if self.n > self.reported and time.monotonic() - self.started >= self.every_s:
            self._report(time.monotonic())  # a closing line only for work that was long enough to report

    def _report(self, now: float) -> None:
        self.reported = self.n
        rate = (self.n - self.start_n) / max(now - self.started, 1e-9)
        share = "" if self.total is None else f"/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"
        done = f"{self.n}{share}"
        eta = ""
        if self.total is not None and rate > 0 and self.n < self.total:
            eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime((self.total - self.n) / rate))}"
        extra = f", {self.postfix}" if self.postfix else ""
        speed = f"{rate:.1f} {self.unit}/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s/{self.unit}"
        log.info("%s: %s %s, %s%s%s", self.desc, done, self.unit, speed, eta, extra)


def progress_bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    enabled: bool,
    total: int | None = None,
    unit: str = "it",
    initial: int = 0,
    every_s: float = LOG_EVERY_S,
):
    """``iterable`` with progress reports when ``enabled``: a tqdm bar when standard error is a terminal, else a
    log line (logger ``elta.progress``, INFO) every ``every_s`` seconds. Supports iteration, ``update``,
    ``set_postfix`` and ``close``."""
    if enabled and not sys.stderr.isatty():
        return _LogLines(iterable if iterable is not None else (), desc, total, unit, initial, every_s)
    shown = {"unit": unit, "initial": initial, "leave": False, "disable": not enabled}
    return tqdm(iterable, desc=desc, total=total, **shown)
