"""Labels out as a DICOM Segmentation (SEG) object referencing the CT series they came from.

The SEG (highdicom) is BINARY, one segment per class but background, numbered by class
id (segment ``c`` is class ``c``), labelled with the class name and coded in SNOMED CT
(category "Anatomical Structure"; the type from ``SEGMENT_TYPES``, else "Anatomical
Structure" itself for a class this table does not know). Its frames are the slices of
the source series (empty frames left out, as highdicom does), each referencing its
source image, and it copies the patient and study of the series, so a PACS or viewer
files it beside the CT. Algorithm: "fastcascade", type AUTOMATIC, family "Artificial
Intelligence".

Labels are on the series' own grid, as ``io/dicom.py`` reads it: ``labels[i, j, k]`` is
column ``i``, row ``j`` of the ``k``-th slice along the slice normal.

>>> path, write = seg_output("seg.dcm", labels, CLASS_NAMES, scan.dicom, "0.1.0")  # doctest: +SKIP
>>> write(path)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .dicom import DicomSeries
from .sitk import require

PathLike = str | os.PathLike

#: SNOMED CT (value, meaning) of the segmented property type per class name.
SEGMENT_TYPES: dict[str, tuple[str, str]] = {
    "liver": ("10200004", "Liver"),
    "spleen": ("78961009", "Spleen"),
    "kidney_right": ("9846003", "Right kidney"),
    "kidney_left": ("18639004", "Left kidney"),
    "kidney": ("64033007", "Kidney"),
    "pancreas": ("15776009", "Pancreas"),
    "stomach": ("69695003", "Stomach"),
    "gallbladder": ("28231008", "Gallbladder"),
    "aorta": ("15825003", "Aorta"),
    "inferior_vena_cava": ("64131007", "Inferior vena cava"),
    "portal_vein": ("32764006", "Portal vein"),
    "splenic_vein": ("35819009", "Splenic vein"),
    "portal_splenic_vein": ("29092000", "Vein"),  # two veins in one class: no single code
    "artery": ("51114001", "Artery"),
    "vein": ("29092000", "Vein"),
}
ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")


def seg_output(
    path: PathLike,
    labels: Any,
    class_names: Sequence[str],
    series: DicomSeries,
    software_version: str,
) -> tuple[Path, Callable[[Path], None]]:
    """Build the SEG of ``labels`` and return ``(path, write)``: ``write(tmp)`` saves it
    to ``tmp``. Everything that can fail but the disk fails here, before any file is
    written (``io.nifti.write_outputs`` then writes it all or nothing with the rest).

    ``labels``: integer ``(columns, rows, slices)`` ids in ``[0, len(class_names))`` on
    ``series``' grid (numpy, or a tensor on any device). Raises ``ValueError`` for labels
    off that grid or out of range, or a series highdicom cannot reference.
    """
    hd = require("highdicom", "writing a DICOM SEG")
    from pydicom.sr.codedict import codes

    if not isinstance(series, DicomSeries):
        raise ValueError(
            "a DICOM SEG references the DICOM series the labels came from; this result did "
            "not come from one (give a DICOM folder or .zip as the input)"
        )
    path = Path(path)
    arr = labels.detach().cpu().numpy() if hasattr(labels, "detach") else np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels have dtype {arr.dtype}; expected integer class ids")
    if tuple(arr.shape) != tuple(series.shape):
        raise ValueError(
            f"labels have shape {tuple(arr.shape)}; the series {series.uid} is "
            f"{series.shape} (columns, rows, slices)"
        )
    names = [str(n) for n in class_names]
    if len(names) < 2 or len(names) > 65536:
        raise ValueError(f"{len(names)} classes; a SEG needs background and 1 to 65535 more")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= len(names)):
        raise ValueError(
            f"labels range over [{int(arr.min())}, {int(arr.max())}]; expected ids in "
            f"[0, {len(names) - 1}]"
        )
    pixels = np.ascontiguousarray(arr.transpose(2, 1, 0)).astype(
        np.uint8 if len(names) <= 256 else np.uint16, copy=False
    )  # (frames = slices, rows, columns)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="fastcascade",
        version=software_version,
        family=codes.cid7162.ArtificialIntelligence,
    )
    category = hd.sr.CodedConcept(ANATOMICAL_STRUCTURE[0], "SCT", ANATOMICAL_STRUCTURE[1])
    segments = [
        hd.seg.SegmentDescription(
            segment_number=c,
            segment_label=name[:64],
            segmented_property_category=category,
            segmented_property_type=hd.sr.CodedConcept(
                SEGMENT_TYPES.get(name, ANATOMICAL_STRUCTURE)[0],
                "SCT",
                SEGMENT_TYPES.get(name, ANATOMICAL_STRUCTURE)[1],
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for c, name in enumerate(names[1:], start=1)
    ]
    sources = [_source_header(h) for h in series.headers]
    number = int(sources[0].get("SeriesNumber", 0) or 0)
    try:
        with warnings.catch_warnings():
            # highdicom's notes on the source's own values (e.g. a one-part patient name)
            warnings.simplefilter("ignore", UserWarning)
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixels,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=segments,
                series_instance_uid=hd.UID(),
                series_number=number + 1000 if 0 <= number < 2**31 - 1000 else 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="fastcascade",
                manufacturer_model_name="fastcascade",
                software_versions=software_version,
                device_serial_number="0",
                series_description="fastcascade segmentation",
                content_label="FASTCASCADE",
                content_description="Organ labels by fastcascade",
            )
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(
            f"cannot build a DICOM SEG referencing series {series.uid} of {series.source} ({e})"
        ) from e
    return path, lambda tmp: seg.save_as(str(tmp))


def _source_header(header: Any) -> Any:
    """A copy of a slice's header that highdicom accepts: an empty SpecificCharacterSet
    (allowed, meaning the default repertoire, but refused by highdicom) is removed."""
    header = copy.deepcopy(header)
    if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
        del header.SpecificCharacterSet
    return header
