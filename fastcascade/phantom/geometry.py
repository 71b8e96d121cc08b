"""Geometry helpers in millimetres: smooth random fields, implicit shapes, tables."""

from __future__ import annotations

import numpy as np

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
