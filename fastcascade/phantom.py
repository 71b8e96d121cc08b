"""Synthetic abdominal CT phantom: a labelled CT volume generated from a seed.

There is one real labelled abdominal CT available to the project (case A, a non-contrast
scan from T11 to the proximal femur, 122 x 101 x 112 voxels of 3 mm). The phantom fills
the gap for training and testing: it draws an abdomen whose organ positions, sizes and
intensities follow case A's measurements, and surrounds the organs with what a network
could confuse with them: skin, subcutaneous and visceral fat, the abdominal wall, psoas,
quadratus lumborum, paraspinal and gluteal muscles, vertebrae with discs and spinal canal,
ribs and costal cartilage, sacrum, iliac wings, acetabula and femoral heads, lung bases
and diaphragm, colon with stool and air, small-bowel loops, duodenum, bladder, unlabelled
vessels (iliac, renal, mesenteric) and a patient table below the body.

Geometry. The volume is indexed ``(x, y, z)`` in canonical RAS (axis 0 towards the
patient's right, axis 1 anterior, axis 2 superior); spacings are millimetres in that
order. The anatomy is defined in millimetres and centred in the field of view
``shape * spacing``, so any grid (isotropic or not) shows the same patient; the default
grid equals case A's. Each seed varies body size and fat, organ positions, sizes,
orientations and shapes (smooth random fields added to implicit surfaces), bowel
content, bladder filling and the tissue intensities by a few HU.

Labels are ids of ``fastcascade.config.CLASS_NAMES``; every unlabelled structure
(bowel, bladder, muscles, bones, iliac and renal vessels, ...) is background, as in
case A's mapping ``fastcascade.config.CASE_A_TO_CLASSES``.

Intensities (HU, before partial-volume blur and noise). Each seed shifts every soft
tissue (|HU| < 300) by a normal offset of 4 HU standard deviation, and every small-bowel
loop's fluid by 8 HU:

=============================  ============  =====================
tissue                         ``"none"``    ``"portal_venous"``
=============================  ============  =====================
air (outside, bowel gas)       -1000         -1000
lung base                      -850          -850
fat (subcutaneous, visceral)   -100          -100
skin                           20            25
muscle (psoas, wall, crura)    48            60
muscle (paraspinal, gluteal)   28            40
liver                          50            110
spleen                         36            120
kidney parenchyma              24            170
renal sinus (in the label)     -60           -40
pancreas; its fatty lobules    30; -80       95; -80
stomach wall; content          40; 15        90; 15
gallbladder bile               8             8
aorta; its calcified plaques   42; 500       160; 500
inferior vena cava             42            130
portal/splenic, liver veins    42            160
other vessels                  40            150
adrenal glands                 25            25
bowel wall; fluid              35; 15        80; 15
colon stool (mottled)          -60 +- 90     -60 +- 90
gas pockets in the stool       -850          -850
bladder urine                  8             8
intervertebral disc            90            90
bone marrow; cortex            120; 800      120; 800
vertebral arch; rib            330; 330      330; 330
costal cartilage               110           110
spinal canal                   15            15
table                          -150          -150
=============================  ============  =====================

Noise: a partial-volume blur (Gaussian, 1 mm scanner PSF plus the voxel footprint) and
mildly correlated Gaussian noise of 12 HU standard deviation at 3 mm voxels (growing as
the fourth root of the voxel-volume ratio on finer grids).

Example::

    >>> from fastcascade.phantom import make_phantom
    >>> ph = make_phantom(seed=3)
    >>> ph.image.shape, ph.image.dtype, ph.labels.dtype
    ((122, 101, 112), dtype('float32'), dtype('uint8'))
    >>> ct, seg = ph.to_nifti()
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from .config import CLASS_NAMES

__all__ = ["Phantom", "make_phantom", "CONTRASTS"]

CONTRASTS = ("none", "portal_venous")

_ID = {name: i for i, name in enumerate(CLASS_NAMES)}

# Tissue kinds: which structure may be painted over which (see _Canvas.paint).
# _RETRO is the perirenal fat, which the liver, spleen and bowel may not enter.
_AIR, _TABLE, _SUBCUT, _WALL, _CAVITY, _BONE, _MUSCLE, _LUNG, _ORGAN, _BOWEL, _VESSEL, _RETRO = (
    range(12)
)

_HU = {
    "none": {
        "air": -1000.0,
        "lung": -850.0,
        "fat": -100.0,
        "skin": 20.0,
        "muscle": 48.0,
        "muscle_fatty": 28.0,
        "liver": 50.0,
        "spleen": 36.0,
        "kidney": 24.0,
        "renal_sinus": -60.0,
        "pancreas": 30.0,
        "stomach_wall": 40.0,
        "stomach_content": 15.0,
        "bile": 8.0,
        "aorta": 42.0,
        "ivc": 42.0,
        "portal": 42.0,
        "vessel": 40.0,
        "bowel_wall": 35.0,
        "bowel_fluid": 15.0,
        "urine": 8.0,
        "disc": 90.0,
        "cancellous": 120.0,
        "cortical": 800.0,
        "posterior_elements": 330.0,
        "rib": 330.0,
        "cartilage": 110.0,
        "csf": 15.0,
        "adrenal": 25.0,
        "table": -150.0,
    },
}
_HU["portal_venous"] = dict(
    _HU["none"],
    skin=25.0,
    muscle=60.0,
    muscle_fatty=40.0,
    liver=110.0,
    spleen=120.0,
    kidney=170.0,
    renal_sinus=-40.0,
    pancreas=95.0,
    stomach_wall=90.0,
    aorta=160.0,
    ivc=130.0,
    portal=160.0,
    vessel=150.0,
    bowel_wall=80.0,
)


@dataclass
class Phantom:
    """One synthetic CT with its labels.

    ``image``: float32 HU, shape ``(X, Y, Z)`` in canonical RAS. ``labels``: uint8 ids of
    ``CLASS_NAMES``, same shape. ``spacing``: voxel size in mm ``(x, y, z)``. ``affine``:
    4 x 4 float64 voxel-to-RAS-mm matrix, ``diag(spacing)`` with the field of view's
    centre at the origin.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray

    def to_nifti(self) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """The CT (int16 HU, unit scaling) and the labels (uint8) as NIfTI images.

        Both carry ``affine`` as sform and qform (code 1, scanner) and millimetre units.

        >>> ct, seg = make_phantom(shape=(40, 40, 40), seed=0).to_nifti()
        >>> ct.get_data_dtype(), seg.get_data_dtype()
        (dtype('int16'), dtype('uint8'))
        """
        ct = np.clip(np.rint(self.image), -32768, 32767).astype(np.int16)
        out = []
        for data in (ct, self.labels.astype(np.uint8)):
            img = nib.Nifti1Image(data, self.affine)
            img.header.set_data_dtype(data.dtype)
            img.header.set_slope_inter(1.0, 0.0)
            img.header.set_xyzt_units("mm", "sec")
            img.set_sform(self.affine, code=1)
            img.set_qform(self.affine, code=1)
            out.append(img)
        return out[0], out[1]


