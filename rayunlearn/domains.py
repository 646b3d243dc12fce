"""Domains: the values a setting may take, declared as data and checked when a config, a method
string or a search space loads (never at the end of a run).

One :class:`Domain` describes itself in words (``"a finite number > 0 or null"``), so every
error message that names a setting also says what it accepts. Config fields
(``rayunlearn.config``), objective hyper-parameters and term weights (``rayunlearn.objectives``)
and search-space ranges (``rayunlearn.sweep.space``) all use these. No torch here: the config
checks run before anything heavy is imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Kind = Literal["number", "integer", "bool", "choice", "layer"]


class DomainError(ValueError):
    """A value outside its domain; callers re-raise it as their own UserError naming the key."""


@dataclass(frozen=True)
class Domain:
    """The values one setting accepts.

    ``number``: a finite int or float within the bounds; ``integer``: an int within the bounds;
    ``bool``: true/false; ``choice``: one of ``choices``; ``layer``: a block index (any int,
    negative counts from the end) or ``"middle"``. ``low``/``high`` bound numbers and integers
    (``low_open``/``high_open``: strict). ``nullable``: None is accepted too."""

    kind: Kind
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    nullable: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "layer":
            text = "a block index (negative counts from the last block) or 'middle'"
        else:
            text = "a finite number" if self.kind == "number" else "an integer"
            if self.low is not None and self.high is not None:
                left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text += f" in {left}{_num(self.low)}, {_num(self.high)}{right}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {_num(self.low)}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {_num(self.high)}"
        return text + (" or null" if self.nullable else "")

    def check(self, value: Any) -> Any:
        """``value`` coerced to the domain's type (ints to float for numbers), or a
        :class:`DomainError` saying what is accepted."""
        if value is None and self.nullable:
            return None
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
        elif self.kind == "choice":
            if not isinstance(value, bool) and value in self.choices:
                return value
        elif self.kind == "layer":
            if value == "middle" or (isinstance(value, int) and not isinstance(value, bool)):
                return value
        elif self.kind == "integer":
            if isinstance(value, int) and not isinstance(value, bool) and self._in_bounds(value):
                return value
        elif isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) and self._in_bounds(value):
            return float(value)
        raise DomainError(f"must be {self.describe()}")

    def contains(self, value: Any) -> bool:
        try:
            self.check(value)
        except DomainError:
            return False
        return True

    def _in_bounds(self, v) -> bool:
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        if self.high is not None and (v >= self.high if self.high_open else v > self.high):
            return False
        return True


def _num(x: float) -> str:
    return f"{x:g}"


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, nullable: bool = False) -> Domain:
    return Domain("number", low, high, low_open, high_open, nullable=nullable)


def integer(low: int | None = None, high: int | None = None, *, nullable: bool = False) -> Domain:
    return Domain("integer", low, high, nullable=nullable)


def choice(*values) -> Domain:
    return Domain("choice", choices=tuple(values))


POSITIVE = number(0, low_open=True)          # a finite number > 0
NONNEGATIVE = number(0)                      # a finite number >= 0
BOOL = Domain("bool")
LAYER = Domain("layer")
COUNT = integer(1)                           # an integer >= 1
NONNEGATIVE_INT = integer(0)                 # an integer >= 0 (0 = off, where documented)
