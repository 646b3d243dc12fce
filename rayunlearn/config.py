"""Typed, validated configuration: dataclasses per stage, YAML presets, ``key=value`` overrides.

Unknown keys, wrong types and impossible values fail at load time with a :class:`ConfigError`
that names the key (dotted path) and what it accepts: every numeric field has a domain in its
class's ``DOMAINS`` table (``rayunlearn.domains``), checked before the class's cross-field
``validate()``; the method string is parsed (``rayunlearn.objectives``) and ``model.name``
resolved (``model_name_problem``) at load too. The resolved config is saved with every run
(``config.yaml`` in the run directory) and a run refuses to resume into a directory whose saved
config differs in anything but bookkeeping fields.

    cfg = load_config(UnlearnConfig, preset="unlearn_tiny", overrides=["method=npo+kl", "train.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional, Union

import yaml

from rayunlearn import UserError
from rayunlearn.domains import (COUNT, NONNEGATIVE, NONNEGATIVE_INT, POSITIVE, Domain, DomainError,
                                integer, number)

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(UserError):
    """A bad configuration value; the message names the dotted key."""


# --------------------------------------------------------------------------------------------
# stage configs


@dataclass
class SynthConfig:
    """The synthetic TOFU-format benchmark (see docs/spec/BENCHMARK_DATA.md)."""

    out: str = "results/data/synthetic"
    seed: int = 0
    num_authors: int = 200
    min_qa_per_author: int = 10
    max_qa_per_author: int = 20
    num_world_facts: int = 240   # world knowledge learned by the base model before finetuning
    retain_perturbed_size: int = 400

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "seed": NONNEGATIVE_INT,
        "num_authors": integer(10),          # forget01 needs >= 1 author
        "min_qa_per_author": COUNT,
        "max_qa_per_author": integer(1, 20),  # the generator has 20 fact slots per author
        "num_world_facts": integer(10),
        "retain_perturbed_size": COUNT,
    }

    def validate(self) -> None:
        _check(self.min_qa_per_author <= self.max_qa_per_author, "min_qa_per_author",
               "must be <= max_qa_per_author")


@dataclass
class DataConfig:
    """Where the benchmark comes from and how QA pairs become token sequences."""

    # "synthetic" (generated from `synth` on first use), "tofu" (hub `locuslab/TOFU`, or
    # `tofu_dir` when set), or a path to a directory of TOFU-format JSON/JSONL files.
    benchmark: str = "synthetic"
    tofu_dir: Optional[str] = None
    forget_split: Literal["forget01", "forget05", "forget10"] = "forget10"
    template: Literal["plain", "llama2", "chat"] = "plain"
    max_length: int = 256
    synth: SynthConfig = field(default_factory=SynthConfig)

    DOMAINS: ClassVar[dict[str, Domain]] = {"max_length": integer(8)}


@dataclass
class ModelConfig:
    """A causal LM: a preset (`tiny`, `smollm2-135m`), a hub name or a local path."""

    name: str = "tiny"
    dtype: Literal["float32", "bfloat16", "float64"] = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    # tiny preset (Llama architecture from a config, trained from scratch)
    hidden_size: int = 128
    num_layers: int = 6                  # a multiple of 3: the layer groups (thirds) are equal
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 384
    vocab_size: int = 1024
    tie_embeddings: bool = False
    max_position_embeddings: int = 512   # must be >= data.max_length
    init_seed: int = 0                   # weight init of a fresh tiny model
    # where converted models are cached (smollm2-135m: GGUF -> safetensors, once)
    cache_dir: str = "results/cache"
    # LoRA through peft (0 = full finetuning); targets every linear layer but the LM head
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "hidden_size": COUNT,
        "num_layers": COUNT,
        "num_heads": COUNT,
        "num_kv_heads": COUNT,
        "intermediate_size": COUNT,
        "vocab_size": integer(300),           # byte-level BPE needs 256 bytes + specials
        "max_position_embeddings": integer(8),
        "init_seed": NONNEGATIVE_INT,
        "lora_r": NONNEGATIVE_INT,
        "lora_alpha": COUNT,
        "lora_dropout": number(0, 1, high_open=True),
    }

    def validate(self) -> None:
        problem = model_name_problem(self.name)
        _check(problem is None, "name", problem or "")
        _check(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        _check(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", "must divide num_heads")


@dataclass
class TrainConfig:
    """Optimisation: AdamW, linear warm-up then linear decay, gradient accumulation normalised
    by the accumulated token count."""

    epochs: float = 5.0
    max_steps: int = 0            # > 0: exactly this many optimiser steps (overrides epochs)
    batch_size: int = 16          # effective batch (over micro-batches and workers)
    micro_batch_size: int = 4
    lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = None
    bf16: bool = False
    seed: int = 0
    checkpoint_every: int = 0     # optimiser steps; 0 = only at the end
    log_every: int = 1
    num_workers: int = 1          # >1: Ray Train TorchTrainer with this many workers
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    # fsdp: shard the frozen reference model too (saves its memory / world size per rank; every
    # reference forward then all-gathers its blocks). Default: replicated (no extra traffic).
    shard_reference: bool = False
    progress: bool = True

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "epochs": POSITIVE,
        "max_steps": NONNEGATIVE_INT,          # 0 = run all epochs
        "batch_size": COUNT,
        "micro_batch_size": COUNT,
        "lr": POSITIVE,
        "warmup_epochs": NONNEGATIVE,
        "weight_decay": NONNEGATIVE,
        # a negative clip coefficient flips the gradient (the model would learn the forget set)
        "max_grad_norm": number(0, low_open=True, nullable=True),
        "seed": NONNEGATIVE_INT,
        "checkpoint_every": NONNEGATIVE_INT,   # 0 = only at the end
        "log_every": COUNT,
        "num_workers": COUNT,
    }

    def validate(self) -> None:
        _check(self.batch_size % (self.micro_batch_size * self.num_workers) == 0, "batch_size",
               f"must be a multiple of micro_batch_size*num_workers "
               f"({self.micro_batch_size}*{self.num_workers})")
        # the schedule clips warm-up to the run's length: a longer warm-up never decays the lr
        _check(self.max_steps > 0 or self.warmup_epochs <= self.epochs, "warmup_epochs",
               f"must be <= epochs ({self.epochs:g}), got {self.warmup_epochs:g}")


@dataclass
class EffectsConfig:
    """Live G-effect recording during unlearning (docs/spec/GEFFECT.md)."""

    every: int = 0                 # optimiser steps; 0 = off
    probe: Literal["step", "fixed"] = "fixed"   # the step's own batches, or a fixed probe subset
    # the fixed probes (rayunlearn/effects/probes.py): forget rows stratified over every forget
    # author (at least one each); non-targeted rows: half retain authors, half world facts
    probe_size: int = 24
    retain_probe_size: int = 16
    per_instance: bool = True
    estimator: Literal["exact", "ema"] = "exact"
    aggregator: Optional[str] = None   # name of a running sweep's G-effect aggregator Ray actor (set by the sweep)

    DOMAINS: ClassVar[dict[str, Domain]] = {"every": NONNEGATIVE_INT, "probe_size": COUNT,
                                            "retain_probe_size": COUNT}


# the bit widths torchao's weight-only integer quantization (IntxWeightOnlyConfig) rounds to;
# 1 bit leaves a single level per scale group, nothing left to evaluate
QUANT_BITS = (2, 3, 4, 5, 6, 7, 8)
ATTACK_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass
class AttackConfig:
    """One attack of ``eval.attacks``, run on the unlearned model after its final evaluation and
    on the retain and target models when a sweep prepares them (rayunlearn/eval/attacks.py
    documents each): ``relearn`` finetunes a copy for ``steps`` ``optimizer`` steps on ``data`` — a
    held-out subset of ``size`` forget items (whole authors; the other authors' items are
    evaluated), or ``size`` retain / world-fact rows (benign finetuning); ``quantize`` rounds
    every linear weight but the LM head to ``bits`` bits (torchao, weight-only)."""

    kind: Literal["relearn", "quantize"] = "relearn"
    name: str = ""                 # the columns attack.<name>.*; default: relearn / relearn_<data> / quant<bits>
    data: Literal["forget", "retain", "world"] = "forget"
    steps: int = 10
    # plain SGD by default: its step scales with the relearning loss's gradient, so it barely moves
    # a model that already knows the relearned facts (the target) and restores a model they were
    # removed from; AdamW moves every weight by ~lr whatever the gradient, and on the demo's tiny
    # model destroyed the target's own knowledge (docs/spec/ATTACKS.md has the measurements)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 2e-2
    batch_size: int = 4
    size: int = 20                 # relearning rows: 20 = about two of the demo's authors (one of TOFU's)
    seed: int = 0
    bits: int = 8
    group_size: int = 0            # input columns sharing one scale; 0 = one scale per output row
    # a LoRA run's adapter is merged into a copy of the model before the attack (the attacker holds
    # the released weights); false is refused (an unmerged adapter is not a model to attack)
    merge_lora: bool = True

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "steps": COUNT,        # 0 relearning steps is no attack
        "lr": POSITIVE,
        "batch_size": COUNT,
        "size": COUNT,
        "seed": NONNEGATIVE_INT,
        "bits": COUNT,
        "group_size": NONNEGATIVE_INT,
    }

    def validate(self) -> None:
        _check(not self.name or bool(ATTACK_NAME.fullmatch(self.name)), "name",
               f"{self.name!r} is not a column name: letters, digits and _, starting with a letter")
        if self.kind == "quantize":
            _check(self.bits in QUANT_BITS, "bits",
                   f"torchao's weight-only integer quantization rounds to {QUANT_BITS[0]}..{QUANT_BITS[-1]} "
                   f"bits, got {self.bits}; use e.g. 8 or 4")

    @property
    def label(self) -> str:
        """The attack's name in its columns (``attack.<label>.<metric>``)."""
        if self.name:
            return self.name
        if self.kind == "quantize":
            return f"quant{self.bits}"
        return "relearn" if self.data == "forget" else f"relearn_{self.data}"


