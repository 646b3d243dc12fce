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

Who sends under data parallelism (the recorder's choice, ``recorder.py``): the engine
all-reduces its scalars under FSDP2, so rank 0 always holds the *complete* values and is the only
rank that sends, with ``world_size=1`` semantics (DDP: rank 0 alone computes). The rank-combining
path above serves callers that send per-rank partial sums (``gradient_effects(...,
all_reduce=False)``); a partial sum is never mixed with complete values of the same batch.

Resume: ``sink.resume(trial_id, start)`` (called by the recorder when a run starts or resumes
from a checkpoint at optimiser step ``start``) drops this trial's rows with ``step >= start`` —
they are recomputed — and forgets their batch identities, so re-sent steps replace the rows of
a crashed attempt instead of being ignored as duplicates; rows of steps ``< start`` are kept
(from memory, or read back from the trial's Parquet files when this sink/actor does not hold
the trial, e.g. a fresh process or a restarted sweep). It returns the last kept ``steps`` row
(or None) so the recorder can continue its cumulative sums.

The sweep's actor is named and lives in the Ray namespace :data:`AGGREGATOR_NAMESPACE`
(``make_aggregator(out_dir, name=...)``; trials and Ray Train workers reach it with
:func:`get_aggregator` ``(name)``). It is owned by the sweep driver, which flushes it at the end
of the sweep (also when interrupted) and then kills it.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pyarrow as pa

from rayunlearn.runs import EFFECT_KEY_COLUMNS, EFFECT_SCHEMAS, effects_table
from rayunlearn.io import write_parquet

AGGREGATOR_NAMESPACE = "rayunlearn"
TABLES = ("geffects", "steps")


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
        if table not in EFFECT_SCHEMAS:
            raise ValueError(f"unknown G-effect table {table!r}; expected one of {sorted(EFFECT_SCHEMAS)}")
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
        t = pa.Table.from_pydict(combined, schema=EFFECT_SCHEMAS[table])
        self._chunks[(str(trial_id), table)].append(t)
        self._dirty.add((str(trial_id), table))
        self.rows += t.num_rows
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()
        return True

    def table(self, trial_id: str, table: str) -> pa.Table:
        chunks = self._chunks.get((str(trial_id), table))
        return pa.concat_tables(chunks) if chunks else EFFECT_SCHEMAS[table].empty_table()

    def flush(self) -> list[str]:
        """Write every table that changed since the last flush; returns the paths written."""
        written = []
        for trial_id, table in sorted(self._dirty):
            path = self.path(trial_id, table)
            write_parquet(path, self.table(trial_id, table))
            written.append(str(path))
        self._dirty.clear()
        self._last_flush = time.monotonic()
        return written

    def path(self, trial_id: str, table: str) -> Path:
        return effects_table(self.out_dir, trial_id, table)

    def resume(self, trial_id: str, start: int) -> dict | None:
        """Prepare for a run of `trial_id` that (re)starts at optimiser step `start`: keep its rows
        with ``step < start`` (read back from its Parquet files when they are not held in memory),
        drop the rest and forget their batch identities, so the steps a retried or resumed
        attempt sends again replace those of the earlier attempt. Returns the last kept ``steps``
        row as ``{column: value}`` (None when there is none)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        trial_id, start = str(trial_id), int(start)
        for table in TABLES:
            key = (trial_id, table)
            path = self.path(trial_id, table)
            if key in self._chunks:
                old = self.table(trial_id, table)
            elif start > 0 and path.exists():
                old = pq.read_table(path).cast(EFFECT_SCHEMAS[table])
            else:
                old = None
            kept = old.filter(pc.less(old["step"], start)) if old is not None else None
            if kept is not None and kept.num_rows:
                self._chunks[key] = [kept]
            else:
                self._chunks.pop(key, None)
            if old is not None or path.exists():
                self._dirty.add(key)      # rewrite the file without the dropped rows
        self._done = {k for k in self._done if not (k[1] == trial_id and k[2] >= start)}
        self._pending = {k: v for k, v in self._pending.items() if not (k[1] == trial_id and k[2] >= start)}
        steps = self.table(trial_id, "steps")
        if not steps.num_rows:
            return None
        i = int(pc.index(steps["step"], pc.max(steps["step"])).as_py())
        return steps.slice(i, 1).to_pylist()[0]

    def release(self, trial_ids) -> list[str]:
        """Write the tables of `trial_ids` that changed and free their rows (a finished trial);
        a later :meth:`resume` reads them back from disk."""
        ids = {str(t) for t in trial_ids}
        written = []
        for trial_id, table in sorted(k for k in self._dirty if k[0] in ids):
            write_parquet(self.path(trial_id, table), self.table(trial_id, table))
            written.append(str(self.path(trial_id, table)))
        self._dirty = {k for k in self._dirty if k[0] not in ids}
        for k in [k for k in self._chunks if k[0] in ids]:
            del self._chunks[k]
        self._done = {k for k in self._done if k[1] not in ids}
        return written

    def stats(self) -> dict:
        return {"rows": self.rows, "ignored": self.ignored, "pending": len(self._pending)}


def _combine(table: str, parts: list[dict]) -> dict:
    """Sum `value` over rows with the same identity across ranks (geffects); rank 0 wins (steps)."""
    if table != "geffects":
        return parts[0]
    keys = EFFECT_KEY_COLUMNS[table]
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

    def resume(self, trial_id: str, start: int) -> dict | None:
        """See :meth:`AggregatorCore.resume`."""
        return self.core.resume(trial_id, start)

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

    def add_many(self, batches: list) -> int:
        """Several ``add`` calls in one message: ``[(table, columns, {trial_id, step, part, rank,
        world_size}), ...]`` in order; returns how many were appended."""
        return sum(bool(self.core.add(t, c, **kw)) for t, c, kw in batches)

    def resume(self, trial_id: str, start: int):
        return self.core.resume(trial_id, start)

    def release(self, trial_ids) -> list[str]:
        return self.core.release(trial_ids)

    def flush(self) -> list[str]:
        return self.core.flush()

    def close(self) -> list[str]:
        """Write every changed table (the sweep driver calls it before killing the actor)."""
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


def make_aggregator(out_dir: str, name: str | None = None, flush_every_s: float = 30.0,
                    detached: bool = False):
    """Start a G-effect aggregator actor writing under `out_dir` (Ray must be initialised).

    With `name`: get-or-create the named actor in namespace :data:`AGGREGATOR_NAMESPACE`, so any
    process of the cluster (Tune trials, Ray Train workers) reaches it with
    :func:`get_aggregator`. It is owned by the caller (dies with it) unless `detached`."""
    cls = _remote_class()
    if name:
        opts = dict(name=name, namespace=AGGREGATOR_NAMESPACE, get_if_exists=True)
        if detached:
            opts["lifetime"] = "detached"
        return cls.options(**opts).remote(str(out_dir), flush_every_s)
    return cls.remote(str(out_dir), flush_every_s)


def get_aggregator(name: str):
    """The handle of the named aggregator actor (:func:`make_aggregator` ``(..., name=name)``);
    raises ``ValueError`` when no such actor is alive."""
    import ray

    return ray.get_actor(name, namespace=AGGREGATOR_NAMESPACE)


class RaySink:
    """Asynchronous, batched sink to a GEffectAggregator actor.

    ``add`` only appends to a local buffer; every `batch_size` adds the buffer goes to the actor
    in one ``add_many`` call without waiting for it, with at most `max_in_flight` unfinished
    calls (older ones are waited for only when the bound is exceeded). ``flush`` sends the
    buffer, waits for every call and has the actor write its tables (the training loop calls it
    after each checkpoint, so what a resume keeps is on disk); ``close`` also frees the sent
    trials' rows in the actor after writing them. Calls from one sink reach the actor in order."""

    def __init__(self, actor, max_in_flight: int = 16, batch_size: int = 8):
        self.actor = actor
        self.max_in_flight = int(max_in_flight)
        self.batch_size = max(1, int(batch_size))
        self._refs: list = []
        self._buffer: list = []
        self._trials: set[str] = set()
        self.send_time_s = 0.0

    def add(self, table: str, columns: dict, *, trial_id: str, step: int, part: str = "",
            rank: int = 0, world_size: int = 1) -> None:
        t0 = time.perf_counter()
        self._buffer.append((table, columns, dict(trial_id=str(trial_id), step=int(step), part=str(part),
                                                  rank=int(rank), world_size=int(world_size))))
        self._trials.add(str(trial_id))
        if len(self._buffer) >= self.batch_size:
            self._send()
        self.send_time_s += time.perf_counter() - t0

    def _send(self) -> None:
        import ray

        if self._buffer:
            self._refs.append(self.actor.add_many.remote(self._buffer))
            self._buffer = []
        if len(self._refs) > self.max_in_flight:
            _, self._refs = ray.wait(self._refs, num_returns=len(self._refs) - self.max_in_flight)

    def _drain(self) -> None:
        import ray

        self._send()
        ray.get(self._refs)
        self._refs = []

    def resume(self, trial_id: str, start: int) -> dict | None:
        """See :meth:`AggregatorCore.resume` (waits for the actor)."""
        import ray

        self._drain()
        return ray.get(self.actor.resume.remote(str(trial_id), int(start)))

    def flush(self) -> None:
        import ray

        self._drain()
        ray.get(self.actor.flush.remote())

    def close(self) -> None:
        import ray

        self._drain()
        if self._trials:
            ray.get(self.actor.release.remote(sorted(self._trials)))
        ray.get(self.actor.flush.remote())

    def stats(self) -> dict:
        import ray

        self._drain()
        return ray.get(self.actor.stats.remote())
