"""Formatting: templates, the label anchor (labels = answer tokens + one EOS), batches, refusals."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from rayunlearn.data.formatting import (IGNORE, QADataset, collate, encode_prompt, encode_qa,  # noqa: E402
                                        get_template, make_loader, pad_token_id, pick_refusal,
                                        refusal_batch)
from rayunlearn.data.schema import DataError  # noqa: E402

CHAT = ("{% for m in messages %}<s><|{{ m['role'] }}|> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["Question: Where was Ada Lee born?\nAnswer: Ada Lee was born in Lazil.",
         "[INST] Who wrote The Song of Vim? [/INST] The Song of Vim was written by Orm Tal.",
         "<|user|> What is the capital of Eldor?\n<|assistant|> The capital of Eldor is Vim.",
         "I don't know.", "I have no idea."] * 4
Q, A = "Where was Ada Lee born?", "Ada Lee was born in Lazil."


def _wrap(tok, pad=True, chat=False):
    kw = {"pad_token": "<pad>"} if pad else {}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", **kw)
    if chat:
        hf.chat_template = CHAT
    return hf


def bpe_tokenizer(chat=True, append_eos=False):
    """Byte-level BPE (GPT-2 style spaces) adding BOS (and optionally EOS) around a text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    single = "<s> $A </s>" if append_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return _wrap(tok, chat=chat)


def metaspace_tokenizer():
    """SentencePiece-style: the first word gets a ▁ marker by itself."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always")
    tok.decoder = decoders.Metaspace(prepend_scheme="always")
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return _wrap(tok)


WORDS = ["<unk>", "<s>", "</s>", "Question", ":", "Answer", "Where", "was", "Ada", "Lee", "born", "?", "in",
         "Lazil", ".", "[", "INST", "]", "/", "I", "don", "'", "t", "know", "have", "no", "idea"]
EOS = WORDS.index("</s>")


def word_tokenizer():
    """A WordLevel tokenizer with known ids (every punctuation mark a token), no BOS
    post-processor and no pad token."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Punctuation("isolated")])
    return _wrap(tok, pad=False)


def _unmasked(enc):
    return [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE], \
        [l for l in enc["labels"] if l != IGNORE]


@pytest.mark.parametrize("template", ["plain", "llama2", "chat"])
@pytest.mark.parametrize("make", [bpe_tokenizer, metaspace_tokenizer, lambda: bpe_tokenizer(append_eos=True)])
def test_labels_are_exactly_the_answer_tokens_plus_one_eos(template, make):
    tok = make()
    if template == "chat" and not tok.chat_template:
        tok.chat_template = CHAT
    tpl = get_template(template, tok)
    enc = encode_qa(tok, template, Q, A, max_length=128)
    answer_ids = tok(tpl.answer_text(A), add_special_tokens=False)["input_ids"]
    inputs, labels = _unmasked(enc)
    assert labels == answer_ids + [tok.eos_token_id] == inputs
    prompt = encode_prompt(tok, template, Q)
    if template != "chat":   # = the tokenizer's own encoding with specials, minus a trailing EOS
        own = tok(tpl.prompt_text(Q))["input_ids"]
        assert own[: len(prompt)] == prompt and own[len(prompt):] in ([], [tok.eos_token_id])
    assert enc["input_ids"] == prompt + answer_ids + [tok.eos_token_id]
    assert enc["labels"][: len(prompt)] == [IGNORE] * len(prompt)
    assert enc["input_ids"].count(tok.eos_token_id) == 1          # no EOS inside the prompt
    assert enc["input_ids"][0] == tok.bos_token_id                # BOS from the tokenizer / template
    text = tok.decode(enc["input_ids"])
    expected = {"plain": f"<s>Question: {Q}\nAnswer: {A}</s>",
                "llama2": f"<s>[INST] {Q} [/INST] {A}</s>",
                "chat": f"<s><|user|> {Q}\n<|assistant|>{A}</s>"}[template]
    if make is metaspace_tokenizer:   # the ▁ decoder renders word starts as spaces
        assert text.replace(" ", "") == expected.replace(" ", "")
    else:
        assert text == expected


def test_space_handling_per_tokenizer_kind():
    assert get_template("plain", bpe_tokenizer()).answer_text(A) == " " + A
    assert get_template("llama2", bpe_tokenizer()).answer_text(A) == " " + A
    assert get_template("llama2", metaspace_tokenizer()).answer_text(A) == A
    assert get_template("chat", bpe_tokenizer()).answer_text(A) == A
    # byte-level BPE: the answer's first token carries the space (Ġ), as in a joint tokenization
    tok = bpe_tokenizer()
    first = tok.convert_ids_to_tokens(tok(" " + A, add_special_tokens=False)["input_ids"][0])
    assert first.startswith("\u0120")


def test_hand_computed_ids_with_a_word_tokenizer():
    tok = word_tokenizer()
    ids = {w: i for i, w in enumerate(WORDS)}
    enc = encode_qa(tok, "plain", Q, A, max_length=64)
    prompt = [ids[w] for w in ["Question", ":", "Where", "was", "Ada", "Lee", "born", "?", "Answer", ":"]]
    answer = [ids[w] for w in ["Ada", "Lee", "was", "born", "in", "Lazil", "."]]
    assert enc["input_ids"] == prompt + answer + [ids["</s>"]]
    assert enc["labels"] == [IGNORE] * 10 + answer + [ids["</s>"]]
    enc = encode_qa(tok, "llama2", Q, A, max_length=64)
    prompt = [ids[w] for w in ["[", "INST", "]", "Where", "was", "Ada", "Lee", "born", "?", "[", "/", "INST", "]"]]
    assert enc["input_ids"] == prompt + answer + [ids["</s>"]]
    assert enc["labels"] == [IGNORE] * 13 + answer + [ids["</s>"]]
    assert pad_token_id(tok) == ids["</s>"]        # no pad token: pad with EOS