@dataclass
class EvalConfig:
    """TOFU evaluation (docs/spec/TOFU_METRICS.md)."""

    every: int = 0                 # evaluate every k optimiser steps during unlearning (0 = end only)
    max_items: Optional[int] = None   # None = all items (the original code used 300)
    batch_size: int = 32
    # prompts per greedy-generation call (None = batch_size): a generation step of a small model
    # costs about the same for 32 prompts as for 128, so larger batches take fewer steps
    generate_batch_size: Optional[int] = None
    max_new_tokens: int = 48
    rouge: bool = True
    mia: bool = True
    retain_reference: Optional[str] = None   # a retain model's stored evaluation (JSON) for FQ/privleak
    target_reference: Optional[str] = None   # the target model's stored evaluation, for nll_rise
    mia_min_k: float = 0.4         # k of Min-K% / Min-K%++ (fraction of lowest-scoring tokens)
    # what `removal` measures (rayunlearn/eval/scores.py lists the names) and the held-out split
    # of the forget set by author: `removal` on the selection part, `removal_report` on the rest
    removal_score: str = "tr_closeness"
    selection_fraction: float = 0.5   # share of forget authors in the selection part (1 = no held-out part)
    selection_seed: int = 0
    # robustness attacks run after the final evaluation (AttackConfig; metrics attack.<name>.*)
    attacks: list[AttackConfig] = field(default_factory=list)
    # the name of one of `attacks`: `removal` / `removal_report` are then that attack's
    # post-attack scores (the sweep optimises removal that survives it); `removal_unattacked`
    # keeps the plain one
    removal_attack: Optional[str] = None
    # generate answers (ROUGE) when evaluating attacked models; false: the fast evaluation (no
    # generation; their `retention` is then the six non-ROUGE utility numbers' harmonic mean)
    attack_rouge: bool = True

    DOMAINS: ClassVar[dict[str, Domain]] = {
        "every": NONNEGATIVE_INT,
        "max_items": integer(1, nullable=True),
        "batch_size": COUNT,
        "generate_batch_size": integer(1, nullable=True),
        "max_new_tokens": COUNT,
        "mia_min_k": number(0, 1, low_open=True),
        "selection_fraction": number(0, 1, low_open=True),
        "selection_seed": NONNEGATIVE_INT,
    }

    def validate(self) -> None:
        from rayunlearn.eval.scores import check_score_name
        from rayunlearn.registry import UnknownNameError

        try:
            check_score_name(self.removal_score, "removal_score")
        except UnknownNameError as exc:     # a config key: reported as the config's error
            raise ConfigError(str(exc)) from None
        labels = [a.label for a in self.attacks]
        for i, label in enumerate(labels):
            _check(label not in labels[:i], f"attacks[{i}].name",
                   f"two attacks are named {label!r}; give each a distinct name")
        _check(self.removal_attack is None or self.removal_attack in labels, "removal_attack",
               f"{self.removal_attack!r} names none of eval.attacks ({', '.join(labels) or 'none given'})")


