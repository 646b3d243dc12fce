"""Training examples from benchmark records: encoding, collating, refusal answers, split names.

The training loop, the G-effect probe (``effects/recorder.py:build_probe``) and the tests all
build their batches here, so a forget row is tokenised the same way wherever it is scored. This
module sits below training and the G-effect library (it imports neither).
"""

from __future__ import annotations

from rayunlearn.data.formatting import QADataset, collate, pick_refusal
from rayunlearn.data.schema import RETAIN_OF, SPLIT_NAMES, DataError

# the training sets of the finetuning stages (members of schema.SPLIT_NAMES)
WORLD_SPLIT = "world"     # the base model's world knowledge
FULL_SPLIT = "full"       # every author (the target model's training set)
assert WORLD_SPLIT in SPLIT_NAMES and FULL_SPLIT in SPLIT_NAMES


def retain_split(forget_split: str) -> str:
    """The retain split that complements `forget_split` (forget05 -> retain95)."""
    try:
        return RETAIN_OF[forget_split]
    except KeyError:
        raise DataError(f"data.forget_split={forget_split!r} has no retain split; use one of "
                        f"{', '.join(RETAIN_OF)}") from None


def encode_records(records: list[dict], tokenizer, data_cfg) -> list[dict]:
    """Encode QA records with the data package's formatting (template, max_length); each
    example gets ``row_id`` = its index in `records`."""
    ds = QADataset(records, tokenizer, data_cfg.template, data_cfg.max_length)
    return [ds[i] for i in range(len(ds))]


def collate_examples(examples: list[dict], pad_id: int) -> dict:
    """Pad encoded examples into one batch of tensors (``formatting.collate``)."""
    return collate(examples, pad_id)


def refusal_records(records: list[dict], refusals: list[str], seed: int) -> list[dict]:
    """The forget questions with a refusal answer each (``formatting.pick_refusal``: row i's
    refusal is fixed by (seed, i), so reference log-probs of the refusal view can be cached)."""
    return [{"question": rec["question"], "answer": pick_refusal(refusals, i, seed)}
            for i, rec in enumerate(records)]


def to_device(batch: dict, device) -> dict:
    """A collated batch (possibly with nested batches, e.g. ``"idk"``) moved to `device`."""
    return {k: (to_device(v, device) if isinstance(v, dict) else v.to(device)) for k, v in batch.items()}
