"""Objective metadata, the registry, and the helpers every term uses.

An *objective* (a "term") is a small pure function of token views (``rayunlearn.forward``)
returning a :class:`TermOutput`: a ``(B,)`` tensor of per-example terms ``l_i`` whose sum is the
term's batch loss, plus logging statistics. Everything is **minimised**.

Per-example contract. Token-mean terms divide each sequence's token sum by
``view.token_count``; sequence-mean terms divide by ``view.seq_count``. Both default to the
micro-batch's own counts, and the training loop sets them to the effective-batch counts, so
``sum over micro-batches of sum_i l_i`` is exactly the unsplit batch loss (batch-size
invariance) and per-instance gradient effects are well defined.

Registration carries the metadata as data::

    @objective("npo", side="forget", needs={"forget": ("ref_logps",)}, domains={"beta": POSITIVE})
    def npo(forget: TokenView, *, beta: float = 0.5) -> TermOutput: ...

The hyper-parameters and their defaults are the function's keyword-only arguments; every one
declares its :class:`rayunlearn.domains.Domain`, checked when a method string is parsed (and
against search-space ranges). A term's ``weight`` (its coefficient in a method) has the domain
``WEIGHT_DOMAIN``: a finite number > 0, since a negative weight turns a forget term into learning
the forget set and a zero weight silently removes the term.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from rayunlearn import UserError
from rayunlearn.domains import POSITIVE, Domain, DomainError
from rayunlearn.forward import NEEDS, TokenView
from rayunlearn.registry import Registry

VIEWS = ("forget", "retain", "idk")
SIDES = ("forget", "retain")

REGISTRY: Registry["Objective"] = Registry("objective")
WEIGHT_DOMAIN = POSITIVE


class ObjectiveError(UserError):
    """A bad hyper-parameter value or a bad method string / parameter key."""


class MissingViewError(ValueError):
    """A term was called without a view (or a field of a view) it declared it needs.
    This is a wiring bug in the caller, not a user error."""


@dataclass
class TermOutput:
    """What a term returns: ``per_example`` (B,) with batch loss = ``per_example.sum()``,
    ``stats``: logging statistics as Python floats (computed without grad), and for weighted
    forget terms ``instance_weight`` (B,): the weight the term gives each instance (sequence
    weight, or its token weights averaged over the answer; no grad) — what the G-effect
    recorder stores per instance (the paper's Fig. 5(b))."""

    per_example: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    instance_weight: Optional[torch.Tensor] = None


@dataclass
class ObjectiveContext:
    """Run-level state handed to terms: the run ``seed`` (RMU's random direction u is drawn
    from it) and a cache of such vectors keyed by (hidden size, normalize, device, dtype)."""

    seed: int = 0
    cache: dict = field(default_factory=dict)

    def steering_vector(self, d: int, normalize: bool = False, device=None,
                        dtype=torch.float32) -> torch.Tensor:
        """u ~ U[0,1)^d drawn from a generator seeded with ``self.seed`` (the same u for every
        call with the same d); ``normalize`` returns u/||u|| (original RMU, open-unlearning)
        instead of the raw u (the G-effect reference code)."""
        key = (int(d), bool(normalize), str(device), dtype)
        if key not in self.cache:
            gen = torch.Generator().manual_seed(int(self.seed))
            u = torch.rand(int(d), generator=gen, dtype=torch.float64)     # (d,)
            if normalize:
                u = u / u.norm()
            self.cache[key] = u.to(device=device, dtype=dtype)
        return self.cache[key]


@dataclass(frozen=True)
class Objective:
    """A registered term.

    ``needs`` maps each token view the term reads ("forget", "retain", "idk") to the
    token-view needs (``rayunlearn.forward.NEEDS``) it requires on that view. ``defaults`` are
    the hyper-parameters and ``domains`` the values each accepts."""

    name: str
    side: str
    needs: Mapping[str, frozenset]
    defaults: Mapping[str, Any]
    fn: Callable[..., TermOutput]
    domains: Mapping[str, Domain]
    uses_refusal: bool = False
    summary: str = ""

    @property
    def needs_reference(self) -> bool:
        """True if any view needs a ``ref_*`` field (the frozen pre-unlearning model)."""
        return any(n.startswith("ref_") for ns in self.needs.values() for n in ns)

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(v for v in VIEWS if v in self.needs)

    def view_needs(self, view: str) -> frozenset:
        return self.needs.get(view, frozenset())

    def domain(self, key: str) -> Domain:
        """The domain of hyper-parameter ``key``, or of ``"weight"`` (the term's coefficient)."""
        if key == "weight":
            return WEIGHT_DOMAIN
        if key not in self.domains:
            keys = ["weight", *self.defaults]
            close = difflib.get_close_matches(key, keys, n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ObjectiveError(f"{self.name!r} has no hyper-parameter {key!r}.{hint} "
                                 f"Valid keywords for {self.name!r}: {', '.join(keys)}.")
        return self.domains[key]

    def resolve_params(self, params: Mapping[str, Any] | None = None, where: str = "") -> dict:
        """Defaults overridden by ``params``, each checked against its domain."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            keys = ["weight", *self.defaults] if where else list(self.defaults)
            close = difflib.get_close_matches(unknown[0], keys, n=2, cutoff=0.5)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ObjectiveError(
                f"{self.name!r} has no hyper-parameter {', '.join(map(repr, unknown))}{where}.{hint} "
                f"Valid keywords for {self.name!r}: {', '.join(keys) or '(none)'}.")
        out = dict(self.defaults)
        for k, v in params.items():
            out[k] = self.check_value(k, v, where)
        return out

    def check_value(self, key: str, value: Any, where: str = "") -> Any:
        """``value`` of hyper-parameter ``key`` (or ``"weight"``) coerced to its domain, or an
        :class:`ObjectiveError` naming ``<name>.<key>`` and the domain."""
        try:
            return self.domain(key).check(value)
        except DomainError as exc:
            raise ObjectiveError(f"{self.name}.{key}={value!r}{where}: {exc}.") from None

    def __call__(self, views: Mapping[str, TokenView], ctx: ObjectiveContext | None = None,
                 **params) -> TermOutput:
        """Evaluate on ``views`` (a dict with at least the views in ``self.needs``)."""
        resolved = self.resolve_params(params)
        kwargs = {}
        for view in self.views:
            v = views.get(view)
            if v is None:
                raise MissingViewError(f"term {self.name!r} needs the {view!r} token view; pass "
                                       f"views={{{view!r}: token_view(...)}}")
            for need in self.needs[view]:
                if getattr(v, need) is None:
                    raise MissingViewError(
                        f"term {self.name!r} needs {need!r} on the {view!r} token view; build it "
                        f"with token_view(..., needs=method.needs({view!r}))")
            kwargs[view] = v
        if _takes_ctx(self.fn):
            kwargs["ctx"] = ctx if ctx is not None else ObjectiveContext()
        return self.fn(**kwargs, **resolved)


def _takes_ctx(fn) -> bool:
    return "ctx" in inspect.signature(fn).parameters


def objective(name: str, *, side: str, needs: Mapping[str, tuple | list] | None = None,
              uses_refusal: bool = False, domains: Mapping[str, Domain] | None = None):
    """Register ``fn`` as objective ``name``; its keyword-only arguments are the
    hyper-parameters (their defaults the defaults), each with its domain in ``domains``."""
    domains = dict(domains or {})
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    needs = {v: frozenset(ns) for v, ns in (needs or {}).items()}
    for v, ns in needs.items():
        if v not in VIEWS or not ns <= NEEDS:
            raise ValueError(f"bad needs for {name!r}: {v!r}: {sorted(ns)}")

    def wrap(fn):
        sig = inspect.signature(fn)
        defaults = {p.name: p.default for p in sig.parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "ctx"}
        view_args = [p.name for p in sig.parameters.values()
                     if p.kind is not inspect.Parameter.KEYWORD_ONLY]
        if set(view_args) != set(needs):
            raise ValueError(f"{name!r}: positional arguments {view_args} must be the views {list(needs)}")
        if "weight" in defaults:
            raise ValueError(f"{name!r}: 'weight' is reserved for the method coefficient")
        if set(domains) != set(defaults):
            raise ValueError(f"{name!r}: declare a domain for every hyper-parameter "
                             f"{sorted(defaults)} (got domains for {sorted(domains)})")
        for key, default in defaults.items():
            if not domains[key].contains(default):
                raise ValueError(f"{name!r}: default {key}={default!r} is not {domains[key].describe()}")
        doc = inspect.getdoc(fn) or ""
        REGISTRY.register(name, Objective(
            name=name, side=side, needs=needs, defaults=defaults, fn=fn, domains=domains,
            uses_refusal=uses_refusal, summary=doc.splitlines()[0] if doc else ""))
        return fn

    return wrap


def get(name: str) -> Objective:
    """The registered objective ``name``; unknown names raise ``UnknownNameError`` with the
    closest valid names."""
    return REGISTRY.get(name)


def names() -> list[str]:
    """Sorted names of every registered objective."""
    return REGISTRY.names()


def check_value(term: str, key: str, value: Any) -> Any:
    """``value`` for hyper-parameter ``key`` (or ``"weight"``) of objective ``term``, checked
    against its domain (e.g. ``check_value("wga", "alpha", -1)`` raises an
    :class:`ObjectiveError` naming ``wga.alpha`` and "a finite number >= 0")."""
    return get(term).check_value(key, value)


# --------------------------------------------------------------------------------------------
# helpers shared by the terms

def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 tensors are upcast; float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_mean_terms(values: torch.Tensor, view: TokenView) -> torch.Tensor:
    """(B, T-1) per-token values -> (B,) per-example terms Σ_t values·mask / token_count."""
    return (values * view.mask).sum(-1) / view.token_count


def seq_logp(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) sequence log-prob log π(y|x) = Σ_t log p_t over answer tokens."""
    return (logps * mask).sum(-1)


@torch.no_grad()
def row_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) -> (B,): each row's mean of ``values`` over its answer tokens (no grad)."""
    m = mask.to(values.dtype)
    return ((values * m).sum(-1) / m.sum(-1).clamp_min(1)).detach()


@torch.no_grad()
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of ``values`` over ``mask`` as a Python float (nan when the mask is empty)."""
    n = int(mask.sum())
    return float((values.double() * mask).sum() / n) if n else float("nan")


def layer_states(hidden: tuple, layer: int | str, what: str) -> torch.Tensor:
    """Output of block ``layer`` from an HF ``hidden_states`` tuple: ``hidden[layer + 1]``
    (index 0 is the embedding output). Negative layers count from the last block;
    ``"middle"`` is block ``n_blocks // 2``. HF's last entry (block n-1) is after the final norm."""
    n_blocks = len(hidden) - 1
    if layer == "middle":
        k = n_blocks // 2
    else:
        k = int(layer)
        if not -n_blocks <= k < n_blocks:
            raise ObjectiveError(f"{what}: layer={layer} is out of range for a model with {n_blocks} "
                                 f"blocks; use 0..{n_blocks - 1}, a negative index, or 'middle'")
        k %= n_blocks
    return hidden[k + 1]
