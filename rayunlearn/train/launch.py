"""Starting a run: checks that fail before anything starts, the run directory (config.yaml,
resume refusal, status), and the launch in-process or on a Ray Train ``TorchTrainer``.

    finetune(cfg: FinetuneConfig) -> Path      base / target / retain model
    unlearn(cfg: UnlearnConfig) -> dict        unlearn data.forget_split from the target model
    unlearn_trial(cfg, report=None) -> dict    the per-trial entry for a Ray Tune sweep

Each worker runs the same :func:`rayunlearn.train.loop.run_loop`. Ray Train's ``TorchTrainer``
sets up the process group (gloo on CPU, NCCL on GPU) and we use its device; ``run_loop`` also
runs under any other launcher that initialised one. The method string of an unlearning run is
parsed once per process: here for an in-process run, in :func:`train_loop_per_worker` on a worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import yaml

from rayunlearn import UserError
from rayunlearn.config import FinetuneConfig, UnlearnConfig, check_resume_config, from_dict, save_config, to_dict
from rayunlearn.eval.evaluate import (check_fingerprint, evaluation_fingerprint, fingerprint_diff,
                                      load_reference, reference_content_hash)
from rayunlearn.io import read_json, read_jsonl
from rayunlearn.objectives import Method, parse_method
from rayunlearn.models.checkpoints import MODEL_CONFIG_FILE, check_weight_files
from rayunlearn.runs import (COMPLETED, CONFIG_FILE, DIVERGED, LOG_FILE, METRICS_FILE, RAY_TRAIN_DIR,
                             STATUS_FILE, DivergedError, run_dir)
from rayunlearn.train.callbacks import scalars
from rayunlearn.train.loop import run_loop


def finetune(cfg: FinetuneConfig) -> Path:
    """Train the protocol's models and save the result to ``cfg.out`` (safetensors, tokenizer,
    ``config.yaml``, ``log.jsonl``).

    - ``stage="base"``: from nothing (tiny preset: a fresh model and a tokenizer trained on the
      benchmark corpus) on the benchmark's ``world`` split (world knowledge);
    - ``stage="target"``: from ``cfg.init`` (the base model directory) on ``full``;
    - ``stage="retain"``: from ``cfg.init`` on ``retain<NN>`` matching ``data.forget_split``.

    Prints the answer-token accuracy per epoch and at the end (also in the log and in
    ``status.json``).  Same seed → same weights.  Rerunning resumes; a finished run returns at once.
    """
    _check_finetune(cfg)
    out = Path(cfg.out)
    status = prepare_run_dir(cfg, out)
    if status.get("status") == COMPLETED:
        print(f"{out} is already trained ({STATUS_FILE}: {COMPLETED}); nothing to do")
        return out
    _launch("finetune", cfg, out, method=None, results_dir=None, trial_id="")
    return out


def unlearn(cfg: UnlearnConfig) -> dict:
    """Unlearn ``data.forget_split`` from the target model ``cfg.target`` with ``cfg.method``.

    Writes into ``runs.run_dir(cfg.out, cfg.trial_id)`` (``cfg.out``, or
    ``cfg.out/trials/<trial_id>``): config.yaml, log.jsonl, checkpoints, trajectory.jsonl
    (evaluation every ``eval.every`` steps), metrics.json (final evaluation).  Runs in-process
    (``train.num_workers == 1``) or on a Ray Train ``TorchTrainer``.  Returns the final metrics
    dict (with ``removal`` and ``retention`` when ``evaluate``; otherwise the last log record)."""
    return unlearn_trial(cfg)


def unlearn_trial(cfg: UnlearnConfig, report: Optional[Callable[[dict], None]] = None) -> dict:
    """The per-trial entry for a sweep (call it inside a Ray Tune trainable).

    In-process (``train.num_workers == 1``): ``report(metrics)`` is called after every
    evaluation (``{"step", "removal", "retention", ...}``, ``"done": False``) and once at the
    end (``"done": True``), so Tune schedulers can act on intermediate results.  With
    ``num_workers > 1`` it launches a nested Ray Train ``TorchTrainer`` (the trial must leave
    room for its workers: e.g. ``tune.with_resources(trainable, {"CPU": 0})`` or a placement
    group with one bundle per worker) and ``report`` is called once, at the end.
    Returns the final metrics dict.  A diverged run raises :class:`DivergedError`.

    G-effect rows go to ``<cfg.out>/effects/<trial id>/`` (or the sweep's aggregator actor
    named by ``effects.aggregator``); the trial id is ``cfg.trial_id``, or the name of
    ``cfg.out`` for a run outside a sweep."""
    method = _check_unlearn(cfg)
    fingerprint = check_retain_reference(cfg) if cfg.evaluate and cfg.eval.retain_reference else None
    out = run_dir(cfg.out, cfg.trial_id)
    status = prepare_run_dir(cfg, out, fingerprint)
    metrics = finished_result(cfg, out) if status.get("status") == COMPLETED else None
    if metrics is not None:
        if report is not None:
            report({**scalars(metrics), "done": True})
        return metrics
    results_dir, trial_id = effects_destination(cfg)
    result = _launch("unlearn", cfg, out, method=method, results_dir=results_dir, trial_id=trial_id,
                     report=report)
    if report is not None and cfg.train.num_workers > 1:
        report({**scalars(result), "done": True})
    return result


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry: ``config = {"kind": "finetune"|"unlearn", "cfg": dict, "run_dir": str,
    "results_dir": str | None, "trial_id": str}``."""
    kind = config["kind"]
    cfg = from_dict(FinetuneConfig if kind == "finetune" else UnlearnConfig, config["cfg"])
    method = parse_method(cfg.method, allow_no_forget=cfg.allow_no_forget) if kind == "unlearn" else None
    results_dir = Path(config["results_dir"]) if config["results_dir"] else None
    run_loop(kind, cfg, Path(config["run_dir"]), method, results_dir=results_dir, trial_id=config["trial_id"])


