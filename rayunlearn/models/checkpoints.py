"""Checkpoint files: the one reader and writer of model weights, LoRA adapters and optimiser state
on disk, shared by training (save / resume), G-effect replay (``effects/replay.py``) and
evaluation (``eval/evaluate.py``: which weights a model-or-run path means).

It sits below training in the layering (no distributed code: the training loop's parallel
wrapper gathers sharded state first and hands plain state dicts in) and takes its names from
:mod:`rayunlearn.runs`. A checkpoint directory ``checkpoints/step-<k>/`` holds

- ``model.safetensors`` + config.json + tokenizer: a usable model directory (with LoRA the
  *merged* model, and ``adapter.safetensors`` the trainable adapter tensors beside it);
- ``optimizer.safetensors``: the optimiser state, keyed ``state.<id>.<name>`` where ``<id>`` is
  the parameter's index in the optimiser (``optimizer_format`` "index") or its name (``"fqn"``,
  a gathered FSDP state), plus ``rng.torch``, the torch RNG state at the checkpoint;
- ``trainer.json``: step, optimiser format and param groups, and the task's own counters.

Writing goes into a hidden temporary sibling renamed into place, so a kill leaves either the
whole checkpoint or none; :func:`latest_checkpoint` only considers complete ones, and of those
only readable ones (a disk error or a hand-edited file can still spoil a checkpoint after it was
written: resuming falls back to the previous good one, never loads a damaged one).
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from rayunlearn import UserError
from rayunlearn.io import read_json, save_safetensors, write_json
from rayunlearn.runs import (ADAPTER_FILE, CHECKPOINT_PREFIX, CHECKPOINTS_DIR, MODEL_WEIGHTS_FILE,
                             OPTIMIZER_FILE, TRAINER_STATE_FILE, checkpoint_dir, checkpoint_step,
                             list_checkpoints)

MODEL_CONFIG_FILE = "config.json"       # Hugging Face's name: what makes a directory a model
STATE_PREFIX = "state."                 # optimiser tensors: state.<index or FQN>.<name>
RNG_KEY = "rng.torch"


# --------------------------------------------------------------------------------------------
# finding weights


class CorruptFileError(UserError):
    """A weights / optimiser / trainer-state file that cannot be read (truncated, garbage)."""


def safetensors_problem(path: str | Path) -> Optional[str]:
    """Why the safetensors file `path` cannot be loaded, None when it can: its header is parsed
    and its length checked against the tensors it declares (cheap: no tensor is read), which is
    what a truncated or overwritten file fails."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except (SafetensorError, OSError) as exc:
        return str(exc)
    return None


def check_weight_files(model_dir: str | Path) -> None:
    """Refuse a model directory whose safetensors files are unreadable (CorruptFileError naming
    the file), before a model library meets them with a bare SafetensorError."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            raise CorruptFileError(f"{path} is not a readable safetensors file ({problem}); it is "
                                   f"truncated or overwritten: restore it, or re-create the model with "
                                   f"the command that wrote it")


def checkpoint_problem(ckpt: str | Path) -> Optional[str]:
    """Why checkpoint directory `ckpt` cannot be resumed from, None when it can: trainer.json
    must be JSON naming the directory's step, the optimiser state present, and every
    safetensors file (weights, adapter, optimiser state) readable."""
    ckpt = Path(ckpt)
    try:
        meta = read_json(ckpt / TRAINER_STATE_FILE)
    except (OSError, ValueError) as exc:
        return f"{TRAINER_STATE_FILE}: {exc}"
    if not isinstance(meta, dict) or meta.get("step") != checkpoint_step(ckpt):
        return f"{TRAINER_STATE_FILE}: does not record step {checkpoint_step(ckpt)}"
    if not (ckpt / OPTIMIZER_FILE).exists():
        return f"{OPTIMIZER_FILE}: missing"
    for path in sorted(ckpt.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem is not None:
            return f"{path.name}: {problem}"
    return None


def latest_checkpoint(run_dir: str | Path, warn: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The run's last complete and readable checkpoint, None when there is none.  A complete
    checkpoint (one with its trainer state) that cannot be read is skipped for the one before
    it, and ``warn`` (e.g. ``print``) is told which and why; it stays on disk until training
    reaches its step again and overwrites it."""
    done = [p for p in list_checkpoints(run_dir) if (p / TRAINER_STATE_FILE).exists()]
    for ckpt in reversed(done):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if warn is not None:
            earlier = [p.name for p in done if checkpoint_step(p) < checkpoint_step(ckpt)]
            then = (f"trying the previous one ({earlier[-1]})" if earlier
                    else "no earlier checkpoint: starting from the beginning")
            warn(f"warning: checkpoint {ckpt} is unreadable ({problem}); {then}")
    return None


