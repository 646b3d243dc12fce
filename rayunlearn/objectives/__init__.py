"""Unlearning objectives: forget and retain terms as small pure functions of token views,
registered by name with their needs declared as data, and methods (weighted lists of terms)
written as method strings such as ``"npo(beta=0.1)+kl(weight=0.5)"``.

Everything is minimised. Each term returns per-example terms l_i (a (B,) tensor) whose sum is
its batch loss; token means divide by ``view.token_count`` and sequence means by
``view.seq_count`` (batch-size invariance). See ``docs/spec/OBJECTIVES.md``.
"""

from rayunlearn.objectives.base import (WEIGHT_DOMAIN, MissingViewError, Objective,
                                        ObjectiveContext, ObjectiveError, TermOutput, check_value,
                                        get, names, objective)
from rayunlearn.objectives import forget as _forget  # noqa: F401  (registers the forget terms)
from rayunlearn.objectives import retain as _retain  # noqa: F401  (registers the retain terms)
from rayunlearn.objectives.method import (PRESETS, Method, Term, build_method,
                                          check_forget_term, describe, parse_method)

__all__ = ["Method", "MissingViewError", "Objective", "ObjectiveContext", "ObjectiveError",
           "PRESETS", "Term", "TermOutput", "WEIGHT_DOMAIN", "build_method", "check_forget_term",
           "check_value", "describe", "get", "names", "objective", "parse_method"]
