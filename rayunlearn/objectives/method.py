"""Methods: weighted lists of terms, written as method strings.

Grammar (whitespace optional)::

    method := term ("+" term)*
    term   := NAME | NAME "(" [kv ("," kv)*] ")"
    kv     := NAME "=" value           value := number | true | false | word | 'quoted' | "quoted"

``weight`` is the term's coefficient (default 1); every other keyword is a hyper-parameter of
that objective, e.g. ``npo(beta=0.1)+kl(weight=0.5, mask=all)``. A whole string may also be a
preset name (``PRESETS``). The batch loss of a method is Σ_terms weight · Σ_i l_i.
"""

from __future__ import annotations

import numbers
import re
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from rayunlearn.forward import TokenView
from rayunlearn.domains import DomainError
from rayunlearn.objectives.base import (VIEWS, WEIGHT_DOMAIN, ObjectiveContext, ObjectiveError, get,
                                        names)

# The paper's variants (and the beyond-paper anchors), by name. Values are method strings; any
# function that takes a method string also takes one of these names.
PRESETS: dict[str, str] = {
    "ga": "ga",
    "ga+gd": "ga+gd",
    "ga+kl": "ga+kl",
    "npo": "npo(beta=0.5)",
    "npo+kl": "npo(beta=0.5)+kl",
    "wga": "wga(alpha=1.0)",
    "wga+kl": "wga(alpha=1.0)+kl",
    "tnpo": "tnpo(beta=4.0)",
    "tnpo+kl": "tnpo(beta=4.0)+kl",
    "wtnpo": "wtnpo(beta=4.0, alpha=1.5)",
    "wtnpo+kl": "wtnpo(beta=4.0, alpha=1.5)+kl",
    "rmu": "rmu(c=2.0)",
    "rmu+kl": "rmu(c=2.0)+kl",
    "po": "po",
    "po+kl": "po+kl",
    # beyond the paper (open-unlearning's defaults, with its NLL retain term)
    "simnpo+gd": "simnpo(beta=4.5, delta=0.0)+gd",
    "idk_dpo+gd": "idk_dpo(beta=0.1)+gd",
    "satimp+gd": "satimp(beta1=5.0, beta2=1.0)+gd",
    "undial": "undial(beta=10.0)",
    # the G-effect reference code's loss names (its npo_kl weighted KL by β by accident: not copied)
    "ga_kl": "ga+kl", "npo_kl": "npo(beta=0.5)+kl", "wga_kl": "wga(alpha=1.0)+kl",
    "tnpo_kl": "tnpo(beta=4.0)+kl", "wtnpo_kl": "wtnpo(beta=4.0, alpha=1.5)+kl",
    "rmu_kl": "rmu(c=2.0)+kl", "idk": "po", "idk_kl": "po+kl", "KL": "ga+kl",
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?(?![A-Za-z0-9_.])")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")


@dataclass(frozen=True, eq=True)
class Term:
    """One weighted term of a method: objective ``name`` with hyper-parameters ``params``
    (defaults filled in), coefficient ``weight``, unique ``label`` ("kl", "kl#2", ...) and
    ``side`` ("forget" | "retain")."""

    name: str
    weight: float
    params: dict
    label: str
    side: str

    @property
    def objective(self):
        return get(self.name)

    def __str__(self) -> str:
        items = [f"{k}={_format_value(v)}" for k, v in self.params.items()]
        if self.weight != 1.0:
            items.append(f"weight={_format_value(self.weight)}")
        return f"{self.name}({', '.join(items)})" if items else self.name


