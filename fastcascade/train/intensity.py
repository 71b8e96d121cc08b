"""Intensity augmentation: the window's level and width, a gamma and noise, per sample.

Scanners, reconstruction kernels and contrast timing move a tissue's HU by some tens of HU
and change the noise; the synthetic and re-painted sources vary intensities per
structure, but a real or phantom volume would otherwise always reach the network with the
same values. ``IntensityAugmenter`` perturbs every training sample, after the spatial
augmentation, and windows it for the network in the same step:

1. HU offset and gain about the stage's window centre ``c``:
   ``hu <- c + gain (hu - c) + offset`` (the same as shifting the window by ``-offset``
   and scaling its width by ``1 / gain``);
2. white Gaussian noise of ``noise_std`` HU;
3. the stage's window, ``apply_window`` onto [-1, 1];
4. a gamma on the windowed intensities: ``x <- 2 ((x + 1) / 2) ** gamma - 1``, which
   keeps -1 and 1 where they are.

Per sample: ``offset`` uniform in ``[-max_offset_hu, max_offset_hu]``, ``gain`` uniform in
``[1 - max_gain, 1 + max_gain]``, ``gamma`` log-uniform in ``gamma_range``, ``noise_std``
uniform in ``noise_std_hu``; with probability ``1 - p`` the sample is only windowed.
Every random number comes from the caller's ``torch.Generator`` (on its device), the same
count whatever the ``p`` coin says: 5 numbers, then one standard normal per voxel, so a
run resumes bit-identically from the generator's state. Labels are never an input.

Defaults: offsets of +-20 HU and gains of +-10% cover calibration and kernel differences
between scanners (water is specified to +-4 HU, but soft-tissue means move more between
kernels and kVp); noise up to 15 HU adds to the scan's own (CT noise is ~10-30 HU);
gamma in [0.8, 1.25] reshapes contrast inside the window without moving its ends.

>>> aug = IntensityAugmenter()
>>> x = aug(torch.full((4, 4, 4), 40.0), (-200.0, 400.0), torch.Generator().manual_seed(0))
>>> x.shape, x.dtype, bool(x.abs().max() <= 1)
(torch.Size([4, 4, 4]), torch.float32, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..ops.intensity import apply_window

__all__ = ["IntensityAugmenter", "IntensityParams"]


@dataclass(frozen=True)
class IntensityParams:
    """One draw: ``apply`` (the ``p`` coin), ``offset_hu``, ``gain``, ``gamma`` and
    ``noise_std_hu`` (see the module docstring)."""

    apply: bool
    offset_hu: float
    gain: float
    gamma: float
    noise_std_hu: float


def _bound(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _pair(name: str, value, positive: bool) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be (low, high), got {value!r}") from None
    ok = math.isfinite(lo) and math.isfinite(hi) and lo <= hi and (lo > 0 if positive else lo >= 0)
    if not ok:
        least = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite with {least} low <= high, got {value!r}")
    return lo, hi


class IntensityAugmenter:
    """Random HU offset and gain, noise, window and gamma (see the module docstring).

    ``max_offset_hu`` (HU), ``max_gain`` (relative, < 1), ``gamma_range`` ``(low,
    high)`` with ``low > 0``, ``noise_std_hu`` ``(low, high)`` HU, ``p`` the probability
    of perturbing at all.
    """

    def __init__(
        self,
        max_offset_hu: float = 20.0,
        max_gain: float = 0.1,
        gamma_range: Sequence[float] = (0.8, 1.25),
        noise_std_hu: Sequence[float] = (0.0, 15.0),
        p: float = 1.0,
    ):
        self.max_offset_hu = _bound("max_offset_hu", max_offset_hu)
        self.max_gain = _bound("max_gain", max_gain)
        if not self.max_gain < 1:
            raise ValueError(f"max_gain must be < 1, got {max_gain!r}")
        self.gamma_range = _pair("gamma_range", gamma_range, positive=True)
        self.noise_std_hu = _pair("noise_std_hu", noise_std_hu, positive=False)
        self.p = _bound("p", p)
        if self.p > 1:
            raise ValueError(f"p must be a probability in [0, 1], got {p!r}")

    def describe(self) -> dict:
        """The bounds, as plain JSON (what a training record keeps)."""
        return {
            "kind": "intensity",
            "max_offset_hu": self.max_offset_hu,
            "max_gain": self.max_gain,
            "gamma_range": list(self.gamma_range),
            "noise_std_hu": list(self.noise_std_hu),
            "p": self.p,
        }

    def __repr__(self) -> str:
        return (
            f"IntensityAugmenter(max_offset_hu={self.max_offset_hu:g}, "
            f"max_gain={self.max_gain:g}, gamma_range={self.gamma_range}, "
            f"noise_std_hu={self.noise_std_hu}, p={self.p:g})"
        )

    def sample_params(self, generator: torch.Generator) -> IntensityParams:
        """Draw one sample's parameters: 5 uniforms from ``generator``, always."""
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator)}")
        coin, u_off, u_gain, u_gamma, u_noise = torch.rand(
            5, generator=generator, device=generator.device, dtype=torch.float64
        ).tolist()
        g_lo, g_hi = (math.log(g) for g in self.gamma_range)
        n_lo, n_hi = self.noise_std_hu
        return IntensityParams(
            apply=coin < self.p,
            offset_hu=(2.0 * u_off - 1.0) * self.max_offset_hu,
            gain=1.0 + (2.0 * u_gain - 1.0) * self.max_gain,
            gamma=math.exp(g_lo + u_gamma * (g_hi - g_lo)),
            noise_std_hu=n_lo + u_noise * (n_hi - n_lo),
        )

    def __call__(
        self, image_hu: torch.Tensor, window: Sequence[float], generator: torch.Generator
    ) -> torch.Tensor:
        """``image_hu`` (any shape, HU) perturbed and windowed: float32 in [-1, 1] on the
        image's device. Draws the parameters, then one standard normal per voxel on the
        generator's device."""
        params = self.sample_params(generator)
        noise = torch.randn(image_hu.shape, generator=generator, device=generator.device)
        return self.apply(image_hu, window, params, noise.to(image_hu.device))

    @staticmethod
    def apply(
        image_hu: torch.Tensor,
        window: Sequence[float],
        params: IntensityParams,
        noise: torch.Tensor,
    ) -> torch.Tensor:
        """Steps 1-4 with given parameters and a standard-normal ``noise`` field of the
        image's shape."""
        if not params.apply:
            return apply_window(image_hu, window)
        lo, hi = float(window[0]), float(window[1])
        centre = 0.5 * (lo + hi)
        hu = image_hu.float()
        hu = centre + params.gain * (hu - centre) + params.offset_hu
        hu = hu + params.noise_std_hu * noise
        x = apply_window(hu, (lo, hi))
        if params.gamma != 1.0:
            x = 2.0 * ((x + 1.0) * 0.5).pow(params.gamma) - 1.0
        return x
