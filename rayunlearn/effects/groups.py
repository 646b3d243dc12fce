"""Groups of parameter tensors, derived from parameter names (HF naming).

- ``block_index(name)``: k for ``...layers.<k>.`` (also ``h.<k>.``, ``blocks.<k>.``), else -1
- ``kind(name)``: "embed" | "block" | "norm" (final norm) | "lm" | "other"
- ``sublayer(name)``: "attn" | "mlp" | "norm" | "" (outside blocks)
- ``paper_group(name, n_blocks)``: the paper's buckets embed / shallow / middle / deep / lm
  (thirds of the blocks: block k goes to ⌊3k/n⌋), the final norm in its own "norm" group,
  anything else "other"
- ``code_bucket(name)``: the G-effect reference code's 5 buckets: "embed", "module1" (blocks
  0–9), "module2" (10–19), "module3" (20+ and the final norm / any other tensor — the code lets
  such tensors inherit the previous bucket, in practice module3), "lm"

Tied input/output embeddings are one tensor, reported once under the embedding's name
(group "embed"); its value includes the LM-head contribution.
"""

from __future__ import annotations

import re
from collections import defaultdict

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBED = ("embed_tokens", "wte", "embed_in", "word_embeddings", "tok_embeddings")
_LM = ("lm_head", "embed_out", "output.weight")

PAPER_GROUPS = ("embed", "shallow", "middle", "deep", "norm", "lm", "other")
CODE_BUCKETS = ("embed", "module1", "module2", "module3", "lm")


def block_index(name: str) -> int:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else -1


def kind(name: str) -> str:
    if block_index(name) >= 0:
        return "block"
    if any(e in name for e in _EMBED) or "wpe" in name:
        return "embed"
    if any(e in name for e in _LM):
        return "lm"
    if "norm" in name or name.split(".")[-2:-1] == ["ln_f"]:
        return "norm"
    return "other"


def sublayer(name: str) -> str:
    if block_index(name) < 0:
        return ""
    tail = name[_BLOCK.search(name).end():]
    if any(k in tail for k in ("attn", "attention")):
        return "attn"
    if any(k in tail for k in ("mlp", "feed_forward", "ffn")):
        return "mlp"
    if "norm" in tail or tail.startswith("ln_"):
        return "norm"
    return "other"


def num_blocks(names) -> int:
    return max((block_index(n) for n in names), default=-1) + 1


def paper_group(name: str, n_blocks: int) -> str:
    k = block_index(name)
    if k >= 0:
        return ("shallow", "middle", "deep")[min(2, (3 * k) // max(n_blocks, 1))]
    return kind(name)


def code_bucket(name: str) -> str:
    k = block_index(name)
    if k >= 0:
        return "module1" if k < 10 else "module2" if k < 20 else "module3"
    kd = kind(name)
    return kd if kd in ("embed", "lm") else "module3"


def summarize(by_parameter: dict[str, float]) -> dict[str, dict]:
    """Per-parameter values -> {"block": {k: v}, "paper": {group: v}, "code": {bucket: v},
    "sublayer": {"attn"|"mlp"|"norm"|"other": v}, "kind": {...}}; every grouping sums to the
    total."""
    names = list(by_parameter)
    n = num_blocks(names)
    out = {"block": defaultdict(float), "paper": defaultdict(float), "code": defaultdict(float),
           "sublayer": defaultdict(float), "kind": defaultdict(float)}
    for name, v in by_parameter.items():
        k = block_index(name)
        if k >= 0:
            out["block"][k] += v
            out["sublayer"][sublayer(name)] += v
        else:
            out["sublayer"][kind(name)] += v
        out["paper"][paper_group(name, n)] += v
        out["code"][code_bucket(name)] += v
        out["kind"][kind(name)] += v
    return {k: dict(v) for k, v in out.items()}