class Method:
    """A weighted list of terms. Build with :func:`parse_method` or :func:`build_method`."""

    def __init__(self, terms: list[Term] | tuple[Term, ...]):
        if not terms:
            raise ObjectiveError("a method needs at least one term, e.g. 'npo+kl'")
        self.terms: tuple[Term, ...] = tuple(terms)
        self._stats: dict[str, float] = {}
        self._instance_weights: dict[str, torch.Tensor] = {}

    # -- description ---------------------------------------------------------------------
    def __str__(self) -> str:
        """Canonical method string (every hyper-parameter explicit); parses back to ``self``."""
        return "+".join(str(t) for t in self.terms)

    def __repr__(self) -> str:
        return f"Method({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Method) and self.terms == other.terms

    def __hash__(self) -> int:
        return hash(str(self))

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.terms]

    def term(self, label: str) -> Term:
        for t in self.terms:
            if t.label == label:
                return t
        raise ObjectiveError(f"method {self} has no term {label!r}; terms: {', '.join(self.labels)}")

    def needs(self, view: str) -> frozenset:
        """Token-view needs on ``view`` ("forget", "retain" or "idk"), over all terms."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        out: set = set()
        for t in self.terms:
            out |= t.objective.view_needs(view)
        return frozenset(out)

    @property
    def views_needed(self) -> tuple[str, ...]:
        """Which token views the terms read, in the order forget, retain, idk."""
        used = {v for t in self.terms for v in t.objective.needs}
        return tuple(v for v in VIEWS if v in used)

    @property
    def needs_reference(self) -> bool:
        """True if some term needs the frozen reference model (a ``ref_*`` need)."""
        return any(t.objective.needs_reference for t in self.terms)

    @property
    def uses_refusal(self) -> bool:
        """True if some term reads the refusal ("idk") batch."""
        return any(t.objective.uses_refusal for t in self.terms)

    @property
    def stats(self) -> dict[str, float]:
        """Logging statistics ``<label>.<name>`` of the last ``per_example``/``loss`` call."""
        return dict(self._stats)

    # -- evaluation ----------------------------------------------------------------------
    @property
    def instance_weights(self) -> dict[str, torch.Tensor]:
        """{label: (B,) per-instance weight} of the weighted terms in the last ``per_example`` /
        ``loss`` call (``TermOutput.instance_weight``)."""
        return dict(self._instance_weights)

    def per_example(self, views: Mapping[str, TokenView],
                    ctx: ObjectiveContext | None = None) -> dict[str, torch.Tensor]:
        """Unweighted per-example terms {label: (B_side,) tensor}; the batch loss is
        Σ_terms weight · per_example[label].sum()."""
        ctx = ctx if ctx is not None else ObjectiveContext()
        out, stats, weights = {}, {}, {}
        for t in self.terms:
            res = t.objective(views, ctx, **t.params)
            out[t.label] = res.per_example
            stats.update({f"{t.label}.{k}": float(v) for k, v in res.stats.items()})
            if res.instance_weight is not None:
                weights[t.label] = res.instance_weight
        self._stats, self._instance_weights = stats, weights
        return out

    def loss(self, views: Mapping[str, TokenView], ctx: ObjectiveContext | None = None):
        """(total, values, stats): total = Σ weight · Σ_i l_i (a tensor with grad), values =
        {label: unweighted Σ_i l_i as float}, stats = {"<label>.<name>": float}."""
        parts = self.per_example(views, ctx)
        total = None
        values = {}
        for t in self.terms:
            s = parts[t.label].sum()
            values[t.label] = float(s.detach())
            total = t.weight * s if total is None else total + t.weight * s
        return total, values, self.stats

    # -- hyper-parameters ----------------------------------------------------------------
    def param_keys(self) -> list[str]:
        """Every key ``with_params`` accepts: ``<label>.weight`` and ``<label>.<param>``."""
        return [f"{t.label}.{k}" for t in self.terms for k in ("weight", *t.params)]

    def with_params(self, overrides: Mapping[str, Any] | None = None, **kw) -> "Method":
        """A copy with hyper-parameters/weights set from keys ``<label>.<param>`` (param may be
        ``weight``), e.g. ``{"wga.alpha": 2.0, "kl.weight": 0.5}``. Keyword arguments use ``__``
        for the dot (``wga__alpha=2.0``)."""
        overrides = {**dict(overrides or {}), **{k.replace("__", "."): v for k, v in kw.items()}}
        per_term: dict[str, dict] = {t.label: {} for t in self.terms}
        valid = self.param_keys()
        for key, value in overrides.items():
            if key not in valid:
                raise ObjectiveError(f"unknown method parameter {key!r} for {self}. "
                                     f"Valid keys: {', '.join(valid)}.")
            label, param = key.split(".", 1)
            per_term[label][param] = _plain(value)
        terms = []
        for t in self.terms:
            changes = per_term[t.label]
            weight = _check_weight(t.label, changes.pop("weight", t.weight), "")
            params = t.objective.resolve_params({**t.params, **changes}, where=f" (term {t.label})")
            terms.append(Term(t.name, weight, params, t.label, t.side))
        return Method(terms)


# --------------------------------------------------------------------------------------------
# parsing

def parse_method(text: str | Method, allow_no_forget: bool = False) -> Method:
    """Parse a method string (or a ``PRESETS`` name) into a :class:`Method`.

    Unknown objective names raise ``UnknownNameError`` with suggestions; unknown keywords raise
    ``ObjectiveError`` listing the valid ones; values outside a hyper-parameter's domain (or a
    weight that is not a finite number > 0) name the key; syntax errors show where the string
    went wrong. A method without a forget term (``kl``, ``gd``) unlearns nothing and is refused
    unless ``allow_no_forget``.
    """
    if isinstance(text, Method):
        check_forget_term(text, allow_no_forget)
        return text
    if not isinstance(text, str):
        raise ObjectiveError(f"a method must be a string such as 'npo+kl', got {type(text).__name__}")
    key = text.strip()
    if key in PRESETS:
        text = PRESETS[key]
    raw = _Parser(text).parse()
    counts: dict[str, int] = {}
    terms = []
    for name, kwargs in raw:
        obj = get(name)
        counts[name] = counts.get(name, 0) + 1
        label = name if counts[name] == 1 else f"{name}#{counts[name]}"
        where = f" (term {label} of {text.strip()!r})"
        weight = _check_weight(label, kwargs.pop("weight", 1.0), where)
        params = obj.resolve_params(kwargs, where=where)
        terms.append(Term(name, weight, params, label, obj.side))
    seen = set()
    for t in terms:
        key = (t.name, tuple(sorted(t.params.items())))
        if key in seen:
            warnings.warn(f"method {text.strip()!r} repeats {t.name} with the same hyper-parameters; "
                          f"its terms are labelled {t.label} etc. (the same as one term with the "
                          f"summed weight)", stacklevel=2)
        seen.add(key)
    method = Method(terms)
    check_forget_term(method, allow_no_forget)
    return method


def check_forget_term(method: Method, allow_no_forget: bool = False) -> None:
    """Refuse a method with no forget-side term unless ``allow_no_forget``: such a run only
    regularises on retain data, and its "unlearning" results would be meaningless."""
    if allow_no_forget or any(t.side == "forget" for t in method.terms):
        return
    forget = ", ".join(n for n in names() if get(n).side == "forget")
    raise ObjectiveError(f"{str(method)!r} has no forget term, so it unlearns nothing; add one "
                         f"({forget}), e.g. 'ga+{method.terms[0].name}', or allow it explicitly "
                         f"(allow_no_forget=true) for a retain-only control run.")


def build_method(family: str, params: Mapping[str, Any] | None = None,
                 allow_no_forget: bool = False) -> Method:
    """``parse_method(family).with_params(params)``: a sweep's method from its family string and
    sampled values keyed ``<label>.<param>``, e.g. ``build_method("wga+kl", {"wga.alpha": 2.0,
    "kl.weight": 0.5})``."""
    return parse_method(family, allow_no_forget).with_params(params or {})


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.i = 0

    def error(self, what: str):
        raise ObjectiveError(f"bad method string: {what} at position {self.i + 1}\n"
                             f"  {self.text}\n  {' ' * self.i}^\n"
                             f"Write terms joined by '+', each 'name' or 'name(key=value, ...)', "
                             f"e.g. 'npo(beta=0.1)+kl(weight=0.5)'.")

    def skip(self):
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.i] if self.i < len(self.text) else ""

    def found(self) -> str:
        return f", found {self.peek()!r}" if self.peek() else ", found the end"

    def expect(self, ch: str):
        if self.peek() != ch:
            self.error(f"expected {ch!r}{self.found()}")
        self.i += 1

    def name(self, what: str) -> str:
        self.skip()
        m = _NAME.match(self.text, self.i)
        if not m:
            self.error(f"expected {what}{self.found()}")
        self.i = m.end()
        return m.group(0)

    def value(self):
        self.skip()
        for rx, conv in ((_QUOTED, None), (_NUMBER, "num"), (_WORD, "word")):
            m = rx.match(self.text, self.i)
            if not m:
                continue
            self.i = m.end()
            if conv is None:
                return m.group(1) if m.group(1) is not None else m.group(2)
            s = m.group(0)
            if conv == "num":
                return float(s) if any(c in s for c in ".eE") else int(s)
            if s.lower() in ("true", "false"):
                return s.lower() == "true"
            return s
        self.error("expected a value (a number, true/false or a word)")

    def parse(self) -> list[tuple[str, dict]]:
        if not self.text.strip():
            self.error("empty method")
        terms = []
        while True:
            name = self.name("an objective name")
            kwargs: dict = {}
            if self.peek() == "(":
                self.i += 1
                if self.peek() != ")":
                    while True:
                        start = self.i
                        key = self.name("a keyword")
                        self.expect("=")
                        if key in kwargs:
                            self.i = start
                            self.skip()
                            self.error(f"keyword {key!r} given twice")
                        kwargs[key] = self.value()
                        if self.peek() == ",":
                            self.i += 1
                            continue
                        break
                self.expect(")")
            terms.append((name, kwargs))
            nxt = self.peek()
            if nxt == "":
                return terms
            if nxt != "+":
                self.error(f"expected '+', '(' or the end, found {nxt!r}")
            self.i += 1


def _format_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    if _WORD.fullmatch(s) and s.lower() not in ("true", "false"):
        return s
    return repr(s)


def _plain(value):
    """numpy / torch scalars -> Python bool/int/float."""
    if type(value).__name__ in ("bool_", "bool") and not isinstance(value, str):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "item") and callable(value.item):
        return _plain(value.item())
    return value


def _check_weight(label: str, value, where: str) -> float:
    value = _plain(value)
    try:
        return WEIGHT_DOMAIN.check(value)
    except DomainError as exc:
        raise ObjectiveError(f"{label}.weight={value!r}{where}: {exc} (a negative weight reverses "
                             f"the term, a zero weight drops it).") from None


# --------------------------------------------------------------------------------------------
# listing

def describe() -> str:
    """Plain-text tables of the objectives (side, views and needs, defaults) and the presets,
    for ``rayunlearn methods``."""
    rows = [("name", "side", "views: needs", "hyper-parameters (defaults)", "summary")]
    for n in names():
        o = get(n)
        needs = "; ".join(f"{v}: {','.join(sorted(o.needs[v])) or '-'}" for v in o.views)
        params = ", ".join(f"{k}={_format_value(v)}" for k, v in o.defaults.items()) or "-"
        rows.append((n, o.side, needs, params, o.summary.split(":")[0].rstrip(".")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["Objectives (all minimised; per-example terms sum to the batch loss):"]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
    lines += ["", "Method strings: terms joined by '+', each 'name' or 'name(key=value, ...)';",
              "'weight' is the term's coefficient, e.g. 'npo(beta=0.1)+kl(weight=0.5, mask=all)'.",
              f"Every weight must be {WEIGHT_DOMAIN.describe()}; a method needs a forget term.",
              "", "Hyper-parameter domains (checked when a method string or search space loads):"]
    for n in names():
        for k, d in get(n).domains.items():
            lines.append(f"  {n}.{k}: {d.describe()}")
    lines += ["", "Presets (usable wherever a method string is):"]
    w = max(len(k) for k in PRESETS)
    for k, v in PRESETS.items():
        lines.append(f"  {k.ljust(w)}  = {parse_method(v)}")
    return "\n".join(lines)
