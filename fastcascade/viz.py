"""Pictures: a CT with its labels overlaid, and the candidate region's recall and
false-positive rate against the dilation radius r (the paper's Fig. 6), each one PNG.

Needs matplotlib (``pip install fastcascade[viz]``); it is imported only when a picture is
drawn, so the rest of the package works without it.

Volumes are indexed ``(x, y, z)`` in canonical RAS (axis 0 towards the patient's right,
1 anterior, 2 superior). Slices are drawn the radiological way: axial and coronal views
show the patient's right on the left of the picture, anterior up in axial views and
superior up in coronal and sagittal views; pixels are scaled by the voxel spacing.
"""

from __future__ import annotations

from collections.abc import Sequence
from os import PathLike

import numpy as np

from .config import CLASS_NAMES

__all__ = ["candidates_png", "label_colours", "overlay_png"]

# Distinct colours for the default classes (RGB 0..1); further ids cycle through tab20.
_COLOURS = {
    "liver": (0.85, 0.37, 0.01),
    "spleen": (0.46, 0.44, 0.70),
    "kidney_right": (0.91, 0.16, 0.54),
    "kidney_left": (0.40, 0.65, 0.12),
    "pancreas": (0.90, 0.67, 0.01),
    "stomach": (0.10, 0.62, 0.47),
    "gallbladder": (0.12, 0.47, 0.71),
    "aorta": (0.89, 0.10, 0.11),
    "inferior_vena_cava": (0.22, 0.49, 0.72),
    "portal_splenic_vein": (0.60, 0.31, 0.64),
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastcascade.viz needs matplotlib: pip install fastcascade[viz]") from exc
    return plt


def label_colours(class_names: Sequence[str]) -> np.ndarray:
    """(len(class_names), 4) RGBA colours; id 0 (background) is fully transparent."""
    from matplotlib import colormaps

    cycle = colormaps["tab20"].colors
    out = np.zeros((len(class_names), 4))
    for i, name in enumerate(class_names):
        if i == 0:
            continue
        rgb = _COLOURS.get(name, cycle[(i - 1) % len(cycle)])
        out[i] = (*rgb, 1.0)
    return out


def _default_slices(labels: np.ndarray) -> tuple[int, int, int]:
    """Through the labelled voxels' centroid (the volume's centre when there are none)."""
    fg = np.argwhere(labels > 0)
    if len(fg) == 0:
        return tuple(int(n // 2) for n in labels.shape)
    return tuple(int(round(c)) for c in fg.mean(0))


def overlay_png(
    image_hu: np.ndarray,
    labels: np.ndarray,
    path: str | PathLike,
    spacing: Sequence[float],
    class_names: Sequence[str] = CLASS_NAMES,
    slices: Sequence[int] | None = None,
    window: tuple[float, float] = (-160, 240),
) -> None:
    """Write a PNG with an axial, a coronal and a sagittal slice, labels coloured.

    Args:
        image_hu: CT in HU, shape ``(X, Y, Z)`` in canonical RAS, any real dtype.
        labels: integer class ids of ``class_names``, same shape.
        path: where to write the PNG.
        spacing: voxel size in mm ``(x, y, z)`` (sets the pixels' aspect ratio).
        class_names: names of the ids (id 0 is background and left uncoloured).
        slices: voxel indices ``(x, y, z)`` of the sagittal, coronal and axial planes;
            by default through the labelled voxels' centroid.
        window: HU range shown from black to white.

    Example::

        >>> from fastcascade.phantom import make_phantom
        >>> ph = make_phantom(seed=0)
        >>> overlay_png(ph.image, ph.labels, "/tmp/phantom.png", ph.spacing)
    """
    image_hu = np.asarray(image_hu)
    labels = np.asarray(labels)
    if image_hu.ndim != 3:
        raise ValueError(f"image_hu must be a 3D (x, y, z) volume, got shape {image_hu.shape}")
    if labels.shape != image_hu.shape:
        raise ValueError(f"labels must have the image's shape {image_hu.shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive millimetre sizes, got {spacing}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(
            f"labels must be ids 0..{len(class_names) - 1} of class_names, "
            f"got values {labels.min()}..{labels.max()}"
        )
    lo, hi = float(window[0]), float(window[1])
    if not hi > lo:
        raise ValueError(f"window must be (low, high) HU with low < high, got {window}")
    if slices is None:
        slices = _default_slices(labels)
    slices = tuple(int(s) for s in slices)
    if len(slices) != 3 or any(not 0 <= s < n for s, n in zip(slices, labels.shape, strict=True)):
        raise ValueError(f"slices must be (x, y, z) indices inside {labels.shape}, got {slices}")

    plt = _pyplot()
    from matplotlib.patches import Patch

    colours = label_colours(class_names)
    sx, sy, sz = spacing
    ix, iy, iz = slices
    # Each view: (2D image, 2D labels, pixel width mm, pixel height mm, title).
    # Axial: rows = anterior at the top, columns = patient's right on the left.
    views = [
        (image_hu[::-1, ::-1, iz].T, labels[::-1, ::-1, iz].T, sx, sy, f"axial z={iz}"),
        (image_hu[::-1, iy, ::-1].T, labels[::-1, iy, ::-1].T, sx, sz, f"coronal y={iy}"),
        (image_hu[ix, :, ::-1].T, labels[ix, :, ::-1].T, sy, sz, f"sagittal x={ix}"),
    ]
    widths = [v[0].shape[1] * v[2] for v in views]
    fig, axes = plt.subplots(
        1, 3, figsize=(15, 5.6), gridspec_kw={"width_ratios": widths}, squeeze=True
    )
    for ax, (img, lab, pw, ph, title) in zip(axes, views, strict=True):
        extent = (0, img.shape[1] * pw, 0, img.shape[0] * ph)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        rgba = colours[lab]
        rgba[..., 3] *= 0.45
        ax.imshow(rgba, extent=extent, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    present = [i for i in np.unique(labels) if i > 0]
    handles = [Patch(color=colours[i][:3], label=class_names[i]) for i in present]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=80)
    plt.close(fig)


def candidates_png(
    candidates: Sequence[dict],
    path: str | PathLike,
    radius: int | None = None,
    title: str = "Candidate region C2 against the dilation radius r",
) -> None:
    """Write a PNG of C2's recall and false-positive rate against r (the paper's Fig. 6).

    Args:
        candidates: one dict per r with ``radius`` (voxels), ``recall_mean``,
            ``recall_min`` and ``fpr_mean`` (fractions; ``None``/NaN where undefined), as
            in ``fastcascade.evaluate.summary_report(...)["candidates"]``.
        path: where to write the PNG.
        radius: the model's own r, marked with a vertical line (``None``: no mark).
        title: the figure's title.

    Recall (mean over the cases, and the worst case) is read on the left axis, the
    false-positive rate (mean) on the right one, both as percentages.

    Example::

        >>> rows = [{"radius": r, "recall_mean": 1 - 0.1 / (r + 1), "recall_min": 0.8,
        ...          "fpr_mean": 0.01 * r} for r in range(7)]
        >>> candidates_png(rows, "/tmp/candidates.png", radius=3)
    """
    if not candidates:
        raise ValueError("candidates is empty; expected one dict per radius r")
    missing = {"radius", "recall_mean", "recall_min", "fpr_mean"} - set(candidates[0])
    if missing:
        raise ValueError(f"candidates rows lack {sorted(missing)}")

    def column(key):
        return np.array([np.nan if c[key] is None else c[key] for c in candidates], float) * 100

    r = [int(c["radius"]) for c in candidates]
    plt = _pyplot()
    fig, left = plt.subplots(figsize=(6.4, 4.2))
    right = left.twinx()
    lines = left.plot(r, column("recall_mean"), "o-", color="tab:blue", label="recall, mean")
    lines += left.plot(r, column("recall_min"), "o--", color="tab:blue", alpha=0.5,
                       label="recall, worst case")  # fmt: skip
    lines += right.plot(r, column("fpr_mean"), "s-", color="tab:red", label="FPR, mean")
    if radius is not None:
        lines.append(
            left.axvline(radius, color="gray", linestyle=":", label=f"model's r = {radius}")
        )
    lowest = np.nanmin(np.concatenate([column("recall_mean"), column("recall_min"), [100.0]]))
    left.set_ylim(max(0.0, lowest - 0.1 * (100.0 - lowest) - 1.0), 100.5)  # never above 100 %
    right.set_ylim(bottom=0.0)
    left.set_xlabel("dilation radius r (voxels of the working grid)")
    left.set_ylabel("recall (%)", color="tab:blue")
    right.set_ylabel("false-positive rate (%)", color="tab:red")
    left.set_xticks(r)
    left.set_title(title)
    left.grid(alpha=0.3)
    left.legend(handles=lines, loc="best", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    plt.close(fig)