@dataclass
class FinetuneConfig:
    """`rayunlearn finetune`: base (world knowledge), target (base + all authors) or retain
    (base + retain authors) model."""

    stage: Literal["base", "target", "retain"] = "target"
    init: Optional[str] = None     # a model directory to start from (base for target/retain)
    out: str = "results/models/target"
    # Mix the benchmark's `world` split (the base model's knowledge) into target/retain finetuning.
    # A pretrained LLM keeps its world knowledge through TOFU finetuning; a tiny model trained
    # from scratch at a high learning rate would overwrite it, making model utility meaningless.
    # Target and retain get the same replay, so the protocol's comparison is unchanged.
    replay_world: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, lr=3e-3, warmup_epochs=0.5,
                                                                   batch_size=32, micro_batch_size=32))


@dataclass
class UnlearnConfig:
    """`rayunlearn unlearn`: unlearn `data.forget_split` from the target model with `method`."""

    method: str = "npo+kl"
    target: str = "results/models/target"
    out: str = "results/runs/unlearn"
    trial_id: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    effects: EffectsConfig = field(default_factory=EffectsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    evaluate: bool = True          # TOFU evaluation at the end (and every eval.every steps)
    # a method without a forget term (kl, gd) unlearns nothing; true runs one anyway (a control)
    allow_no_forget: bool = False

    def validate(self) -> None:
        _check(bool(self.method.strip()), "method", "must be a method string such as 'npo+kl'")
        # the objectives import torch: only an unlearning config pays for it
        from rayunlearn.objectives import parse_method

        try:
            parse_method(self.method, allow_no_forget=self.allow_no_forget)
        except UserError as exc:
            raise ConfigError(f"method: {exc}") from None
        check_attacks(self.eval.attacks, self.model, self.train)


def check_attacks(attacks: list[AttackConfig], model: ModelConfig, train: TrainConfig) -> None:
    """What an attack needs of the run: a whole model on one process, a merged LoRA adapter."""
    for i, a in enumerate(attacks):
        _check(a.merge_lora or model.lora_r == 0, f"eval.attacks[{i}].merge_lora",
               f"model.lora_r={model.lora_r}: an attack acts on the released model, the adapter merged "
               f"into its base; set eval.attacks[{i}].merge_lora=true (or drop the attack)")
    _check(not attacks or train.strategy == "ddp", "eval.attacks",
           f"attacks run on one process with the whole model; train.strategy={train.strategy} shards it: "
           f"use train.strategy=ddp or drop eval.attacks")


# --------------------------------------------------------------------------------------------
# model names (resolved by rayunlearn.models.load_model; checked here without importing torch)

MODEL_PRESETS = ("tiny", "smollm2-135m")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def model_name_problem(name: str) -> str | None:
    """None when ``name`` can name a model: a preset, an existing local directory, or a hub id
    ``org/name``; else what is wrong with it (a run given a target model never loads
    ``model.name``, so a typo there would otherwise pass unnoticed)."""
    if name in MODEL_PRESETS or Path(name).expanduser().is_dir() or _HUB_ID.fullmatch(name):
        return None
    return (f"{name!r} is not a model preset ({', '.join(MODEL_PRESETS)}), an existing local model "
            f"directory, or a hub id such as 'HuggingFaceTB/SmolLM2-135M'; give one of those")


# --------------------------------------------------------------------------------------------
# machinery


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def load_config(cls: type, preset: str | Path | None = None, overrides: list[str] | None = None,
                data: dict | None = None):
    """Build and validate `cls` from a preset (a name in rayunlearn/presets or a YAML path),
    then a dict, then ``key=value`` overrides (dotted keys, YAML-typed values)."""
    return from_dict(cls, merge_sources(read_preset(preset) if preset is not None else {}, data, overrides))


def load_data_config(preset: str | Path | None = None, overrides: list[str] | None = None) -> DataConfig:
    """The DataConfig of ``rayunlearn data check``, with its keys spelt as in every other config
    (``data.benchmark=tofu data.tofu_dir=DIR``; bare ``benchmark=tofu`` works too), from a data
    preset or the ``data`` section of an unlearn/finetune preset. Errors name ``data.<key>``."""
    base = read_preset(preset) if preset is not None else {}
    if isinstance(base.get("data"), dict):
        base = base["data"]
    items = [o if o.strip().startswith("data.") or "=" not in o else f"data.{o.strip()}"
             for o in overrides or []]
    return from_dict(DataConfig, merge_sources({"data": base}, None, items)["data"], "data.")


def merge_sources(base: dict, data: dict | None = None, overrides: list[str] | None = None) -> dict:
    """The layering every config file shares (presets, search spaces): ``base`` (a file's
    mapping), deep-merged with ``data``, then each ``key=value`` override set at its dotted key."""
    merged = _deep_merge({}, base)
    if data:
        merged = _deep_merge(merged, data)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(merged, key, value)
    return merged


def read_preset(preset: str | Path) -> dict:
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"config preset {str(preset)!r} not found (looked for {path}). "
                          f"Built-in presets: {', '.join(available) or 'none'}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys to values")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # method strings like "npo(beta=0.1)+kl" are not YAML scalars of another type
    return key, value


