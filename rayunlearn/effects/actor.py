"""Where G-effect rows go: sinks and the aggregator Ray actor.

Two sinks with one interface write the SAME files:

- :class:`LocalSink` ``(out_dir)`` — in-process, no Ray;
- :class:`RaySink` ``(actor)`` — fire-and-forget calls to a :class:`GEffectAggregator` Ray
  actor (one per sweep or trial; create it with :func:`make_aggregator`), with a bounded number
  of calls in flight so the training loop never blocks on it for long.

Interface: ``sink.add(table, columns, trial_id=, step=, part="", rank=0, world_size=1)``,
``sink.flush()``, ``sink.close()``. ``table`` is "geffects" or "steps" (``rows.py``); the files
are ``<out_dir>/effects/<trial_id>/geffects.parquet`` and ``steps.parquet``, rewritten atomically
(``rayunlearn.io.write_parquet``) on ``flush()`` / ``close()`` and periodically (every
``flush_every_s`` seconds of adds), so a killed run keeps what was sent before the last flush.

Data parallelism: a batch of rows is identified by (table, trial_id, step, part). When
``world_size > 1`` each rank sends its partial sums of the same batch tagged with its rank; once
all ``world_size`` parts arrived the aggregator combines them **exactly once** — rows with the
same identity (every column but ``value``) have their values summed, rows only one rank has are
kept (e.g. its own instances) — and appends the result. A part that arrives again (a retried
rank) or a batch that was already combined is ignored and counted in ``stats()["ignored"]``.
``steps`` rows are not summed across ranks: rank 0's row is kept.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pyarrow as pa

from rayunlearn.effects.rows import KEY_COLUMNS, SCHEMAS
from rayunlearn.io import write_parquet


class AggregatorCore:
    """The aggregation logic shared by LocalSink and the Ray actor (plain Python)."""

    def __init__(self, out_dir: str, flush_every_s: float = 30.0):
        self.out_dir = Path(out_dir)
        self.flush_every_s = float(flush_every_s)
        self._chunks: dict[tuple[str, str], list[pa.Table]] = collections.defaultdict(list)
        self._pending: dict[tuple, dict[int, dict]] = {}
        self._done: set[tuple] = set()
        self._dirty: set[tuple[str, str]] = set()
        self._last_flush = time.monotonic()
        self.ignored = 0
        self.rows = 0

    def add(self, table: str, columns: dict, trial_id: str, step: int, part: str = "",
            rank: int = 0, world_size: int = 1) -> bool:
        """Returns True when the batch was appended, False when it waits for other ranks or was a
        duplicate."""
        if table not in SCHEMAS:
            raise ValueError(f"unknown G-effect table {table!r}; expected one of {sorted(SCHEMAS)}")
        key = (table, str(trial_id), int(step), str(part))
        if key in self._done:
            self.ignored += 1
            return False
        if world_size <= 1:
            combined = columns
        else:
            parts = self._pending.setdefault(key, {})
            if rank in parts:
                self.ignored += 1
                return False
            parts[int(rank)] = columns
            if len(parts) < world_size:
                return False
            combined = _combine(table, [parts[r] for r in sorted(parts)])
            del self._pending[key]
        self._done.add(key)
        t = pa.Table.from_pydict(combined, schema=SCHEMAS[table])
        self._chunks[(str(trial_id), table)].append(t)
        self._dirty.add((str(trial_id), table))
        self.rows += t.num_rows
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()
        return True

    def table(self, trial_id: str, table: str) -> pa.Table:
        chunks = self._chunks.get((str(trial_id), table))
        return pa.concat_tables(chunks) if chunks else SCHEMAS[table].empty_table()

    def flush(self) -> list[str]:
        """Write every table that changed since the last flush; returns the paths written."""
        written = []
        for trial_id, table in sorted(self._dirty):
            path = self.out_dir / "effects" / trial_id / f"{table}.parquet"
            write_parquet(path, self.table(trial_id, table))
            written.append(str(path))
        self._dirty.clear()
        self._last_flush = time.monotonic()
        return written

    def stats(self) -> dict:
        return {"rows": self.rows, "ignored": self.ignored, "pending": len(self._pending)}


def _combine(table: str, parts: list[dict]) -> dict:
    """Sum `value` over rows with the same identity across ranks (geffects); rank 0 wins (steps)."""
    if table != "geffects":
        return parts[0]
    keys = KEY_COLUMNS[table]
    index: dict[tuple, int] = {}
    out = {c: [] for c in parts[0]}
    for cols in parts:
        n = len(cols["value"])
        for i in range(n):
            k = tuple(cols[c][i] for c in keys)
            j = index.get(k)
            if j is None:
                index[k] = len(out["value"])
                for c in out:
                    out[c].append(cols[c][i])
            else:
                out["value"][j] += cols["value"][i]
    return out


class LocalSink:
    """In-process sink (no Ray): same files as the Ray actor."""

    def __init__(self, out_dir: str, flush_every_s: float = 30.0):
        self.core = AggregatorCore(out_dir, flush_every_s)

    def add(self, table: str, columns: dict, *, trial_id: str, step: int, part: str = "",
            rank: int = 0, world_size: int = 1) -> None:
        self.core.add(table, columns, trial_id, step, part, rank, world_size)

    def flush(self) -> None:
        self.core.flush()

    def close(self) -> None:
        self.core.flush()

    def stats(self) -> dict:
        return self.core.stats()


class _AggregatorActor:
    """Body of the Ray actor (``GEffectAggregator``): a thin wrapper of AggregatorCore."""

    def __init__(self, out_dir: str, flush_every_s: float = 30.0):
        self.core = AggregatorCore(out_dir, flush_every_s)

    def add(self, table, columns, trial_id, step, part="", rank=0, world_size=1) -> bool:
        return self.core.add(table, columns, trial_id, step, part, rank, world_size)

    def flush(self) -> list[str]:
        return self.core.flush()

    def stats(self) -> dict:
        return self.core.stats()


_REMOTE = None


def __getattr__(name):
    if name == "GEffectAggregator":
        return _remote_class()
    raise AttributeError(name)


def _remote_class():
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(num_cpus=0)(_AggregatorActor)
    return _REMOTE


def make_aggregator(out_dir: str, name: str | None = None, flush_every_s: float = 30.0):
    """Start (or, with `name`, get-or-create a named, detached-from-caller) G-effect aggregator
    actor writing under `out_dir`. Ray must be initialised."""
    cls = _remote_class()
    if name:
        return cls.options(name=name, get_if_exists=True).remote(str(out_dir), flush_every_s)
    return cls.remote(str(out_dir), flush_every_s)


class RaySink:
    """Fire-and-forget sink to a GEffectAggregator actor with at most `max_in_flight` unfinished
    calls (older ones are waited for only when the bound is exceeded). Calls from one sink reach
    the actor in order."""

    def __init__(self, actor, max_in_flight: int = 16):
        self.actor = actor
        self.max_in_flight = int(max_in_flight)
        self._refs: list = []
        self.send_time_s = 0.0

    def add(self, table: str, columns: dict, *, trial_id: str, step: int, part: str = "",
            rank: int = 0, world_size: int = 1) -> None:
        import ray

        t0 = time.perf_counter()
        self._refs.append(self.actor.add.remote(table, columns, trial_id, step, part, rank, world_size))
        if len(self._refs) > self.max_in_flight:
            _, self._refs = ray.wait(self._refs, num_returns=len(self._refs) - self.max_in_flight)
        self.send_time_s += time.perf_counter() - t0

    def flush(self) -> None:
        import ray

        ray.get(self._refs)
        self._refs = []
        ray.get(self.actor.flush.remote())

    def close(self) -> None:
        self.flush()

    def stats(self) -> dict:
        import ray

        return ray.get(self.actor.stats.remote())
