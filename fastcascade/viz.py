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
from dataclasses import dataclass
from os import PathLike

import numpy as np
from nibabel import orientations
from scipy import ndimage

from .config import CLASS_NAMES

__all__ = [
    "PALETTE",
    "Overlay",
    "candidates_png",
    "label_colours",
    "overlay_png",
    "preview_png",
    "require_matplotlib",
]

#: The label palette: 16 qualitative colours (sRGB hex), every pair at least 29 CIE76 ΔE
#: apart and none close to grey (CIELAB chroma ≥ 27), so each stays distinct over a grey
#: CT. Ids 1..10 of the default classes take the first ten in order; other class lists
#: take them by name where a name is a default one, else the next unused colour; beyond
#: 16 classes the colours repeat. (The colours are those of Sasha Trubetskoy's "20
#: simple, distinct colours" without the greys and the palest tints.)
PALETTE: tuple[str, ...] = (
    "#f58231",  # orange      liver
    "#911eb4",  # purple      spleen
    "#ffe119",  # yellow      kidney_right
    "#bfef45",  # lime        kidney_left
    "#f032e6",  # magenta     pancreas
    "#dcbeff",  # lavender    stomach
    "#3cb44b",  # green       gallbladder
    "#e6194b",  # red         aorta
    "#4363d8",  # blue        inferior_vena_cava
    "#42d4f4",  # cyan        portal_splenic_vein
    "#9a6324",  # brown
    "#800000",  # maroon
    "#aaffc3",  # mint
    "#808000",  # olive
    "#469990",  # teal
    "#000075",  # navy
)

#: Opacity of a label's area over the CT; its outline is drawn opaque.
FILL_ALPHA = 0.35

#: The legend takes the figure's right part, from this fraction of its width.
LEGEND_LEFT = 0.84


def require_matplotlib() -> None:
    """Raise ``ImportError`` naming ``pip install fastcascade[viz]`` where matplotlib is
    missing (e.g. before a long job that ends with a picture)."""
    _pyplot()


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastcascade.viz needs matplotlib: pip install fastcascade[viz]") from exc
    return plt


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    return tuple(int(hex_colour[i : i + 2], 16) / 255.0 for i in (1, 3, 5))


def label_colours(class_names: Sequence[str]) -> np.ndarray:
    """``(len(class_names), 4)`` RGBA colours in 0..1 from :data:`PALETTE`; id 0
    (background) is fully transparent.

    A default class name gets its default colour whatever its id (a fine-tuned model's
    liver stays orange); other names get the palette's unused colours in id order, and
    the colours repeat beyond :data:`PALETTE`'s 16.

    >>> label_colours(("background", "liver"))[1].round(3).tolist()
    [0.961, 0.51, 0.192, 1.0]
    """
    fixed = {name: i for i, name in enumerate(CLASS_NAMES[1:]) if i < len(PALETTE)}
    taken = {fixed[n] for n in class_names[1:] if n in fixed}
    spare = iter([i for i in range(len(PALETTE)) if i not in taken])
    out = np.zeros((len(class_names), 4))
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        index = fixed.get(name)
        if index is None:
            index = next(spare, (k - 1) % len(PALETTE))
        out[k] = (*_rgb(PALETTE[index]), 1.0)
    return out


def _default_slices(labels: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the slice through the most organs: the one inside the most labels'
    bounding boxes, then the one with the most labelled voxels, then the one nearest the
    labelled voxels' centroid (the volume's centre when there are none)."""
    fg = labels > 0
    if not fg.any():
        return tuple(int(n // 2) for n in labels.shape)
    boxes = [b for b in ndimage.find_objects(labels) if b]
    chosen = []
    for axis, n in enumerate(labels.shape):
        crossed = np.zeros(n, np.int64)
        for box in boxes:
            crossed[box[axis]] += 1
        others = tuple(a for a in range(3) if a != axis)
        counts = fg.sum(axis=others)
        centre = (np.arange(n) * counts).sum() / counts.sum()
        order = np.lexsort((np.abs(np.arange(n) - centre), -counts, -crossed))
        chosen.append(int(order[0]))
    return tuple(chosen)


def _outline(labels2d: np.ndarray) -> np.ndarray:
    """Labelled pixels with a 4-neighbour of another id (the image's border counts as
    background): each organ's outline, one pixel wide, inside the organ."""
    padded = np.pad(labels2d, 1)
    inner = padded[1:-1, 1:-1]
    edge = np.zeros(labels2d.shape, bool)
    for shifted in (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]):
        edge |= shifted != inner
    return edge & (labels2d > 0)


