"""Progress of long work: a tqdm bar on a terminal, a plain line every N seconds anywhere else.

    for batch in progress(loader, desc="eval", unit="img"):     # wrap an iterable
        ...
    with progress(total=max_iter, initial=start, desc="train") as bar:   # or count by hand
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

tqdm's `disable=None` hides the bar when stderr is not a terminal, which leaves a log file (nohup,
a cluster job) silent for minutes. When stderr is not a terminal, this prints instead one line every
`MASKDISTILL_PROGRESS_SECONDS` seconds (default 30; 0 turns the lines off), such as

    train: 120/300 it (40%), 2.31 it/s, eta 1m18s, loss=0.412

and a last line when the work ends (if any line was printed). `enabled=False` (e.g. on ranks > 0)
shows nothing at all; `leave=False` clears the bar when done (a short preliminary pass).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

from utils.errors import UserError

INTERVAL_ENV = "MASKDISTILL_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0


def line_interval() -> float:
    """Seconds between plain progress lines, from MASKDISTILL_PROGRESS_SECONDS (default 30)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        return float(raw)
    except ValueError:
        raise UserError(f"{INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """A tqdm bar (terminal) or periodic plain lines (log); see the module docstring."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, enabled: bool = True, interval: float | None = None,
                 stream: TextIO | None = None, leave: bool = True):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.stream = stream if stream is not None else sys.stderr
        self.interval = line_interval() if interval is None else float(interval)
        self.postfix: dict[str, Any] = {}
        self._bar = None
        self._printed = False
        self._closed = False
        self.enabled = enabled
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                             dynamic_ncols=True, leave=leave)
        self._start = self._last = time.monotonic()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this Progress wraps no iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.interval > 0:
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._print_line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._printed:
            self._print_line(final=True)

    def line(self, final: bool = False) -> str:
        """The plain progress line for the current count."""
        elapsed = time.monotonic() - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc}: {done} {self.unit}" if self.desc else f"{done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        parts.append(f"{rate:.3g} {self.unit}/s")
        if final:
            parts.append(f"done in {_duration(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return ", ".join(parts)

    def _print_line(self, final: bool = False) -> None:
        print(self.line(final), file=self.stream, flush=True)
        self._printed = True


def progress(iterable: Iterable | None = None, **kwargs: Any) -> Progress:
    """`Progress(iterable, **kwargs)`: iterate it, or use it as a context manager with `update`."""
    return Progress(iterable, **kwargs)
