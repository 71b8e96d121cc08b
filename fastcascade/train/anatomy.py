"""Training data from real anatomy: synthesized and re-painted images of real label maps.

A real case is a CT, its *full* label map (every structure a model like TotalSegmentator
labels: 61 ids in case A, 90 in case E) and the names of those structures
(``io.structures``). ``load_case`` reads one once, onto the working grid and the training
device, and checks it; two sources then draw new images of it:

- ``SynthSource``: ``synth.synthesize`` per draw -- a deformed label map, an intensity per
  structure, blur, bias, resolution and noise -- the original HU passed so that label 0
  splits into air and body tissue;
- ``RepaintSource``: ``repaint.repaint`` per draw -- the real scan with its
  phase-dependent structures moved to a contrast phase drawn from ``phases``.

Both map the structure ids onto the model's classes (``label_map``, e.g.
``presets.CASE_A_TO_CLASSES``; every other id becomes background), draw with their own
``torch.Generator`` on the cases' device, and give ``dataset.Volume`` s, each with a new
key (every draw is a new image). ``dataset.NiftiSource.from_cases`` serves the same cases
as they are.

>>> cases = [load_case(CaseFiles("ct.nii.gz", "seg.nii.gz", "names.json"), (3.0,) * 3)]
... # doctest: +SKIP
>>> volume = SynthSource(cases, CASE_A_TO_CLASSES, seed=0).draw()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..io.structures import read_structure_names
from ..ops.warp import warp
from .dataset import Volume, read_pair
from .mixed import weighted_choice
from .repaint import PHASES, enhancement_kind, repaint
from .sampling import cut_distance
from .synth import SynthParams, deformation_coordinates, draw_params, synthesize

__all__ = [
    "AnatomyCase",
    "CaseFiles",
    "RepaintSource",
    "SynthSource",
    "check_classes",
    "load_case",
    "map_structures",
]


@dataclass(frozen=True)
class CaseFiles:
    """The files of one real case: CT, full label map on the CT's grid, and the names of
    its structures (a JSON or CSV, ``io.structures``; ``None``: unnamed). ``name`` names
    the case in messages and training records (default: the CT's folder and file)."""

    ct: Path
    labels: Path
    names: Path | None = None
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "ct", Path(self.ct))
        object.__setattr__(self, "labels", Path(self.labels))
        if self.names is not None:
            object.__setattr__(self, "names", Path(self.names))
        if not self.name:
            object.__setattr__(self, "name", f"{self.ct.parent.name}/{self.ct.name}")


class AnatomyCase(NamedTuple):
    """One real case on the working grid (``load_case``).

    ``image_hu``: float32 ``(x, y, z)`` HU; ``structures``: the full label map's ids
    ``(x, y, z)`` (uint8, or int16/int32 for larger ids), both on the training device;
    ``names``: id -> structure name (empty when the case has none); ``spacing`` mm.
    """

    name: str
    image_hu: torch.Tensor
    structures: torch.Tensor
    names: dict[int, str]
    spacing: tuple[float, float, float]
    files: CaseFiles


def load_case(
    files: CaseFiles, spacing: Sequence[float], device: str | torch.device = "cpu"
) -> AnatomyCase:
    """Read a case onto the working grid of ``spacing`` mm (canonical RAS, CT linear,
    labels nearest, as ``dataset.load_nifti_pair``) on ``device``.

    ``ValueError`` naming the case: a missing file, a label map not on the CT's grid, a
    label id that its names do not name.
    """
    if not isinstance(files, CaseFiles):
        raise TypeError(f"files must be a CaseFiles, got {type(files).__name__}")
    for p in (files.ct, files.labels, files.names):
        if p is not None and not p.exists():
            raise FileNotFoundError(f"case {files.name}: file not found: {p}")
    try:
        scan, ids = read_pair(files.ct, files.labels)
        names = read_structure_names(files.names) if files.names is not None else {}
    except ValueError as e:
        raise ValueError(f"case {files.name}: {e}") from None
    present = [int(i) for i in np.unique(ids) if i != 0]
    unnamed = [i for i in present if i not in names]
    if names and unnamed:
        shown = ", ".join(map(str, unnamed[:10])) + (", ..." if len(unnamed) > 10 else "")
        raise ValueError(
            f"case {files.name}: {files.labels} holds label ids {shown} that "
            f"{files.names} does not name"
        )
    hi = max(present, default=0)
    dtype = np.uint8 if hi <= 255 else np.int16 if hi < 2**15 else np.int32
    grid = scan.working_grid(tuple(float(s) for s in spacing))
    structures = grid.labels_from_input(torch.from_numpy(ids.astype(dtype)))
    return AnatomyCase(
        files.name,
        grid.image(device),
        structures.to(device),
        names,
        grid.spacing,
        files,
    )


