"""Counters and the periodic stats line every service prints (upstream style).

The line is ``detector=<det>,service=<name>,processed_times=N,repetition_rate_hz=R,...``: the
counts are those of the last period, so a steady deployment prints steady numbers; ``totals()``
keeps the counts since start for tests, the REST API and the closing summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

log = logging.getLogger("stddaq.stats")


class Stats:
    """Counters of one service; ``tick()`` in the service loop prints the line when due."""

    def __init__(self, detector: str, service: str, period: float, *,
                 clock: Callable[[], float] = time.monotonic,
                 emit: Callable[[str], None] | None = None) -> None:
        self.detector = detector
        self.service = service
        self.period = period
        self._clock = clock
        self._emit = emit or log.info
        self._period_start = clock()
        self._period: dict[str, int] = {}
        self._totals: dict[str, int] = {}
        # the per-image counters are plain attributes: a dict update per image is measurable
        self.processed_times = 0
        self.processed_bytes = 0
        self._period_processed = (0, 0)
        self._warned: set[str] = set()
        self._ratios: dict[str, tuple[str, str]] = {}

    def add(self, name: str, n: int = 1) -> None:
        self._period[name] = self._period.get(name, 0) + n
        self._totals[name] = self._totals.get(name, 0) + n

    def processed(self, n_bytes: int = 0) -> None:
        self.processed_times += 1
        self.processed_bytes += n_bytes

    def unprocessed(self, n_bytes: int = 0) -> None:
        """Take back one image counted ``processed`` (it was given up after all)."""
        self.processed_times -= 1
        self.processed_bytes -= n_bytes

    def declare(self, *names: str) -> None:
        """Counters that appear in every line, zero included (so a missing drop count is a 0)."""
        for name in names:
            self._period.setdefault(name, 0)
            self._totals.setdefault(name, 0)

    def declare_ratio(self, name: str, numerator: str, denominator: str) -> None:
        """A derived figure of the line, ``numerator / denominator`` of the period's counters
        (e.g. a compression ratio), printed with 2 decimals; 0.00 while the denominator is 0."""
        self.declare(numerator, denominator)
        self._ratios[name] = (numerator, denominator)

    def warn(self, key: str, logger: logging.Logger, message: str, *args: object) -> None:
        """Log a warning at most once per period per ``key`` (garbage must not flood the log)."""
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def totals(self) -> Mapping[str, int]:
        return MappingProxyType({"processed_times": self.processed_times, "processed_bytes": self.processed_bytes,
                                 **self._totals})

    def line(self, elapsed: float) -> str:
        # images given up after all (ImageSubscriber.give_up) come off the count of the period they
        # are given up in; counted in a period already printed, they made it negative (the source
        # stopped): the line says 0 and the rest comes off the next periods (see flush)
        times = max(0, self.processed_times - self._period_processed[0])
        n_bytes = max(0, self.processed_bytes - self._period_processed[1])
        rate = times / elapsed if elapsed > 0 else 0.0
        parts = [f"detector={self.detector}", f"service={self.service}",
                 f"processed_times={times}", f"repetition_rate_hz={rate:.1f}", f"processed_bytes={n_bytes}"]
        parts += [f"{k}={v}" for k, v in self._period.items()]
        for name, (numerator, denominator) in self._ratios.items():
            below = self._period[denominator]
            parts.append(f"{name}={self._period[numerator] / below if below else 0.0:.2f}")
        return ",".join(parts)

    def tick(self, now: float | None = None) -> str | None:
        """Emit and reset the period's counters if the period is over; returns the line."""
        now = self._clock() if now is None else now
        elapsed = now - self._period_start
        if elapsed < self.period:
            return None
        return self.flush(now)

    def flush(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        text = self.line(now - self._period_start)
        self._emit(text)
        self._period = dict.fromkeys(self._period, 0)
        times, n_bytes = self._period_processed  # kept where the period went below 0 (see line)
        self._period_processed = (max(times, self.processed_times), max(n_bytes, self.processed_bytes))
        self._period_start = now
        self._warned.clear()
        return text
