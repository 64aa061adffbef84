"""The one console progress bar of the crn-* commands (crn-train, crn-convert, crn-eval, crn-synthesize, crn-segmenter).

On a terminal the line is redrawn in place (a carriage return, at most every 0.2 s); elsewhere (a log file,
a pipe, the demo's captured output) it is printed as plain lines, about 20 per run.
"""

from __future__ import annotations

import sys
import time

_REDRAW_S = 0.2  # a terminal line redrawn more often only costs time


class Progress:
    """`[#####---] step 40/100 loss=0.5 (...) 12.5 images/s, eta 30s`.

    Args:
        total: the count at which the work is done (a step number, a number of images).
        start: the count the work starts at (a resumed run's first step).
        per_update: images per counted unit (the batch size for steps), for the rate.
        unit: what the rate counts.
        label: what is counted (`step`); with one, finish() prints `done: step N, M steps in Xs`.
        stream: where the line goes (default stdout); log: a print-like function instead of a stream.
        enabled: False draws nothing (finish() still returns the rate).
        every: on a non-terminal, print every this many counts (default: ~20 lines per run).
    """

    def __init__(
        self,
        total: int,
        *,
        start: int = 0,
        per_update: int = 1,
        unit: str = "images",
        label: str = "",
        stream=None,
        log=None,
        enabled: bool = True,
        every: int | None = None,
    ):
        self.total, self.start, self.per_update, self.unit, self.label = total, start, per_update, unit, label
        self.stream = stream or sys.stdout
        self.log = log
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if log is None else sys.stdout.isatty()
        self.every = every or max(1, (total - start) // 20)
        self.t0 = time.perf_counter()
        self.last_time, self.last_step, self.last_drawn = self.t0, start, 0.0
        self.done = start
        self.steps_per_second = 0.0  # between the last two updates (crn-train's speed summaries)

    def _write(self, text: str, end: str = "\n") -> None:
        if self.log is not None:
            self.log(text, **({"end": end, "flush": True} if end != "\n" else {}))
        else:
            self.stream.write(text + end)
            self.stream.flush()

    def update(self, done: int, terms: dict | None = None) -> None:
        """Records `done` (and draws the line when due); `terms` (with `total`) are shown as losses."""
        now = time.perf_counter()
        if done > self.last_step:
            self.steps_per_second = (done - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step, self.done = now, done, done
        if not self.enabled:
            return
        if self.tty:
            if now - self.last_drawn < _REDRAW_S and done != self.total:
                return
        elif (done - self.start) % self.every and done != self.total:
            return
        self.last_drawn = now
        fraction = (done - self.start) / max(self.total - self.start, 1)
        bar = "#" * int(20 * fraction) + "-" * (20 - int(20 * fraction))
        rate = (done - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        counted = f"{self.label} {done}/{self.total}" if self.label else f"{done}/{self.total}"
        losses = ""
        if terms:
            detail = " ".join(f"{k}={v:.4g}" for k, v in terms.items() if k != "total")
            losses = f" loss={terms['total']:.4g} ({detail})"
        line = f"[{bar}] {counted}{losses} {rate * self.per_update:.2f} {self.unit}/s, eta {eta:.0f}s"
        if self.tty:
            self._write("\r" + line, end="")
        else:
            self._write(line)

    def finish(self, done: int | None = None) -> float:
        """Ends the line (and with a label prints `done: ...`); returns the rate in units per second."""
        done = self.done if done is None else done
        elapsed = time.perf_counter() - self.t0
        if self.enabled:
            if self.tty:
                self._write("")
            if self.label:
                self._write(f"done: {self.label} {done}, {done - self.start} {self.label}s in {elapsed:.1f}s")
        return (done - self.start) * self.per_update / max(elapsed, 1e-9)

    close = finish  # crn-convert's name for it