# ---------------------------------------------------------------------------------------
# Smooth random fields, defined in millimetres so that every grid sees the same field.

_FIELD_HALF_MM = 400.0  # the fields cover +-400 mm around the field of view's centre


def _bspline_weights(coords: np.ndarray, step: float, n: int) -> np.ndarray:
    """(len(coords), n) cubic B-spline interpolation weights of nodes every ``step`` mm."""
    t = (coords + _FIELD_HALF_MM) / step + 1.0
    i = np.floor(t).astype(np.int64)
    f = (t - i).astype(np.float64)
    w = (
        (1 - f) ** 3 / 6,
        (3 * f**3 - 6 * f**2 + 4) / 6,
        (-3 * f**3 + 3 * f**2 + 3 * f + 1) / 6,
        f**3 / 6,
    )
    out = np.zeros((len(coords), n), np.float32)
    rows = np.arange(len(coords))
    for k in range(4):
        np.add.at(out, (rows, np.clip(i - 1 + k, 0, n - 1)), w[k])
    return out


def _smooth_field(rng: np.random.Generator, axes_mm, step: float) -> np.ndarray:
    """A smooth Gaussian random field of unit standard deviation, correlation ~``step`` mm.

    The node values are drawn on a fixed grid (independent of the voxel grid), so the
    same seed gives the same field on every grid.
    """
    n = int(np.ceil(2 * _FIELD_HALF_MM / step)) + 3
    nodes = rng.standard_normal((n, n, n), dtype=np.float32)
    wx, wy, wz = (_bspline_weights(a, step, n) for a in axes_mm)
    out = np.tensordot(wx, nodes, (1, 0))
    out = np.tensordot(out, wy, (1, 1)).transpose(0, 2, 1)
    out = np.tensordot(out, wz, (2, 1))
    # A 3D cubic B-spline of unit-variance nodes has a standard deviation of ~0.33.
    return (out / 0.33).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Implicit shapes. Each returns an approximate signed distance in mm (negative inside).


def _ellipse_sd(u, v, a, b):
    q2 = (u / a) ** 2 + (v / b) ** 2
    h = np.sqrt(((u / a**2) ** 2 + (v / b**2) ** 2) / np.maximum(q2, 1e-12))
    return (np.sqrt(q2) - 1.0) / np.maximum(h, 1e-6)


def _ellipsoid_sd(p, centre, radii, rot=None):
    """p: (X, Y, Z) broadcastable arrays; rot: 3x3 matrix whose columns are local axes."""
    d = [p[i] - centre[i] for i in range(3)]
    if rot is None:
        loc = d
    else:
        loc = [d[0] * rot[0, k] + d[1] * rot[1, k] + d[2] * rot[2, k] for k in range(3)]
    q2 = sum((loc[k] / radii[k]) ** 2 for k in range(3))
    h2 = sum((loc[k] / radii[k] ** 2) ** 2 for k in range(3))
    h = np.sqrt(h2 / np.maximum(q2, 1e-12))
    return (np.sqrt(q2) - 1.0) / np.maximum(h, 1e-6)


def _tube_sd(p, pts, radii, squash=(1.0, 1.0, 1.0)):
    """Union of cone frusta along a polyline ``pts`` (K, 3) with radii (K,) in mm.

    ``squash`` scales the distance per axis (e.g. 0.7 on y makes the tube 30% thinner
    antero-posteriorly).
    """
    best = None
    for k in range(len(pts) - 1):
        a, b = pts[k], pts[k + 1]
        ab = b - a
        dx, dy, dz = p[0] - a[0], p[1] - a[1], p[2] - a[2]
        t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / float(ab @ ab), 0.0, 1.0)
        ex = (dx - t * ab[0]) / squash[0]
        ey = (dy - t * ab[1]) / squash[1]
        ez = (dz - t * ab[2]) / squash[2]
        d = np.sqrt(ex * ex + ey * ey + ez * ez) - (radii[k] + t * (radii[k + 1] - radii[k]))
        best = d if best is None else np.minimum(best, d)
    return best


def _superellipse_rho(u, v, a, b):
    """Normalised radius (1 on the outline) of a body-like outline, flatter at the back.

    An ellipse in front (v >= 0) and a superellipse of exponent 3 behind.
    """
    u2 = (u / a) ** 2
    v2 = (v / b) ** 2
    front = np.sqrt(u2 + v2)
    back = np.cbrt(u2 * np.sqrt(u2) + v2 * np.sqrt(v2))
    return np.where(v >= 0, front, back)


