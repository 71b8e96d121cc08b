"""Bladder, colon, small-bowel loops and mesenteric vessels (all unlabelled)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .painter import _Painter
from .tissue import _BOWEL, _CAVITY


class _Bowel(_Painter):
    """The bladder and the bowel loops, drawn as widened centre lines."""

    def bowel(self):
        hu, r, j = self.hu, self.rng, self.jit
        ok = {_CAVITY}
        # Bladder, low in the pelvis.
        bvol = r.uniform(80, 500) * 1000.0
        rb = np.array([1.0, 1.0, 0.8])
        k = (bvol / (4 / 3 * np.pi * np.prod(rb))) ** (1 / 3)
        brad = rb * k
        bc = np.array([j(4), 8 + j(4), -150 + brad[2] + self.pelvis_dz])
        reg, sd = self.ellipsoid(bc, brad, noise=(0.0, 1.5))
        if reg is not None:
            m = self.paint(reg, sd < 0, _BOWEL, hu["bowel_wall"], ok)
            self.cv.hu[reg][m & (sd < -2.5)] = hu["urine"]

        # Colon frame and small-bowel loops as centre lines, rasterised and widened by a
        # distance transform (one pass for all loops).
        colon = np.array(
            [
                [84, 25, -40],
                [104, 10, -10],
                [110, 6, 30],
                [100, 28, 60],
                [60, 72, 58],
                [0, 84, 48],
                [-60, 76, 62],
                [-98, 52, 120],
                [-112, 20, 90],
                [-116, 0, 40],
                [-110, 5, -20],
                [-80, 30, -60],
                [-30, 40, -82],
                [10, 18, -92],
                [2, -30, -104],
                [0, -70, -124],
                [0, -66, -170],
            ],
            np.float64,
        )
        colon += r.normal(0, 6, colon.shape)
        colon_r = np.clip(r.normal(24, 3, len(colon)), 15, 32)
        colon_r[-3:] = 15
        lines = [(colon, colon_r, 1)]
        # Small bowel: persistent random walks inside the colon frame.
        target = r.uniform(2000, 3500)  # mm of loop length
        centre = np.array([0, 35, 0.0])
        half = np.array([85, 45, 75.0])
        length = 0.0
        while length < target:
            p = centre + r.uniform(-0.8, 0.8, 3) * half
            d = r.normal(0, 1, 3)
            d /= np.linalg.norm(d)
            pts = [p]
            for _ in range(r.integers(10, 30)):
                d = d + r.normal(0, 0.45, 3)
                q = (pts[-1] - centre) / half
                if np.linalg.norm(q) > 1.0:
                    d -= q * 0.8
                d /= np.linalg.norm(d)
                pts.append(pts[-1] + 8.0 * d)
            pts = np.array(pts)
            rad = np.full(len(pts), float(np.clip(r.normal(10.5, 2.5), 5.5, 15)))
            lines.append((pts, rad, 2))
            length += 8.0 * (len(pts) - 1)
        # Mesenteric vessels fanning out from the root towards the loops (type 3).
        root = self.smv[2]
        loops = np.concatenate([p for p, _, t in lines if t == 2])
        for _ in range(24):
            end = loops[r.integers(len(loops))]
            mid = (root + end) / 2 + r.normal(0, 8, 3)
            lines.append((np.array([root, mid, end]), np.array([2.6, 2.0, 1.5]), 3))
        self.bowel_lines(lines)

    def bowel_lines(self, lines):
        """Widen centre lines ``(points (K, 3) mm, radii (K,), type)`` into bowel loops.

        Type 1 is colon (stool with gas), type 2 small bowel (fluid, some gas). All loops
        are rasterised as seed voxels and widened in one distance transform; each voxel
        takes the radius and content of its nearest seed.
        """
        cv, hu, r = self.cv, self.hu, self.rng
        step = 0.45 * min(cv.spacing)
        samples = []
        for pts, rad, typ in lines:
            # Per loop: gas level (fraction of the radius above the centre line) and the
            # HU of its content.
            gas = r.uniform(0.0, 1.1) if typ == 1 else r.uniform(0.3, 3.0)
            fluid = hu["bowel_fluid"] + r.normal(0.0, 8.0)
            seg = np.diff(pts, axis=0)
            n = np.maximum(np.ceil(np.linalg.norm(seg, axis=1) / step).astype(int), 1)
            t = np.concatenate([np.arange(k) / k for k in n])
            k = np.repeat(np.arange(len(seg)), n)
            q = pts[k] + t[:, None] * seg[k]
            rr = rad[k] + t * (rad[k + 1] - rad[k])
            info = np.column_stack(
                [rr, np.full_like(rr, typ), np.full_like(rr, gas), np.full_like(rr, fluid)]
            )
            samples.append((q, info))
        q = np.concatenate([a for a, _ in samples])
        info = np.concatenate([b for _, b in samples]).astype(np.float32)
        c, s_ = np.cos(cv.theta), np.sin(cv.theta)
        ax = q[:, 0] * cv.scale[0] + cv.shift[0]
        ay = q[:, 1] * cv.scale[1] + cv.shift[1]
        w = (c * ax - s_ * ay, s_ * ax + c * ay, q[:, 2] * cv.scale[2] + cv.shift[2])
        ii = np.stack(
            [
                np.rint(wk / sp + (nn - 1) / 2.0).astype(np.int64)
                for wk, sp, nn in zip(w, cv.spacing, cv.shape, strict=True)
            ]
        )
        inside = np.all((ii >= 0) & (ii < np.array(cv.shape)[:, None]), axis=0)
        if not inside.any():
            return
        ii, info = ii[:, inside], info[inside]
        flat = np.ravel_multi_index(tuple(ii), cv.shape)
        flat, first = np.unique(flat, return_index=True)
        info = info[first]
        # Distance transform on the box around the seeds only.
        idx = np.array(np.unravel_index(flat, cv.shape))
        pad = np.ceil(info[:, 0].max() / np.array(cv.spacing)).astype(int) + 2
        lo = np.maximum(idx.min(1) - pad, 0)
        hi = np.minimum(idx.max(1) + pad + 1, cv.shape)
        reg = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        box = tuple(hi - lo)
        seed_of = np.full(box, -1, np.int32)
        seed_of[tuple(idx - lo[:, None])] = np.arange(len(flat))
        dist, ind = ndi.distance_transform_edt(
            seed_of < 0, sampling=cv.spacing, return_indices=True
        )
        near = seed_of[ind[0], ind[1], ind[2]]
        rad = info[near, 0]
        sd = dist - rad
        m = cv.paint(reg, sd < 0, _BOWEL, hu["bowel_wall"], {_CAVITY})
        typ = info[near, 1]
        h = cv.hu[reg]
        h[m & (typ == 3)] = hu["vessel"]
        lumen = m & (sd < -2.5) & (typ != 3)
        small = lumen & (typ == 2)
        h[small] = info[near[small], 3]
        # Stool: faeces mottled with gas bubbles.
        colon = lumen & (typ == 1)
        mott = self.tex.standard_normal(box).astype(np.float32)
        mott = ndi.gaussian_filter(mott, 2.5 / np.array(cv.spacing))
        mott /= mott.std() + 1e-6
        stool = np.where(mott > 1.0, -850.0, -60.0 + 90.0 * mott)
        h[colon] = stool[colon]
        # Gas rises anteriorly (supine patient): above a level relative to the centre line.
        y = cv.Y[reg[0], reg[1]][:, :, None]
        yy = np.broadcast_to(y, box)
        yc = yy[ind[0], ind[1], ind[2]]
        gas = lumen & ((yy - yc) > info[near, 2] * rad)
        h[gas] = hu["air"]