@dataclass(frozen=True)
class Overlay:
    """What :func:`overlay_png` drew: the ``slices`` ``(x, y, z)`` (sagittal, coronal,
    axial) and the ``legend``'s class names, in id order."""

    slices: tuple[int, int, int]
    legend: tuple[str, ...]


def overlay_png(
    image_hu: np.ndarray,
    labels: np.ndarray,
    path: str | PathLike,
    spacing: Sequence[float],
    class_names: Sequence[str] = CLASS_NAMES,
    slices: Sequence[int] | None = None,
    window: tuple[float, float] = (-160, 240),
) -> Overlay:
    """Write a PNG with an axial, a coronal and a sagittal slice, labels coloured.

    Each label is drawn in its colour (:func:`label_colours`): its area at
    :data:`FILL_ALPHA` over the CT, its outline opaque; a legend on the right names every
    label present in the volume.

    Args:
        image_hu: CT in HU, shape ``(X, Y, Z)`` in canonical RAS, any real dtype.
        labels: integer class ids of ``class_names``, same shape.
        path: where to write the PNG.
        spacing: voxel size in mm ``(x, y, z)`` (sets the pixels' aspect ratio).
        class_names: names of the ids (id 0 is background and left uncoloured).
        slices: voxel indices ``(x, y, z)`` of the sagittal, coronal and axial planes;
            by default, per axis, the slice through the most organs
            (:func:`_default_slices`).
        window: HU range shown from black to white.

    Returns the :class:`Overlay` drawn (slices and legend).

    Example::

        >>> from fastcascade.phantom import make_phantom
        >>> ph = make_phantom(seed=0)
        >>> overlay_png(ph.image, ph.labels, "/tmp/phantom.png", ph.spacing).legend[:2]
        ('liver', 'spleen')
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
        1, 3, figsize=(16, 5.6), gridspec_kw={"width_ratios": widths}, squeeze=True
    )
    for ax, (img, lab, pw, ph, title) in zip(axes, views, strict=True):
        extent = (0, img.shape[1] * pw, 0, img.shape[0] * ph)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
        rgba = colours[lab]
        rgba[..., 3] = np.where(_outline(lab), 1.0, rgba[..., 3] * FILL_ALPHA)
        ax.imshow(rgba, extent=extent, interpolation="nearest")
        ax.set_title(title)
        ax.set_axis_off()
    present = [int(i) for i in np.unique(labels) if i > 0]
    handles = [Patch(color=colours[i][:3], label=class_names[i]) for i in present]
    if handles:
        fig.legend(
            handles=handles, loc="center left", bbox_to_anchor=(LEGEND_LEFT, 0.5), frameon=False
        )
    fig.tight_layout(rect=(0, 0, LEGEND_LEFT, 1))
    fig.savefig(path, dpi=80, format="png")
    plt.close(fig)
    return Overlay(slices=slices, legend=tuple(class_names[i] for i in present))


def preview_png(
    image_hu: np.ndarray,
    labels: np.ndarray,
    affine: np.ndarray,
    path: str | PathLike,
    class_names: Sequence[str] = CLASS_NAMES,
) -> Overlay:
    """:func:`overlay_png` of a CT and its labels on the input's own grid: both are
    brought to canonical RAS (flips and an axis permutation, nibabel's
    ``io_orientation`` of ``affine``) and drawn with the affine's voxel sizes.

    ``image_hu``: HU ``(i, j, k)``; ``labels``: integer ids, same shape; ``affine``: the
    4x4 voxel → mm matrix of that grid. Returns the :class:`Overlay` drawn (its slices
    are indices of the RAS view).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    ornt = orientations.io_orientation(affine)
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # mm per input axis
    spacing = [0.0, 0.0, 0.0]
    for axis, (canonical, _) in enumerate(ornt):
        spacing[int(canonical)] = float(sizes[axis])
    image = orientations.apply_orientation(np.asarray(image_hu), ornt)
    lab = orientations.apply_orientation(np.asarray(labels), ornt)
    return overlay_png(image, lab, path, spacing, class_names)


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