def test_truncation_keeps_eos_and_errors():
    tok = word_tokenizer()
    enc = encode_qa(tok, "plain", Q, A, max_length=14)     # prompt 10 + 3 answer tokens + EOS
    assert len(enc["input_ids"]) == 14
    assert enc["labels"][10:] == [WORDS.index("Ada"), WORDS.index("Lee"), WORDS.index("was"), EOS]
    with pytest.raises(DataError, match="max_length=11"):
        encode_qa(tok, "plain", Q, A, max_length=11)
    with pytest.raises(DataError, match="max_length"):
        encode_prompt(tok, "plain", Q, max_length=11)
    with pytest.raises(DataError, match="chat needs a tokenizer with a chat template"):
        get_template("chat", word_tokenizer())
    with pytest.raises(DataError, match="unknown prompt template 'alpaca'"):
        get_template("alpaca", tok)


RECORDS = [{"question": "Where was Ada Lee born?", "answer": "Ada Lee was born in Lazil.",
            "perturbed_answer": ["Ada was born in Lee.", "Lee was born."]},
           {"question": "Where was Ada born?", "answer": "Lazil.", "perturbed_answer": ["Lee.", "Ada."]},
           {"question": "Ada?", "answer": "Ada Lee was born in Lazil . I don't know .",
            "perturbed_answer": ["no idea", "I know"]}]


def test_collate_pads_right_with_masks_and_row_ids():
    tok = word_tokenizer()                 # pad = eos
    ds = QADataset(RECORDS, tok, "plain", max_length=64)
    assert [ds[i]["row_id"] for i in range(3)] == [0, 1, 2]
    batch = collate([ds[2], ds[1]], pad_id=ds.pad_id)
    lens = [len(ds[2]["input_ids"]), len(ds[1]["input_ids"])]
    assert lens == [6 + 13 + 1, 9 + 2 + 1]
    assert batch["input_ids"].shape == (2, 20) and batch["input_ids"].dtype == torch.long
    assert batch["row_ids"].tolist() == [2, 1]
    assert batch["attention_mask"].tolist() == [[1] * 20, [1] * 12 + [0] * 8]
    assert batch["input_ids"][1].tolist() == ds[1]["input_ids"] + [EOS] * 8
    assert batch["labels"][1].tolist() == ds[1]["labels"] + [IGNORE] * 8
    assert batch["labels"][1, :12].tolist() == [IGNORE] * 9 + [WORDS.index("Lazil"), WORDS.index("."), EOS]
    assert "idk" not in batch
    # a tokenizer with its own pad token pads with it
    bpe = bpe_tokenizer()
    ds2 = QADataset(RECORDS, bpe, "plain", max_length=64)
    b2 = collate([ds2[0], ds2[1]], pad_id=ds2.pad_id)
    assert ds2.pad_id == bpe.pad_token_id == 0
    n1 = len(ds2[1]["input_ids"])
    assert (b2["input_ids"][1, n1:] == 0).all() and (b2["labels"][1, n1:] == IGNORE).all()
    # perturbed answers through answer_key/answer_index
    ds3 = QADataset(RECORDS, tok, "plain", max_length=64, answer_key="perturbed_answer", answer_index=1)
    assert _unmasked(ds3[1])[1] == [WORDS.index("Ada"), WORDS.index("."), EOS]


def test_make_loader_deterministic_shuffle():
    tok = word_tokenizer()
    ds = QADataset(RECORDS * 7, tok, "plain", max_length=64)

    def order(seed):
        return [r for b in make_loader(ds, 4, shuffle=True, seed=seed) for r in b["row_ids"].tolist()]

    assert order(3) == order(3) and sorted(order(3)) == list(range(21))
    assert order(3) != order(4)
    plain = [r for b in make_loader(ds, 5) for r in b["row_ids"].tolist()]
    assert plain == list(range(21))


def test_refusal_pairing():
    tok = word_tokenizer()
    refusals = ["I don't know .", "I have no idea .", "no idea ."]
    ds = QADataset(RECORDS * 4, tok, "plain", max_length=64, refusals=refusals, refusal_seed=5)
    batch = collate([ds[i] for i in (7, 2, 9)], ds.pad_id)
    idk = batch["idk"]
    assert idk["row_ids"].tolist() == [7, 2, 9]
    for b, row in enumerate([7, 2, 9]):
        refusal = pick_refusal(refusals, row, 5)
        want = tok(" " + refusal, add_special_tokens=False)["input_ids"] + [EOS]
        got = [l for l in idk["labels"][b].tolist() if l != IGNORE]
        assert got == want
        # same question as the forget item: identical prompt tokens
        n_prompt = sum(1 for l in batch["labels"][b].tolist() if l == IGNORE) - \
            (batch["attention_mask"][b] == 0).sum().item()
        assert idk["input_ids"][b, :n_prompt].tolist() == batch["input_ids"][b, :n_prompt].tolist()
    # the standalone helper builds the same nested batch
    rb = refusal_batch(ds, batch["row_ids"], refusals, seed=5)
    for k in ("input_ids", "attention_mask", "labels", "row_ids"):
        assert torch.equal(rb[k], idk[k])
    # deterministic in (seed, row), varied over rows, seed-dependent
    picks = [pick_refusal(refusals, r, 5) for r in range(40)]
    assert picks == [pick_refusal(refusals, r, 5) for r in range(40)] and len(set(picks)) == 3
    assert picks != [pick_refusal(refusals, r, 6) for r in range(40)]
    with pytest.raises(DataError, match="refusal list is empty"):
        pick_refusal([], 0)
