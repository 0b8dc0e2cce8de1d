"""Batch progress: a tqdm bar on a terminal, plain periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
import time

log = logging.getLogger("serve.batch")

LOG_EVERY_S = 10.0


class Progress:
    def __init__(self, mode: str = "auto"):
        # mode: auto (bar if stderr is a TTY, else log lines) | bar | log | none
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.lock = threading.Lock()
        self.total = 0  # records known so far (grows while inputs are read)
        self.total_final = False
        self.done = 0  # records finished, including those found in journals
        self.resumed = 0  # of which were already journalled before this run
        self.errors = 0
        self.tokens = 0  # generated in this run
        self.start = time.monotonic()
        self._last_log = self.start
        self._bar = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="rec", dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def add_total(self, n: int) -> None:
        with self.lock:
            self.total += n

    def add_done(self, n: int = 1, errors: int = 0, tokens: int = 0, resumed: bool = False) -> None:
        with self.lock:
            self.done += n
            self.errors += errors
            if resumed:
                self.resumed += n
            else:
                self.tokens += tokens

    def tick(self) -> None:
        """Called periodically by the main thread."""
        with self.lock:
            done, total, tokens, errors = self.done, self.total, self.tokens, self.errors
        now = time.monotonic()
        tok_s = tokens / max(now - self.start, 1e-9)
        if self._bar is not None:
            self._bar.total = max(total, done)
            self._bar.n = done
            self._bar.set_postfix(tok_s=f"{tok_s:.1f}", errors=errors, refresh=False)
            self._bar.refresh()
        elif self.mode == "log" and now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.info("batch: %s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        fresh = self.done - self.resumed
        rate = fresh / max(elapsed, 1e-9)
        eta = ""
        if self.total_final and rate > 0 and self.total > self.done:
            eta = f", ETA {time.strftime('%H:%M:%S', time.gmtime((self.total - self.done) / rate))}"
        pct = f" ({100.0 * self.done / self.total:.1f}%)" if self.total else ""
        return (f"{self.done}/{self.total}{'' if self.total_final else '+'} records{pct}, {self.errors} errors, "
                f"{self.tokens / max(elapsed, 1e-9):.1f} tok/s, {rate:.1f} rec/s{eta}")

    def close(self) -> None:
        if self._bar is not None:
            self.tick()
            self._bar.close()
