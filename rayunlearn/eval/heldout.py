"""Held-out selection: the forget set split by author into a *selection* part (what a sweep
optimises) and a *report* part (the headline numbers), so the winner of a sweep is measured on
forget items its selection never saw.

Whole authors go to one part: the items of one author share facts and phrasing, so an item-level
split would leak the selection into the report. An author is the record's ``author`` field (the
synthetic benchmark has one); TOFU's records have none, and its forget splits are consecutive
blocks of :data:`TOFU_QA_PER_AUTHOR` QA per author, so item ``i`` belongs to block ``i // 20``.

The split is a seeded ranking of authors by a hash of ``(seed, author)``: the first
``round(fraction · n_authors)`` go to selection. It depends only on the seed, the fraction and
the author names — not on the order of the records, the process or the machine.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rayunlearn import UserError

TOFU_QA_PER_AUTHOR = 20        # TOFU: 20 QA per fictitious author, stored author by author
DEFAULT_FRACTION = 0.5


@dataclass(frozen=True)
class HeldoutSplit:
    """Item indices (into the forget split) of each part and the authors behind them."""

    fraction: float
    seed: int
    selection: tuple[int, ...]
    report: tuple[int, ...]
    selection_authors: tuple[str, ...]
    report_authors: tuple[str, ...]

    def as_dict(self) -> dict:
        """What metrics.json stores under ``heldout``."""
        return {"fraction": self.fraction, "seed": self.seed,
                "authors": {"selection": list(self.selection_authors), "report": list(self.report_authors)},
                "items": {"selection": list(self.selection), "report": list(self.report)}}


def item_authors(records: list[dict]) -> list[str]:
    """The author of each forget record: its ``author`` field, or TOFU's block of 20 QA."""
    if records and all(r.get("author") for r in records):
        return [str(r["author"]) for r in records]
    return block_authors(len(records))


def block_authors(n: int) -> list[str]:
    """TOFU's authors of ``n`` forget items: consecutive blocks of 20 QA."""
    return [f"block-{i // TOFU_QA_PER_AUTHOR}" for i in range(n)]


def ranked_authors(authors: list[str], seed: int) -> list[str]:
    """The distinct ``authors`` in a seeded order that depends only on the seed and the names
    (a hash of ``(seed, author)``): the held-out split takes its selection part from the front,
    the relearning attack (``rayunlearn.eval.attacks``) its relearned authors."""
    return sorted(set(authors), key=lambda a: hashlib.sha256(f"{int(seed)}:{a}".encode("utf-8")).hexdigest())


def split_authors(authors: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(selection authors, report authors), each sorted by name. ``fraction`` = 1 puts every
    author into selection (no held-out part); below 1 both parts get at least one author, except
    that a forget set of a single author cannot be split: it is all selection, and the empty
    report part shows in metrics.json (``removal_report`` null, no report items)."""
    unique = sorted(set(authors))
    if not 0 < fraction <= 1:
        raise UserError(f"eval.selection_fraction: must be in (0, 1], got {fraction!r}")
    if fraction == 1 or len(unique) < 2:
        return unique, []
    k = min(len(unique) - 1, max(1, round(fraction * len(unique))))
    ranked = ranked_authors(unique, seed)
    return sorted(ranked[:k]), sorted(ranked[k:])


def split_items(authors: list[str], fraction: float = DEFAULT_FRACTION, seed: int = 0) -> HeldoutSplit:
    """The held-out split of forget items whose authors are ``authors`` (one per item)."""
    sel_authors, rep_authors = split_authors(authors, fraction, seed)
    chosen = set(sel_authors)
    return HeldoutSplit(fraction=float(fraction), seed=int(seed),
                        selection=tuple(i for i, a in enumerate(authors) if a in chosen),
                        report=tuple(i for i, a in enumerate(authors) if a not in chosen),
                        selection_authors=tuple(sel_authors), report_authors=tuple(rep_authors))
