"""Training volumes on the working grid: synthetic phantoms or NIfTI (CT, labels) pairs.

A source hands out whole volumes; the sampler cuts sub-volumes from them. Every source
(these two, ``anatomy.SynthSource`` / ``RepaintSource``, ``mixed.MixedSource``) gives
``Volume(image_hu, labels, spacing, key, cut_distance)``: float32 ``(x, y, z)`` HU, uint8
class ids ``(x, y, z)``, the working spacing in mm, a ``key`` that names the volume (the
same volume always has the same key, so callers may cache what they derive from it, e.g.
its candidate region) and optionally the voxels' distance to a face of the field of view
that cuts an organ (``sampling.cut_distance``; ``None``: the trainer derives it from the
labels). Iterating a source yields ``(image_hu, labels, spacing)`` triples.

Each source draws with its own ``torch.Generator``; ``state_dict()`` /
``load_state_dict()`` capture everything needed to continue the same sequence of draws
(plain tensors, ints and lists); ``describe()`` says what it holds as plain JSON (what a
training record keeps).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..io.nifti import load_nifti, map_labels, read_labels
from ..io.scan import Scan, load_scan


class Volume(NamedTuple):
    """One training volume on the working grid (see the module docstring)."""

    image_hu: torch.Tensor
    labels: torch.Tensor
    spacing: tuple[float, float, float]
    key: str
    cut_distance: torch.Tensor | None = None


# -- phantoms -------------------------------------------------------------------------------
class PhantomSource:
    """Synthetic CT phantoms made on the fly, from a small in-memory pool.

    Making a phantom costs about a second, so ``pool_size`` phantoms are kept and one
    draw picks one of them uniformly; every ``refresh_every`` draws the oldest is
    replaced by a phantom with the next seed (seeds ``seed, seed + 1, ...``). A phantom's
    contrast phase is drawn from ``contrasts`` with ``contrast_weights`` by a generator
    seeded with the phantom's seed, so it depends on the seed alone. ``shape`` and
    ``phantom_spacing`` (mm) are passed to ``make_phantom``; the result is resampled to
    ``spacing`` (the model's working grid, mm) when they differ. ``make_fn`` replaces
    ``fastcascade.phantom.make_phantom`` (same keywords, same result fields).

    >>> src = PhantomSource(spacing=(3.0, 3.0, 3.0), pool_size=1)  # doctest: +SKIP
    >>> image_hu, labels, spacing = next(iter(src))  # doctest: +SKIP
    """

    def __init__(
        self,
        spacing: Sequence[float] = (3.0, 3.0, 3.0),
        seed: int = 0,
        pool_size: int = 4,
        refresh_every: int = 8,
        contrasts: Sequence[str] = ("none", "portal_venous"),
        contrast_weights: Sequence[float] | None = None,
        shape: Sequence[int] = (122, 101, 112),
        phantom_spacing: Sequence[float] = (3.0, 3.0, 3.0),
        make_fn: Callable | None = None,
    ):
        if pool_size < 1 or refresh_every < 1:
            raise ValueError(
                f"pool_size and refresh_every must be >= 1, got {pool_size}, {refresh_every}"
            )
        if not contrasts:
            raise ValueError("contrasts must name at least one contrast setting")
        if contrast_weights is not None and len(contrast_weights) != len(contrasts):
            raise ValueError(
                f"contrast_weights needs one weight per contrast ({len(contrasts)}), "
                f"got {len(contrast_weights)}"
            )
        self.spacing = tuple(float(s) for s in spacing)
        self.pool_size = int(pool_size)
        self.refresh_every = int(refresh_every)
        self.contrasts = tuple(contrasts)
        self.contrast_weights = None if contrast_weights is None else tuple(contrast_weights)
        self.shape = tuple(int(n) for n in shape)
        self.phantom_spacing = tuple(float(s) for s in phantom_spacing)
        self.make_fn = make_fn
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.draws = 0
        self.next_seed = self.seed
        self._pool: list[Volume] = []
        self._pool_seeds: list[int] = []

    def describe(self) -> dict:
        return {
            "kind": "phantom",
            "seed": self.seed,
            "pool_size": self.pool_size,
            "refresh_every": self.refresh_every,
            "contrasts": list(self.contrasts),
            "contrast_weights": None
            if self.contrast_weights is None
            else list(self.contrast_weights),
            "shape": list(self.shape),
            "phantom_spacing": list(self.phantom_spacing),
        }

    def contrast_for(self, seed: int) -> str:
        """The contrast setting of the phantom with this seed."""
        return random.Random(seed).choices(self.contrasts, self.contrast_weights)[0]

    def make(self, seed: int) -> Volume:
        """The phantom with this seed, on the working grid."""
        make_phantom = self.make_fn
        if make_phantom is None:
            from ..phantom import make_phantom

        contrast = self.contrast_for(seed)
        p = make_phantom(
            shape=self.shape, spacing=self.phantom_spacing, seed=seed, contrast=contrast
        )
        scan = load_scan(torch.as_tensor(np.asarray(p.image)), spacing=p.spacing)
        grid = scan.working_grid(self.spacing)
        labels = grid.labels_from_input(torch.as_tensor(np.asarray(p.labels)).to(torch.uint8))
        return Volume(grid.image(), labels, grid.spacing, f"phantom-{seed}-{contrast}")

    def _fill(self) -> None:
        while len(self._pool) < self.pool_size:
            self._pool_seeds.append(self.next_seed)
            self._pool.append(self.make(self.next_seed))
            self.next_seed += 1

    def draw(self) -> Volume:
        """One volume of the pool, uniformly at random."""
        if self.draws and self.draws % self.refresh_every == 0:
            self._pool.pop(0)
            self._pool_seeds.pop(0)
        self._fill()
        k = int(torch.randint(len(self._pool), (1,), generator=self.generator))
        self.draws += 1
        return self._pool[k]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple]]:
        while True:
            v = self.draw()
            yield v.image_hu, v.labels, v.spacing

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "draws": self.draws,
            "next_seed": self.next_seed,
            "pool_seeds": list(self._pool_seeds),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.next_seed = int(state["next_seed"])
        self.generator.set_state(state["generator"])
        seeds = [int(s) for s in state["pool_seeds"]]
        if seeds != self._pool_seeds:
            self._pool_seeds = seeds
            self._pool = [self.make(s) for s in seeds]


# -- NIfTI pairs ----------------------------------------------------------------------------
def read_pair(ct_path: str | Path, labels_path: str | Path) -> tuple[Scan, np.ndarray]:
    """A CT as a ``Scan`` (``io.scan.load_scan``) and its label file's ids on the CT's own
    input grid (``io.nifti.read_labels``: uint8, uint16 or int64); ``ValueError`` naming
    both files when the label map does not lie on the CT's grid (shape and affine)."""
    scan = load_scan(ct_path)
    ids = read_labels(labels_path)
    seg_affine = load_nifti(labels_path).affine
    if ids.shape != scan.input_shape or not np.allclose(seg_affine, scan.input_affine, atol=1e-3):
        raise ValueError(
            f"{labels_path} does not lie on the grid of {ct_path}: shapes "
            f"{scan.input_shape} and {ids.shape}, affines differ by "
            f"{np.abs(scan.input_affine - seg_affine).max():.3g}"
        )
    return scan, ids


def load_nifti_pair(
    ct_path: str | Path,
    labels_path: str | Path,
    label_map: Mapping[int, int] | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float]]:
    """A CT and its label map on a working grid of ``spacing`` mm (default: the scan's
    own), canonical RAS, read and checked as ``segment()`` reads scans
    (``io.scan.load_scan``) and ``evaluate`` reads labels (``io.nifti``).

    Returns float32 HU ``(x, y, z)`` (the file's scaling applied; linear), uint8 labels on
    the same grid (nearest; ``label_map`` maps file ids onto class ids, every other id
    becoming 0; without it the ids are kept and must fit in uint8) and the grid's spacing
    in mm (``WorkingGrid.spacing``), the scan's taken from its affine as at inference.
    """
    scan, ids = read_pair(ct_path, labels_path)
    if label_map is not None:
        ids = map_labels(ids, label_map)
    elif ids.max(initial=0) > 255:
        raise ValueError(f"{labels_path} holds ids outside 0..255; pass a label_map")
    grid = scan.working_grid(scan.spacing if spacing is None else tuple(spacing))
    labels = grid.labels_from_input(torch.from_numpy(ids.astype(np.uint8)))
    return grid.image(), labels, grid.spacing


