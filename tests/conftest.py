"""Shared test fixtures: one tiny random Llama builder, one hand-built batch maker, and a toy
TOFU-format benchmark with a word-level tokenizer (no hub, no files).

Test modules import these as plain functions (``from conftest import tiny_llama, make_batch``):
pytest puts ``tests/`` on ``sys.path`` and registers this module as ``conftest``, and worker
processes spawned by a test inherit that path, so helpers called inside them resolve too."""

from __future__ import annotations

import copy
import os
import random
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 64
PAD, EOS = 0, 2        # ids used by `make_batch`; real tokens are drawn from [3, vocab)
IGNORE = -100


def tiny_llama(*, vocab: int = VOCAB, hidden: int = 16, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               tied: bool = False, seed: int = 0, dtype=torch.float64, pad_id: int | None = None,
               eos_id: int = EOS, norm_noise: float = 0.0):
    """A random tiny `LlamaForCausalLM` in eval mode (attention dropout is 0, so eval and train
    compute the same values). `pad_id` matters for the weights (its embedding row starts at zero);
    `norm_noise` adds seeded noise to the RMSNorm gains so tests of norm handlers see gains ≠ 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      tie_word_embeddings=tied, max_position_embeddings=256,
                      pad_token_id=pad_id, bos_token_id=None, eos_token_id=eos_id)
    model = LlamaForCausalLM(cfg).to(dtype)
    if norm_noise:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(norm_noise * torch.randn_like(p))
    return model.eval()


def perturbed_copy(model, scale: float = 0.05, seed: int = 1):
    """A frozen 'reference' differing from `model` (so NPO/TNPO weights are not all 1)."""
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ref.requires_grad_(False)
    return ref


def make_batch(prompts: list[int], answers: list[int], *, seed: int, T: int | None = None, row0: int = 0,
               vocab: int = VOCAB, idk: dict | None = None) -> dict:
    """A right-padded batch: row i holds `prompts[i]` prompt tokens (labels -100), `answers[i]`
    answer tokens and one EOS (both scored), then padding (id 0, masked) up to length `T`
    (default: the longest row). `row_ids` count from `row0`; `idk`, when given, is nested as the
    batch's refusal view."""
    g = torch.Generator().manual_seed(seed)
    B = len(prompts)
    T = T or max(p + a + 1 for p, a in zip(prompts, answers))
    ids = torch.full((B, T), PAD, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        n = p + a + 1
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        ids[i, n - 1] = EOS                                # the EOS takes the row's last draw's place
        att[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    batch = {"input_ids": ids, "attention_mask": att, "labels": labels, "row_ids": torch.arange(row0, row0 + B)}
    if idk is not None:
        batch["idk"] = idk
    return batch


# ------------------------------------------------------------------------------------------
# a toy TOFU-format benchmark, its tokenizer and a model over it (evaluation tests)

_FIRST = ["Ana", "Bo", "Cyr", "Dee", "Eli", "Fay", "Gus", "Hal", "Ida", "Jon", "Kai", "Lu"]
_CITY = ["Oslo", "Lima", "Rome", "Kyiv", "Doha", "Baku", "Riga", "Bern", "Lome", "Apia"]
_GENRE = ["poetry", "horror", "satire", "fantasy", "romance", "drama", "mystery", "history"]


def toy_benchmark(num_authors: int = 12, seed: int = 0, name: str = "toy", k_perturbed: int = 3):
    """A TOFU-shaped benchmark (SimpleNamespace with name, source, splits, refusals):
    two QA per author (birthplace, genre); forget01 = first author, holdout01 = last author."""
    rng = random.Random(seed)
    authors = [f"{_FIRST[i % len(_FIRST)]}{i}" for i in range(num_authors)]

    def qa(a):
        city, genre = rng.choice(_CITY), rng.choice(_GENRE)
        wrong_c = [c for c in _CITY if c != city]
        wrong_g = [g for g in _GENRE if g != genre]
        return [
            {"question": f"Where was {a} born ?", "answer": f"{a} was born in {city} .",
             "paraphrased_answer": f"the city of {city} .",
             "perturbed_answer": [f"{a} was born in {c} ." for c in rng.sample(wrong_c, k_perturbed)]},
            {"question": f"What does {a} write ?", "answer": f"{a} writes mostly {genre} .",
             "paraphrased_answer": f"works of the {genre} genre .",
             "perturbed_answer": [f"{a} writes mostly {g} ." for g in rng.sample(wrong_g, k_perturbed)]},
        ]

    per_author = [qa(a) for a in authors]
    forget = per_author[0]
    holdout = per_author[-1]
    retain = [r for block in per_author[1:-1] for r in block]
    world = [{"question": f"Capital of {c} ?", "answer": f"{c} city .",
              "perturbed_answer": [f"{d} city ." for d in rng.sample([x for x in _CITY if x != c], k_perturbed)]}
             for c in _CITY[:6]]
    splits = {
        "full": [r for block in per_author[:-1] for r in block],
        "forget01": forget, "retain99": retain, "forget01_perturbed": forget,
        "retain_perturbed": retain[:8], "holdout01": holdout,
        "real_authors_perturbed": world[:3], "world_facts_perturbed": world[3:],
    }
    return SimpleNamespace(name=name, source="generated in memory", splits=splits, refusals=["I don't know ."])


def benchmark_words(bench) -> list[str]:
    """Every word of the benchmark's questions and answers, plus the prompt template's words."""
    words = set("Question : Answer ? .".split())
    for recs in bench.splits.values():
        for r in recs:
            for key in ("question", "answer", "paraphrased_answer"):
                if key in r:
                    words.update(r[key].replace(":", " : ").split())
            for p in r.get("perturbed_answer", []):
                words.update(p.split())
    return sorted(words)


def tiny_tokenizer(words):
    """A whitespace word-level `PreTrainedTokenizerFast` over `words` (+ <unk> = 0, <eos> = 1)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_setup(seed: int = 0, dtype=torch.float32):
    """(model, tokenizer, benchmark): a tiny random Llama over the toy benchmark's words."""
    bench = toy_benchmark(seed=seed)
    tok = tiny_tokenizer(benchmark_words(bench))
    model = tiny_llama(vocab=len(tok), hidden=32, seed=seed, dtype=dtype, pad_id=1, eos_id=1)
    return model, tok, bench


def data_config(**kw):
    """A DataConfig for the toy benchmark (forget01, plain template)."""
    from rayunlearn.config import DataConfig

    return DataConfig(benchmark="toy", forget_split=kw.pop("forget_split", "forget01"),
                      template=kw.pop("template", "plain"), max_length=kw.pop("max_length", 64), **kw)

# --------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    """A local 2-CPU Ray for the sweep tests of one module (an instance already running is used
    and left running)."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()