def checkpoint_weights(run_dir: str | Path) -> list[tuple[int, Path]]:
    """[(k, checkpoints/step-k/model.safetensors)] of every checkpoint holding weights, by k."""
    out = []
    for ckpt in list_checkpoints(run_dir):
        weights = ckpt / MODEL_WEIGHTS_FILE
        if weights.exists():
            out.append((int(ckpt.name[len(CHECKPOINT_PREFIX):]), weights))
    return out


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory a model-or-run path means: the path itself when it holds a model
    (a finetuning run saves its final model into its run directory), else the run's last
    checkpoint holding one (an unlearning run's final weights are its last checkpoint)."""
    path = Path(path)
    if (path / MODEL_CONFIG_FILE).exists():
        return path
    for ckpt in reversed(list_checkpoints(path)):
        if (ckpt / MODEL_CONFIG_FILE).exists():
            return ckpt
    raise UserError(f"{path} is neither a model directory ({MODEL_CONFIG_FILE} + weights) nor a run "
                    f"directory with a model ({CHECKPOINTS_DIR}/{CHECKPOINT_PREFIX}<k>/); pass a model "
                    f"directory or a run that wrote a checkpoint")


# --------------------------------------------------------------------------------------------
# weights


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def adapter_state(model) -> dict:
    """The trainable (adapter) tensors of a peft model, by their names in the peft model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def write_model(out: Path, model, state_dict: Optional[dict] = None) -> None:
    """model.safetensors + config.json of the unwrapped `model` into `out`: from a gathered full
    `state_dict` (fsdp / deepspeed), as the merged model plus ``adapter.safetensors`` (LoRA), or
    plainly."""
    from safetensors.torch import save_file

    if state_dict is not None:
        model.config.save_pretrained(str(out))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(str(out))
            except (ValueError, OSError):     # a generation config HF refuses to save: not needed
                pass
        tensors, seen = {}, set()
        for k, v in state_dict.items():
            v = v.detach().cpu().contiguous()
            if v.data_ptr() in seen:                     # an alias (tied embeddings): stored once
                continue
            if getattr(model.config, "tie_word_embeddings", False) and k == "lm_head.weight":
                continue
            seen.add(v.data_ptr())
            tensors[k] = v
        save_file(tensors, str(out / MODEL_WEIGHTS_FILE), metadata={"format": "pt"})
    elif is_peft(model):
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(str(out), safe_serialization=True)
        del merged
        save_safetensors(out / ADAPTER_FILE, adapter_state(model))
    else:
        model.save_pretrained(str(out), safe_serialization=True)


def load_weights(ckpt: str | Path, model) -> None:
    """Load a checkpoint directory's weights into the unwrapped, unsharded `model`: the adapter
    tensors for a peft model (its base is the unchanged target model), else model.safetensors
    (a missing LM head is fine: it is tied to the embeddings)."""
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    device = str(next(model.parameters()).device)
    if is_peft(model):
        path = ckpt / ADAPTER_FILE
        if not path.exists():
            raise UserError(f"checkpoint {ckpt} has no {ADAPTER_FILE} for this LoRA run; remove the run "
                            f"directory to start over")
        saved = load_file(str(path), device=device)
        params = dict(model.named_parameters())
        want = set(adapter_state(model))
        if set(saved) != want:
            raise UserError(f"checkpoint {ckpt} does not fit the LoRA model (missing "
                            f"{sorted(want - set(saved))[:3]}, unexpected {sorted(set(saved) - want)[:3]}); "
                            f"remove the run directory to start over")
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t.to(params[n].dtype))
        return
    weights = load_file(str(ckpt / MODEL_WEIGHTS_FILE), device=device)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
        raise UserError(f"checkpoint {ckpt} does not fit the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); remove the run directory to start over")
    if hasattr(model, "tie_weights"):
        model.tie_weights()


# --------------------------------------------------------------------------------------------
# whole checkpoints


def write_checkpoint(run_dir: Path, step: int, model, tokenizer, trainer_state: dict,
                     model_state: Optional[dict] = None, optimizer_state: Optional[dict] = None,
                     optimizer_format: str = "index") -> Path:
    """Write ``checkpoints/step-<step>/`` atomically (see the module docstring).

    `model` is the unwrapped model; `model_state` a gathered full state dict when the live model
    is sharded. `optimizer_state` is ``{"state": {id: {name: tensor}}, "param_groups": [...]}``
    (ids are indices for "index", parameter names for "fqn"), or None when the optimiser saves
    itself (``optimizer_format="deepspeed"``). `trainer_state` is added to trainer.json."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_model(tmp, model, model_state)
    tokenizer.save_pretrained(str(tmp))
    tensors, meta = {}, {"step": step, **trainer_state, "optimizer_format": optimizer_format}
    if optimizer_state is None:
        meta["param_groups"] = []
    else:
        for key, st in optimizer_state["state"].items():
            for name, value in st.items():
                tensors[f"{STATE_PREFIX}{key}.{name}"] = torch.as_tensor(value)
        meta["param_groups"] = optimizer_state["param_groups"]
    tensors[RNG_KEY] = torch.get_rng_state()
    save_safetensors(tmp / OPTIMIZER_FILE, tensors)
    write_json(tmp / TRAINER_STATE_FILE, meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_trainer_state(ckpt: Path) -> dict:
    """trainer.json of a checkpoint (step, optimizer_format, param_groups, task counters)."""
    return read_json(Path(ckpt) / TRAINER_STATE_FILE)


def read_optimizer_state(ckpt: Path, meta: dict) -> dict:
    """The saved optimiser state ``{"state", "param_groups"}`` (ids as written: int indices for
    "index", parameter names for "fqn"), tensors on the CPU; also restores the torch RNG state
    saved with it."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(ckpt) / OPTIMIZER_FILE))
    by_name = meta.get("optimizer_format", "index") == "fqn"
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(STATE_PREFIX):
            ident, name = key[len(STATE_PREFIX):].rsplit(".", 1)
            state.setdefault(ident if by_name else int(ident), {})[name] = value
    if RNG_KEY in tensors:
        torch.set_rng_state(tensors[RNG_KEY])
    return {"state": state, "param_groups": meta["param_groups"]}
