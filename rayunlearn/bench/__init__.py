"""Performance measurements, printed as side-by-side ratios measured in one run.
Timing lives here, never in tests."""

from __future__ import annotations

import importlib

from rayunlearn import UserError

BENCHES = {
    "effects": "rayunlearn.bench.effects",
    "eval": "rayunlearn.bench.eval",
    "sweep": "rayunlearn.bench.sweep",
    "gpu": "rayunlearn.bench.gpu",
    "attacks": "rayunlearn.bench.attacks",
}


def bench_command(what: str, model: str | None = None, quick: bool = False) -> int:
    names = list(BENCHES) if what == "all" else [what]
    if what == "all":
        names.remove("gpu")
    for name in names:
        if name not in BENCHES:
            raise UserError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHES)}, all")
        mod = importlib.import_module(BENCHES[name])
        kwargs = {"quick": quick}
        if name != "sweep":
            kwargs["model"] = model
        mod.main(**kwargs)
    return 0
