"""Everything a sweep needs before its first trial, done once and cached.

``<results>/prepared/<key>/`` with key = a hash of the data, model, preparation and evaluation
settings (:meth:`SearchSpace.prepare_key`); names from ``rayunlearn.runs``:

    done.json                the stages finished (a rerun skips them)
    data/                    the synthetic benchmark (when data.benchmark = synthetic)
    models/{base,target,retain}/   via rayunlearn.train.finetune (each resumable, skipped when done)
    reference/{retain,target}.json (+ .raw.json)   their TOFU evaluations (retain first: the
                             target's forget quality is measured against it)
    reference/{retain,target}.attacks.json   with unlearn.eval.attacks: their evaluations under
                             the same attacks as the trials' (rayunlearn.eval.attacks)

The sweep copies the reference evaluations to ``<sweep>/reference/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
    from rayunlearn.train import finetune

    key = space.prepare_key()
    root = runs.prepared_dir(space.results, key).resolve()
    data = prepared_data_config(space, root)
    say = console.print if console is not None else print
    done_path = root / runs.PREPARED_DONE_FILE
    done = read_json(done_path) if done_path.exists() else {}
    p = space.prepare
    _fail_fast(space, data)
    given = {"target": p.target_path, "retain": p.retain_path}
    stages = (("base", None), ("target", "base"), ("retain", "base")) if p.train_base else \
        (("target", None), ("retain", None))
    for stage, init in stages:
        out = runs.model_dir(root, stage)
        if done.get(stage) or given.get(stage):
            continue
        say(f"[prepare {key}] training the {stage} model -> {out}")
        cfg = FinetuneConfig(stage=stage, init=str(runs.model_dir(root, init)) if init else None, out=str(out),
                             replay_world=p.replay_world, data=data, model=space.model,
                             train=stage_train(space, stage))
        finetune(cfg)
        done[stage] = True
        write_json(done_path, done)
    model_dirs = {s: Path(given[s]) if given.get(s) else runs.model_dir(root, s) for s in ("target", "retain")}
    retain_ref = None
    if space.prepare.reference_eval:
        retain_ref = str(runs.reference_eval(root, "retain"))
        for stage in ("retain", "target"):
            if not done.get(f"eval_{stage}"):
                say(f"[prepare {key}] evaluating the {stage} model (reference)")
                _evaluate(space, data, model_dirs[stage], runs.reference_eval(root, stage),
                          retain_reference=retain_ref if stage == "target" else None)
                done[f"eval_{stage}"] = True
                write_json(done_path, done)
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


def _attack_reference(space: SearchSpace, data, model_dir: Path, reference: Path, retain_reference: str) -> None:
    """The reference model's evaluations under ``unlearn.eval.attacks`` (the same attacks as
    every trial's), beside its reference evaluation (``runs.attacked_reference``): a trial's
    recovered fraction is measured against the equally attacked target."""
    from rayunlearn.data import load_benchmark
    from rayunlearn.eval.attacks import reference_attacks
    from rayunlearn.eval.evaluate import Evaluator, load_reference
    from rayunlearn.models import load_model

    model, tokenizer = load_model(space.model, path=str(model_dir))
    model.eval()
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


def _evaluate(space: SearchSpace, data, model_dir: Path, out: Path, retain_reference=None) -> None:
    from rayunlearn.data import load_benchmark
    from rayunlearn.eval import evaluate_model
    from rayunlearn.eval.evaluate import load_reference, write_eval
    from rayunlearn.models import load_model

    model, tokenizer = load_model(space.model, path=str(model_dir))
    import torch

    if torch.cuda.is_available():
        model.cuda()
    model.eval()
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


def copy_references(prepared: Prepared, sweep_dir: Path) -> None:
    """Copy the prepared reference evaluations into ``<sweep>/reference/``."""
    src = prepared.root / runs.REFERENCE_DIR
    if not src.exists():
        return
    dst = sweep_dir / runs.REFERENCE_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.json"):
        shutil.copyfile(f, dst / f.name)