def prepare_run_dir(cfg, out: Path, eval_fingerprint: Optional[dict] = None) -> dict:
    """Refuse a run directory holding another config; save ours; return the saved status.

    The one setting that may change between attempts is an unlearning run's
    ``eval.retain_reference`` (given `eval_fingerprint`, this run's evaluation fingerprint,
    which the new reference was checked against): a reference is identified by its content,
    not its path, so a moved reference with the same content is accepted, and so is any
    corrected reference when the saved one could never have been used by this run (it no
    longer loads, or it was evaluated under other settings: every evaluation would have been
    refused).  A usable saved reference with other content is refused like any other changed
    setting: forget quality against it would not be comparable with the trajectory written."""
    out.mkdir(parents=True, exist_ok=True)
    ignore = ("progress",)
    if eval_fingerprint is not None and _reference_replaceable(cfg, out / CONFIG_FILE, eval_fingerprint):
        ignore += ("retain_reference",)
    check_resume_config(cfg, out / CONFIG_FILE, ignore=ignore)
    save_config(cfg, out / CONFIG_FILE)
    return read_status(out)


def _reference_replaceable(cfg: UnlearnConfig, saved_config: Path, fingerprint: dict) -> bool:
    """The saved run names another retain reference than `cfg` (whose reference matches
    `fingerprint`), and the saved one is unusable for this run or holds the same content."""
    if not saved_config.exists():
        return False
    saved = (yaml.safe_load(saved_config.read_text()) or {}).get("eval") or {}
    before = saved.get("retain_reference")
    if not before or before == cfg.eval.retain_reference:
        return False
    try:
        old = load_reference(before)
    except UserError:
        return True
    if fingerprint_diff(fingerprint, old.get("fingerprint") or {}):
        return True
    return reference_content_hash(old) == reference_content_hash(load_reference(cfg.eval.retain_reference))


def finished_result(cfg: UnlearnConfig, out: Path) -> Optional[dict]:
    """What a completed run returned: its metrics.json, or without evaluation (``evaluate``
    off) its last log record; None when the run must be finished again (an evaluation that
    was asked for is missing)."""
    if (out / METRICS_FILE).exists():
        return read_json(out / METRICS_FILE)
    if cfg.evaluate:
        return None
    log = read_jsonl(out / LOG_FILE)
    return dict(log[-1]) if log else None


def read_status(out: Path) -> dict:
    """The run's status.json, {} when there is none or it cannot be read."""
    path = Path(out) / STATUS_FILE
    try:
        return read_json(path) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def effects_destination(cfg: UnlearnConfig) -> tuple[Path, str]:
    """(results directory, trial id) of an unlearning run's G-effect rows: ``cfg.out`` and
    ``cfg.trial_id`` in a sweep; ``cfg.out`` and its name for a run outside one."""
    return Path(cfg.out).resolve(), cfg.trial_id or Path(cfg.out).name


