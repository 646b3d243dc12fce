"""The training progress bar (rich), or plain prints where it is off (other ranks, tests, logs).

Kept apart from the loop so that the loop reads as training only, and so that tests can
interrupt a run at a given step through :meth:`Bar.advance`, the one call per optimiser step.
"""

from __future__ import annotations

from typing import Optional


class Bar:
    """A rich progress bar over optimiser steps showing the loss; ``print`` goes above it."""

    def __init__(self, progress=None, task_id=None):
        self.progress, self.task_id = progress, task_id

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def advance(self, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, advance=1, loss=loss_text(loss))

    def print(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text)


def loss_text(loss: Optional[float]) -> str:
    """The bar's loss field: 4 decimals, or a dash before any step was logged (not "nan")."""
    return "—" if loss is None else f"{loss:.4f}"


def progress_bar(enabled: bool, title: str, total: int, done: int, last_loss: Optional[float] = None) -> Bar:
    """A bar at `done` of `total` steps showing `last_loss` (the last logged loss of a resumed
    run) until the next step; a silent one (prints only) when not `enabled`."""
    if not enabled:
        return Bar()
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn())
    task_id = progress.add_task(title, total=total, completed=done, loss=loss_text(last_loss))
    return Bar(progress, task_id)