def _lut(label_map: Mapping[int, int] | None, size: int, device) -> torch.Tensor | None:
    if label_map is None:
        return None
    if any(k < 0 or not 0 <= v <= 255 for k, v in label_map.items()):
        raise ValueError(f"label map ids must be >= 0 and classes 0..255, got {dict(label_map)}")
    lut = torch.zeros(max(size, max(label_map, default=0) + 1), dtype=torch.uint8)
    for src, dst in label_map.items():
        lut[src] = dst
    return lut.to(device)


def map_structures(
    structures: torch.Tensor, label_map: Mapping[int, int] | None, lut: torch.Tensor | None = None
) -> torch.Tensor:
    """Structure ids -> uint8 class ids through ``label_map`` (``{id: class}``, every
    other id 0; ``None``: ids kept, which must fit in uint8), on the input's device.
    ``lut``: a table built before (from ``label_map``), to skip building it again."""
    if label_map is None:
        if structures.numel() and int(structures.max()) > 255:
            raise ValueError("label ids above 255 need a label map onto the model's classes")
        return structures.to(torch.uint8)
    hi = int(structures.max()) if structures.numel() else 0
    if lut is None or lut.numel() <= hi:
        lut = _lut(label_map, hi + 1, structures.device)
    return lut[structures.long()]


def check_classes(
    cases: Sequence[AnatomyCase], label_map: Mapping[int, int] | None, num_classes: int
) -> None:
    """``ValueError`` naming the case when its labels, mapped, are not all class ids of a
    model with ``num_classes`` classes (e.g. a full label map with no ``label_map``)."""
    for case in cases:
        classes = torch.unique(map_structures(case.structures, label_map)).tolist()
        bad = [c for c in classes if c >= num_classes]
        if bad:
            if label_map is None:
                how, fix = "its ids give", "give a label map onto them"
            else:
                how, fix = "the label map gives", "fix the label map"
            raise ValueError(
                f"case {case.name}: {how} class ids {bad[:10]}, but the model has "
                f"{num_classes} classes (0..{num_classes - 1}); {fix}"
            )


def _check_cases(cases: Sequence[AnatomyCase], what: str) -> list[AnatomyCase]:
    cases = list(cases)
    if not cases:
        raise ValueError(f"{what} needs at least one case")
    for c in cases:
        if not isinstance(c, AnatomyCase):
            raise TypeError(f"{what} takes cases from load_case, got {type(c).__name__}")
        if not c.names:
            raise ValueError(f"{what}: case {c.name} has no structure names")
    first = cases[0]
    for c in cases[1:]:
        # Working grids round voxel counts, so spacings differ by a little (as trainer).
        same = np.allclose(c.spacing, first.spacing, rtol=0.05, atol=0.0)
        if c.image_hu.device != first.image_hu.device or not same:
            raise ValueError(
                f"{what}: case {c.name} is on {c.image_hu.device} at {c.spacing} mm, "
                f"case {first.name} on {first.image_hu.device} at {first.spacing} mm"
            )
    return cases


class _CaseSource:
    """Shared by the two sources: cases, their mapped labels and cut distances, a
    generator on the cases' device, a count of draws."""

    kind = ""

    def __init__(self, cases, label_map, seed):
        self.cases = _check_cases(cases, type(self).__name__)
        self.device = self.cases[0].image_hu.device
        self.spacing = self.cases[0].spacing
        self.label_map = None if label_map is None else dict(label_map)
        size = max(int(c.structures.max()) for c in self.cases) + 1
        self._lut = _lut(self.label_map, size, self.device)
        self.labels = [map_structures(c.structures, self.label_map, self._lut) for c in self.cases]
        self.cut = [cut_distance(labels) for labels in self.labels]
        self.seed = int(seed)
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed)
        self.draws = 0

    def _pick(self) -> int:
        g = self.generator
        return int(torch.randint(len(self.cases), (1,), generator=g, device=g.device))

    def __len__(self) -> int:
        return len(self.cases)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self.generator.set_state(state["generator"])

    def describe(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "cases": [c.name for c in self.cases]}


