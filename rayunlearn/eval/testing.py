"""Small, deterministic stand-ins for tests and benchmarks: a word-level tokenizer, a tiny
random Llama and a toy TOFU-format benchmark (no hub, no files)."""

from __future__ import annotations

import random
from types import SimpleNamespace

_FIRST = ["Ana", "Bo", "Cyr", "Dee", "Eli", "Fay", "Gus", "Hal", "Ida", "Jon", "Kai", "Lu"]
_CITY = ["Oslo", "Lima", "Rome", "Kyiv", "Doha", "Baku", "Riga", "Bern", "Lome", "Apia"]
_GENRE = ["poetry", "horror", "satire", "fantasy", "romance", "drama", "mystery", "history"]
_PAR = ["was", "is", "born", "in", "the", "city", "of", "writes", "mostly", "works", "of", "genre"]


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
    """A whitespace word-level `PreTrainedTokenizerFast` over `words` (+ <unk>, <eos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")   # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0, hidden: int = 32, layers: int = 2, dtype=None):
    """A random tiny `LlamaForCausalLM` (eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, eos_token_id=1, pad_token_id=1, bos_token_id=None,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    if dtype is not None:
        model = model.to(dtype)
    return model


def tiny_setup(seed: int = 0, dtype=None):
    """(model, tokenizer, benchmark) for tests."""
    bench = toy_benchmark(seed=seed)
    tok = tiny_tokenizer(benchmark_words(bench))
    model = tiny_llama(len(tok), seed=seed, dtype=dtype)
    return model, tok, bench


def data_config(**kw):
    """A DataConfig for the toy benchmark (forget01, plain template)."""
    from rayunlearn.config import DataConfig

    return DataConfig(benchmark="toy", forget_split=kw.pop("forget_split", "forget01"),
                      template=kw.pop("template", "plain"), max_length=kw.pop("max_length", 64), **kw)