class NiftiSource:
    """Training volumes from NIfTI ``(ct_path, labels_path)`` pairs.

    Each pair is read once (canonical RAS via nibabel, ``label_map`` applied, e.g.
    ``fastcascade.presets.CASE_A_TO_CLASSES``), resampled to ``spacing`` (mm) and kept in
    memory; a draw picks a pair uniformly with the source's generator.

    >>> from fastcascade.presets import CASE_A_TO_CLASSES
    >>> src = NiftiSource([("ct.nii.gz", "seg.nii.gz")], CASE_A_TO_CLASSES)  # doctest: +SKIP
    """

    def __init__(
        self,
        pairs: Sequence[tuple[str | Path, str | Path]],
        label_map: Mapping[int, int] | None = None,
        spacing: Sequence[float] = (3.0, 3.0, 3.0),
        seed: int = 0,
    ):
        self.pairs = [(Path(c), Path(s)) for c, s in pairs]
        if not self.pairs:
            raise ValueError("NiftiSource needs at least one (ct, labels) pair")
        for ct, seg in self.pairs:
            for p in (ct, seg):
                if not p.exists():
                    raise FileNotFoundError(f"training file not found: {p}")
        self.label_map = None if label_map is None else dict(label_map)
        self.spacing = tuple(float(s) for s in spacing)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.draws = 0
        self._cache: dict[int, Volume] = {}
        #: How the cases are named in messages and training records.
        self.case_names = [f"{ct.parent.name}/{ct.name}" for ct, _ in self.pairs]

    @classmethod
    def from_cases(cls, cases, label_map: Mapping[int, int] | None = None, seed: int = 0):
        """A source over cases already read (``anatomy.load_case``: full label maps on the
        working grid and device), their ids mapped through ``label_map`` (``None``: kept);
        nothing is read again.

        >>> real = NiftiSource.from_cases(cases, CASE_A_TO_CLASSES)  # doctest: +SKIP
        """
        from .anatomy import map_structures

        cases = list(cases)
        if not cases:
            raise ValueError("NiftiSource needs at least one case")
        src = cls([(c.files.ct, c.files.labels) for c in cases], label_map, cases[0].spacing, seed)
        for i, c in enumerate(cases):
            labels = map_structures(c.structures, src.label_map)
            src._cache[i] = Volume(c.image_hu, labels, c.spacing, f"nifti-{i}-{c.files.ct.name}")
        src.case_names = [c.name for c in cases]
        return src

    def describe(self) -> dict:
        return {"kind": "real", "seed": self.seed, "cases": list(self.case_names)}

    def load(self, index: int) -> Volume:
        if index not in self._cache:
            ct, seg = self.pairs[index]
            image, labels, spacing = load_nifti_pair(ct, seg, self.label_map, self.spacing)
            self._cache[index] = Volume(image, labels, spacing, f"nifti-{index}-{ct.name}")
        return self._cache[index]

    def draw(self) -> Volume:
        k = int(torch.randint(len(self.pairs), (1,), generator=self.generator))
        self.draws += 1
        return self.load(k)

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple]]:
        for i in range(len(self.pairs)):
            v = self.load(i)
            yield v.image_hu, v.labels, v.spacing

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.generator.set_state(state["generator"])
