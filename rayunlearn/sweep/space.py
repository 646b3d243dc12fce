"""Search spaces as data: a YAML file -> a validated :class:`SearchSpace`, its method families
parsed once (:class:`Family`), and the Optuna define-by-run function that samples them.

A space is named by a file path or by the bare name of a space shipped with the package
(``rayunlearn/search_spaces/<name>.yaml``; ``recipes/<name>`` for the real-model recipes), so
``rayunlearn sweep wga_kl`` works from any directory and any install.

A search space says what is prepared (benchmark, model, the finetuning of the base / target /
retain models), how each trial unlearns (``unlearn:`` = UnlearnConfig's train / effects / eval
sections), which method families are searched and the distributions of their hyper-parameters,
and how Ray Tune runs the trials. Example (the shipped ``wga_kl``)::

    name: wga_kl
    families:
      wga+kl:                       # a method family = a method string of term names
        wga.alpha: {type: loguniform, low: 0.1, high: 10}
        kl.weight: {type: uniform, low: 0.1, high: 5}
    sampler: tpe                    # tpe (multi-objective) | nsga2 | random | grid (each family once)
    unlearn:
      eval: {removal_score: tr_closeness, selection_fraction: 0.5}   # what `removal` measures
    seeds: 2                        # every configuration unlearns with 2 seeds; the means are optimised
    retention_floor: 0.9            # a constraint: retention >= 0.9 x the target model's
    prepare: {retain_replicates: 2} # 2 retain models: the noise floor of every score

The two objectives are ``removal`` (the removal score named by ``unlearn.eval.removal_score``,
``rayunlearn/eval/scores.py``, on the *selection* part of the forget set, split by author with
``unlearn.eval.selection_fraction`` / ``selection_seed``) and ``retention`` (model utility); the
held-out *report* part's value is ``removal_report`` in the trials table, never optimised.
    num_samples: 24
    max_concurrent: 2

Hyper-parameter keys are ``<term>.<param>``: ``param`` is a keyword of the term
(``rayunlearn methods`` lists them) or ``weight``, the term's coefficient in the method.
Distributions: ``uniform`` / ``loguniform`` (low, high), ``int`` (low, high inclusive, optional
``log``), ``choice`` (values), ``fixed`` (value). Several families make the family a
categorical choice; each family's parameters are then conditional on it (Optuna define-by-run),
named ``<family>:<term>.<param>`` inside Optuna and ``hp.<term>.<param>`` in the trials table.

Every mistake raises :class:`rayunlearn.config.ConfigError` naming the key, when the space
loads: among them a distribution reaching outside its hyper-parameter's domain (``wga.alpha``
uniform on [-5, -1]: α must be >= 0; any ``weight`` must be > 0), which would otherwise fail
every trial of the sweep.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from rayunlearn import runs
from rayunlearn.config import (ConfigError, DataConfig, EffectsConfig, EvalConfig, FinetuneConfig,
                               ModelConfig, TrainConfig, check_attacks, from_dict, merge_sources, parse_override,
                               read_preset, to_dict)
from rayunlearn.domains import COUNT, NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, Domain, integer, number
from rayunlearn.eval.scores import MIA, check_score_name

SPACE_DIR = Path(__file__).resolve().parents[1] / "search_spaces"   # package data
DIST_TYPES = ("uniform", "loguniform", "int", "choice", "fixed")
OBJECTIVES = ("removal", "retention")    # what every trial reports and the sweep optimises


@dataclass
class Distribution:
    """One hyper-parameter's distribution."""

    type: Literal["uniform", "loguniform", "int", "choice", "fixed"] = "uniform"
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False               # int only: log-spaced integers
    values: Optional[list] = None   # choice
    value: Any = None               # fixed

    def validate(self) -> None:
        t = self.type
        if t in ("uniform", "loguniform", "int"):
            if self.low is None or self.high is None:
                raise ConfigError(f"type {t} needs both low and high")
            if not (math.isfinite(self.low) and math.isfinite(self.high)):
                raise ConfigError("low and high must be finite numbers")
            if not self.low < self.high:
                raise ConfigError(f"low ({self.low:g}) must be < high ({self.high:g})")
            if (t == "loguniform" or (t == "int" and self.log)) and self.low <= 0:
                raise ConfigError(f"a log-scaled distribution needs low > 0, got low={self.low:g}")
            if t == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
                raise ConfigError("type int needs integer low and high")
            if self.values is not None or self.value is not None:
                raise ConfigError(f"type {t} takes low/high, not values/value")
        elif t == "choice":
            if not self.values:
                raise ConfigError("type choice needs a non-empty list `values`")
            for v in self.values:
                if not isinstance(v, (int, float, str, bool)) and v is not None:
                    raise ConfigError(f"choice values must be numbers, strings or booleans, got {v!r}")
            if self.low is not None or self.high is not None:
                raise ConfigError("type choice takes values, not low/high")
        elif t == "fixed":
            if self.value is None:
                raise ConfigError("type fixed needs `value`")
        if self.log and t != "int":
            raise ConfigError("`log` applies to type int only (use type loguniform for floats)")

    def suggest(self, trial, name: str):
        """Ask an Optuna trial for a value (define-by-run)."""
        if self.type == "uniform":
            return trial.suggest_float(name, self.low, self.high)
        if self.type == "loguniform":
            return trial.suggest_float(name, self.low, self.high, log=True)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        if self.type == "choice":
            return trial.suggest_categorical(name, list(self.values))
        return self.value

    def unit(self, v) -> float:
        """Position of value ``v`` in [0, 1] (log-scaled where the distribution is)."""
        if self.type in ("uniform", "int") and not self.log:
            return (float(v) - self.low) / (self.high - self.low)
        if self.type in ("loguniform", "int"):
            return (math.log(v) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        if self.type == "choice":
            return self.values.index(v) / max(1, len(self.values) - 1)
        return 0.5

    def extremes(self) -> list:
        """The values that bound what this distribution can return: both ends of a range (every
        numeric domain is an interval, so they decide whether all samples lie inside), each
        choice, or the fixed value."""
        if self.type in ("uniform", "loguniform"):
            return [self.low, self.high]
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return list(self.values) if self.type == "choice" else [self.value]

    def describe(self) -> str:
        if self.type in ("uniform", "loguniform", "int"):
            return f"{self.type} [{self.low:g}, {self.high:g}]"
        if self.type == "choice":
            return f"choice {self.values!r}"
        return f"fixed {self.value!r}"


@dataclass
class Resources:
    """Per trial: CPUs and GPUs reserved for the trial; ``num_workers`` > 1 runs the unlearning
    as a Ray Train TorchTrainer with that many workers (each with ``cpus`` / ``gpus``)."""

    cpus: float = 1.0
    gpus: float = 0.0
    num_workers: int = 1
    torch_threads: int = 1   # torch.set_num_threads inside each in-process trial (0 = leave)

    DOMAINS: ClassVar[dict[str, Domain]] = {"cpus": POSITIVE, "gpus": NONNEGATIVE, "num_workers": COUNT,
                                            "torch_threads": NONNEGATIVE_INT}


@dataclass
class RaySettings:
    """How the driver connects to Ray: an existing cluster (``address``, or the RAY_ADDRESS
    environment variable that ``ray job submit`` sets) or a local instance with ``num_cpus``;
    ``reuse_actors``: a trial runs in the process of a finished one (Ray Tune's actor reuse), so
    the worker start and the imports (torch, transformers, rouge) are paid once per concurrent
    trial instead of once per trial; false starts every trial in a fresh process (for a custom
    ``trainable`` that leaves global state behind). Results do not depend on it."""

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    reuse_actors: bool = True

    DOMAINS: ClassVar[dict[str, Domain]] = {"num_cpus": integer(1, nullable=True),
                                            "num_gpus": integer(0, nullable=True)}


@dataclass
class UnlearnBase:
    """The parts of UnlearnConfig every trial shares (method, target and out are set per trial)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    effects: EffectsConfig = field(default_factory=EffectsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    allow_no_forget: bool = False    # UnlearnConfig.allow_no_forget: families without a forget term


@dataclass
class Prepare:
    """Training of the models a sweep needs, as TrainConfig overrides per stage (defaults: the
    FinetuneConfig defaults). Cached under ``<results>/prepared/<hash>/``."""

    base: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    retain: dict = field(default_factory=dict)
    reference_eval: bool = True    # evaluate the retain and target models once per preparation
    enabled: bool = True           # false: no models (only for trainables that need none)
    # false: no base stage; target/retain start from `model.name` itself (a pretrained LLM, as
    # in TOFU, whose "base" knowledge is its pre-training)
    train_base: bool = True
    replay_world: bool = True      # FinetuneConfig.replay_world for target/retain (synthetic data)
    # existing finetuned models (e.g. TOFU's published checkpoints): skip training that stage
    target_path: Optional[str] = None
    retain_path: Optional[str] = None
    # k > 1: train k - 1 more retain models that differ only in their training seed
    # (prepare.retain seed + j) and write the noise floor of every score between them
    # (rayunlearn.runs.noise_path; what the Pareto front's noise band uses). Not part of the
    # preparation's key: the replicates are extra stages beside the retain model.
    retain_replicates: int = 1
    # how many of the finetunings that start from the base model (target, retain, replicates)
    # run at once on CPUs, each in a process of its own with an equal share of the torch threads;
    # 1 = one after another in this process. A tiny model uses one core far better than two
    # threads of one step, so on two cores two at once finish sooner. Not part of the key: the
    # models are the same but for float rounding of the thread count
    parallel: int = 1

    DOMAINS: ClassVar[dict[str, Domain]] = {"retain_replicates": COUNT, "parallel": COUNT}


@dataclass
class EarlyStopping:
    """When the sweep ends a running trial early (``rayunlearn.sweep.stopping``), judged at its
    trajectory evaluations (``unlearn.eval.every``): ``collapse``: its retention fell below the
    sweep's ``retention_floor``; ``dominated``: its point is dominated, beyond the noise band, by
    the completed trials' points at the same step (at least ``min_completed`` of them).
    Evaluations before step ``min_step`` are not judged.

    ``collapse`` is on by default: it acts only when a ``retention_floor`` is set, it depends on the
    trial's own trajectory alone (a sweep still gives the same table for the same seed), and a
    trial under the floor is infeasible anyway. ``dominated`` is off by default: which trials have
    completed when a trial reaches a step depends on timing, so with it a sweep's results are no
    longer a function of its seed, and a point dominated half-way may still reach the front."""

    collapse: bool = True
    dominated: bool = False
    min_step: int = 1
    min_completed: int = 2

    DOMAINS: ClassVar[dict[str, Domain]] = {"min_step": COUNT, "min_completed": COUNT}


@dataclass
class SearchSpace:
    """A sweep: what to prepare, how to unlearn, what to search, how to run it."""

    name: str = ""                      # the sweep directory <results>/<name>; default: file stem
    results: str = "results"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    prepare: Prepare = field(default_factory=Prepare)
    unlearn: UnlearnBase = field(default_factory=UnlearnBase)
    families: dict = field(default_factory=dict)     # method string -> {term.param: distribution}
    objectives: dict = field(default_factory=lambda: {"removal": "max", "retention": "max"})
    sampler: Literal["tpe", "nsga2", "random", "grid"] = "tpe"
    num_samples: int = 16
    # every configuration runs with this many unlearning seeds (train.seed + j: data order,
    # sampling) inside one Tune trial; the trial reports their means (rayunlearn.sweep.trial)
    seeds: int = 1
    # a constraint for the sampler: mean retention >= retention_floor x the target model's
    # retention (None: no floor). Infeasible trials stay in the table (`feasible` false) and
    # the Optuna sampler steers away from them (rayunlearn.sweep.tuner.make_search_alg); early
    # stopping ends a trial whose trajectory falls below it (rayunlearn.sweep.stopping)
    retention_floor: Optional[float] = None
    max_concurrent: int = 2
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 1
    ray: RaySettings = field(default_factory=RaySettings)
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    # the Optuna study's database URL (default: <sweep>/study.db; rayunlearn.sweep.study)
    storage: Optional[str] = None
    # the MLflow tracking URI (default: <sweep>/mlruns.db; rayunlearn.sweep.tracking)
    tracking_uri: Optional[str] = None
    # advanced: "module:function" run per trial as fn(cfg: UnlearnConfig, report=None, **options)
    trainable: str = "rayunlearn.train:unlearn_trial"
    trainable_options: dict = field(default_factory=dict)

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "seed": NONNEGATIVE_INT,
        "num_samples": COUNT,
        "seeds": COUNT,
        "retention_floor": number(0, 1, low_open=True, nullable=True),
        "max_concurrent": COUNT,
        "max_failures": NONNEGATIVE_INT,   # Tune's -1 (retry forever) is refused: a sweep must end
    }

    def validate(self) -> None:
        if ":" not in self.trainable:
            raise ConfigError(f"trainable: expected 'module:function', got {self.trainable!r}")
        objs = self.objectives
        if not isinstance(objs, dict) or set(objs) != set(OBJECTIVES):
            raise ConfigError(f"objectives: must name exactly removal and retention "
                              f"(e.g. {{removal: max, retention: max}}), got {objs!r}")
        for k, v in objs.items():
            if v not in ("max", "min"):
                raise ConfigError(f"objectives.{k}: must be max or min, got {v!r}")
        score = check_score_name(self.unlearn.eval.removal_score, "unlearn.eval.removal_score")
        # (prepare.enabled=false: no models and no evaluation, e.g. a synthetic trainable)
        if score.needs and self.prepare.enabled and not self.prepare.reference_eval:
            raise ConfigError(f"unlearn.eval.removal_score: {score.name} needs the prepared reference "
                              f"evaluations ({', '.join(score.needs)}); set prepare.reference_eval=true or "
                              f"choose a score that needs none (es_removal, prob_removal)")
        if MIA in score.needs and not self.unlearn.eval.mia:
            raise ConfigError(f"unlearn.eval.removal_score: {score.name} needs membership-inference scores; "
                              f"set unlearn.eval.mia=true or choose another score")
        try:
            check_attacks(self.unlearn.eval.attacks, self.model, self.unlearn.train)
        except ConfigError as exc:
            raise ConfigError(f"unlearn.{exc}") from None
        if self.storage is not None:
            check_storage_url(self.storage)
        p = self.prepare
        if p.retain_replicates > 1 and not (p.enabled and p.reference_eval):
            raise ConfigError(f"prepare.retain_replicates: {p.retain_replicates} replicates are measured "
                              f"against each other by their reference evaluations; set prepare.enabled=true "
                              f"and prepare.reference_eval=true, or retain_replicates=1")
        if p.retain_replicates > 1 and p.retain_path:
            raise ConfigError("prepare.retain_replicates: the replicates are retain models trained here with "
                              "other seeds, which a given retain_path is not; drop retain_path or set "
                              "retain_replicates=1")
        if self.retention_floor is not None and p.enabled and not p.reference_eval:
            raise ConfigError("retention_floor: the floor is a fraction of the target model's retention, "
                              "which needs its reference evaluation; set prepare.reference_eval=true or "
                              "retention_floor=null")
        if self.early_stopping.dominated and self.unlearn.eval.every <= 0:
            raise ConfigError("early_stopping.dominated: judges trials at their trajectory evaluations, and "
                              "unlearn.eval.every is 0 (none); set unlearn.eval.every to k > 0 (an evaluation "
                              "every k steps) or early_stopping.dominated=false")
        families = self.parsed_families     # parses (and so validates) every family, once
        if self.sampler == "grid":
            for fam, parsed in families.items():
                for key, dist in parsed.dists.items():
                    if dist.type != "fixed":
                        raise ConfigError(f"families.{fam}.{key}: sampler 'grid' runs each family once at "
                                          f"fixed values; give a value instead of a {dist.type} distribution")

    @property
    def total_trials(self) -> int:
        """Trials the sweep runs: one per family under ``grid``, else ``num_samples``."""
        return len(self.families) if self.sampler == "grid" else self.num_samples

    # ----------------------------------------------------------------------------------------
    @cached_property
    def parsed_families(self) -> dict[str, "Family"]:
        """Every family parsed once (validate() fills this; not a field, so not in sweep.yaml)."""
        return parse_families(self.families, self.unlearn.allow_no_forget)

    @property
    def distributions(self) -> dict[str, dict[str, Distribution]]:
        return {name: fam.dists for name, fam in self.parsed_families.items()}

    @property
    def multi_family(self) -> bool:
        return len(self.families) > 1

    @property
    def maximize(self) -> tuple[bool, bool]:
        return tuple(self.objectives[k] == "max" for k in OBJECTIVES)

    def sweep_dir(self) -> Path:
        return Path(self.results) / self.name

    def prepare_key(self) -> str:
        """Hash of everything the prepared models and reference evaluation depend on."""
        blob = {"data": to_dict(self.data), "model": to_dict(self.model),
                "prepare": to_dict(self.prepare), "eval": to_dict(self.unlearn.eval)}
        blob["data"]["synth"].pop("out", None)
        if self.data.benchmark == "synthetic":     # models trained on an older generator's data are stale
            from rayunlearn.data.synth import FORMAT_VERSION

            blob["data"]["synth"]["format_version"] = FORMAT_VERSION
        # replicates are extra stages of the same preparation: a study without them and a sweep
        # with them share the base, target and retain models
        blob["prepare"].pop("retain_replicates")
        blob["prepare"].pop("parallel")
        # attacks change neither the models nor their plain evaluations (prepare adds the
        # references' attacked evaluations as a stage of its own), and how often a trial evaluates
        # along the way is no setting of a reference's (final) evaluation: a study without
        # trajectory evaluations and a sweep with them share one preparation
        for key in ("attacks", "removal_attack", "attack_rouge", "every"):
            blob["eval"].pop(key)
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------


def parse_family(family: str, allow_no_forget: bool = False):
    """The :class:`rayunlearn.objectives.Method` of a family string such as ``wga+kl`` (a method
    string, possibly with fixed keywords, or a preset name). Unknown terms raise the objectives
    registry's error (with the closest names) prefixed by the key; so does a family without a
    forget term unless ``allow_no_forget`` (``unlearn.allow_no_forget``)."""
    from rayunlearn import UserError
    from rayunlearn.objectives import parse_method

    if not isinstance(family, str) or not family.strip():
        raise ConfigError(f"families: {family!r} is not a method family such as 'wga+kl'")
    try:
        return parse_method(family, allow_no_forget)
    except UserError as exc:
        raise ConfigError(f"families.{family}: {exc}") from None


@dataclass(frozen=True)
class Family:
    """A method family parsed once: its :class:`rayunlearn.objectives.Method` and the
    distributions of its hyper-parameters ({term.param: Distribution})."""

    name: str
    method: Any          # rayunlearn.objectives.Method (imported lazily: objectives imports torch)
    dists: dict

    def method_string(self, hp: dict[str, Any]) -> str:
        """The canonical method string of this family with hyper-parameters ``hp`` ({term.param})."""
        return str(self.method.with_params(dict(hp)))

    def retain_keys(self, hp: dict[str, Any]) -> list[str]:
        """The keys of ``hp`` (term.param) that belong to a retain-side term."""
        retain = {t.label for t in self.method.terms if t.side == "retain"}
        return [k for k in hp if k.split(".")[0] in retain]

    def unit(self, hp: dict[str, Any]) -> dict[str, float]:
        """Positions in [0, 1] of the sampled (not fixed) values of ``hp``."""
        return {k: self.dists[k].unit(v) for k, v in hp.items() if self.dists[k].type != "fixed"}


def parse_families(families: dict, allow_no_forget: bool = False) -> dict[str, Family]:
    """Validate ``families`` ({family: {term.param: distribution}}) -> parsed :class:`Family`;
    every value a distribution can return must lie in its hyper-parameter's domain."""
    if not isinstance(families, dict) or not families:
        raise ConfigError("families: give at least one method family with its hyper-parameter "
                          "distributions, e.g. families: {wga+kl: {wga.alpha: {type: loguniform, "
                          "low: 0.1, high: 10}}}")
    out: dict[str, Family] = {}
    for family, params in families.items():
        method = parse_family(family, allow_no_forget)
        terms = [t.label for t in method.terms]
        valid_keys = method.param_keys()
        params = params or {}
        if not isinstance(params, dict):
            raise ConfigError(f"families.{family}: expected a mapping of term.param to a distribution")
        dists = {}
        for key, spec in params.items():
            where = f"families.{family}.{key}"
            if not isinstance(key, str) or key.count(".") != 1:
                raise ConfigError(f"{where}: hyper-parameter keys are <term>.<param>, e.g. wga.alpha")
            term, param = key.split(".")
            if term not in terms:
                raise ConfigError(f"{where}: {term!r} is not a term of the family {family!r} "
                                  f"(terms: {', '.join(terms)})")
            valid = [k.split(".", 1)[1] for k in valid_keys if k.startswith(term + ".")]
            if key not in valid_keys:
                raise ConfigError(f"{where}: {param!r} is not a hyper-parameter of {term!r} "
                                  f"(valid: {', '.join(valid)})")
            if not isinstance(spec, dict):
                spec = {"type": "fixed", "value": spec}
            if spec.get("type") not in DIST_TYPES:
                raise ConfigError(f"{where}.type: {spec.get('type')!r} is not one of "
                                  f"{', '.join(DIST_TYPES)}")
            try:
                dists[key] = from_dict(Distribution, spec, f"{where}.")
            except ConfigError as exc:
                msg = str(exc)
                raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
            check_domain(method.term(term).objective, param, dists[key], where)
        out[family] = Family(name=family, method=method, dists=dists)
    return out


def check_domain(objective, param: str, dist: Distribution, where: str) -> None:
    """Refuse a distribution that can return a value outside the domain of ``param`` (a
    hyper-parameter of ``objective``, or ``weight``): every trial would fail on it."""
    domain = objective.domain(param)
    outside = [v for v in dist.extremes() if not domain.contains(v)]
    if outside:
        raise ConfigError(f"{where}: {dist.describe()} reaches outside the domain of "
                          f"{objective.name}.{param}, which must be {domain.describe()} "
                          f"(e.g. {outside[0]!r}); narrow the distribution")


def space_path(path: str | Path) -> Path:
    """The file of a search space: ``path`` itself when it exists, else the shipped space of that
    bare name (``wga_kl``, ``recipes/tofu_phi15_wga_kl``)."""
    p = Path(path)
    if p.is_file():
        return p
    shipped = SPACE_DIR / f"{path}.yaml"
    if not p.suffix and shipped.is_file():
        return shipped
    names = sorted(q.relative_to(SPACE_DIR).with_suffix("").as_posix() for q in SPACE_DIR.rglob("*.yaml"))
    raise ConfigError(f"search space {str(path)!r} not found: give a YAML file or the name of a "
                      f"shipped space ({', '.join(names) or 'none'})")


def read_space(path: str | Path) -> dict:
    """The raw mapping of a space file (a path or a shipped name); ``name`` defaults to its stem."""
    p = space_path(path)
    raw = read_preset(p)
    raw.setdefault("name", p.stem)
    return raw


def load_space(path: str | Path | None = None, overrides: list[str] | None = None,
               data: dict | None = None) -> SearchSpace:
    """Load and validate a search space: a YAML file (or a shipped name) and/or a dict, then
    ``key=value`` overrides (e.g. ``num_samples=4``, ``unlearn.train.epochs=1``)."""
    # families.<fam>.<term>.<param>[.<field>]: the key <term>.<param> holds a dot of its own, so
    # these overrides are set here rather than at a plain dotted key
    family_items = [o for o in overrides or [] if o.strip().startswith("families.")]
    merged = merge_sources(read_space(path) if path is not None else {}, copy.deepcopy(data),
                           [o for o in overrides or [] if o not in family_items])
    for item in family_items:
        _set_family_override(merged, *parse_override(item))
    space = from_dict(SearchSpace, merged)
    for stage in ("base", "target", "retain"):
        stage_train(space, stage)      # validates prepare.<stage> overrides
    if not space.name:
        raise ConfigError("name: a sweep needs a name (its directory under results/)")
    return space


def _set_family_override(merged: dict, key: str, value) -> None:
    parts = key.split(".")
    if len(parts) < 4:
        raise ConfigError(f"{key}: use families.<family>.<term>.<param>[.<field>]=value")
    fam, hp = parts[1], ".".join(parts[2:4])
    node = merged.setdefault("families", {}).setdefault(fam, {})
    if len(parts) == 4:
        node[hp] = value
    else:
        spec = node.setdefault(hp, {})
        if not isinstance(spec, dict):
            spec = node[hp] = {"type": "fixed", "value": spec}
        spec[parts[4]] = value


def stage_train(space: SearchSpace, stage: str) -> TrainConfig:
    """TrainConfig of a preparation stage: FinetuneConfig's default overridden by prepare.<stage>."""
    base = to_dict(FinetuneConfig().train)
    return from_dict(TrainConfig, merge_sources(base, getattr(space.prepare, stage) or {}),
                     f"prepare.{stage}.")


def space_to_dict(space: SearchSpace) -> dict:
    """The resolved space as plain data (what ``sweep.yaml`` holds)."""
    return to_dict(space)


# --------------------------------------------------------------------------------------------
# Optuna define-by-run and decoding


def check_storage_url(url: str) -> None:
    """The form of a ``storage:`` URL (a SQLAlchemy database URL); raises ConfigError."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(f"storage: {url!r} is not a database URL ({exc}); give e.g. "
                          f"sqlite:////abs/path/study.db or postgresql://host/dbname, or leave it "
                          f"unset for <sweep>/{runs.STUDY_FILE}") from None
    if parsed.get_backend_name() == "sqlite" and not parsed.database:
        raise ConfigError(f"storage: {url!r} is an in-memory SQLite database, which ends with the "
                          f"driver; give a file (sqlite:////abs/path/study.db)")


def optuna_name(space: SearchSpace, family: str, key: str) -> str:
    return f"{family}:{key}" if space.multi_family else key


class DefineByRun:
    """An Optuna define-by-run function (a picklable object: Tune saves the searcher with
    pickle): the family (a categorical when there are several), then that family's parameters.
    Returns the constants (fixed values, and the family when there is one) as Tune config."""

    def __init__(self, distributions: dict[str, dict[str, Distribution]]):
        self.distributions = distributions

    def __call__(self, trial):
        dists = self.distributions
        names = list(dists)
        multi = len(names) > 1
        family = trial.suggest_categorical("family", names) if multi else names[0]
        consts = {}
        for key, dist in dists[family].items():
            name = f"{family}:{key}" if multi else key
            if dist.type == "fixed":
                consts[name] = dist.value
            else:
                dist.suggest(trial, name)
        if not multi:
            consts["family"] = family
        return consts


def define_by_run(space: SearchSpace) -> DefineByRun:
    """The space's Optuna define-by-run function (see :class:`DefineByRun`)."""
    return DefineByRun(space.distributions)


def decode(space: SearchSpace, config: dict) -> tuple[str, dict[str, Any]]:
    """(family, {term.param: value}) of a Tune trial config produced by :func:`define_by_run`."""
    dists = space.distributions
    family = config.get("family") or next(iter(dists))
    hp = {}
    for key, dist in dists[family].items():
        name = optuna_name(space, family, key)
        hp[key] = dist.value if dist.type == "fixed" and name not in config else config[name]
    return family, hp


def dumps_space(space: SearchSpace) -> str:
    return yaml.safe_dump(space_to_dict(space), sort_keys=False)


__all__ = ["Distribution", "Family", "SearchSpace", "OBJECTIVES", "load_space", "read_space",
           "space_path", "parse_families", "define_by_run", "decode", "space_to_dict", "stage_train",
           "dumps_space"]