def _rot(ax_deg: float, ay_deg: float, az_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad([ax_deg, ay_deg, az_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    # Spin about the local z axis first, then tilt: column 2 is the tilted long axis.
    return rx @ ry @ rz


def _f(rows) -> np.ndarray:
    """A table of numbers (profiles, polylines) as float64."""
    return np.array(rows, np.float64)


def _profile(z, table):
    """Interpolate rows ``(z, p1, p2, ...)`` of ``table`` at ``z``; NaN outside its range."""
    table = np.asarray(table, np.float64)
    order = np.argsort(table[:, 0])
    table = table[order]
    return [
        np.interp(z, table[:, 0], table[:, k], left=np.nan, right=np.nan).astype(np.float32)
        for k in range(1, table.shape[1])
    ]


# ---------------------------------------------------------------------------------------
# The canvas: the grid, the anatomy frame, and painting with priorities.


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


# ---------------------------------------------------------------------------------------
# The generator.


def make_phantom(
    shape: tuple[int, int, int] = (122, 101, 112),
    spacing: tuple[float, float, float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    contrast: str = "none",
    noise: bool = True,
) -> Phantom:
    """Draw one synthetic abdominal CT and its labels.

    Args:
        shape: grid size ``(X, Y, Z)`` in voxels; the default is case A's.
        spacing: voxel size in mm ``(x, y, z)``; any positive values (anisotropic too).
        seed: the random seed (``numpy.random.default_rng(seed)``); the same seed gives
            the same phantom, and the same anatomy on every grid.
        contrast: ``"none"`` (like case A) or ``"portal_venous"`` (see the module's HU
            table).
        noise: add partial-volume blur and CT noise; ``False`` gives the piecewise
            constant tissue map (still with tissue texture).

    Returns:
        A ``Phantom`` with ``image`` float32 HU and ``labels`` uint8 of ``shape``.

    Example::

        >>> ph = make_phantom(shape=(61, 51, 56), spacing=(6.0, 6.0, 6.0), seed=1)
        >>> int(ph.labels.max()) <= 10
        True
    """
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive voxel counts (x, y, z), got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive millimetre sizes, got {spacing}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")

    rng = np.random.default_rng(int(seed))
    offsets = np.clip(rng.normal(0.0, 4.0, len(_HU[contrast])), -8.0, 8.0)
    hu = {
        k: v + (float(o) if abs(v) < 300 else 0.0)
        for (k, v), o in zip(_HU[contrast].items(), offsets, strict=True)
    }
    cv = _Canvas(shape, spacing, rng)
    fields = {
        "low": _smooth_field(rng, cv.axes, 60.0),
        "mid": _smooth_field(rng, cv.axes, 25.0),
    }
    # Draws whose size depends on the grid come from a second generator, so that the
    # geometry (drawn from ``rng`` in a fixed order) is the same on every grid.
    tex_rng = np.random.default_rng([int(seed), 1])
    _Anatomy(cv, rng, tex_rng, hu, fields).build()
    image = _finish(cv, hu, tex_rng, noise)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2.0 * s for n, s in zip(shape, spacing, strict=True)]
    return Phantom(image=image, labels=cv.labels, spacing=spacing, affine=affine)


class _Anatomy:
    """Paints one patient onto a canvas, outside in: body, bones, muscles, organs, bowel."""

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

    # -- the patient ---------------------------------------------------------------------

    def build(self):
        self.body()
        self.table()
        self.spine()
        self.pelvis()
        self.ribs()
        self.muscles()
        self.spleen_shape()
        self.lungs()
        self.vessels()
        self.organs()
        self.bowel()

    def body(self):
        cv = self.cv
        # The abdominal cavity per level (z, half-width, anterior and posterior extent),
        # measured on case A; the wall and the seed's fat are added outside it.
        rows = _f(
            [
                [-900, 150, 70, -118],
                [-166, 152, 70, -118],
                [-118, 150, 65, -118],
                [-70, 146, 75, -118],
                [-22, 145, 95, -117],
                [26, 147, 108, -116],
                [74, 148, 110, -116],
                [122, 150, 110, -116],
                [170, 148, 104, -118],
                [900, 144, 98, -120],
            ]
        )
        rows[:, 1] *= self.body_w
        rows[:, 2:] *= self.body_d
        z = cv.Z[None, None, :]
        a, ya, yp = _profile(z, rows)
        # Subcutaneous fat is thinner over the rib cage than at the waist.
        fz = np.interp(z, [60, 130], [1.0, 0.6]).astype(np.float32) * self.fat
        t_lat, t_ant, t_post = 14.0 * fz, 20.0 * fz, 20.0 * fz
        m_lat, m_ant, m_post = 12.0 + self.jit(1.5), 10.0 + self.jit(1.5), 8.0
        x, y = cv.X[:, :, None], cv.Y[:, :, None]

        def rho(extra_lat, extra_ant, extra_post):
            lo, hi = yp - extra_post, ya + extra_ant
            cy = (lo + hi) / 2
            return _superellipse_rho(x, y - cy, a + extra_lat, (hi - lo) / 2), cy

        wobble = 0.012 * self.f["low"]
        rho_body, _ = rho(m_lat + t_lat, m_ant + t_ant, m_post + t_post)
        rho_body = rho_body + wobble
        rho_wall, _ = rho(m_lat, m_ant, m_post)
        rho_cav, cy_cav = rho(0.0, 0.0, 0.0)
        body = rho_body < 1.0
        skin = body & (rho_body > 1.0 - 2.5 / (a + m_lat + t_lat))
        self.rho_cav, self.cav_centre_y = rho_cav, cy_cav
        self.y_post = float(np.nanmin(yp - m_post - t_post))
        full = (slice(None),) * 3
        cv.paint(full, body, _SUBCUT, self.hu["fat"], {_AIR})
        cv.paint(full, skin, _SUBCUT, self.hu["skin"], {_SUBCUT})
        # No wall muscle behind the spine: the paraspinal muscles lie under the fat there.
        back = (y < cy_cav) & (np.abs(x) < 0.5 * (cy_cav - y))
        cv.paint(full, body & (rho_wall < 1.0) & ~back, _WALL, self.hu["muscle"], {_SUBCUT})
        cv.paint(full, body & (rho_cav < 1.0), _CAVITY, self.hu["fat"], {_WALL})
        # Linea alba: a fat seam in the anterior wall at the midline.
        alba = (np.abs(x) < 4) & (y > cy_cav) & (rho_cav >= 1.0)
        cv.paint(full, alba, _WALL, self.hu["fat"], {_WALL})

    def table(self):
        cv = self.cv
        y0 = self.y_post - 14.0 - abs(self.jit(6))
        x = cv.X
        yt = y0 - 25.0 + 0.0011 * x**2
        band = (cv.Y > yt - 4.0) & (cv.Y < yt) & (np.abs(x) < 230)
        band = np.broadcast_to(band[:, :, None], cv.shape)
        cv.paint((slice(None),) * 3, band, _TABLE, self.hu["table"], {_AIR})

    # -- skeleton ------------------------------------------------------------------------

    def canal_y(self, z):
        zs = [-160, -100, -40, -22, -4, 14, 40, 68, 94, 122, 148, 166, 230]
        ys = [-104, -95, -81, -61, -49, -44, -44, -48, -56, -63, -70, -74, -82]
        return np.interp(z, zs, ys) + self.spine_dy

    def spine(self):
        cv, hu = self.cv, self.hu
        self.spine_dy = self.jit(4)
        bone_ok = {_SUBCUT, _WALL, _CAVITY}
        # Vertebral levels: (centre z, lateral and AP semi-axes of the body, TP length).
        period = 34.0 * (1 + self.jit(0.03))
        levels = []
        z = -15.0 + self.jit(5)  # L5
        lat = [25, 25, 24, 23, 22, 20, 19, 18, 17]
        tp = [40, 44, 46, 42, 34, 26, 28, 28, 28]
        for i in range(9):  # L5 up to T10
            levels.append((z, lat[i], lat[i] * 0.72, tp[i], i >= 5))
            z += period if i < 5 else period * 0.85
        self.levels = levels
        # Spinal canal and its content, continuous.
        reg = cv.region((-20, -130, -60), (20, 0, 260))
        if reg is not None:
            x, y, zz = cv.coords(reg)
            yc = self.canal_y(zz).astype(np.float32)
            canal = _ellipse_sd(x, y - yc, 10.0, 8.5) < 0
            self.canal = (reg, canal)
        for zc, a, b, tpl, thoracic in levels:
            reg = cv.region((-60, -160, zc - 30), (60, 20, zc + 30))
            if reg is None:
                continue
            x, y, zz = cv.coords(reg)
            yc = self.canal_y(zz).astype(np.float32)
            h = period / 2 - 3.5
            yb = yc + 9.5 + b
            inplane = _ellipse_sd(x, y - yb, a, b)
            body = np.maximum(inplane, np.abs(zz - zc) - h)
            disc = (inplane < 0) & (np.abs(zz - zc) - h >= 0) & (np.abs(zz - zc) < period / 2 + 0.5)
            # Disc above each body (the next body paints its own).
            self.paint(reg, disc & (zz > zc), _BONE, hu["disc"], bone_ok)
            if zc < self.levels[0][0] + 1:
                self.paint(reg, disc & (zz < zc), _BONE, hu["disc"], bone_ok)
            self.bone(reg, body, bone_ok)
            # Posterior arch, pedicles, spinous and transverse processes.
            dz = zz - zc
            ring = (_ellipse_sd(x, y - yc + 2, 17.0, 15.0) < 0) & (y < yc + 4)
            ped = (np.abs(x) > 7) & (np.abs(x) < 15) & (y > yc - 2) & (y < yb)
            sp_len = 30 if thoracic else 34
            spin = (
                (np.abs(x) < 4)
                & (y < yc - 8)
                & (y > yc - 8 - sp_len)
                & (np.abs(dz + 4 + 0.25 * (yc - y)) < 9)
            )
            tpm = (
                (np.abs(x) > 8)
                & (np.abs(x) < 8 + tpl)
                & (np.abs(y - yc - 3 + (0.3 * np.abs(x) if thoracic else 0)) < 4)
            )
            arch = (ring | ped) & (np.abs(dz) < 10)
            procs = spin | (tpm & (np.abs(dz) < 4.5))
            m = (arch | procs) & (_ellipse_sd(x, y - yc, 10.0, 8.5) >= 0)
            self.paint(reg, m, _BONE, hu["posterior_elements"], bone_ok)
        reg, canal = self.canal
        self.paint(reg, canal, _MUSCLE, hu["csf"], {_CAVITY, _WALL, _SUBCUT, _BONE})
        # Sacrum: a plate tilting back, with a cortex.
        s1 = levels[0][0] - period
        tab = [
            [s1 + 14, 0, -40, 25, 16],
            [s1 - 4, 0, -48, 52, 19],
            [s1 - 30, 0, -63, 48, 16],
            [s1 - 55, 0, -78, 38, 12],
            [s1 - 80, 0, -91, 24, 9],
            [s1 - 100, 0, -99, 10, 6],
        ]
        tab = _f(tab)
        tab[:, 2] += self.spine_dy
        reg, sd = self.zcyl(tab)
        self.bone(reg, sd, bone_ok)

    def pelvis(self):
        cv, hu = self.cv, self.hu
        bone_ok = {_SUBCUT, _WALL, _CAVITY}
        dz = self.jit(5)
        self.pelvis_dz = dz
        for side in (-1, 1):
            # Iliac wing: part of an elliptic shell centred in front of the sacrum, from
            # the sacroiliac joint round to the anterior superior iliac spine.
            tab = _f(
                [
                    [10, 10, 30, 122, 118, 7, 70],
                    [-20, 0, 30, 135, 128, 6, 46],
                    [-50, 0, 28, 132, 124, 6, 44],
                    [-75, 10, 20, 104, 100, 8, 46],
                    [-98, 30, 4, 58, 58, 12, 52],
                ]
            )
            tab[:, 0] += dz
            reg = cv.region((-170, -130, -110 + dz), (170, 60, 20 + dz))
            if reg is None:
                continue
            x, y, z = cv.coords(reg)
            cx, cy, ax, ay, t, xmin = _profile(z, tab)
            u = side * x - cx
            sd = _ellipse_sd(u, y - cy, ax, ay)
            quad = (y < cy - 12) & (side * x > xmin)
            self.bone(reg, np.where(quad, np.abs(sd) - t / 2, 1e3), bone_ok)
            # Iliacus: fills the iliac fossa inside the wing.
            fossa = quad & (sd < -t / 2) & (sd > -t / 2 - 22) & (y > -60)
            self.paint(reg, fossa, _MUSCLE, hu["muscle"], {_CAVITY})
            # Gluteus medius and minimus, lateral to and behind the wing.
            tab = _f(
                [
                    [-135, 128, -30, 12, 20, -35],
                    [-112, 134, -35, 20, 32, -35],
                    [-76, 124, -36, 22, 34, -40],
                    [-40, 114, -43, 20, 32, -45],
                    [-14, 104, -52, 14, 24, -50],
                    [2, 100, -54, 6, 10, -50],
                ]
            )
            tab[:, 0] += dz
            tab[:, 1] *= side
            tab[:, 5] *= side
            reg_g, sd_g = self.zcyl(tab, noise=(1.5, 1.5))
            self.paint(reg_g, sd_g < 0, _MUSCLE, hu["muscle_fatty"], {_CAVITY, _WALL})
            # Femoral head, neck, greater trochanter, shaft.
            hc = np.array([side * 88, -22, -136 + dz])
            reg_h, sd_h = self.ellipsoid(hc, (23, 23, 23))
            self.bone(reg_h, sd_h, bone_ok)
            troch = np.array([side * 128, -34, -166 + dz])
            reg_n, sd_n = self.tube([hc, troch, troch + [side * -6, 2, -90]], [15, 19, 15])
            self.bone(reg_n, sd_n, bone_ok)
            # Acetabulum and ilium body.
            if reg_h is not None:
                x, y, z = cv.coords(reg_h)
                cup = (side * (x - hc[0]) < 6) & (z > hc[2] - 18)
                self.bone(reg_h, np.where(cup, np.abs(sd_h - 6.5) - 4.5, 1e3), bone_ok)
            reg_b, sd_b = self.tube(
                [[side * 60, -6, -98 + dz], [side * 78, -20, -118 + dz]], [14, 16]
            )
            self.bone(reg_b, sd_b, bone_ok)
            # Pubic ramus to the symphysis, ischium below and behind.
            reg_p, sd_p = self.tube(
                [[side * 76, 8, -142 + dz], [side * 40, 30, -158 + dz], [side * 6, 38, -168 + dz]],
                [10, 8, 8],
            )
            self.bone(reg_p, sd_p, bone_ok)
            reg_i, sd_i = self.tube(
                [[side * 82, -48, -140 + dz], [side * 70, -58, -200 + dz]], [13, 14]
            )
            self.bone(reg_i, sd_i, bone_ok)
            # Gluteus maximus, behind the pelvis.
            tab = _f(
                [
                    [-240, side * 90, -86, 55, 20],
                    [-170, side * 90, -88, 58, 22],
                    [-120, side * 98, -86, 62, 26],
                    [-80, side * 96, -86, 48, 22],
                    [-45, side * 86, -90, 30, 14],
                    [-25, side * 76, -94, 10, 6],
                ]
            )
            tab[:, 0] += dz
            reg_g, sd_g = self.zcyl(tab, noise=(2.0, 1.5))
            self.paint(reg_g, sd_g < 0, _MUSCLE, hu["muscle_fatty"], {_CAVITY, _WALL})
            # Obturator internus lines the pelvic side wall.
            tab = _f(
                [
                    [-175, side * 62, -18, 9, 26],
                    [-140, side * 64, -14, 10, 30],
                    [-112, side * 62, -10, 5, 14],
                ]
            )
            tab[:, 0] += dz
            reg_o, sd_o = self.zcyl(tab)
            self.paint(reg_o, sd_o < 0, _MUSCLE, hu["muscle"], {_CAVITY})

    def ribs(self):
        cv, hu = self.cv, self.hu
        dz = self.jit(5)
        dzi = [self.jit(2) for _ in range(7)]
        reg = cv.region((-200, -170, 20), (200, 170, 300))
        if reg is None:
            return
        x, y, z = cv.coords(reg)
        rho = self.rho_cav[reg]
        yc = self.cav_centre_y[:, :, reg[2]]
        band = (rho > 0.975) & (rho < 1.022)
        # Only the thin band around the cavity can hold ribs: work on its voxels.
        idx = np.nonzero(band)
        x = np.broadcast_to(x, band.shape)[idx]
        y = np.broadcast_to(y, band.shape)[idx]
        yc = np.broadcast_to(yc, band.shape)[idx]
        z = np.broadcast_to(z, band.shape)[idx]
        # Angle from the posterior midline (0) to the anterior midline (pi), per side.
        alpha = np.arctan2(np.abs(x), -(y - yc))
        # Ribs 12 (lowest, short) up to 7: (z at the spine, how far round, drop to the end).
        ribs = [
            (150, 1.1, 45),
            (178, 1.7, 85),
            (205, 2.3, 105),
            (230, 2.6, 115),
            (255, 2.8, 120),
            (280, 2.95, 125),
            (305, 3.0, 130),
        ]
        mask = np.zeros(alpha.shape, bool)
        cart = np.zeros(alpha.shape, bool)
        for (z0, amax, drop), dzr in zip(ribs, dzi, strict=True):
            # Nearly level behind, steeply down at the side (a smoothstep in the angle).
            ramp = np.clip((alpha - 0.6) / 1.5, 0.0, 1.0)
            zr = z0 + dz + dzr - drop * ramp * ramp * (3 - 2 * ramp)
            on = (np.abs(z - zr) < 4.5) & (alpha > 0.25) & (alpha < amax)
            mask |= on & (alpha < amax - 0.45 * (amax > 2.0))
            cart |= on & (alpha >= amax - 0.45) & (amax > 2.0)
        for m, value in ((mask, hu["rib"]), (cart, hu["cartilage"])):
            full = np.zeros(band.shape, bool)
            full[tuple(i[m] for i in idx)] = True
            self.paint(reg, full, _BONE, value, {_WALL, _CAVITY, _SUBCUT})

    def muscles(self):
        hu = self.hu
        sdy = self.spine_dy
        dz = self.pelvis_dz
        for side in (-1, 1):
            s = 1 + self.jit(0.08)
            # Psoas (joins the iliacus in the pelvis).
            tab = _f(
                [
                    [118, 22, -46, 4, 4],
                    [98, 27, -38, 9, 11],
                    [70, 33, -29, 12, 14],
                    [40, 38, -23, 14, 16],
                    [10, 44, -19, 17, 18],
                    [-15, 54, -18, 21, 19],
                    [-45, 66, -10, 22, 20],
                    [-75, 76, 2, 20, 18],
                    [-105, 84, 22, 16, 14],
                    [-135, 88, 26, 14, 12],
                    [-240, 92, 12, 12, 10],
                ]
            )
            tab[:, 1] *= side
            tab[:, 2] += sdy
            tab[:, 3:] *= s
            tab[tab[:, 0] < -20, 0] += dz
            reg, sd = self.zcyl(tab, noise=(1.5, 1.0))
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle"], {_CAVITY})
            # Quadratus lumborum: lateral and behind the psoas.
            tab = _f(
                [
                    [120, 48, -66, 6, 5],
                    [90, 58, -60, 15, 9],
                    [40, 64, -56, 19, 10],
                    [0, 66, -60, 16, 9],
                    [-25, 60, -70, 6, 5],
                ]
            )
            tab[:, 1] *= side
            tab[:, 2] += sdy
            reg, sd = self.zcyl(tab, noise=(1.0, 1.0))
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle"] - 5, {_CAVITY})
            # Paraspinal muscles (erector spinae, multifidus).
            tab = _f(
                [
                    [-70, 16, -108, 8, 5],
                    [-40, 22, -100, 16, 10],
                    [0, 32, -84, 25, 19],
                    [30, 37, -78, 29, 22],
                    [70, 39, -84, 31, 21],
                    [110, 42, -92, 32, 20],
                    [150, 40, -101, 30, 16],
                    [240, 38, -104, 28, 15],
                ]
            )
            tab[:, 1] *= side
            tab[:, 2] += sdy
            tab[:, 3:] *= 1 + self.jit(0.06)
            reg, sd = self.zcyl(tab, noise=(1.5, 1.0))
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle_fatty"], {_CAVITY, _WALL})

    def spleen_shape(self):
        """The spleen: a crescent against the left posterolateral wall (not painted yet).

        It is drawn before the lungs so that the costophrenic recess and the diaphragm
        wrap round it instead of cutting into it.
        """
        j = self.jit
        ss = 1 + j(0.06)
        sdz = j(5)
        tab = _f(
            [
                [72, -128, -25, 5, 4, 110],
                [88, -126, -28, 35, 12, 100],
                [110, -122, -30, 48, 17, 105],
                [130, -115, -40, 55, 22, 120],
                [150, -102, -45, 60, 24, 135],
                [172, -95, -45, 52, 22, 140],
                [188, -90, -45, 30, 14, 140],
                [196, -88, -45, 6, 4, 140],
            ]
        )
        tab[:, 0] = 130 + (tab[:, 0] - 130) * ss + sdz
        tab[:, 3:5] *= ss * 1.03
        tab[:, 1] += j(5)
        tab[:, 2] += j(5) + self.spine_dy
        tab[:, 5] += j(8)
        self.spleen = self.zcyl(tab, noise=(2.0, 2.0))

    def lungs(self):
        cv, hu = self.cv, self.hu
        dz = self.jit(6)
        reg = cv.region((-220, -170, 100), (220, 170, 300))
        if reg is None:
            return
        x, y, z = cv.coords(reg)
        rho = self.rho_cav[reg]
        yc = self.cav_centre_y[:, :, reg[2]]
        # The diaphragm: lung in the outer ring of the cavity, deeper higher up and
        # wrapping from the back round to the front.
        thr = np.interp(z - dz, [135, 155, 175, 200, 240], [1.0, 0.95, 0.86, 0.68, 0.35]).astype(
            np.float32
        )
        ylim = np.interp(z - dz, [125, 160, 200], [-30, 30, 90]).astype(np.float32)
        thr = thr + 0.03 * self.f["mid"][reg]
        yrel = y - yc
        # The costophrenic recess is deepest at the back.
        thr = thr - 0.14 * np.clip(-yrel / 90.0, 0.0, 1.0) * np.clip((1.0 - thr) / 0.06, 0.0, 1.0)
        lung = (rho > thr) & (rho < 1.0) & (yrel < ylim)
        dia = (rho > thr - 0.05) & (rho <= thr) & (yrel < ylim + 10)
        # Keep the spleen whole: the lung stops 5 mm short of it, diaphragm in between.
        sreg, ssd = self.spleen
        if sreg is not None:
            near = np.full(cv.shape, 1e3, np.float32)
            near[sreg] = ssd
            near = near[reg]
            dia = (dia | (lung & (near < 5.0))) & (near >= 0.0)
            lung &= near >= 5.0
        self.paint(reg, lung, _LUNG, hu["lung"], {_CAVITY})
        self.paint(reg, dia, _MUSCLE, hu["muscle"], {_CAVITY})

    def vessels(self):
        hu, j = self.hu, self.jit
        ok = {_CAVITY}
        sdy = self.spine_dy
        self.v_shift = np.array([j(3), sdy + j(2), j(4)])
        sh = self.v_shift
        # Aorta down to the bifurcation.
        zb = 8.0 + j(8)
        ra = float(np.clip(10.5 * (1 + j(0.06)), 9.0, 11.5))
        aorta = np.array(
            [
                [-13, -18, 230],
                [-13, -16, 166],
                [-14, -4, 124],
                [-15, 4, 98],
                [-15, 12, 62],
                [-14, 13, zb + 10],
                [-12, 12, zb],
            ]
        )
        reg, sd = self.tube(
            aorta + sh,
            [ra, ra, ra * 0.98, ra * 0.95, ra * 0.9, ra * 0.85, ra * 0.8],
            noise=(0.0, 0.5),
        )
        m = self.paint(reg, sd < 0, _VESSEL, hu["aorta"], ok, _ID["aorta"])
        if m is not None and m.any():
            # Calcified plaques in the wall (case A's aorta: 42 +- 34 HU at 3 mm).
            spots = ndi.gaussian_filter(self.tex.standard_normal(m.shape).astype(np.float32), 0.7)
            wall = m & (sd > -2.5)
            cut = (
                np.quantile(spots[wall], 1.0 - self.tex.uniform(0.02, 0.08))
                if wall.any()
                else np.inf
            )
            self.cv.hu[reg][wall & (spots > cut)] = 500.0
        # IVC: a slightly flattened tube to the right of the aorta.
        rv = float(np.clip(10.3 * (1 + j(0.05)), 9.0, 10.8))
        ivc = np.array(
            [
                [19, 2, 230],
                [18, 2, 166],
                [19, 7, 140],
                [17, 11, 122],
                [17, 13, 104],
                [15, 10, 86],
                [12, 11, 50],
                [9, 11, 22],
                [8, 10, zb - 2],
            ]
        )
        reg, sd = self.tube(
            ivc + sh, [rv] * 8 + [rv * 0.85], squash=(1.15, 0.85, 1.0), noise=(0.0, 0.5)
        )
        self.paint(reg, sd < 0, _VESSEL, hu["ivc"], ok, _ID["inferior_vena_cava"])
        # Common and external iliac arteries and veins (unlabelled, as in case A).
        for side in (-1, 1):
            art = np.array(
                [
                    [-12, 12, zb],
                    [-20, 5, zb - 18],
                    [-34, -14, zb - 40],
                    [-41, -20, zb - 60],
                    [-47, -9, zb - 78],
                    [-57, 20, zb - 106],
                    [-68, 34, zb - 132],
                    [-75, 32, zb - 170],
                ]
            )
            if side > 0:
                art[:, 0] = -art[:, 0] - 24
                art[0, 0] = -12
            reg, sd = self.tube(art + sh, [7, 6, 5.5, 5, 5, 4.5, 4.5, 4.5])
            self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
            vein = np.array(
                [
                    [8, 10, zb - 4],
                    [-6, 4, zb - 14],
                    [-16, -8, zb - 30],
                    [-32, -22, zb - 42],
                    [-46, -28, zb - 62],
                    [-48, -14, zb - 84],
                    [-50, 4, zb - 102],
                    [-58, 22, zb - 120],
                    [-64, 28, zb - 168],
                ]
            )
            if side > 0:
                vein[:, 0] = -vein[:, 0] + 16
                vein[:, 1] -= 4
            reg, sd = self.tube(vein + sh, [8, 7, 7, 6.5, 6.5, 6.5, 6.5, 6.5, 6])
            self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
        # Superior mesenteric artery and vein, renal veins (unlabelled).
        sma = np.array([[-14, 8, 112], [-12, 28, 102], [-8, 40, 80], [-4, 46, 50], [0, 50, 10]])
        reg, sd = self.tube(sma + sh, [4, 3.5, 3.5, 3, 2.5])
        self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
        smv = np.array([[6, 32, 110], [9, 37, 92], [10, 42, 70], [12, 48, 45], [14, 52, 10]])
        reg, sd = self.tube(smv + sh, [5.5, 5, 4.5, 4, 3])
        self.paint(reg, sd < 0, _VESSEL, hu["vessel"], ok)
        self.smv = smv + sh

    def organs(self):
        hu, j, r = self.hu, self.jit, self.rng
        ok = {_CAVITY}
        sh = self.v_shift
        # Diaphragmatic crura beside the aorta (unlabelled muscle).
        for tab in (
            [
                [92, 12, -16, 4, 7],
                [130, 15, -14, 7, 12],
                [170, 19, -10, 8, 13],
                [205, 20, -6, 6, 9],
            ],
            [
                [98, -32, -20, 4, 7],
                [135, -35, -17, 6, 11],
                [170, -35, -13, 7, 12],
                [205, -31, -9, 5, 8],
            ],
        ):
            tab = _f(tab)
            tab[:, 1:3] += sh[:2]
            tab[:, 0] += sh[2]
            reg, sd = self.zcyl(tab)
            self.paint(reg, sd < 0, _MUSCLE, hu["muscle"], ok)
        # Adrenal glands: two thin limbs each, above and medial to the kidneys.
        for c, a1, a2 in (([32, -14, 138], 20, -35), ([-44, -10, 140], -25, 30)):
            cen = np.array(c, float) + sh + [j(3), j(3), j(5)]
            for az in (a1, a2):
                reg, sd = self.ellipsoid(cen + [0, 0, -4], (2.5, 13, 15), _rot(0, 0, az + j(5)))
                self.paint(reg, sd < 0, _MUSCLE, hu["adrenal"], ok)
        # Portal and splenic vein (labelled), behind the pancreas.
        pv = _f(
            [
                [-100, -12, 128],
                [-75, 2, 125],
                [-45, 18, 120],
                [-15, 27, 116],
                [6, 31, 112],
                [22, 35, 122],
                [36, 35, 132],
                [52, 30, 142],
                [62, 26, 150],
            ]
        )
        pv[:, 2] += j(5)
        reg, sd = self.tube(pv + sh, [5.5, 6, 6, 6, 7.5, 8.5, 8.5, 7.5, 5.5], noise=(0.0, 0.4))
        self.paint(reg, sd < 0, _VESSEL, hu["portal"], ok, _ID["portal_splenic_vein"])
        smv_top = np.array([[6, 31, 112], [7, 34, 100]]) + sh
        reg, sd = self.tube(smv_top, [7, 6])
        self.paint(reg, sd < 0, _VESSEL, hu["portal"], ok, _ID["portal_splenic_vein"])

        # Kidneys: tilted ellipsoids with a medial hilum; the right one lower.
        kz = j(8)
        for side, name, c, rad in (
            (1, "kidney_right", [74, -28, 84], [30, 25, 57]),
            (-1, "kidney_left", [-79, -34, 98], [27, 22, 52]),
        ):
            s = 1 + j(0.05)
            cen = np.array(c, float) + [j(5), j(4) + self.spine_dy, kz + j(6)]
            rad = np.array(rad) * s
            rot = _rot(16 + j(5), side * (-18 + j(5)), side * (-35 + j(8)))
            reg, sd = self.ellipsoid(cen, rad, rot, noise=(1.0, 1.2))
            if reg is None:
                continue
            p = self.cv.coords(reg)
            # Hilum: the local -x axis points medially and a little anteriorly.
            hil_c = cen + rot[:, 0] * (-side) * rad[0] * 0.95
            sd_h = _ellipsoid_sd(p, hil_c, (rad[0] * 0.45, rad[1] * 0.45, rad[2] * 0.42), rot)
            kid = (sd < 0) & (sd_h > 0)
            m = self.paint(reg, kid, _ORGAN, hu["kidney"], ok, _ID[name])
            sin_c = cen + rot[:, 0] * (-side) * rad[0] * 0.35
            sd_s = _ellipsoid_sd(p, sin_c, (rad[0] * 0.38, rad[1] * 0.42, rad[2] * 0.5), rot)
            sinus = m & (sd_s < 0)
            self.cv.hu[reg][sinus] = hu["renal_sinus"]
            reg_p, sd_p = self.ellipsoid(cen + [0, -5, 0], rad + [6, 7, 6], rot)
            self.paint(reg_p, sd_p < 0, _RETRO, hu["fat"], ok)
            # Renal vein towards the IVC (unlabelled).
            ivc_pt = np.array([17, 10, cen[2] + 4]) + sh * [1, 1, 0]
            reg_v, sd_v = self.tube([hil_c, (hil_c + ivc_pt) / 2 + [0, 6, 0], ivc_pt], [5, 5, 5])
            self.paint(reg_v, sd_v < 0, _VESSEL, hu["vessel"], {_CAVITY, _RETRO})

        # Gallbladder under the liver.
        gb_c = np.array([66, 50, 100]) + [j(6), j(6), j(8)]
        gs = float(np.clip(1 + j(0.06), 0.88, 1.12))
        reg, sd = self.ellipsoid(
            gb_c,
            np.array([16, 24, 22]) * gs,
            _rot(-30 + j(10), 10 + j(10), j(15)),
            noise=(0.3, 0.6),
        )
        self.paint(reg, sd < 0, _ORGAN, hu["bile"], ok, _ID["gallbladder"])

        # Pancreas: a flattened, lobulated tube from the duodenal C-loop to the spleen.
        pz = j(5)
        pts = (
            _f(
                [
                    [24, 34, 82],
                    [18, 38, 100],
                    [-8, 40, 112],
                    [-40, 30, 118],
                    [-70, 12, 124],
                    [-96, -6, 130],
                ]
            )
            + sh
        )
        pts[:, 2] += pz
        ps = 1 + j(0.06)
        reg, sd = self.tube(
            pts,
            np.array([16.5, 15.5, 13, 12.5, 12, 10]) * ps,
            squash=(1.0, 0.75, 1.25),
            noise=(0.3, 0.8),
        )
        m = self.paint(reg, sd < 0, _ORGAN, hu["pancreas"], ok, _ID["pancreas"])
        if m is not None and m.any():
            # Fatty lobulation: a seed-dependent share of the gland is fat.
            lob = ndi.gaussian_filter(self.tex.standard_normal(m.shape).astype(np.float32), 0.8)
            lob += 0.1 * self.f["mid"][reg]
            cut = np.quantile(lob[m], 1.0 - self.tex.uniform(0.2, 0.35))
            self.cv.hu[reg][m & (lob > cut)] = hu["fat"] + 20

        # Duodenum (unlabelled bowel) around the pancreas head.
        duo = (
            np.array(
                [
                    [28, 58, 98],
                    [44, 44, 96],
                    [50, 26, 78],
                    [46, 20, 58],
                    [20, 18, 50],
                    [-16, 20, 54],
                    [-30, 26, 70],
                    [-22, 36, 84],
                ]
            )
            + sh
        )
        reg, sd = self.tube(duo, [11, 12, 12, 11, 11, 11, 10, 9], noise=(0.0, 1.5))
        self.bowel_fill(reg, sd, air=0.15)

        # Spleen (its shape was drawn before the lungs, which make room for it).
        reg, sd = self.spleen
        self.paint(reg, sd < 0, _ORGAN, hu["spleen"], ok, _ID["spleen"])

        # Stomach: a J-shaped tube, fundus high at the back, antrum crossing the midline.
        st = np.array(
            [
                [-58, 4, 172],
                [-58, 24, 155],
                [-52, 44, 136],
                [-38, 64, 119],
                [-16, 76, 104],
                [8, 72, 94],
                [24, 60, 97],
            ]
        )
        st = st + [j(6), j(6), j(5)]
        srad = np.array([22.5, 21.5, 19.5, 16.5, 13.5, 11, 9]) * (1 + j(0.07))
        gas = r.uniform(0.0, 0.25)
        reg, sd = self.tube(st, srad, noise=(0.8, 1.2))
        m = self.paint(reg, sd < 0, _ORGAN, hu["stomach_wall"], ok, _ID["stomach"])
        if m is not None:
            x, y, z = self.cv.coords(reg)
            lumen = m & (sd < -3.5)
            self.cv.hu[reg][lumen] = hu["stomach_content"]
            # Air rises anteriorly (the patient lies supine): an air-fluid level in y.
            level = (
                np.percentile(np.broadcast_to(y, m.shape)[lumen], 100 - 100 * gas)
                if lumen.any()
                else 0.0
            )
            air = lumen & (y > level)
            self.cv.hu[reg][air] = hu["air"]

        # Liver: right lobe against the wall plus a left lobe in front of the stomach.
        ls = 1 + j(0.045)
        ldz = j(8)
        right = _f(
            [
                [36, 126, 18, 4, 8],
                [50, 124, 20, 10, 26],
                [68, 118, 14, 17, 40],
                [84, 108, 14, 24, 50],
                [100, 96, 18, 32, 60],
                [116, 84, 22, 46, 70],
                [130, 72, 22, 60, 80],
                [146, 62, 22, 72, 88],
                [166, 56, 24, 76, 86],
                [190, 50, 20, 66, 72],
                [215, 46, 20, 10, 10],
            ]
        )
        left = _f(
            [
                [90, 8, 70, 6, 6],
                [104, 0, 68, 20, 14],
                [120, -8, 62, 36, 22],
                [145, -16, 56, 50, 30],
                [170, -18, 48, 52, 30],
                [200, -12, 40, 30, 18],
                [212, -10, 36, 6, 6],
            ]
        )
        for tab in (right, left):
            tab[:, 0] = 130 + (tab[:, 0] - 130) * ls + ldz
            tab[:, 3:5] *= ls * 0.97
            tab[:, 1] += j(4)
            tab[:, 2] += j(4)
        reg1, sd1 = self.zcyl(right, noise=(3.0, 2.5))
        self.paint(reg1, sd1 < 0, _ORGAN, hu["liver"], ok, _ID["liver"])
        reg2, sd2 = self.zcyl(left, noise=(3.0, 2.5))
        self.paint(reg2, sd2 < 0, _ORGAN, hu["liver"], ok, _ID["liver"])
        # Intrahepatic portal and hepatic veins: part of the liver label, blood HU.
        hv = sh + [0, 0, ldz]
        branches = [
            ([[52, 30, 142], [85, 14, 150], [112, 2, 138]], [5.5, 4.5, 3]),
            ([[52, 30, 142], [20, 48, 150], [-15, 60, 158]], [5, 4, 3]),
            ([[85, 14, 150], [95, 30, 118], [100, 35, 95]], [4, 3.5, 2.5]),
            ([[18, 4, 185], [60, -10, 178], [105, -15, 165]], [6.5, 5, 3.5]),
            ([[18, 4, 185], [45, 35, 178], [60, 65, 160]], [5.5, 4.5, 3]),
            ([[18, 4, 185], [-10, 40, 178], [-35, 55, 170]], [5, 4, 3]),
        ]
        for pts, rad in branches:
            pts = _f(pts) + hv + r.normal(0, 3, (3, 3))
            reg, sd = self.tube(pts, rad)
            if reg is not None:
                inside = (sd < 0) & (self.cv.labels[reg] == _ID["liver"])
                self.cv.hu[reg][inside] = hu["portal"]

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


def _finish(cv: _Canvas, hu: dict, rng: np.random.Generator, noise: bool) -> np.ndarray:
    """Tissue texture, partial-volume blur and CT noise."""
    img = cv.hu
    sp = np.array(cv.spacing)
    tex = rng.standard_normal(cv.shape).astype(np.float32)
    tex = ndi.gaussian_filter(tex, 2.0 / sp)
    tex /= tex.std() + 1e-6
    soft = (cv.kind == _ORGAN) | (cv.kind == _MUSCLE) | (cv.kind == _VESSEL)
    fat = (cv.kind == _CAVITY) | (cv.kind == _SUBCUT) | (cv.kind == _RETRO)
    img[soft] += 4.0 * tex[soft]
    img[fat] += 10.0 * tex[fat]
    if not noise:
        return img
    sigma = np.sqrt((1.0 / sp) ** 2 + 0.35**2)
    img = ndi.gaussian_filter(img, sigma)
    white = rng.standard_normal(cv.shape).astype(np.float32)
    white = ndi.gaussian_filter(white, 0.6)
    white *= 12.0 * (27.0 / float(np.prod(sp))) ** 0.25 / (white.std() + 1e-6)
    img += white
    return img.astype(np.float32)
