"""QA records -> token sequences -> batches (the batch contract in docs/ARCHITECTURE.md).

Templates (``data.template``):

- ``plain``:  prompt ``"Question: {q}\\nAnswer:"``, answer ``" {a}"``
- ``llama2``: prompt ``"[INST] {q} [/INST]"``, answer ``" {a}"`` (TOFU's Llama-2 chat format)
- ``chat``:   the tokenizer's own ``apply_chat_template`` with user = question and
  ``add_generation_prompt=True`` as the prompt; answer ``"{a}"``.

**Space handling.** The prompt and the answer are tokenized *separately* and concatenated, so
the labelled tokens are always exactly ``tokenizer(answer_text(a), add_special_tokens=False)``
plus one EOS, whatever the template. The space between the prompt and the answer belongs to the
answer (``answer_text = " " + a``): that is how a joint tokenization of ``"Answer: Paris"``
splits with byte-level BPE (``Ġ`` + word), so pretrained models see their natural tokens. For
tokenizers that put a word-boundary marker on the first word by themselves (SentencePiece ``▁``,
or BPE with ``add_prefix_space``), the answer text is ``a`` without the space, since adding one
would produce a stray ``▁`` token. Generation uses the same prompt ids (:func:`encode_prompt`),
so training and decoding agree; decoded answers should be ``.strip()``-ed.

**Special tokens.** The prompt is tokenized with the tokenizer's special tokens (a BOS when the
tokenizer adds one; a trailing EOS some tokenizers append is dropped) — except for ``chat``,
whose template text already holds them (tokenized with ``add_special_tokens=False``). The
answer never carries special tokens; exactly one ``eos_token_id`` follows it.

**Truncation.** When prompt + answer + EOS exceed ``max_length``, the answer is cut from its
end and the EOS is kept (every sequence still ends with one labelled EOS). A prompt that leaves
no room for one answer token raises :class:`DataError` (raise ``data.max_length``).

**Refusals** (``po``, ``idk_dpo``): the refusal answer of a forget record is chosen by
:func:`pick_refusal` from ``(seed, row_id)`` alone — the same row always gets the same refusal,
independent of batch composition, worker count and epoch (so reference log-probs of the refusal
batch can be cached by row id too).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from rayunlearn.data.schema import DataError

IGNORE = -100
TEMPLATES = ("plain", "llama2", "chat")


def pad_token_id(tokenizer) -> int:
    """The id used for right padding: the tokenizer's pad token, else its EOS."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return int(tokenizer.pad_token_id)
    return eos_token_id(tokenizer)


def eos_token_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token (every answer ends "
                        "with one EOS)")
    return int(eos)


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _adds_prefix_space(tokenizer) -> bool:
    """True when the tokenizer marks the first word as word-initial by itself (▁ or Ġ)."""
    ids = _ids(tokenizer, "x", False)
    if not ids:
        return False
    tok = tokenizer.convert_ids_to_tokens(ids[0])
    return isinstance(tok, str) and tok.startswith(("\u2581", "\u0120"))


@dataclass
class Template:
    """A prompt format bound to a tokenizer: text and token ids of prompt and answer."""

    name: str
    tokenizer: Any
    answer_sep: str = " "
    _prefix: Optional[list] = field(default=None, repr=False)

    def prompt_text(self, question: str) -> str:
        if self.name == "plain":
            return f"Question: {question}\nAnswer:"
        if self.name == "llama2":
            return f"[INST] {question} [/INST]"
        return self.tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                  tokenize=False, add_generation_prompt=True)

    def answer_text(self, answer: str) -> str:
        return answer if self.name == "chat" else self.answer_sep + answer

    def special_prefix(self) -> list[int]:
        """The special tokens the tokenizer puts before a text (a BOS, or nothing); ``chat``
        templates write their own, so none are added for them. Trailing specials (an EOS some
        tokenizers append) are never used."""
        if self.name == "chat":
            return []
        if self._prefix is None:
            probe = "Question"
            plain = _ids(self.tokenizer, probe, False)
            full = _ids(self.tokenizer, probe, True)
            self._prefix = full[:_find(full, plain)] if plain else []
        return list(self._prefix)

    def prompt_ids(self, question: str) -> list[int]:
        return self.prompt_ids_many([question])[0]

    def answer_ids(self, answer: str) -> list[int]:
        return self.answer_ids_many([answer])[0]

    def prompt_ids_many(self, questions: Sequence[str]) -> list[list[int]]:
        """Prompt token ids of many questions (one batched tokenizer call)."""
        prefix = self.special_prefix()
        texts = [self.prompt_text(q) for q in questions]
        return [prefix + list(ids) for ids in _ids_many(self.tokenizer, texts)]

    def answer_ids_many(self, answers: Sequence[str]) -> list[list[int]]:
        """Answer token ids (no special tokens) of many answers."""
        return [list(ids) for ids in _ids_many(self.tokenizer, [self.answer_text(a) for a in answers])]


