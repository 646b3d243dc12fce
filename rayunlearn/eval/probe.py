"""Batched probing: per-token answer log-probs for many (item, answer-variant) sequences in few
padded forward passes, and batched greedy generation with the KV cache.

Scoring flattens every sequence (original, paraphrased and each perturbed answer of every item),
packs the sequences that share a prompt into one row (the prompt once, then each answer, with
a 4-D attention mask and position ids that give each answer exactly its own sequence's context:
an item's five to seven answers no longer recompute its question; `Pack`), sorts the rows by
length, right-pads them into batches, runs one forward per batch and scatters the answer-token
results back.  Only answer positions (labels ≠ −100, shifted) are projected through the output
head when the architecture allows it (Llama-family decoders): the vocabulary-sized logits are
never materialised for question or padding tokens.  Models that take no 4-D mask (another
architecture, flash attention, sliding windows) score every sequence in a row of its own.

Per sequence the result holds float64 numpy arrays over the answer tokens (the EOS after the
answer included, as in the batch contract):
  `logps`    log p(label_t | prefix)                                   (n,)
  `correct`  teacher-forced argmax == label          (only with extras) (n,) bool
  `mu`,`sigma` mean / std of log p(·) under p(·) over the vocabulary (only with extras) (n,)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

IGNORE = -100
MAX_TOKENS = 16384    # default padded-token budget of one scoring batch

# decoders whose logits are exactly `output_embeddings(decoder(x).last_hidden_state)`
_HEAD_SPLIT_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "olmo", "olmo2", "smollm3"}


@dataclass
class SeqScore:
    logps: np.ndarray
    correct: Optional[np.ndarray] = None
    mu: Optional[np.ndarray] = None
    sigma: Optional[np.ndarray] = None

    @property
    def num_tokens(self) -> int:
        return int(self.logps.size)

    @property
    def nll_sum(self) -> float:
        return float(-self.logps.sum())

    @property
    def avg_nll(self) -> float:
        return self.nll_sum / max(1, self.num_tokens)


@dataclass
class Probe:
    """One sequence to score: token ids and HF-aligned labels (−100 off the answer)."""

    input_ids: list
    labels: list
    extras: bool = False     # also compute argmax-correct flags and vocabulary mean/std


# --------------------------------------------------------------------------------------------
# encoding (the data module's formatting, or a plain local fallback)


class QAEncoder:
    """Turns (question, answer) into (input_ids, labels) and a question into a generation
    prompt, through `rayunlearn.data.formatting` when present; otherwise a plain local format
    ``"Question: {q}\\nAnswer:"`` + ``" {a}"`` + EOS (prompt ids are an exact prefix)."""

    def __init__(self, tokenizer, template: str = "plain", max_length: int = 256, use_data_module: bool = True):
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = int(max_length)
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            from rayunlearn import UserError

            raise UserError("the tokenizer has no EOS token; evaluation needs one to end answers")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self._qa = self._prompt = None
        self._tmpl = template
        if use_data_module:
            from rayunlearn.data.formatting import encode_prompt, encode_qa, get_template

            self._tmpl = get_template(template, tokenizer)   # bound once (DataError for a bad name)
            self._qa, self._prompt = encode_qa, encode_prompt

    @staticmethod
    def _ids(x) -> list:
        if isinstance(x, dict):
            x = x["input_ids"]
        if isinstance(x, torch.Tensor):
            x = x.tolist()
        return list(x)

    def _call(self, fn, **kw):
        params = inspect.signature(fn).parameters
        args = {k: v for k, v in kw.items() if k in params}
        return fn(**args)

    def qa(self, question: str, answer: str) -> tuple[list, list]:
        if self._qa is not None:
            out = self._call(self._qa, tokenizer=self.tokenizer, template=self._tmpl, question=question,
                             answer=answer, max_length=self.max_length)
            ids, labels = out["input_ids"], out["labels"]
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
            return ids, labels
        prompt = self.prompt(question)
        ans = self.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"] + [self.eos_id]
        ids = (prompt + ans)[: self.max_length]
        labels = ([IGNORE] * len(prompt) + ans)[: self.max_length]
        return ids, labels

    def prompt(self, question: str) -> list:
        if self._prompt is not None:
            return self._ids(self._call(self._prompt, tokenizer=self.tokenizer, template=self._tmpl,
                                        question=question, max_length=self.max_length))
        return self.tokenizer(f"Question: {question.strip()}\nAnswer:", add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------
# scoring


def _unwrap(model):
    return getattr(model, "module", model)


def _head_split(model):
    """(decoder, head) when logits = head(decoder(...).last_hidden_state) exactly, else None."""
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in _HEAD_SPLIT_TYPES:
        return None
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return None
    try:
        dec, head = m.get_decoder(), m.get_output_embeddings()
    except Exception:
        return None
    if dec is None or head is None:
        return None
    return dec, head


def _device(model) -> torch.device:
    try:
        return next(_unwrap(model).parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _is_fsdp2(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _through_root(root, fn):
    """Run ``fn()`` inside ``root(...)``'s call so FSDP2's root hooks fire (lazy init, all-gather
    of the root's parameters — embeddings, final norm, output head — and reshard afterwards);
    the decoder layers' own hooks fire as usual inside ``fn``."""
    root.forward = lambda *a, **k: fn()        # an instance attribute shadows the class method
    try:
        return root()
    finally:
        del root.forward


def answer_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, answer_mask: torch.Tensor,
                  head_split: bool = True) -> torch.Tensor:
    """Logits at the answer-predicting positions: (N, V) for the True entries of `answer_mask`
    (B, T-1) in row-major order.  With an FSDP2 (`fully_shard`) root the head-split computation
    runs inside the root's call, so the same numbers come out as without FSDP."""
    split = _head_split(model) if head_split else None
    if split is not None:
        dec, head = split

        def run():
            h = dec(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            return head(h[:, :-1][answer_mask])                               # (N, V)

        m = _unwrap(model)
        return _through_root(m, run) if _is_fsdp2(m) else run()
    out = _unwrap(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits[:, :-1][answer_mask]                                    # (N, V)


def _batches(order: list, lengths: list, batch_size: int, max_tokens: Optional[int]):
    batch = []
    for i in order:
        if batch and (len(batch) >= batch_size or
                      (max_tokens and (len(batch) + 1) * lengths[batch[0]] > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: Optional[int] = None) -> list[list[int]]:
    """The batch schedule: indices sorted by decreasing length (stable), cut into batches of at
    most `batch_size` rows and (when given) about `max_tokens` padded tokens.  Deterministic, so
    every rank of a distributed evaluation derives the same schedule."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return list(_batches(order, list(lengths), int(batch_size), max_tokens))


@torch.no_grad()
def score_batch(model, probes: Sequence[Probe], chunk: Sequence[int], pad_id: int,
                head_split: bool = True) -> list[SeqScore]:
    """Score the probes `chunk` (indices into `probes`) in one right-padded forward; one
    `SeqScore` per index of `chunk`, in that order."""
    lengths = [len(probes[i].input_ids) for i in chunk]
    device = _device(model)
    T = max(lengths)
    ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
    lab = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
    att = torch.zeros((len(chunk), T), dtype=torch.long)
    for r, i in enumerate(chunk):
        L = lengths[r]
        ids[r, :L] = torch.tensor(probes[i].input_ids, dtype=torch.long)
        lab[r, :L] = torch.tensor(probes[i].labels, dtype=torch.long)
        att[r, :L] = 1
    ids, lab, att = ids.to(device), lab.to(device), att.to(device)
    shifted = lab[:, 1:]                                                  # (B, T-1)
    mask = shifted != IGNORE
    logits = answer_logits(model, ids, att, mask, head_split=head_split)  # (N, V)
    return _token_scores(logits, shifted[mask], mask.sum(1).tolist(), [probes[i].extras for i in chunk])


def _token_scores(logits: torch.Tensor, targets: torch.Tensor, counts: list, extras: list) -> list[SeqScore]:
    """`SeqScore`s from the answer-position logits (N, V) and their targets (N,), cut into
    consecutive sequences of ``counts`` tokens; ``extras[r]``: sequence r wants the argmax flags
    and the vocabulary mean / std."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(dt), dim=-1)                      # (N, V)
    tok = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)              # (N,)
    want_extras = any(extras)
    if want_extras:
        correct = logits.argmax(-1) == targets
        p = logp.exp()
        mu = (p * logp).sum(-1)
        var = (p * logp * logp).sum(-1) - mu * mu
        sigma = var.clamp_min(0).sqrt()
        extra = [x.double().cpu().numpy() for x in (mu, sigma)] + [correct.cpu().numpy()]
    tok_np = tok.double().cpu().numpy()
    out = []
    start = 0
    for n, wants in zip(counts, extras):
        sl = slice(start, start + n)
        start += n
        s = SeqScore(logps=tok_np[sl].copy())
        if wants:
            s.mu, s.sigma, s.correct = extra[0][sl].copy(), extra[1][sl].copy(), extra[2][sl].copy()
        out.append(s)
    return out


@dataclass
class Pack:
    """Probes that share their prompt (an item's original, paraphrased and perturbed answers),
    scored in one row: the prompt once, then each probe's answer, its positions continuing from
    the prompt's end and its tokens attending to the prompt and to its own earlier tokens only —
    the numbers of each probe's own sequence, with the prompt computed once instead of once per
    answer (most of an evaluation's tokens are prompt tokens)."""

    members: list            # probe indices, in input order
    prompt: Optional[int]    # prompt length (the tokens before the first labelled one); None: a
                             # probe that is no prompt + self-labelled answer, scored unpacked
    length: int              # prompt + every member's answer tokens


def _prompt_length(probe: Probe) -> Optional[int]:
    """The prompt length when the probe is a prompt followed by an answer labelled with its own
    tokens (what the evaluation encodes), else None (such a probe is packed alone)."""
    labels, ids = probe.labels, probe.input_ids
    p = next((t for t, lab in enumerate(labels) if lab != IGNORE), None)
    if not p or list(labels[p:]) != list(ids[p:]):
        return None
    return p


def plan_packs(probes: Sequence[Probe], batch_size: int, max_tokens: Optional[int] = MAX_TOKENS,
               share_prompts: bool = True) -> tuple[list[Pack], list[list[int]]]:
    """(packs, batches of pack indices): probes with equal prompts grouped (in order of first
    appearance; ``share_prompts=False`` or a probe without a prompt: one pack each), the packs
    sorted by decreasing length and cut into batches of about ``batch_size`` probes (as many
    answers per forward as unpacked batches of ``batch_size`` rows: the memory of the answer
    logits stays the same) and at most ``max_tokens`` padded tokens. Deterministic, so every
    rank of a distributed evaluation derives the same plan."""
    groups: dict = {}       # key -> (prompt length or None, member probe indices)
    for i, probe in enumerate(probes):
        p = _prompt_length(probe) if share_prompts else None
        key = ("own", i) if p is None else tuple(probe.input_ids[:p])
        groups.setdefault(key, (p, []))[1].append(i)
    packs = [Pack(members, p, sum(len(probes[i].input_ids) for i in members) if p is None else
                  p + sum(len(probes[i].input_ids) - p for i in members))
             for p, members in groups.values()]
    batches = []
    # packed rows and rows of their own never share a batch: one forward per batch either way
    # (what a sharded model's ranks count on)
    for kind in (True, False):
        order = sorted((k for k in range(len(packs)) if (packs[k].prompt is not None) == kind),
                       key=lambda k: -packs[k].length)
        batch, n = [], 0
        for k in order:
            size = len(packs[k].members)
            if batch and (n + size > batch_size or
                          (max_tokens and (len(batch) + 1) * packs[batch[0]].length > max_tokens)):
                batches.append(batch)
                batch, n = [], 0
            batch.append(k)
            n += size
        if batch:
            batches.append(batch)
    return packs, batches


def packs_supported(model) -> bool:
    """Whether the model honours a 4-D attention mask with position ids (packed rows): Llama-
    family decoders under the sdpa or eager attention (flash attention takes no such mask)."""
    m = _unwrap(model)
    cfg = getattr(m, "config", None)
    return (getattr(cfg, "model_type", None) in _HEAD_SPLIT_TYPES
            and getattr(cfg, "_attn_implementation", None) in ("sdpa", "eager")
            and getattr(cfg, "sliding_window", None) is None)


@torch.no_grad()
def score_pack_batch(model, probes: Sequence[Probe], packs: Sequence[Pack], chunk: Sequence[int], pad_id: int,
                     head_split: bool = True) -> list[tuple[int, SeqScore]]:
    """Score the packs `chunk` (indices into `packs`, a batch of :func:`plan_packs`) in one
    right-padded forward with a 4-D attention mask (see :class:`Pack`); (probe index,
    `SeqScore`) per member probe. A batch of packs without a prompt is `score_batch`'s."""
    if packs[chunk[0]].prompt is None:
        alone = [packs[k].members[0] for k in chunk]
        return list(zip(alone, score_batch(model, probes, alone, pad_id, head_split=head_split)))
    rows = [packs[k] for k in chunk]
    device = _device(model)
    B, T = len(rows), max(pk.length for pk in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)       # 0 = prompt, k = the k-th answer, -1 = padding
    where_r, where_t, targets, spans, extras = [], [], [], [], []
    for r, pk in enumerate(rows):
        p = pk.prompt
        ids[r, :p] = torch.tensor(probes[pk.members[0]].input_ids[:p], dtype=torch.long)
        pos[r, :p] = torch.arange(p)
        seg[r, :p] = 0
        start = p
        for k, i in enumerate(pk.members, start=1):
            answer = probes[i].input_ids[p:]
            n = len(answer)
            ids[r, start:start + n] = torch.tensor(answer, dtype=torch.long)
            pos[r, start:start + n] = torch.arange(p, p + n)
            seg[r, start:start + n] = k
            # the answer's t-th token is predicted at the prompt's last position (t = 0), then
            # at its own previous token
            where_r += [r] * n
            where_t += [p - 1] + list(range(start, start + n - 1))
            targets += answer
            spans.append((i, n))
            extras.append(probes[i].extras)
            start += n
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])      # (B, query, key)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (same & causal & (seg[:, None, :] >= 0)) | torch.eye(T, dtype=torch.bool)   # padding sees itself
    dtype = next(_unwrap(model).parameters()).dtype
    mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    ids, pos, mask = ids.to(device), pos.to(device), mask.to(device)
    where_r, where_t = torch.tensor(where_r, device=device), torch.tensor(where_t, device=device)
    split = _head_split(model) if head_split else None
    if split is not None:
        dec, head = split

        def run():
            h = dec(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            return head(h[where_r, where_t])                                  # (N, V)

        m = _unwrap(model)
        logits = _through_root(m, run) if _is_fsdp2(m) else run()
    else:
        logits = _unwrap(model)(input_ids=ids, attention_mask=mask, position_ids=pos,
                                use_cache=False).logits[where_r, where_t]
    return list(zip([i for i, _ in spans], _token_scores(logits, torch.tensor(targets, device=device),
                                                          [n for _, n in spans], extras)))


@torch.no_grad()
def score_probes(model, probes: Sequence[Probe], pad_id: int, batch_size: int = 32,
                 max_tokens: Optional[int] = MAX_TOKENS, head_split: bool = True,
                 on_batch: Optional[Callable[[int], None]] = None) -> list[SeqScore]:
    """Score every probe: probes sharing a prompt packed into one row (:class:`Pack`, where the
    model supports it), rows sorted by length, right-padded into batches (one forward each).

    Returns one `SeqScore` per probe, in the input order.  Log-probs are computed in float64
    when the model runs in float64, else in float32."""
    results: list[Optional[SeqScore]] = [None] * len(probes)
    packs, plan = plan_packs(probes, batch_size, max_tokens, share_prompts=packs_supported(model))
    for chunk in plan:
        scored = score_pack_batch(model, probes, packs, chunk, pad_id, head_split=head_split)
        for i, s in scored:
            results[i] = s
        if on_batch is not None:
            on_batch(len(scored))
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# generation


@torch.no_grad()
def generate_batch(model, prompts: Sequence[list], chunk: Sequence[int], pad_id: int, eos_id: int,
                   max_new_tokens: int = 48, synced_gpus: Optional[bool] = None) -> list[list]:
    """Greedy continuations of the prompts `chunk` (indices into `prompts`), left-padded into one
    `model.generate` call; each cut at its first EOS (EOS not included).  ``synced_gpus=True``
    keeps every rank stepping the model until all ranks are done (needed when the forward is a
    collective, e.g. FSDP); None lets transformers decide."""
    lengths = [len(prompts[i]) for i in chunk]
    T = max(lengths)
    ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(chunk), T), dtype=torch.long)
    for r, i in enumerate(chunk):
        L = lengths[r]
        ids[r, T - L:] = torch.tensor(prompts[i], dtype=torch.long)
        att[r, T - L:] = 1
    device = _device(model)
    kw = {} if synced_gpus is None else {"synced_gpus": bool(synced_gpus)}
    seqs = _unwrap(model).generate(input_ids=ids.to(device), attention_mask=att.to(device), do_sample=False,
                                   num_beams=1, max_new_tokens=int(max_new_tokens), eos_token_id=eos_id,
                                   pad_token_id=pad_id, use_cache=True, temperature=None, top_p=None, top_k=None,
                                   **kw)
    out = []
    for toks in seqs[:, T:].tolist():
        if eos_id in toks:
            toks = toks[: toks.index(eos_id)]
        out.append(toks)
    return out


@torch.no_grad()
def generate_greedy(model, prompts: Sequence[list], pad_id: int, eos_id: int, max_new_tokens: int = 48,
                    batch_size: int = 32, on_batch: Optional[Callable[[int], None]] = None) -> list[list]:
    """Greedy continuations of left-padded prompts with the KV cache (`model.generate`,
    do_sample=False); each continuation is cut at its first EOS (EOS not included)."""
    out: list[Optional[list]] = [None] * len(prompts)
    for chunk in plan_batches([len(p) for p in prompts], batch_size, None):
        for i, toks in zip(chunk, generate_batch(model, prompts, chunk, pad_id, eos_id, max_new_tokens)):
            out[i] = toks
        if on_batch is not None:
            on_batch(len(chunk))
    return out  # type: ignore[return-value]