def _set_dotted(target: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = target
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {part} is not a section")
        node = nxt
    node[parts[-1]] = value


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(cls: type, values: dict, prefix: str = ""):
    """Construct dataclass `cls` from a nested dict, checking keys, types and values."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ConfigError(f"{prefix}{key}: unknown key{hint}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in values:
            continue
        kwargs[name] = _coerce(hints[name], values[name], f"{prefix}{name}")
    # nested dataclasses that were not mentioned keep their defaults, but partial nested dicts
    # must start from the field's default (not the nested class's), e.g. FinetuneConfig.train
    for name, f in fields.items():
        ftype = hints[name]
        if dataclasses.is_dataclass(ftype) and name in values and f.default_factory is not dataclasses.MISSING:
            base = dataclasses.asdict(f.default_factory())
            kwargs[name] = from_dict(ftype, _deep_merge(base, values[name]), f"{prefix}{name}.")
    obj = cls(**kwargs)
    validate(obj, prefix)
    return obj


def validate(obj, prefix: str = "") -> None:
    """Nested dataclasses first, then each field's domain (the class's ``DOMAINS``), then the
    class's own ``validate()`` (cross-field checks); errors name the dotted key."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    for name, domain in getattr(obj, "DOMAINS", {}).items():
        value = getattr(obj, name)
        try:
            setattr(obj, name, domain.check(value))
        except DomainError as exc:
            raise ConfigError(f"{prefix}{name}: {exc} (got {_shown(value)})") from None
    if hasattr(obj, "validate"):
        try:
            obj.validate()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}{exc}") from None


