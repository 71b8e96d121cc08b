"""The base of the anatomy's parts: the seed's body proportions and drawing helpers."""

from __future__ import annotations

import numpy as np

from .canvas import _Canvas
from .geometry import _ellipse_sd, _ellipsoid_sd, _profile, _tube_sd
from .tissue import _BONE, _BOWEL, _CAVITY


class _Painter:
    """Holds the canvas, the generators, the HU table and the fields; draws primitives.

    The anatomy's parts (``_Body``, ``_Viscera``, ``_Bowel``) derive from it and
    ``_Anatomy`` combines them.
    """

    def __init__(self, cv: _Canvas, rng, tex_rng, hu: dict, fields: dict):
        self.cv, self.rng, self.tex, self.hu, self.f = cv, rng, tex_rng, hu, fields
        r = rng
        # Cavity shape and fat: case A's body is ~350 x 280 mm with ~46% fat.
        self.body_w = float(np.clip(r.normal(1.0, 0.03), 0.92, 1.08))
        self.body_d = float(np.clip(r.normal(1.0, 0.04), 0.9, 1.1))
        self.fat = float(np.clip(r.normal(0.85, 0.25), 0.4, 1.5))

    # -- helpers -------------------------------------------------------------------------

    def jit(self, sd):
        """A normal variate of standard deviation ``sd``, clipped at two of them."""
        return float(np.clip(self.rng.normal(0.0, sd), -2.0 * sd, 2.0 * sd))

    def noisy(self, reg, f, amp_low, amp_mid):
        return f + amp_low * self.f["low"][reg] + amp_mid * self.f["mid"][reg]

    def zcyl(self, table, noise=(0.0, 0.0)):
        """Stack of ellipses ``(z, cx, cy, ax, ay[, angle_deg])``; returns (reg, sd)."""
        t = np.asarray(table, np.float64)
        lo = (t[:, 1] - t[:, 3] - t[:, 4]).min(), (t[:, 2] - t[:, 3] - t[:, 4]).min()
        hi = (t[:, 1] + t[:, 3] + t[:, 4]).max(), (t[:, 2] + t[:, 3] + t[:, 4]).max()
        reg = self.cv.region(
            (lo[0] - 10, lo[1] - 10, t[:, 0].min()), (hi[0] + 10, hi[1] + 10, t[:, 0].max())
        )
        if reg is None:
            return None, None
        x, y, z = self.cv.coords(reg)
        prof = _profile(z, t)
        cx, cy, ax, ay = prof[:4]
        u, v = x - cx, y - cy
        if len(prof) > 4:
            a = np.deg2rad(prof[4])
            u, v = u * np.cos(a) + v * np.sin(a), -u * np.sin(a) + v * np.cos(a)
        sd = _ellipse_sd(u, v, np.maximum(ax, 0.5), np.maximum(ay, 0.5))
        sd = np.where(np.isnan(ax), 1e3, sd)
        if noise != (0.0, 0.0):
            sd = self.noisy(reg, sd, *noise)
        return reg, sd

    def tube(self, pts, radii, squash=(1.0, 1.0, 1.0), noise=(0.0, 0.0)):
        pts = np.asarray(pts, np.float64)
        radii = np.asarray(radii, np.float64)
        m = radii.max() * max(squash) + 8
        reg = self.cv.region(pts.min(0) - m, pts.max(0) + m)
        if reg is None:
            return None, None
        sd = _tube_sd(self.cv.coords(reg), pts, radii, squash)
        if noise != (0.0, 0.0):
            sd = self.noisy(reg, sd, *noise)
        return reg, sd

    def ellipsoid(self, centre, radii, rot=None, noise=(0.0, 0.0)):
        m = max(radii) + 8
        c = np.asarray(centre, np.float64)
        reg = self.cv.region(c - m, c + m)
        if reg is None:
            return None, None
        sd = _ellipsoid_sd(self.cv.coords(reg), c, radii, rot)
        if noise != (0.0, 0.0):
            sd = self.noisy(reg, sd, *noise)
        return reg, sd

    def paint(self, reg, mask, kind, hu, allowed, label=0):
        if reg is None:
            return None
        return self.cv.paint(reg, mask, kind, hu, allowed, label)

    def bone(self, reg, sd, allowed, cortex=1.5):
        """Paint ``sd < 0`` as bone: marrow inside a cortex ``cortex`` mm thick.

        The cortex is thinner than a voxel, so each voxel gets the cortex's share of its
        own width (a one-dimensional partial volume along the distance).
        """
        if reg is None:
            return None
        h = float(np.mean(self.cv.spacing))
        frac = np.clip(
            (np.minimum(sd + h / 2, 0.0) - np.maximum(sd - h / 2, -cortex)) / h, 0.0, 1.0
        )
        lo, hi = self.hu["cancellous"], self.hu["cortical"]
        return self.cv.paint(reg, sd < 0, _BONE, lo + (hi - lo) * frac, allowed)

    def bowel_fill(self, reg, sd, air=0.0):
        if reg is None:
            return
        hu = self.hu
        m = self.paint(reg, sd < 0, _BOWEL, hu["bowel_wall"], {_CAVITY})
        lumen = m & (sd < -3)
        self.cv.hu[reg][lumen] = hu["bowel_fluid"]
        if air > 0 and lumen.any():
            _, y, _ = self.cv.coords(reg)
            yy = np.broadcast_to(y, m.shape)[lumen]
            level = np.percentile(yy, 100 * (1 - air))
            self.cv.hu[reg][lumen & (y > level)] = hu["air"]