def _launch(kind: str, cfg, out: Path, *, method: Optional[Method], results_dir: Optional[Path],
            trial_id: str, report=None):
    if cfg.train.num_workers <= 1:
        return run_loop(kind, cfg, out, method, results_dir=results_dir, trial_id=trial_id, report=report)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True, include_dashboard=False)
    use_gpu = bool(cfg.train.use_gpu)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"kind": kind, "cfg": to_dict(cfg), "run_dir": str(out.resolve()),
                           "results_dir": str(results_dir) if results_dir else None, "trial_id": trial_id},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{kind}-{out.name}", storage_path=str((out / RAY_TRAIN_DIR).resolve())),
    )
    try:
        trainer.fit()
    except Exception:  # Ray wraps worker errors; surface ours with their message
        status = read_status(out)
        if status.get("status") == DIVERGED:
            raise DivergedError(status.get("message", "training diverged")) from None
        raise
    if kind == "unlearn":
        if (out / METRICS_FILE).exists():
            return read_json(out / METRICS_FILE)
        log = read_jsonl(out / LOG_FILE)
        return log[-1] if log else {}
    return out


def _check_finetune(cfg: FinetuneConfig) -> None:
    if cfg.stage in ("target", "retain") and not cfg.init and cfg.model.name == "tiny":
        raise UserError(f"finetune stage={cfg.stage} starts from the base model: set init=<base model "
                        f"dir> (e.g. init=results/models/base), or model.name=<a pretrained model>")
    if cfg.init and (Path(cfg.init) / MODEL_CONFIG_FILE).exists():
        check_weight_files(cfg.init)
    _check_common(cfg)


def _check_unlearn(cfg: UnlearnConfig) -> Method:
    """Fail before starting anything; returns the parsed method."""
    if not (Path(cfg.target) / MODEL_CONFIG_FILE).exists():
        raise UserError(f"target model {cfg.target} not found (no {MODEL_CONFIG_FILE}): train it first with "
                        f"`rayunlearn finetune stage=target ...` or set target=<model dir>")
    check_weight_files(cfg.target)
    _check_common(cfg)
    if cfg.evaluate and cfg.eval.attacks:
        from rayunlearn.data import load_benchmark
        from rayunlearn.eval.attacks import check_attacks_fit

        check_attacks_fit(cfg.eval.attacks, load_benchmark(cfg.data), cfg.data, cfg.eval)
    return parse_method(cfg.method, allow_no_forget=cfg.allow_no_forget)


def check_retain_reference(cfg: UnlearnConfig) -> dict:
    """Load ``eval.retain_reference`` and compare its fingerprint with this run's evaluation
    settings (the target's tokenizer, the benchmark's splits, ``data.*``, ``eval.*``) before
    training, not after it: a missing, malformed or differently evaluated reference is a
    UserError naming the file and the differing fields.  Returns this run's evaluation
    fingerprint."""
    from rayunlearn.data import load_benchmark
    from rayunlearn.models import load_tokenizer

    reference = load_reference(cfg.eval.retain_reference)
    ours = evaluation_fingerprint(load_tokenizer(cfg.model, cfg.target), load_benchmark(cfg.data),
                                  cfg.data, cfg.eval)
    try:
        check_fingerprint(ours, reference.get("fingerprint"))
    except UserError as exc:
        raise type(exc)(f"eval.retain_reference={cfg.eval.retain_reference}: {exc}") from None
    return ours


def _check_common(cfg) -> None:
    strategy = cfg.train.strategy
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401  (an optional extra: is it installed?)
        except ImportError:
            raise UserError("train.strategy=deepspeed needs DeepSpeed, an optional extra: "
                            "pip install deepspeed (on a GPU machine), or use train.strategy=fsdp") from None
        if isinstance(cfg, UnlearnConfig) and cfg.effects.every > 0:
            raise UserError("G-effects (effects.every > 0) are not recorded under train.strategy=deepspeed "
                            "(ZeRO-3 partitions are not DTensors); use train.strategy=fsdp or effects.every=0")
    if strategy != "ddp" and cfg.model.lora_r > 0:
        raise UserError(f"model.lora_r > 0 with train.strategy={strategy} is not supported yet (LoRA "
                        f"checkpoints need the unsharded adapter); use train.strategy=ddp with LoRA")
    if cfg.model.name == "tiny" and cfg.data.max_length > cfg.model.max_position_embeddings:
        raise UserError(f"data.max_length={cfg.data.max_length} exceeds model.max_position_embeddings="
                        f"{cfg.model.max_position_embeddings}; raise the latter or lower the former")