def _shown(value) -> str:
    """A value as the user wrote it: -1 rather than -1.0, nan, inf, 'text'."""
    if isinstance(value, float) and (value.is_integer() or not math.isfinite(value)):
        return f"{value:g}"
    return repr(value)


def _coerce(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)   # YAML reads "1e-5" as a string
                except ValueError:
                    pass
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def save_config(obj, path: str | Path) -> None:
    from rayunlearn.io import write_text

    write_text(path, yaml.safe_dump(to_dict(obj), sort_keys=False))


def check_resume_config(obj, path: str | Path, ignore: tuple[str, ...] = ("progress",)) -> None:
    """Refuse to reuse a run directory whose saved config differs (kronfluence-style)."""
    path = Path(path)
    if not path.exists():
        return
    # a field added since the run was saved compares at its default
    saved = _deep_merge(to_dict(type(obj)()), yaml.safe_load(path.read_text()) or {})
    now = to_dict(obj)
    diffs = _diff(saved, now, "", ignore)
    if diffs:
        raise ConfigError(f"{path.parent} holds a run with a different config ({'; '.join(diffs[:5])}). "
                          f"Use another output directory, or the same settings to resume.")


def _diff(a, b, prefix, ignore):
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in ignore:
                continue
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.", ignore)
    elif a != b:
        out.append(f"{prefix.rstrip('.')}: saved {a!r}, now {b!r}")
    return out
