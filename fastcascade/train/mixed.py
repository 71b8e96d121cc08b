"""A mix of training sources: each draw comes from one source, picked by weight.

``MixedSource({"phantom": p, "synth": s, "real": r}, {"phantom": 1, "synth": 2, "real":
1})`` picks a source per draw with its own ``torch.Generator`` (probability proportional
to its weight) and hands on that source's draw. Its ``state_dict`` holds its generator,
its counts and every source's own state, so a run resumes bit-identically; ``describe``
records the mix (names, weights, and what each source holds) as plain JSON.

>>> class Const:
...     def __init__(self, v): self.v = v
...     def draw(self): return self.v
>>> mix = MixedSource({"a": Const("a"), "b": Const("b")}, {"a": 1, "b": 3}, seed=0)
>>> sorted(set(mix.draw() for _ in range(20)))
['a', 'b']
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence

import torch

__all__ = ["MixedSource", "describe_source", "weighted_choice"]


def weighted_choice(
    generator: torch.Generator, weights: Sequence[float], *, check_only: bool = False
) -> int:
    """An index into ``weights`` (finite, >= 0, not all 0) with probability proportional
    to its weight, from one float64 uniform of ``generator`` (on its device).
    ``check_only``: validate the weights, draw nothing (returns -1)."""
    w = [float(x) for x in weights]
    if not w or not all(math.isfinite(x) and x >= 0 for x in w) or not sum(w) > 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    if check_only:
        return -1
    cumulative = list(itertools.accumulate(w))
    u = torch.rand((), generator=generator, device=generator.device, dtype=torch.float64)
    return min(bisect.bisect_right(cumulative, float(u) * cumulative[-1]), len(w) - 1)


def describe_source(source) -> dict:
    """``source.describe()``, or its class name for a source without one."""
    describe = getattr(source, "describe", None)
    return describe() if callable(describe) else {"kind": type(source).__name__}


class MixedSource:
    """Draws from ``sources`` (name -> source with ``draw()`` and ``state_dict`` /
    ``load_state_dict``), one picked per draw in proportion to ``weights`` (name ->
    weight > 0; default: equal), with a CPU generator seeded with ``seed``.

    ``counts``: draws so far per source.
    """

    def __init__(
        self,
        sources: Mapping[str, object],
        weights: Mapping[str, float] | None = None,
        seed: int = 0,
    ):
        if not sources:
            raise ValueError("MixedSource needs at least one source")
        self.sources = dict(sources)
        self.names = tuple(self.sources)
        weights = {n: 1.0 for n in self.names} if weights is None else dict(weights)
        if set(weights) != set(self.names):
            raise ValueError(
                f"weights must name the sources {list(self.names)}, got {list(weights)}"
            )
        self.weights = {n: float(weights[n]) for n in self.names}
        bad = {n: w for n, w in self.weights.items() if not (math.isfinite(w) and w > 0)}
        if bad:
            raise ValueError(f"source weights must be finite and > 0, got {bad}")
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.draws = 0
        self.counts = {n: 0 for n in self.names}

    def draw(self):
        k = weighted_choice(self.generator, [self.weights[n] for n in self.names])
        name = self.names[k]
        self.draws += 1
        self.counts[name] += 1
        return self.sources[name].draw()

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "draws": self.draws,
            "counts": dict(self.counts),
            "generator": self.generator.get_state(),
            "sources": {n: s.state_dict() for n, s in self.sources.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["sources"]) != set(self.names):
            raise ValueError(
                f"the saved mix has sources {sorted(state['sources'])}, this one "
                f"{sorted(self.names)}"
            )
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.counts = {n: int(state["counts"][n]) for n in self.names}
        self.generator.set_state(state["generator"])
        for n, s in self.sources.items():
            s.load_state_dict(state["sources"][n])

    def describe(self) -> dict:
        return {
            "kind": "mixed",
            "seed": self.seed,
            "weights": dict(self.weights),
            "sources": {n: describe_source(s) for n, s in self.sources.items()},
        }
