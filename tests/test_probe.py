"""Batched probing equals one-sequence-at-a-time float64 computations on a tiny random model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from rayunlearn.eval.probe import IGNORE, Probe, QAEncoder, generate_greedy, score_probes
from conftest import tiny_setup


@pytest.fixture(scope="module")
def setup64():
    model, tok, bench = tiny_setup(seed=3, dtype=torch.float64)
    enc = QAEncoder(tok, "plain", max_length=64, use_data_module=False)
    probes = []
    for name in ("forget01_perturbed", "retain_perturbed", "real_authors_perturbed"):
        for r in bench.splits[name][:4]:
            for a in [r["answer"], r.get("paraphrased_answer", r["answer"])] + r["perturbed_answer"]:
                ids, labels = enc.qa(r["question"], a)
                probes.append(Probe(ids, labels, extras=True))
    oracles = [oracle(model, p) for p in probes]
    return model, tok, enc, probes, oracles


def oracle(model, probe):
    """One sequence, no padding, full forward, float64 log-softmax."""
    ids = torch.tensor([probe.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()          # (T-1, V)
    lab = torch.tensor(probe.labels[1:])
    m = lab != IGNORE
    logp = torch.log_softmax(logits[m], -1)
    tok = logp.gather(-1, lab[m].unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    mu = (p * logp).sum(-1)
    sigma = ((p * (logp - mu[:, None]) ** 2).sum(-1)).sqrt()
    return tok.numpy(), (logits[m].argmax(-1) == lab[m]).numpy(), mu.numpy(), sigma.numpy()


def test_encoder_fallback_layout(setup64):
    _, tok, enc, _, _ = setup64
    prompt = enc.prompt("Where was Ana0 born ?")
    ids, labels = enc.qa("Where was Ana0 born ?", "Ana0 was born in Oslo .")
    assert ids[: len(prompt)] == prompt                         # prompt is an exact prefix
    assert labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id   # exactly one EOS, labelled
    assert ids.count(tok.eos_token_id) == 1


@pytest.mark.parametrize("head_split", [True, False])
def test_batched_scores_equal_one_at_a_time_float64(setup64, head_split):
    model, tok, enc, probes, oracles = setup64
    got = score_probes(model, probes, pad_id=enc.pad_id, batch_size=7, head_split=head_split)
    assert len(got) == len(probes)
    for p, s, o in zip(probes, got, oracles):
        tok_lp, correct, mu, sigma = o
        n = sum(l != IGNORE for l in p.labels[1:])
        assert s.num_tokens == n == tok_lp.size
        np.testing.assert_allclose(s.logps, tok_lp, rtol=0, atol=1e-9)
        assert s.nll_sum == pytest.approx(-tok_lp.sum(), abs=1e-6)
        assert s.avg_nll == pytest.approx(-tok_lp.mean(), abs=1e-6)
        np.testing.assert_array_equal(s.correct, correct)
        np.testing.assert_allclose(s.mu, mu, atol=1e-9)
        np.testing.assert_allclose(s.sigma, sigma, atol=1e-9)


def test_probes_sharing_a_prompt_are_packed_and_others_scored_alone(setup64):
    """An item's answers share one packed row (the prompt once), so the oracle test above covers
    packed rows; a probe that is no prompt + self-labelled answer is scored in a row of its own,
    in a batch of its own (one forward per batch), and matches its oracle too."""
    from rayunlearn.eval.probe import packs_supported, plan_packs

    model, tok, enc, probes, oracles = setup64
    packs, plan = plan_packs(probes, 7)
    assert packs_supported(model)
    assert max(len(pk.members) for pk in packs) >= 5                # original, paraphrase, >= 3 perturbed
    assert sum(pk.length for pk in packs) < 0.7 * sum(len(p.input_ids) for p in probes)
    assert sorted(i for pk in packs for i in pk.members) == list(range(len(probes)))
    odd = Probe(list(probes[0].input_ids), [IGNORE] * 3 + list(probes[0].input_ids[3:5]) +
                [IGNORE] * (len(probes[0].input_ids) - 5), extras=True)
    mixed = [odd] + probes[:9]
    packs, plan = plan_packs(mixed, 16)
    alone = [k for k, pk in enumerate(packs) if 0 in pk.members]
    assert [packs[k].prompt for k in alone] == [None] and plan[-1] == alone and len(plan) == 2
    got = score_probes(model, mixed, pad_id=enc.pad_id, batch_size=16)
    np.testing.assert_allclose(got[0].logps, oracle(model, odd)[0], rtol=0, atol=1e-9)
    for s, o in zip(got[1:], oracles[:9]):
        np.testing.assert_allclose(s.logps, o[0], rtol=0, atol=1e-9)
        np.testing.assert_allclose(s.sigma, o[3], atol=1e-9)


def test_float32_batched_close_to_float64_oracle(setup64):
    model, tok, enc, probes, oracles = setup64
    m32 = tiny_setup(seed=3)[0]                     # same weights in float32
    got = score_probes(m32, probes, pad_id=enc.pad_id, batch_size=8)
    for s, o in zip(got, oracles):
        assert s.avg_nll == pytest.approx(-o[0].mean(), abs=1e-5)


def greedy_oracle(model, prompt, eos, max_new):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_batched_greedy_generation_equals_unbatched_loop(setup64):
    model, tok, enc, _, _ = setup64
    from conftest import toy_benchmark

    bench = toy_benchmark(seed=3)
    qs = [r["question"] for name in ("forget01_perturbed", "retain_perturbed", "world_facts_perturbed")
          for r in bench.splits[name][:3]]
    prompts = [enc.prompt(q) for q in qs]
    assert len({len(p) for p in prompts}) > 1                   # left padding is exercised
    got = generate_greedy(model, prompts, pad_id=enc.pad_id, eos_id=enc.eos_id, max_new_tokens=6, batch_size=5)
    for p, g in zip(prompts, got):
        assert g == greedy_oracle(model, p, enc.eos_id, 6)
