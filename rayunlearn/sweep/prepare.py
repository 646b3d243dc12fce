"""Everything a sweep needs before its first trial, done once and cached.

``<results>/prepared/<key>/`` with key = a hash of the data, model, preparation and evaluation
settings (:meth:`SearchSpace.prepare_key`); names from ``rayunlearn.runs``:

    done.json                the stages finished (a rerun skips them)
    data/                    the synthetic benchmark (when data.benchmark = synthetic)
    models/{base,target,retain}/   via rayunlearn.train.finetune (each resumable, skipped when done)
    reference/{retain,target}.json (+ .raw.json)   their TOFU evaluations (retain first: the
                             target's forget quality is measured against it)
    models/retain.<j>/, reference/retain.<j>.json   retain replicates j = 1..k-1
                             (``prepare.retain_replicates: k``): the retain finetuning again with
                             seed + j, from the same base model
    reference/noise.json     the noise floor of every score between the retain replicates
                             (:func:`noise_floor`; ``rayunlearn.runs.noise_path``)
    reference/{retain,target}.attacks.json   with unlearn.eval.attacks: their evaluations under
                             the same attacks as the trials' (rayunlearn.eval.attacks)

The sweep copies the reference evaluations to ``<sweep>/reference/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

from rayunlearn import runs
from rayunlearn.config import FinetuneConfig, SynthConfig, to_dict
from rayunlearn.io import read_json, write_json
from rayunlearn.sweep.space import SearchSpace, stage_train


@dataclasses.dataclass
class Prepared:
    root: Path
    data: object          # DataConfig the trials use
    target: str           # target model directory
    retain_reference: str | None   # retain model's evaluation (JSON) for forget quality


def prepared_data_config(space: SearchSpace, root: Path):
    data = dataclasses.replace(space.data)
    if data.benchmark == "synthetic" and data.synth.out == SynthConfig().out:
        data.synth = dataclasses.replace(data.synth, out=str((root / runs.DATA_DIR).resolve()))
    return data


def prepare(space: SearchSpace, console=None) -> Prepared:
    """Train (or find cached) base/target/retain models and their reference evaluations."""
    key = space.prepare_key()
    root = runs.prepared_dir(space.results, key).resolve()
    data = prepared_data_config(space, root)
    say = console.print if console is not None else print
    done_path = root / runs.PREPARED_DONE_FILE
    done = read_json(done_path) if done_path.exists() else {}
    p = space.prepare
    _fail_fast(space, data)
    given = {"target": p.target_path, "retain": p.retain_path}
    init = "base" if p.train_base else None
    # (name, what it learns, the model it starts from, its seed offset): the base model first,
    # then the finetunings that start from it, which do not depend on each other
    waves = [[("base", "base", None, 0)] if p.train_base else [],
             [("target", "target", init, 0)] + [(runs.retain_replicate(j), "retain", init, j)
                                                for j in range(p.retain_replicates)]]
    for wave in waves:
        jobs = []
        for name, stage, start, j in wave:
            out = runs.model_dir(root, name)
            if done.get(name) or given.get(name):
                continue
            say(f"[prepare {key}] training the {name} model -> {out}")
            train = stage_train(space, stage)
            jobs.append((name, FinetuneConfig(stage=stage, init=str(runs.model_dir(root, start)) if start else None,
                                              out=str(out), replay_world=p.replay_world, data=data, model=space.model,
                                              train=dataclasses.replace(train, seed=train.seed + j))))

        def finished(name):
            done[name] = True
            write_json(done_path, done)

        finetune_all(jobs, p.parallel, finished)
    replicates = [runs.retain_replicate(j) for j in range(p.retain_replicates)]
    model_dirs = {s: Path(given[s]) if given.get(s) else runs.model_dir(root, s) for s in ("target", *replicates)}
    retain_ref = None
    if space.prepare.reference_eval:
        retain_ref = str(runs.reference_eval(root, "retain"))
        for stage in ("retain", "target", *replicates[1:]):
            if not done.get(f"eval_{stage}"):
                say(f"[prepare {key}] evaluating the {stage} model (reference)")
                _evaluate(space, data, model_dirs[stage], runs.reference_eval(root, stage),
                          retain_reference=retain_ref if stage == "target" else None)
                done[f"eval_{stage}"] = True
                write_json(done_path, done)
        if len(replicates) > 1:
            from rayunlearn.eval.evaluate import load_reference

            noise = noise_floor([load_reference(runs.reference_eval(root, r)) for r in replicates],
                                load_reference(runs.reference_eval(root, "target")), space.unlearn.eval)
            write_json(runs.noise_path(root), noise)
            say(f"[prepare {key}] noise floor between {len(replicates)} retain replicates: removal "
                f"({noise['removal_kind']}) ±{noise['removal']:.4g}, retention ±{noise['retention']:.4g}")
        attacks = space.unlearn.eval.attacks
        if attacks:
            stage_key = "attacks_" + hashlib.sha256(json.dumps(to_dict(space.unlearn.eval)["attacks"],
                                                               sort_keys=True).encode()).hexdigest()[:12]
            for stage in ("retain", "target"):
                if not done.get(f"{stage_key}_{stage}"):
                    say(f"[prepare {key}] attacking the {stage} model ({', '.join(a.label for a in attacks)})")
                    _attack_reference(space, data, model_dirs[stage], runs.reference_eval(root, stage), retain_ref)
                    done[f"{stage_key}_{stage}"] = True
                    write_json(done_path, done)
    return Prepared(root=root, data=data, target=str(model_dirs["target"]), retain_reference=retain_ref)


def finetune_all(jobs: list[tuple[str, FinetuneConfig]], parallel: int, finished) -> None:
    """Finetune every ``(name, config)`` of ``jobs`` (independent of each other), calling
    ``finished(name)`` as each completes: one after another in this process, or with
    ``parallel`` > 1 on CPUs that many at once, each in a spawned process with
    ``torch.get_num_threads() // parallel`` threads and no progress bar (bars of several
    processes would overwrite each other; the per-epoch accuracy lines stay). A failed job's
    exception is raised here once the jobs already running have finished."""
    import torch

    from rayunlearn.train import finetune

    workers = min(parallel, len(jobs))
    if workers <= 1 or torch.cuda.is_available():
        for name, cfg in jobs:
            finetune(cfg)
            finished(name)
        return
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_use_threads,
                             initargs=(threads,)) as pool:
        running = {pool.submit(finetune, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))):
                   name for name, cfg in jobs}
        while running:
            completed, _ = wait(running, return_when=FIRST_EXCEPTION)
            for fut in completed:
                name = running.pop(fut)
                if fut.exception() is not None:
                    for other in running:
                        other.cancel()
                    raise fut.exception()
                finished(name)


def _use_threads(threads: int) -> None:
    """A preparation worker process's share of the CPU threads (``finetune_all``)."""
    import torch

    torch.set_num_threads(threads)


