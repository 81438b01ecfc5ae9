"""Mixing data kinds by ratio: every global batch holds each kind in (rounded) proportion."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

import numpy as np

MIXTURE_STREAM = 11


class Mixture:
    """The kind of every slot of every global batch, a pure function of (seed, step).

    Each batch gets floor(ratio * batch_size) slots per kind; the leftover slots go to kinds
    drawn in proportion to their fractional parts, so long-run proportions are exact. Slots are
    shuffled so that micro-batches and processes all see every kind.
    """

    def __init__(self, ratios: Mapping[str, float], batch_size: int, seed: int = 0):
        self.ratios = {kind: float(r) for kind, r in ratios.items() if r > 0}
        if not self.ratios:
            raise ValueError("a data mixture needs at least one kind with a positive ratio")
        self.batch_size, self.seed = batch_size, seed

    def _rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, MIXTURE_STREAM, step])

    def kinds(self, step: int) -> list[str]:
        """Kinds of the slots of global batch `step`."""
        rng = self._rng(step)
        names = list(self.ratios)
        total = sum(self.ratios.values())
        quotas = np.array([self.ratios[n] / total * self.batch_size for n in names])
        counts = np.floor(quotas).astype(int)
        leftover = self.batch_size - int(counts.sum())
        if leftover:
            fractions = quotas - counts
            extra = rng.choice(len(names), size=leftover, replace=False, p=fractions / fractions.sum())
            counts[extra] += 1
        slots = [name for name, count in zip(names, counts) for _ in range(int(count))]
        return [slots[i] for i in rng.permutation(len(slots))]

    def slots(self, step: int) -> list[tuple[str, int]]:
        """(kind, example index within that kind's stream) of every slot of global batch `step`.

        Kind `k` owns indices [step * ceil(quota_k), ...), so each stream is read almost densely
        (which matters for finite files) and the index is still a pure function of the step.
        """
        total = sum(self.ratios.values())
        stride = {kind: math.ceil(r / total * self.batch_size) for kind, r in self.ratios.items()}
        seen: Counter[str] = Counter()
        assigned = []
        for kind in self.kinds(step):
            assigned.append((kind, step * stride[kind] + seen[kind]))
            seen[kind] += 1
        return assigned
