"""Shared helpers for benchmarks: a rich table printer."""

from __future__ import annotations


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console(width=140).print(table)
