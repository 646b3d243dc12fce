"""Where a run's time goes: wall time by phase (``rayunlearn.runs.TIME_PHASES``).

The loop times loading (model, data, reference model, checkpoint), the unlearning steps and the
end of the run (final G-effect recording + final evaluation); the callbacks time the G-effect
recording and the in-loop (trajectory) evaluation. Phases are exclusive: a phase entered inside
another pauses it, so the G-effect recording inside a step counts as ``effects`` only and the
phases add up to the time they cover. A sweep trial reports them as ``time.<phase>`` and
``time.other`` = its ``time_s`` minus their sum (``rayunlearn.sweep.trial``): config checks, the
run directory's files, launching a multi-worker run, Tune's reports.
"""

from __future__ import annotations

import contextlib
import time


class PhaseTimer:
    """Exclusive wall-clock totals by phase name (see the module docstring): time accrues to the
    innermost open phase; ``switch`` moves the outermost one on, ``phase`` nests one."""

    def __init__(self, first: str):
        self.totals: dict[str, float] = {}
        self._open = [first]
        self._since = time.perf_counter()

    def _accrue(self) -> None:
        now = time.perf_counter()
        if self._open:
            self.totals[self._open[-1]] = self.totals.get(self._open[-1], 0.0) + (now - self._since)
        self._since = now

    def switch(self, name: str) -> None:
        """The time from now on is ``name``'s (the previous phase ends)."""
        self._accrue()
        self._open[:1] = [name]

    def stop(self) -> None:
        self._accrue()
        self._open = []

    @contextlib.contextmanager
    def phase(self, name: str):
        """``name`` inside the current phase, which is paused meanwhile."""
        self._accrue()
        self._open.append(name)
        try:
            yield
        finally:
            self._accrue()
            self._open.pop()

    def seconds(self, phases: tuple[str, ...]) -> dict[str, float]:
        """The totals of ``phases`` (0 for a phase never entered)."""
        return {p: self.totals.get(p, 0.0) for p in phases}
