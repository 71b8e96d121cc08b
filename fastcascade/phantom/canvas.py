"""The canvas: the grid, the anatomy frame, and painting with priorities."""

from __future__ import annotations

import numpy as np


class _Canvas:
    def __init__(self, shape, spacing, rng):
        self.shape = shape
        self.spacing = spacing
        self.axes = [
            (np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)
        ]
        # Patient pose: a small in-plane rotation, a shift, and an anatomy scale.
        self.theta = float(np.deg2rad(np.clip(rng.normal(0.0, 2.5), -5.0, 5.0)))
        self.shift = np.clip(rng.normal(0.0, 1.0, 3), -2.0, 2.0) * [4.0, 3.0, 6.0]
        self.scale = np.clip(rng.normal(1.0, 0.03, 3), 0.94, 1.06)
        c, s = np.cos(self.theta), np.sin(self.theta)
        wx, wy = self.axes[0][:, None], self.axes[1][None, :]
        self.X = (((c * wx + s * wy) - self.shift[0]) / self.scale[0]).astype(np.float32)
        self.Y = (((-s * wx + c * wy) - self.shift[1]) / self.scale[1]).astype(np.float32)
        self.Z = ((self.axes[2] - self.shift[2]) / self.scale[2]).astype(np.float32)
        self.hu = np.full(shape, -1000.0, np.float32)
        self.kind = np.zeros(shape, np.uint8)
        self.labels = np.zeros(shape, np.uint8)

    def region(self, lo, hi):
        """Index slices covering the anatomy-frame box [lo, hi] (mm), or None if outside."""
        c, s = np.cos(self.theta), np.sin(self.theta)
        corners = np.array([[x, y] for x in (lo[0], hi[0]) for y in (lo[1], hi[1])])
        ax = corners[:, 0] * self.scale[0] + self.shift[0]
        ay = corners[:, 1] * self.scale[1] + self.shift[1]
        wx, wy = c * ax - s * ay, s * ax + c * ay
        wz = np.array([lo[2], hi[2]]) * self.scale[2] + self.shift[2]
        out = []
        for w, n, sp in zip((wx, wy, wz), self.shape, self.spacing, strict=True):
            i0 = int(np.floor(w.min() / sp + (n - 1) / 2.0)) - 1
            i1 = int(np.ceil(w.max() / sp + (n - 1) / 2.0)) + 2
            i0, i1 = max(i0, 0), min(i1, n)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)

    def coords(self, reg):
        x = self.X[reg[0], reg[1]][:, :, None]
        y = self.Y[reg[0], reg[1]][:, :, None]
        z = self.Z[reg[2]][None, None, :]
        return x, y, z

    def paint(self, reg, mask, kind, hu, allowed, label=0):
        k = self.kind[reg]
        lut = np.zeros(256, bool)
        lut[list(allowed)] = True
        m = mask & lut[k]
        k[m] = kind
        h = self.hu[reg]
        h[m] = hu[m] if isinstance(hu, np.ndarray) else hu
        self.labels[reg][m] = label
        return m
