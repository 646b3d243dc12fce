"""Which examples each optimiser step uses, and its learning rate: a function of (seed, step) only.

Step k of a run uses positions ``[k·B, (k+1)·B)`` of a stream made of one seeded permutation of
the training (forget) set per epoch, B = ``train.batch_size`` (the effective batch over
micro-batches *and* workers). Worker r of W takes the r-th contiguous slice of B/W examples and
cuts it into micro-batches (:func:`worker_share`), so 1 worker and 2 workers see the same
effective batches. Unlearning pairs each forget example with a retain example drawn (seeded by
step) from the retain split.

Learning rate: linear warm-up over ``warmup_epochs`` then linear decay. Step s (0-based) uses
``lr·(s+1)/W`` for s < W and ``lr·(T−s)/(T−W)`` after (never 0 during the run, unlike HF's
schedule whose first step has lr 0). T = ⌊epochs·N⌋ // B steps (TOFU's count: forget05,
5 epochs, B=16 → 62).
"""

from __future__ import annotations

import torch

from rayunlearn.config import TrainConfig


class Schedule:
    """Which examples each optimiser step uses: a function of (seed, step) only."""

    def __init__(self, n: int, train: TrainConfig, n_paired: int = 0):
        self.n, self.B, self.seed = n, train.batch_size, train.seed
        self.n_paired = n_paired
        self.total_steps = train.max_steps or max(1, int(train.epochs * n) // self.B)
        self.warmup_steps = min(int(round(train.warmup_epochs * n / self.B)), self.total_steps)
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        """The effective batch of step `step`: B indices into the training (forget) set."""
        out = []
        for pos in range(step * self.B, (step + 1) * self.B):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out

    def paired(self, step: int) -> list[int]:
        """B retain indices paired with step `step`'s examples (random, seeded by step)."""
        gen = torch.Generator().manual_seed(self.seed * 7_919 + 1_000_003 + step)
        if self.n_paired >= self.B:
            return torch.randperm(self.n_paired, generator=gen)[: self.B].tolist()
        return torch.randint(self.n_paired, (self.B,), generator=gen).tolist()

    def epoch(self, step_done: int) -> float:
        """Epochs completed after `step_done` optimiser steps."""
        return step_done * self.B / self.n

    def epoch_ended(self, step_done: int) -> bool:
        """Whether optimiser step `step_done` (1-based) crossed an epoch boundary or ended the run."""
        crossed = int(self.epoch(step_done) + 1e-9) > int(self.epoch(step_done - 1) + 1e-9)
        return crossed or step_done == self.total_steps

    def lr_factor(self, step: int) -> float:
        """Multiplier of the peak lr at (0-based) optimiser step `step`."""
        W, T = self.warmup_steps, self.total_steps
        if step < W:
            return (step + 1) / W
        return max(0.0, (T - step) / max(1, T - W))


def worker_share(items: list, rank: int, world: int, micro: int) -> list[list]:
    """This worker's contiguous slice of the effective batch, cut into micro-batches."""
    per = len(items) // world
    mine = items[rank * per:(rank + 1) * per]
    return [mine[i:i + micro] for i in range(0, len(mine), micro)]