def _attack_reference(space: SearchSpace, data, model_dir: Path, reference: Path, retain_reference: str) -> None:
    """The reference model's evaluations under ``unlearn.eval.attacks`` (the same attacks as
    every trial's), beside its reference evaluation (``runs.attacked_reference``): a trial's
    recovered fraction is measured against the equally attacked target."""
    from rayunlearn.data import load_benchmark
    from rayunlearn.eval.attacks import reference_attacks
    from rayunlearn.eval.evaluate import Evaluator, load_reference

    model, tokenizer = _reference_model(space, model_dir)
    benchmark = load_benchmark(data)
    evaluator = Evaluator(tokenizer, benchmark, data, space.unlearn.eval, retain_reference=retain_reference)
    plain = load_reference(str(reference))
    write_json(runs.attacked_reference(reference),
               reference_attacks(model, evaluator, plain, space.unlearn.eval.attacks, benchmark=benchmark))


def _fail_fast(space: SearchSpace, data) -> None:
    """Check in the driver that the benchmark loads and the model resolves, so a missing dataset
    or an unreachable hub fails in seconds with its clear message instead of inside Ray Train
    workers (which may wait for GPUs that never come)."""
    from rayunlearn.data import load_benchmark
    from rayunlearn.eval.attacks import check_attacks_fit

    check_attacks_fit(space.unlearn.eval.attacks, load_benchmark(data), data, space.unlearn.eval)
    name = space.model.name
    if name in ("tiny", "smollm2-135m") or Path(name).is_dir():
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(name, trust_remote_code=space.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        from rayunlearn.models import ModelLoadError

        raise ModelLoadError(f"could not resolve model {name!r} before preparing ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200]}); give a local directory or make the hub "
                             f"reachable (HF_HUB_OFFLINE unset)") from None


def _reference_model(space: SearchSpace, model_dir: Path):
    """A prepared model in eval mode, on the GPU when there is one (its evaluation and, for the
    attacks, its relearning steps run there)."""
    import torch

    from rayunlearn.models import load_model

    model, tokenizer = load_model(space.model, path=str(model_dir))
    if torch.cuda.is_available():
        model.cuda()
    return model.eval(), tokenizer


def _evaluate(space: SearchSpace, data, model_dir: Path, out: Path, retain_reference=None) -> None:
    from rayunlearn.data import load_benchmark
    from rayunlearn.eval import evaluate_model
    from rayunlearn.eval.evaluate import load_reference, write_eval

    model, tokenizer = _reference_model(space, model_dir)
    benchmark = load_benchmark(data)
    ref = load_reference(retain_reference) if retain_reference else None
    result = evaluate_model(model, tokenizer, benchmark, data, space.unlearn.eval, retain_reference=ref)
    write_eval(self_referenced(result, space.unlearn.eval, retain_reference=ref), out)


def self_referenced(result: dict, eval_cfg, retain_reference: dict | None = None) -> dict:
    """A reference model's evaluation scored against itself, so its `removal` is on the trials'
    scale. Without ``retain_reference`` it is the retain model's, its own retain reference (forget
    quality 1, KS statistic 0, closeness 1, privleak 0); with it, the target model's, its own
    target reference (``nll_rise`` 0)."""
    from rayunlearn.eval.evaluate import metrics_from_raw

    raw = result["raw"]
    is_retain = retain_reference is None
    return {**metrics_from_raw(raw, result["fingerprint"], reference=result if is_retain else retain_reference,
                               target=None if is_retain else result, removal_score=eval_cfg.removal_score,
                               selection_fraction=eval_cfg.selection_fraction,
                               selection_seed=eval_cfg.selection_seed), "raw": raw}


# the scores whose noise floor is measured: the objectives, TOFU's forget quality, and every
# removal score of both held-out parts
NOISE_TOP = ("removal", "removal_report", "retention", "forget_quality", "ks_statistic")


def _noise_scores(metrics: dict) -> dict[str, float]:
    """The scores of one evaluation that the noise floor covers, flat (``selection.<score>``)."""
    out = {k: metrics.get(k) for k in NOISE_TOP}
    out["mia.privleak"] = (metrics.get("mia") or {}).get("privleak")
    for part in ("selection", "report"):
        for name, v in (metrics.get(part) or {}).items():
            if name != "n_items":
                out[f"{part}.{name}"] = v
    return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def noise_from_scores(scored: dict[tuple[int, int], dict[str, float]], k: int) -> dict:
    """Half-widths from ``scored[(i, j)]`` = the scores of replicate i evaluated with replicate j
    as the retain reference (every i, j < k): per score, the differences
    |s(i vs j) − s(j vs j)| over the ordered pairs i ≠ j — how far a model that differs from the
    reference only by its training seed lands from the reference's own value — with their mean
    (``half_width``: the band the Pareto front uses), largest (``max``) and all of them
    (``values``). Scores missing in some evaluation are left out."""
    pairs = [(i, j) for i in range(k) for j in range(k) if i != j]
    keys = [key for key in scored[(0, 0)] if all(key in scored[ij] for ij in scored)]
    scores = {}
    for key in keys:
        diffs = [abs(scored[(i, j)][key] - scored[(j, j)][key]) for i, j in pairs]
        scores[key] = {"half_width": math.fsum(diffs) / len(diffs), "max": max(diffs), "values": diffs}
    return {"replicates": k, "pairs": len(pairs), "scores": scores}


def noise_floor(evals: list[dict], target: dict | None, eval_cfg) -> dict:
    """The noise floor of every score between retain replicates ``evals`` (their stored
    evaluations with ``raw``, replicate 0 first), what ``runs.noise_path`` holds: each replicate
    scored against each other (and itself) as if it were an unlearned model
    (``metrics_from_raw`` with the other as the retain reference and ``target`` as the target
    reference), then :func:`noise_from_scores`. ``removal`` / ``retention``: the half-widths of
    the sweep's two objectives (the removal score ``removal_kind`` on the selection part, model
    utility)."""
    from rayunlearn.eval.evaluate import metrics_from_raw

    k = len(evals)
    if k < 2:
        raise ValueError(f"the noise floor needs at least two retain replicates, got {k}")
    scored, kind = {}, None
    for i in range(k):
        for j in range(k):
            m = metrics_from_raw(evals[i]["raw"], evals[i].get("fingerprint", {}), reference=evals[j], target=target,
                                 removal_score=eval_cfg.removal_score, selection_fraction=eval_cfg.selection_fraction,
                                 selection_seed=eval_cfg.selection_seed)
            scored[(i, j)] = _noise_scores(m)
            kind = kind or m["removal_kind"]
    out = noise_from_scores(scored, k)
    return {"removal": out["scores"]["removal"]["half_width"], "retention": out["scores"]["retention"]["half_width"],
            "removal_score": eval_cfg.removal_score, "removal_kind": kind,
            "half_width": "mean over ordered replicate pairs (i, j) of |s(i vs j) - s(j vs j)|", **out}


def copy_references(prepared: Prepared, sweep_dir: Path) -> None:
    """Copy the prepared reference evaluations into ``<sweep>/reference/``."""
    src = prepared.root / runs.REFERENCE_DIR
    if not src.exists():
        return
    dst = sweep_dir / runs.REFERENCE_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.json"):
        shutil.copyfile(f, dst / f.name)
