"""Where the seconds of one call go: :class:`CallClock`, a clock of consecutive phases.

``pldr-llm generate --timing`` reports its whole call, from the start of the process (read from
``/proc/self/stat`` on Linux: the interpreter's own start-up and imports count) to its last text:
each step of the call ends a *lap* (:meth:`CallClock.lap`), the time since the previous lap, so
the laps never overlap and add up to the time the clock has run. Standard library only: the
command line starts it before anything heavy is imported.
"""

from __future__ import annotations

import os
import time

__all__ = ["CallClock", "process_start"]


def process_start() -> float | None:
    """The :func:`time.perf_counter` reading at which this process was started, or None where
    the system does not say (not Linux). Resolution: the kernel's clock tick (10 ms usually)."""
    try:
        with open("/proc/self/stat", "rb") as handle:
            stat = handle.read()
        # Field 22 (starttime, clock ticks after boot); the 2nd, the command, may hold spaces.
        ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
        running = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.perf_counter() - max(running, 0.0)


class CallClock:
    """Seconds per phase of one call, measured as laps from ``start`` (a
    :func:`time.perf_counter` reading; default: now)."""

    def __init__(self, start: float | None = None) -> None:
        self.start = time.perf_counter() if start is None else start
        self._last = self.start
        #: seconds per phase name, in the order the phases first ran
        self.phases: dict[str, float] = {}

    @classmethod
    def from_process_start(cls) -> CallClock:
        """A clock that started with the process (now where its start is unknown)."""
        return cls(process_start())

    def lap(self, name: str) -> float:
        """Add the time since the previous lap (or the start) to phase ``name``; return it."""
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.phases[name] = self.phases.get(name, 0.0) + seconds
        return seconds

    def elapsed(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self.start
