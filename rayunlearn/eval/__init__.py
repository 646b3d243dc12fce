"""Evaluation: batched probing (`probe`), pure metric functions (`metrics`), the TOFU
evaluation (`evaluate`: `evaluate_model`, `Evaluator`, `write_eval`, `eval_command`) and the
original TOFU log format (`tofu_logs`).  Heavy submodules are imported on first use, so reading
logs or computing metrics does not import torch."""

from __future__ import annotations

_LAZY = {
    "evaluate_model": "rayunlearn.eval.evaluate",
    "Evaluator": "rayunlearn.eval.evaluate",
    "write_eval": "rayunlearn.eval.evaluate",
    "load_reference": "rayunlearn.eval.evaluate",
    "metrics_from_raw": "rayunlearn.eval.evaluate",
    "trajectory_record": "rayunlearn.eval.evaluate",
    "eval_command": "rayunlearn.eval.evaluate",
    "ReferenceMismatchError": "rayunlearn.eval.evaluate",
    "summarize_tofu_dir": "rayunlearn.eval.tofu_logs",
    "export_tofu_logs": "rayunlearn.eval.tofu_logs",
    "summary_command": "rayunlearn.eval.tofu_logs",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayunlearn.eval' has no attribute {name!r}")