def _find(full: list[int], part: list[int]) -> int:
    for start in range(len(full) - len(part) + 1):
        if full[start:start + len(part)] == part:
            return start
    return 0   # pragma: no cover - specials that change the text's own tokens


def _ids_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def get_template(name: str, tokenizer) -> Template:
    """The template `name` (plain | llama2 | chat) bound to `tokenizer`."""
    if name not in TEMPLATES:
        raise DataError(f"unknown prompt template {name!r}; choose one of {', '.join(TEMPLATES)}")
    if name == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.template=chat needs a tokenizer with a chat template, and this one "
                            "has none; use data.template=plain or llama2, or a chat model's tokenizer")
        return Template(name, tokenizer, "")
    return Template(name, tokenizer, "" if _adds_prefix_space(tokenizer) else " ")


def _template(tokenizer, template) -> Template:
    return template if isinstance(template, Template) else get_template(template, tokenizer)


def encode_qa(tokenizer, template, question: str, answer: str, max_length: int) -> dict:
    """Token ids of prompt + answer + EOS and labels (−100 on the prompt; the answer's tokens and
    one EOS labelled). `template` is a name or a :class:`Template`. See the module notes for
    space handling and truncation."""
    return encode_qa_many(tokenizer, template, [question], [answer], max_length)[0]


def encode_qa_many(tokenizer, template, questions: Sequence[str], answers: Sequence[str],
                   max_length: int) -> list[dict]:
    """:func:`encode_qa` for many pairs at once (batched tokenizer calls, same result)."""
    tpl = _template(tokenizer, template)
    eos = eos_token_id(tokenizer)
    out = []
    for q, prompt, ans in zip(questions, tpl.prompt_ids_many(questions), tpl.answer_ids_many(answers)):
        room = max_length - len(prompt) - 1
        if room < 1:
            raise DataError(f"the prompt of question {q[:60]!r} is {len(prompt)} tokens, which "
                            f"leaves no room for an answer within data.max_length={max_length}; raise "
                            f"data.max_length")
        ans = ans[:room]
        out.append({"input_ids": prompt + ans + [eos], "labels": [IGNORE] * len(prompt) + ans + [eos]})
    return out


def encode_prompt(tokenizer, template, question: str, max_length: Optional[int] = None) -> list[int]:
    """The prompt's token ids alone (what generation starts from): identical to the prompt part
    of :func:`encode_qa`."""
    tpl = _template(tokenizer, template)
    prompt = tpl.prompt_ids(question)
    if max_length is not None and len(prompt) > max_length - 2:
        raise DataError(f"the prompt of question {question[:60]!r} is {len(prompt)} tokens, over "
                        f"data.max_length={max_length} minus room for an answer; raise data.max_length")
    return prompt


def pick_refusal(refusals: Sequence[str], row_id: int, seed: int = 0) -> str:
    """The refusal answer for dataset row `row_id`: a function of (seed, row_id) only."""
    if not refusals:
        raise DataError("the benchmark's refusal list is empty; po / idk_dpo need refusal answers")
    return refusals[random.Random(f"refusal:{seed}:{int(row_id)}").randrange(len(refusals))]


