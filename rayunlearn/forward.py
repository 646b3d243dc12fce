"""The one place that calls the model at training time: ``(model, batch) -> TokenView``.

A batch is a dict of ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) with
-100 on every non-answer token (HF convention: labels are aligned with ``input_ids``; the
shift happens here), and optionally ``row_ids`` (B,) dataset row ids.

The view holds per-token log-probs of the labels at shifted positions, the answer mask, and
only what the chosen terms declare they need (``NEEDS``):

- ``"logits"``      full-vocabulary logits (B, T-1, V) (KL, UNDIAL)
- ``"hidden"``      HF ``hidden_states`` tuple (index 0 = embeddings, k = output of block k-1)
- ``"ref_logps"``   reference model's per-token log-probs (B, T-1), from a cache when possible
- ``"ref_logits"``  reference model's logits (B, T-1, V)
- ``"ref_hidden"``  reference model's hidden states

Token-mean objectives divide by ``view.token_count`` and sequence-mean ones by
``view.seq_count``. Both default to this micro-batch's counts; the training loop overrides
them with the counts of the whole effective batch (all micro-batches, all workers) so that a
split batch gives exactly the same update as an unsplit one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100
NEEDS = frozenset({"logits", "hidden", "ref_logps", "ref_logits", "ref_hidden"})


@dataclass
class TokenView:
    logps: torch.Tensor                       # (B, T-1) log p(label_t | prefix); 0 where not answer
    mask: torch.Tensor                        # (B, T-1) bool, answer tokens (incl. the one EOS)
    token_count: float                        # denominator of token means
    seq_count: float                          # denominator of sequence means
    row_ids: Optional[torch.Tensor] = None    # (B,)
    labels: Optional[torch.Tensor] = None     # (B, T-1) shifted labels, IGNORE where not answer
    attention_mask: Optional[torch.Tensor] = None   # (B, T)
    logits: Optional[torch.Tensor] = None     # (B, T-1, V) float32
    hidden: Optional[tuple] = None            # hidden_states, each (B, T, d)
    ref_logps: Optional[torch.Tensor] = None  # (B, T-1)
    ref_logits: Optional[torch.Tensor] = None  # (B, T-1, V)
    ref_hidden: Optional[tuple] = None
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.logps.shape[0])

    def nll(self) -> torch.Tensor:
        """(B, T-1) token NLL on answer tokens, 0 elsewhere."""
        return -self.logps

    def seq_nll(self) -> torch.Tensor:
        """(B,) sequence NLL L = sum over answer tokens."""
        return -(self.logps * self.mask).sum(-1)


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, T) -> (shifted labels (B, T-1), answer mask (B, T-1))."""
    shifted = labels[:, 1:]
    return shifted, shifted != IGNORE


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """float32 under bf16/fp16 (accumulate in fp32), float64 kept (float64 oracles)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def label_logps(logits: torch.Tensor, shifted_labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T-1, V), shifted labels (B, T-1) -> (B, T-1) log-probs in at least float32, 0 on IGNORE."""
    mask = shifted_labels != IGNORE
    safe = shifted_labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(_at_least_fp32(logits), dim=-1)         # (B, T-1, V)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)            # (B, T-1)
    return out * mask


def model_forward(model, batch: dict, want_hidden: bool = False):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 output_hidden_states=want_hidden, use_cache=False)


def token_view(model, batch: dict, needs=frozenset(), reference=None, ref_cache: "RefLogpCache | None" = None,
               token_count: float | None = None, seq_count: float | None = None) -> TokenView:
    """Run `model` on `batch` (with grad as the caller's context decides) and build the view."""
    unknown = set(needs) - NEEDS
    if unknown:
        raise ValueError(f"unknown token-view needs {sorted(unknown)}; valid: {sorted(NEEDS)}")
    shifted, mask = shift_labels(batch["labels"])
    out = model_forward(model, batch, want_hidden="hidden" in needs)
    logits = out.logits[:, :-1]                                       # (B, T-1, V)
    view = TokenView(
        logps=label_logps(logits, shifted), mask=mask,
        token_count=float(mask.sum()) if token_count is None else float(token_count),
        seq_count=float(mask.shape[0]) if seq_count is None else float(seq_count),
        row_ids=batch.get("row_ids"), labels=shifted, attention_mask=batch["attention_mask"],
        logits=_at_least_fp32(logits) if "logits" in needs else None,
        hidden=out.hidden_states if "hidden" in needs else None,
    )
    ref_needs = {n for n in needs if n.startswith("ref_")}
    if ref_needs:
        add_reference(view, batch, ref_needs, reference, ref_cache)
    return view


def add_reference(view: TokenView, batch: dict, ref_needs, reference, ref_cache=None) -> None:
    """Fill ref_* fields: from the cache when only log-probs are needed and cached, else by
    running the frozen reference model without grad."""
    ref_needs = set(ref_needs)
    if ref_needs == {"ref_logps"} and ref_cache is not None and batch.get("row_ids") is not None \
            and ref_cache.has(batch["row_ids"]):
        view.ref_logps = ref_cache.lookup(batch["row_ids"], view.mask)
        return
    if reference is None:
        raise ValueError("this method needs the frozen reference model (pre-unlearning), "
                         "but none was given: pass reference=<the target model>")
    with torch.no_grad():
        out = model_forward(reference, batch, want_hidden="ref_hidden" in ref_needs)
        logits = out.logits[:, :-1]
        view.ref_logps = label_logps(logits, view.labels)
        if "ref_logits" in ref_needs:
            view.ref_logits = _at_least_fp32(logits)
        if "ref_hidden" in ref_needs:
            view.ref_hidden = tuple(h.detach() for h in out.hidden_states)


class RefLogpCache:
    """Reference per-token answer log-probs of a fixed set of rows, keyed by dataset row id.
    Lets NPO/TNPO/WTNPO/IdK-DPO run without the reference model resident."""

    def __init__(self):
        self._rows: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def has(self, row_ids: torch.Tensor) -> bool:
        return all(int(r) in self._rows for r in row_ids.tolist())

    @torch.no_grad()
    def fill(self, reference, batches) -> "RefLogpCache":
        for batch in batches:
            shifted, mask = shift_labels(batch["labels"])
            out = model_forward(reference, batch)
            logps = label_logps(out.logits[:, :-1], shifted)
            for i, r in enumerate(batch["row_ids"].tolist()):
                self._rows[int(r)] = logps[i][mask[i]].detach().clone()
        return self

    def lookup(self, row_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        first = next(iter(self._rows.values()))
        out = torch.zeros(mask.shape, dtype=first.dtype, device=mask.device)
        for i, r in enumerate(row_ids.tolist()):
            vals = self._rows[int(r)].to(mask.device)
            if int(mask[i].sum()) != vals.numel():
                raise ValueError(f"reference cache for row {r} has {vals.numel()} answer tokens, "
                                 f"the batch has {int(mask[i].sum())}: the tokenisation changed")
            out[i, mask[i]] = vals
        return out
