"""Per-instance G-effects without per-example gradients: module hooks and contractions.

During the forward passes of the forget-side batches (forget and, for refusal terms, idk) a
forward hook keeps each tracked module's input a (detached: autograd keeps it anyway) and puts a
tensor hook on the module's output. During the *one* backward of the forget-side objective the
tensor hook receives the output gradient g and contracts it, example by example, with fixed
weight-shaped matrices V (the risk gradients ∇_W R):

- ``nn.Linear``     weight: Σ_t g_tᵀ V a_t    bias: Σ_t g_t·v
- ``nn.Embedding``  rows:   Σ_t g_t·V[token_t]
- RMSNorm gains:    Σ_t (g_t ⊙ x̂_t)·v,  x̂ = x·rsqrt(mean(x²)+eps) in float32, cast back to
  the input dtype exactly as ``LlamaRMSNorm`` does
- ``nn.LayerNorm``  gain: Σ_t (g_t ⊙ x̂_t)·v,  bias: Σ_t g_t·v

Each example's objective term only depends on its own positions (a causal LM attends within
a sequence), so this equals Σ_i ∇l_i·V exactly. Parameters owned by other module types are
reported by :meth:`InstanceTracker.uncovered`; the engine falls back to one autograd pass per
example for those tensors only.

Handlers are a registry keyed by a predicate on the module (:func:`register_handler`), so new
module types can be added without touching the engine.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# (predicate(module) -> bool, handler) in lookup order
_HANDLERS: list[tuple[Callable[[nn.Module], bool], "Handler"]] = []


class Handler:
    """Contract one module call's (input a, output gradient g) with V per example.

    ``params`` lists the parameter attribute names this handler accounts for;
    ``contract(module, a, g, V)`` returns a (B,) tensor, ``V`` mapping those attribute names to
    weight-shaped tensors (missing names = zero)."""

    params: tuple[str, ...] = ()

    def contract(self, module: nn.Module, a: torch.Tensor, g: torch.Tensor, V: dict,
                 acc: torch.dtype) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def register_handler(predicate: Callable[[nn.Module], bool], handler: Handler) -> None:
    """Add a per-module-type handler (checked before the built-in ones)."""
    _HANDLERS.insert(0, (predicate, handler))


def find_handler(module: nn.Module) -> "Handler | None":
    for pred, h in _HANDLERS:
        if pred(module):
            return h
    return None


def _flat(x: torch.Tensor, B: int, acc) -> torch.Tensor:
    return x.reshape(B, -1, x.shape[-1]).to(acc)          # (B, T, d)


class LinearHandler(Handler):
    params = ("weight", "bias")

    def contract(self, module, a, g, V, acc):
        B = g.shape[0]
        g3 = _flat(g, B, acc)                              # (B, T, out)
        out = torch.zeros(B, dtype=acc, device=g.device)
        W = V.get("weight")
        if W is not None:
            W = W.to(acc)                                  # (out, in)
            a3 = _flat(a, B, acc)                          # (B, T, in)
            if W.shape[1] <= W.shape[0]:
                out = out + ((g3 @ W) * a3).sum((1, 2))    # (B, T, in)·a
            else:
                out = out + ((a3 @ W.T) * g3).sum((1, 2))  # (B, T, out)·g
        b = V.get("bias")
        if b is not None:
            out = out + g3.sum(1) @ b.to(acc)
        return out


class EmbeddingHandler(Handler):
    params = ("weight",)

    def contract(self, module, a, g, V, acc):
        B = g.shape[0]
        W = V.get("weight")
        if W is None:
            return torch.zeros(B, dtype=acc, device=g.device)
        g3 = _flat(g, B, acc)                              # (B, T, d)
        rows = W[a.reshape(B, -1)].to(acc)                 # (B, T, d); V[pad] = 0 for padding_idx
        return (g3 * rows).sum((1, 2))


class RMSNormHandler(Handler):
    """LlamaRMSNorm-style: out = w * (x·rsqrt(mean(x²)+eps) in float32).to(input dtype).
    Gemma-style (1+w) gains have the same gradient x̂ ⊙ g."""

    params = ("weight",)

    def contract(self, module, a, g, V, acc):
        B = g.shape[0]
        W = V.get("weight")
        if W is None:
            return torch.zeros(B, dtype=acc, device=g.device)
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
        x = a.to(torch.float32)
        xhat = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(a.dtype)
        gx = _flat(g, B, acc) * _flat(xhat, B, acc)        # (B, T, d)
        return gx.sum(1) @ W.to(acc)


class LayerNormHandler(Handler):
    params = ("weight", "bias")

    def contract(self, module, a, g, V, acc):
        B = g.shape[0]
        g3 = _flat(g, B, acc)
        out = torch.zeros(B, dtype=acc, device=g.device)
        W = V.get("weight")
        if W is not None:
            xhat = torch.nn.functional.layer_norm(a.to(acc), module.normalized_shape, eps=module.eps)
            out = out + (g3 * _flat(xhat, B, acc)).sum(1) @ W.to(acc).reshape(-1)
        b = V.get("bias")
        if b is not None:
            out = out + g3.sum(1) @ b.to(acc).reshape(-1)
        return out


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.Tensor) \
        and (hasattr(m, "variance_epsilon") or hasattr(m, "eps"))


def _is_plain_embedding(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) and m.max_norm is None and not m.scale_grad_by_freq


_HANDLERS.extend([
    (lambda m: isinstance(m, nn.Linear), LinearHandler()),
    (_is_plain_embedding, EmbeddingHandler()),
    (lambda m: isinstance(m, nn.LayerNorm) and m.elementwise_affine, LayerNormHandler()),
    (_is_rmsnorm, RMSNormHandler()),
])


class InstanceTracker:
    """Installs the hooks on every handled module of `model` that owns a tracked parameter.

    Phases: ``capturing`` (set during the forget-side forwards: register output hooks) and
    ``armed`` (set during the forget-side objective backward: contract). ``V`` maps a key (e.g.
    "removal") to {id(parameter): weight-shaped tensor}; results accumulate per (key, label)."""

    def __init__(self, model: nn.Module, tracked: dict[int, str], acc_dtype: torch.dtype):
        self.acc = acc_dtype
        self.entries: list[tuple[nn.Module, Handler, dict[str, int]]] = []
        covered: set[int] = set()
        for module in model.modules():
            own = {n: id(p) for n, p in module._parameters.items() if p is not None and id(p) in tracked}
            if not own:
                continue
            h = find_handler(module)
            if h is None:
                continue
            own = {n: i for n, i in own.items() if n in h.params}
            if own:
                self.entries.append((module, h, own))
                covered.update(own.values())
        # a parameter owned by an unhandled module somewhere (e.g. tied into a custom head) is not
        # fully covered even if a handled module also owns it
        unhandled: set[int] = set()
        for module in model.modules():
            h = find_handler(module)
            for n, p in module._parameters.items():
                if p is not None and id(p) in tracked and (h is None or n not in h.params):
                    unhandled.add(id(p))
        self._uncovered = [i for i in tracked if i not in covered or i in unhandled]
        self._skip = set(self._uncovered)
        self.capturing = False
        self.armed = False
        self.label = ""
        self.V: dict[str, dict[int, torch.Tensor]] = {}
        self.results: dict[tuple[str, str], torch.Tensor] = {}
        self._module_handles = []
        self._tensor_handles = []

    def uncovered(self) -> list[int]:
        """ids of tracked parameters that need the per-example autograd fallback."""
        return list(self._uncovered)

    def install(self) -> None:
        for module, handler, own in self.entries:
            self._module_handles.append(module.register_forward_hook(self._make_forward_hook(handler, own)))

    def remove(self) -> None:
        for h in self._tensor_handles:
            h.remove()
        for h in self._module_handles:
            h.remove()
        self._tensor_handles.clear()
        self._module_handles.clear()
        self.V = {}

    def _make_forward_hook(self, handler: Handler, own: dict[str, int]):
        own = {n: i for n, i in own.items() if i not in self._skip}

        def forward_hook(module, inputs, output):
            if not (self.capturing or self.armed):   # armed: backward-time recomputation (checkpointing)
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad or not inputs:
                return None
            a = inputs[0].detach()

            def grad_hook(g):
                if self.armed and g is not None:
                    self._contract(module, handler, own, a, g)
                return None

            self._tensor_handles.append(output.register_hook(grad_hook))
            return None

        return forward_hook

    def _contract(self, module, handler, own, a, g) -> None:
        for key, Vmap in self.V.items():
            V = {n: Vmap[i] for n, i in own.items() if Vmap.get(i) is not None}
            if not V:
                continue
            val = handler.contract(module, a, g.detach(), V, self.acc)
            k = (key, self.label)
            self.results[k] = val if k not in self.results else self.results[k] + val