class QADataset(torch.utils.data.Dataset):
    """Encoded QA records of one split. Item ``i`` is ``{"input_ids", "labels", "row_id": i}``
    (plus ``"idk"``: the same question with its refusal answer, when `refusals` is given).

    `answer_key` may name a list field (``perturbed_answer``) with `answer_index` choosing the
    entry. Records are encoded once, at construction."""

    def __init__(self, records: Sequence[dict], tokenizer, template, max_length: int,
                 question_key: str = "question", answer_key: str = "answer",
                 answer_index: Optional[int] = None, refusals: Optional[Sequence[str]] = None,
                 refusal_seed: int = 0):
        self.records = list(records)
        self.tokenizer = tokenizer
        self.template = _template(tokenizer, template)
        self.max_length = max_length
        self.question_key = question_key
        self.answer_key = answer_key
        self.pad_id = pad_token_id(tokenizer)
        self.refusals = list(refusals) if refusals is not None else None
        self.refusal_seed = refusal_seed
        questions, answers = [], []
        for i, rec in enumerate(self.records):
            try:
                q, a = rec[question_key], rec[answer_key]
            except KeyError as exc:
                raise DataError(f"record {i} has no field {exc.args[0]!r} (QADataset question_key="
                                f"{question_key!r}, answer_key={answer_key!r})") from None
            questions.append(q)
            answers.append(a[answer_index] if answer_index is not None else a)
        self.items = encode_qa_many(tokenizer, self.template, questions, answers, max_length)
        for i, item in enumerate(self.items):
            item["row_id"] = i
        if self.refusals is not None:
            idk = encode_qa_many(tokenizer, self.template, questions,
                                 [pick_refusal(self.refusals, i, refusal_seed) for i in range(len(questions))],
                                 max_length)
            for i, (item, extra) in enumerate(zip(self.items, idk)):
                extra["row_id"] = i
                item["idk"] = extra

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(examples: Sequence[dict], pad_id: int) -> dict:
    """Right-pad encoded examples into a batch: ``input_ids``, ``attention_mask``, ``labels``
    (−100 on padding), ``row_ids``; a nested ``idk`` batch when every example carries one."""
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention[b, :n] = 1
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
             "row_ids": torch.tensor([int(e.get("row_id", -1)) for e in examples], dtype=torch.long)}
    if all("idk" in e for e in examples):
        batch["idk"] = collate([e["idk"] for e in examples], pad_id)
    return batch


_collate = collate


def refusal_batch(dataset: QADataset, row_ids, refusals: Sequence[str], seed: int = 0) -> dict:
    """The nested ``idk`` batch for a forget batch: the questions of `row_ids` in `dataset`,
    each answered with ``pick_refusal(refusals, row_id, seed)``; row ids carried over."""
    rows = [int(r) for r in (row_ids.tolist() if torch.is_tensor(row_ids) else row_ids)]
    questions = [dataset.records[r][dataset.question_key] for r in rows]
    examples = encode_qa_many(dataset.tokenizer, dataset.template, questions,
                              [pick_refusal(refusals, r, seed) for r in rows], dataset.max_length)
    for e, r in zip(examples, rows):
        e["row_id"] = r
    return collate(examples, dataset.pad_id)


def make_loader(dataset, batch_size: int, shuffle: bool = False, seed: int = 0, collate=None,
                drop_last: bool = False, sampler=None) -> torch.utils.data.DataLoader:
    """A DataLoader over `dataset` (shuffled with its own generator seeded by `seed`); `collate`
    defaults to :func:`collate` with the dataset's pad id."""
    if collate is None:
        collate = functools.partial(_collate, pad_id=getattr(dataset, "pad_id", 0))
    generator = torch.Generator().manual_seed(int(seed)) if shuffle and sampler is None else None
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                       shuffle=shuffle if sampler is None else False, sampler=sampler,
                                       generator=generator, collate_fn=collate, drop_last=drop_last,
                                       num_workers=0)
