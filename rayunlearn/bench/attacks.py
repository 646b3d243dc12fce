"""`rayunlearn bench attacks`: what the robustness attacks (``eval.attacks``,
rayunlearn/eval/attacks.py) cost beside the unlearning run they attack.

One real unlearning run in-process (the shipped space ``tiny``, WGA+KL, its models prepared once
and cached under ``results/bench_attacks/prepared/``, not timed) with the demo study's attacks
and evaluation settings (``demo_study``'s ``unlearn.eval.attacks`` and ``attack_rouge``), torch
threads = 1 as in a sweep trial. Reported per attack: its seconds (the attack and the evaluation
of the attacked model), and that over the unlearning run's own time (``time_s`` less
``time.attacks``) and over its optimiser steps (``time.steps``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rayunlearn import runs
from rayunlearn.bench.common import print_table

BENCH_ROOT = "results/bench_attacks"
TIME_KEY = "time_s"


def attack_costs(flat: dict, time_s: float) -> list[dict]:
    """Per attack of a run's flattened metrics: its seconds and their ratio to the unlearning
    run (``time_s`` less ``time.attacks``) and to its steps (``time.steps``)."""
    run_s = time_s - flat.get(f"{runs.TIME_PREFIX}attacks", 0.0)
    steps_s = flat.get(f"{runs.TIME_PREFIX}steps", math.nan)
    suffix = f".{TIME_KEY}"
    out = []
    for key in sorted(flat):
        if key.startswith(runs.ATTACK_PREFIX) and key.endswith(suffix):
            name = key[len(runs.ATTACK_PREFIX):-len(suffix)]
            sec = float(flat[key])
            out.append({"attack": name, "seconds": sec, "per_run": sec / run_s, "per_steps": sec / steps_s,
                        "error": flat.get(f"{runs.ATTACK_PREFIX}{name}.error", "")})
    return out


def bench_attacks(epochs: int, root: str | Path = BENCH_ROOT) -> tuple[list[dict], float, dict]:
    """Run one tiny unlearning trial with the demo study's attacks; (attack costs, time_s, flat metrics)."""
    import torch
    import yaml
    from rich.console import Console

    from rayunlearn.config import to_dict
    from rayunlearn.sweep.prepare import copy_references, prepare
    from rayunlearn.sweep.space import load_space
    from rayunlearn.sweep.trial import TrialContext, flatten_metrics, trial_config
    from rayunlearn.train import unlearn_trial

    demo = load_space("demo_study").unlearn.eval
    # the demo's attacks; its relearning takes one whole selection author: 4 QA here
    attacks = [{**to_dict(a), **({"size": 4} if a.kind == "relearn" else {})} for a in demo.attacks]
    root = Path(root)
    space = load_space("tiny", [f"results={root}", "name=attacks", "num_samples=1", f"unlearn.train.epochs={epochs}",
                                "data.synth.num_authors=40", "unlearn.eval.max_items=16",
                                f"unlearn.eval.attacks={yaml.safe_dump(attacks, default_flow_style=True).strip()}",
                                f"unlearn.eval.attack_rouge={str(demo.attack_rouge).lower()}"])
    prepared = prepare(space, console=Console(quiet=True))
    sweep_dir = space.sweep_dir()
    copy_references(prepared, sweep_dir)
    ctx = TrialContext(space=to_dict(space), sweep_dir=str(sweep_dir), target=prepared.target,
                       data=to_dict(prepared.data), retain_reference=str(runs.reference_eval(sweep_dir, "retain")),
                       aggregator=None)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trial_id = f"run{int(time.time())}"
        t0 = time.perf_counter()
        metrics = unlearn_trial(trial_config(space, ctx, trial_id, "wga+kl"))
        time_s = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old)
    flat = flatten_metrics({**metrics, "time": metrics.get("time", {})})
    return attack_costs(flat, time_s), time_s, flat


def main(quick: bool = False, model: str | None = None) -> None:
    epochs = 2 if quick else 5
    costs, time_s, flat = bench_attacks(epochs)
    steps = flat.get(f"{runs.TIME_PREFIX}steps", math.nan)
    print_table(f"attacks: one tiny unlearning run (wga+kl, {epochs} epochs, 1 thread; {time_s:.1f} s, of which "
                f"steps {steps:.1f} s and attacks {flat.get(runs.TIME_PREFIX + 'attacks', 0.0):.1f} s) with the demo "
                f"study's attacks", ["attack", "seconds", "/ unlearning run", "/ its steps", "error"],
                [[c["attack"], f"{c['seconds']:.2f}", f"{c['per_run']:.2f}", f"{c['per_steps']:.2f}", c["error"]]
                 for c in costs])