class SynthSource(_CaseSource):
    """Synthetic CT images of real label maps (``synth.synthesize``), one per draw.

    ``cases``: from ``load_case``, each with names and at least one labelled structure;
    ``label_map``: structure id -> class id; ``params``: the synthesis's ranges
    (``synth.SynthParams``). A draw picks a case uniformly, then synthesizes from it with
    the original HU, all with the source's generator (on the cases' device). The
    volume's ``cut_distance`` is the case's (``sampling.cut_distance`` of its mapped
    labels) moved by the same deformation as the labels, so the faces where the real
    scan cut an organ stay marked wherever the deformation takes them; voxels brought in
    from outside the scan get distance 0 (they do not count in the loss, like the
    sampler's padding).
    """

    kind = "synth"

    def __init__(
        self,
        cases: Sequence[AnatomyCase],
        label_map: Mapping[int, int] | None,
        seed: int = 0,
        params: SynthParams | None = None,
    ):
        super().__init__(cases, label_map, seed)
        self.params = SynthParams() if params is None else params
        if not isinstance(self.params, SynthParams):
            raise TypeError(f"params must be SynthParams, got {type(self.params).__name__}")
        for case in self.cases:
            if not bool((case.structures != 0).any()):
                raise ValueError(f"SynthSource: case {case.name} has no labelled structures")

    def draw(self) -> Volume:
        k = self._pick()
        case = self.cases[k]
        cut = self.cut[k]
        if self.params.deform:
            coords = self.next_deformation(case)
            out, _ = warp(cut[None], None, coords, fill_value=0.0, backend=self.params.backend)
            cut = out[0]
        image, structures = synthesize(
            case.structures,
            case.image_hu,
            case.spacing,
            case.names,
            self.generator,
            params=self.params,
        )
        labels = map_structures(structures, self.label_map, self._lut)
        key = f"synth-{case.name}-{self.draws}"
        self.draws += 1
        return Volume(image, labels, case.spacing, key, cut)

    def next_deformation(self, case: AnatomyCase) -> torch.Tensor:
        """The sample positions ``(3, x, y, z)`` (voxels) of the deformation that the next
        ``synthesize`` of ``case`` will draw, without drawing anything."""
        # synthesize() draws its parameters first (draw_params' contract): a copy of the
        # generator gives the same deformation without disturbing the real stream.
        g = torch.Generator(device=self.generator.device)
        g.set_state(self.generator.get_state())
        shape = tuple(case.structures.shape)
        draw = draw_params(shape, case.names, g, self.params, has_hu=True)
        return deformation_coordinates(shape, draw, self.params.grid_spacing, self.device)

    def describe(self) -> dict:
        params = json.loads(json.dumps(dataclasses.asdict(self.params)))  # tuples -> lists
        return {**super().describe(), "params": params}


class RepaintSource(_CaseSource):
    """Real scans re-painted to a contrast phase (``repaint.repaint``), one per draw.

    ``phases``: the phases to draw from (names of ``repaint.PHASES``), with
    ``phase_weights`` (default: equal); ``scale_range``: the texture scale of
    ``repaint``. A draw picks a case uniformly, then a phase, then re-paints, all with
    the source's generator. Each case needs a structure whose enhancement depends on the
    phase (``repaint.enhancement_kind``).
    """

    kind = "repaint"

    def __init__(
        self,
        cases: Sequence[AnatomyCase],
        label_map: Mapping[int, int] | None,
        seed: int = 0,
        phases: Sequence[str] = PHASES,
        phase_weights: Sequence[float] | None = None,
        scale_range: Sequence[float] = (1.0, 1.0),
    ):
        super().__init__(cases, label_map, seed)
        self.phases = tuple(phases)
        unknown = [p for p in self.phases if p not in PHASES]
        if not self.phases or unknown:
            raise ValueError(f"phases must be names of {PHASES}, got {list(phases)}")
        if phase_weights is None:
            phase_weights = [1.0] * len(self.phases)
        if len(phase_weights) != len(self.phases):
            raise ValueError(
                f"phase_weights needs one weight per phase ({len(self.phases)}), "
                f"got {len(phase_weights)}"
            )
        self.phase_weights = tuple(float(w) for w in phase_weights)
        self.scale_range = tuple(float(s) for s in scale_range)
        for case in self.cases:
            present = set(torch.unique(case.structures).tolist())
            if not any(enhancement_kind(case.names[i]) for i in present if i in case.names):
                raise ValueError(
                    f"RepaintSource: case {case.name} has no structure whose contrast "
                    "depends on the phase (vessels, kidneys, spleen, liver, pancreas)"
                )
        weighted_choice(self.generator, self.phase_weights, check_only=True)

    def draw(self) -> Volume:
        k = self._pick()
        phase = self.phases[weighted_choice(self.generator, self.phase_weights)]
        case = self.cases[k]
        image = repaint(
            case.image_hu,
            case.structures,
            case.names,
            phase,
            self.generator,
            scale_range=self.scale_range,
        )
        key = f"repaint-{case.name}-{phase}-{self.draws}"
        self.draws += 1
        return Volume(image, self.labels[k], case.spacing, key, self.cut[k])

    def describe(self) -> dict:
        return {
            **super().describe(),
            "phases": list(self.phases),
            "phase_weights": list(self.phase_weights),
            "scale_range": list(self.scale_range),
        }
