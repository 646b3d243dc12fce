"""`rayunlearn bench gpu`: the single-GPU check.

Runs in a few minutes on one GPU and prints timings and peak memory for
- bf16 unlearning steps (`npo+kl`) with and without live G-effects on a SmolLM2-135M-shaped
  model and a ~1B Llama-3.2-1B-shaped model, both configured from scratch (no hub);
- the same step under FSDP2 (`fully_shard`, one rank over NCCL) with sharded G-effects;
- DeepSpeed ZeRO-3 on one GPU when `deepspeed` is importable.
Architectures only: random weights give representative timings, not meaningful effects.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from rayunlearn.bench.common import print_table

SHAPES = {
    "tiny-shape": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                       max_position_embeddings=256),   # CPU smoke test of this script
    # published configs of the two models (weights are random here)
    "smollm2-135m-shape": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                               rope_theta=100000.0, rms_norm_eps=1e-5, max_position_embeddings=2048),
    "llama-3.2-1b-shape": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                               rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=2048),
}


def make_batch(vocab: int, batch: int, length: int, prompt: int, device, generator) -> dict:
    ids = torch.randint(3, vocab, (batch, length), generator=generator).to(device)
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "row_ids": torch.arange(batch, device=device)}


def build(shape: str, device, dtype=torch.bfloat16, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    return model


def unlearn_step(model, reference, method, forget, retain, optimizer, ctx):
    from rayunlearn.forward import token_view

    views = {"forget": token_view(model, forget, method.needs("forget"), reference=reference)}
    if "retain" in method.views_needed:
        views["retain"] = token_view(model, retain, method.needs("retain"), reference=reference)
    total, _, _ = method.loss(views, ctx)
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total.detach())


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, reps: int) -> float:
    fn()  # warm-up
    _sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - t0) / reps


def bench_shape(shape: str, device, reps: int, forget_bs: int = 16, retain_bs: int = 8, length: int = 128):
    from rayunlearn.effects import gradient_effects
    from rayunlearn.objectives import ObjectiveContext, parse_method

    method = parse_method("npo+kl")
    ctx = ObjectiveContext(seed=0)
    g = torch.Generator().manual_seed(0)
    model = build(shape, device)
    reference = build(shape, device)
    reference.load_state_dict(model.state_dict())
    reference.requires_grad_(False)
    vocab = model.config.vocab_size
    forget = make_batch(vocab, forget_bs, length, 32, device, g)
    retain = make_batch(vocab, retain_bs, length, 32, device, g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    plain = _timed(lambda: unlearn_step(model, reference, method, forget, retain, opt, ctx), reps)
    mem_plain = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    rows.append([shape, f"{n_params/1e6:.0f}M", "plain step (npo+kl)", f"{plain*1e3:.1f}", f"{mem_plain:.2f}", "1.00"])
    for per_instance in (False, True):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def step_with_effects():
            res = gradient_effects(model, method, forget, retain, reference=reference, per_instance=per_instance)
            unlearn_step(model, reference, method, forget, retain, opt, ctx)
            return res

        t = _timed(step_with_effects, reps)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        label = "step + G-effects" + (" + per-instance" if per_instance else " (per-layer)")
        rows.append([shape, f"{n_params/1e6:.0f}M", label, f"{t*1e3:.1f}", f"{mem:.2f}", f"{t/plain:.2f}"])
    res = gradient_effects(model, method, forget, retain, reference=reference, per_instance=True)
    print(f"  {shape}: removal e_u={res.removal.total:.4g} retention e_r={res.retention.total:.4g} "
          f"(sum of per-instance + retain-side terms matches: "
          f"{abs(sum(res.removal.by_instance) + sum(v for k, v in res.removal.by_term.items() if k.startswith(('kl', 'gd', 'rr'))) - res.removal.total) <= 1e-3 * abs(res.removal.total) + 1e-6})")
    del model, reference, opt
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


@contextlib.contextmanager
def _single_rank_group(backend: str):
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def bench_fsdp(shape: str, device, reps: int):
    from torch.distributed.fsdp import fully_shard

    from rayunlearn.effects import gradient_effects
    from rayunlearn.objectives import ObjectiveContext, parse_method

    method = parse_method("ga+gd")
    ctx = ObjectiveContext(seed=0)
    g = torch.Generator().manual_seed(1)
    with _single_rank_group("nccl" if device.type == "cuda" else "gloo"):
        model = build(shape, device)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        vocab = model.config.vocab_size
        forget = make_batch(vocab, 16, 128, 32, device, g)
        retain = make_batch(vocab, 8, 128, 32, device, g)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None
        t = _timed(lambda: unlearn_step(model, None, method, forget, retain, opt, ctx), reps)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        t_eff = _timed(lambda: gradient_effects(model, method, forget, retain, per_instance=False), reps)
        res = gradient_effects(model, method, forget, retain, per_instance=False)
        print(f"  FSDP2 {shape}: removal e_u={res.removal.total:.4g} retention e_r={res.retention.total:.4g}")
        del model, opt
    return [[shape, "FSDP2 (1 rank)", "step (ga+gd)", f"{t*1e3:.1f}", f"{mem:.2f}", ""],
            [shape, "FSDP2 (1 rank)", "G-effects (sharded dots)", f"{t_eff*1e3:.1f}", "", f"{t_eff/t:.2f}"]]


def bench_deepspeed(shape: str, device, reps: int):
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001
        return [[shape, "DeepSpeed ZeRO-3", f"not run: deepspeed not importable ({type(exc).__name__})", "", "", ""]]
    from rayunlearn.forward import token_view
    from rayunlearn.objectives import ObjectiveContext, parse_method
    from rayunlearn.train.strategies import deepspeed_config

    method = parse_method("ga+gd")
    ctx = ObjectiveContext(seed=0)
    g = torch.Generator().manual_seed(2)
    with _single_rank_group("nccl"):
        model = build(shape, device, dtype=torch.float32)
        ds_cfg = deepspeed_config(micro_batch_size=16, grad_accum=1, world_size=1, lr=1e-6, bf16=True, zero_stage=3)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        vocab = engine.module.config.vocab_size
        forget = make_batch(vocab, 16, 128, 32, device, g)
        retain = make_batch(vocab, 8, 128, 32, device, g)

        def step():
            views = {"forget": token_view(engine, forget, method.needs("forget")),
                     "retain": token_view(engine, retain, method.needs("retain"))}
            total, _, _ = method.loss(views, ctx)
            engine.backward(total)
            engine.step()

        torch.cuda.reset_peak_memory_stats()
        t = _timed(step, reps)
        mem = torch.cuda.max_memory_allocated() / 2**30
    return [[shape, "DeepSpeed ZeRO-3 (1 rank)", "step (ga+gd, bf16)", f"{t*1e3:.1f}", f"{mem:.2f}", ""]]


def main(model: str | None = None, quick: bool = False) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = 2 if quick else 5
    print(f"device: {torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")
    shapes = [model] if model in SHAPES else [s for s in SHAPES if s != "tiny-shape"]
    if device.type != "cuda" and model is None:
        shapes = ["tiny-shape"]
    rows = []
    for shape in shapes:
        t0 = time.perf_counter()
        rows += bench_shape(shape, device, reps)
        print(f"  {shape} done in {time.perf_counter() - t0:.0f} s")
    for fn in (bench_fsdp, bench_deepspeed):
        try:
            rows += fn(shapes[-1], device, reps)
        except Exception as exc:  # noqa: BLE001 - a check script reports and goes on
            rows.append([shapes[-1], fn.__name__, f"failed: {type(exc).__name__}: {str(exc)[:120]}", "", "", ""])
    print_table("GPU check (batch: forget 16 x 128 tokens, retain 8 x 128; bf16)",
                ["model", "params / setup", "what", "ms / step", "peak GiB", "x plain"], rows)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help=", ".join(SHAPES))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    main(model=args.model, quick=args.quick)
