"""``fastcascade segment INPUT -o OUTPUT``: labels (and probabilities, a preview,
statistics, one mask per organ, a DICOM SEG) for one CT scan.

The inference flags are in ``segment_options.py``, the outputs beyond the labels and
probabilities in ``segment_outputs.py``.

$ fastcascade segment ct.nii.gz -o seg.nii.gz --probabilities probs.nii.gz
$ fastcascade segment dicom_folder/ -o seg.nii.gz --dicom-seg seg.dcm
$ fastcascade segment scans/ -o segs/            # many scans: segment_batch.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..io.limits import human_bytes
from . import arguments, segment_batch, segment_options, segment_outputs

EXAMPLES = """\
examples:
  fastcascade segment ct.nii.gz -o seg.nii.gz
  fastcascade segment ct.nii.gz -o out/seg.nii.gz --preview out/seg.png \\
      --statistics out/stats.json --split out/masks
  fastcascade segment ct.nii.gz -o seg.nii.gz --organs liver,spleen --largest-component
  fastcascade segment ct.nii.gz -o seg.nii.gz --probabilities probs.nii.gz --fp16-probabilities
  fastcascade segment ct.nii.gz -o seg.nii.gz --device cpu --threads 8 --memory-budget 4G
  fastcascade segment ct.nii.gz -o seg.nii.gz --inference tiles --weights gaussian --no-skip

Outputs are written all or none, the label file last, then seg.done.json listing them;
an existing output stops the command before any work unless --overwrite is given.

many scans (the model is loaded once, the next scan read while one runs):
  fastcascade segment a.nii.gz b.nii.gz -o segs/      # segs/a.nii.gz, segs/b.nii.gz
  fastcascade segment scans/ -o segs/                 # every scan file in scans/
  fastcascade segment --list cases.txt -o segs/ --num-parts 4 --part-id 0
  torchrun --nproc-per-node 4 -m fastcascade segment scans/ -o segs/
A scan that fails is recorded in segs/failures.json and the others go on (exit status 1
if any failed); a re-run skips scans whose <name>.done.json matches (--overwrite: redo).
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``segment`` to the ``fastcascade`` command's subparsers."""
    p = sub.add_parser(
        "segment",
        help="segment a CT scan (NIfTI, NRRD, MetaImage or DICOM) into organ labels",
        description="Segment INPUT (a CT: .nii/.nii.gz, .nrrd, .mha/.mhd, or a folder or "
        ".zip holding one DICOM series) and write the labels on its own grid, with a JSON "
        "of label names beside them.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs",
        metavar="INPUT",
        nargs="*",
        type=Path,
        help="CT scan: .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, or a folder or .zip of one "
        "DICOM CT series (NRRD, MetaImage and DICOM need pip install 'fastcascade[dicom]'); "
        "several, or a folder of scan files, segment many (see 'many scans')",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="label file (.nii or .nii.gz); with many scans, the output folder",
    )
    p.add_argument("--model", default=None, help="saved cascade (default: the embedded model)")
    p.add_argument(
        "--device",
        default="auto",
        type=arguments.device,
        help="auto (a GPU if present, else the CPU), cpu, cuda or cuda:N (default: auto)",
    )
    p.add_argument(
        "--probabilities", metavar="FILE", type=Path, help="also write class probabilities"
    )
    p.add_argument(
        "--fp16-probabilities",
        action="store_true",
        help="store probabilities in 16 bits (uint16 scaled by 1/65535) instead of float32",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (without it, an existing output stops the command "
        "before any work)",
    )
    segment_outputs.add_arguments(p)
    segment_options.add_arguments(p)
    dicom = p.add_argument_group("DICOM")
    dicom.add_argument(
        "--series",
        metavar="UID",
        default=None,
        help="the SeriesInstanceUID to read where INPUT holds several series (the error "
        "without it lists them)",
    )
    dicom.add_argument(
        "--dicom-seg",
        metavar="FILE",
        type=Path,
        default=None,
        help="also write the labels as a DICOM SEG object referencing INPUT's series "
        "(DICOM input only)",
    )
    segment_batch.add_arguments(p)
    p.set_defaults(func=_cmd_segment, parser=p)


def _cmd_segment(args: argparse.Namespace) -> int:
    import fastcascade  # segment() looked up at call time (tests replace it)

    from ..io.atomic import inside, output_folders, same_file
    from ..io.dicom import is_dicom_input
    from ..io.nifti import completion_marker_path, label_names_path

    if args.fp16_probabilities and args.probabilities is None:
        args.parser.error("--fp16-probabilities needs --probabilities FILE")
    if not args.inputs and args.list is None:
        args.parser.error("give an INPUT scan (or several, or --list FILE)")
    if segment_batch.is_batch(args):
        return segment_batch.run(args)
    source: Path = args.inputs[0]
    if not source.exists():
        if source.is_symlink():
            raise FileNotFoundError(
                f"input scan {source} is a symbolic link to nothing (broken or a loop)"
            )
        raise FileNotFoundError(f"input scan {source} does not exist")
    if args.dicom_seg is not None and not is_dicom_input(source):
        raise ValueError(
            f"--dicom-seg references the input's DICOM series, and {source} is not one "
            "(expected a folder or .zip of a DICOM series)"
        )
    outputs = [args.output, label_names_path(args.output)]
    if args.dicom_seg is not None:
        outputs.append(args.dicom_seg)
    if args.probabilities is not None:
        outputs += [args.probabilities, label_names_path(args.probabilities)]
        if same_file(args.probabilities, args.output):
            raise ValueError("--probabilities and --output name the same file")
    segment_outputs.check(args)
    outputs += segment_outputs.planned(args)
    outputs.append(completion_marker_path(args.output))
    _check_distinct(outputs)
    for out in outputs:  # checked before the work, and again by the writers
        if same_file(out, source):
            raise ValueError(f"refusing to write {out}: it is the input scan")
        if inside(out, source):
            raise ValueError(f"refusing to write {out}: it is inside the input folder {source}")
        if out.is_dir():
            raise IsADirectoryError(f"{out} is a folder; expected a file name")
    arguments.refuse_existing(outputs, args.overwrite)

    options = segment_options.options(args)
    series = {} if args.series is None else {"series": args.series}
    with output_folders({p.parent for p in outputs}):
        progress = _TileProgress(disable=args.quiet)
        try:
            with segment_options.threads(args.threads):
                result = fastcascade.segment(
                    str(source),
                    model=args.model,
                    device=args.device,
                    progress=progress,
                    **series,
                    **options,
                )
        finally:
            progress.close()

        t0 = time.perf_counter()
        result = segment_outputs.apply(result, args)
        written = result.save(
            args.output,
            args.probabilities,
            "float16" if args.fp16_probabilities else "float32",
            marker=segment_batch.marker_record(args, source, options),
            dicom_seg=args.dicom_seg,
            **segment_outputs.save_arguments(args),
        )
    if not args.quiet:
        timings = {**result.timings, "write": time.perf_counter() - t0}
        print(_summary(result, timings, written))
    return 0


def _check_distinct(outputs: Sequence[Path]) -> None:
    """Two outputs naming one file (``--preview`` and ``-o`` alike, a link to another
    output) are refused before the work."""
    seen: dict[str, Path] = {}
    for out in outputs:
        key = os.path.realpath(out)
        if key in seen:
            raise ValueError(f"{seen[key]} and {out} name the same file; give each output its own")
        seen[key] = out


class _TileProgress:
    """``progress(stage, done, total)`` for ``segment``: one tqdm bar per stage, on stderr."""

    def __init__(self, disable: bool) -> None:
        self.disable = disable
        self.stage: str | None = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.disable:
            return
        from tqdm import tqdm

        if stage != self.stage or self.bar is None:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=stage, unit="tile", file=sys.stderr, leave=True)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _stage_line(stage: str, computed: int, total: int, report: dict | None) -> str:
    """``stage1: 1 of 1 slab passes computed, 1.1x the grid's voxels, budget 11.3 GiB``."""
    if report is None:
        return f"{stage}: {computed} of {total} tiles computed"
    kind = "slab passes" if report["inference"] == "slabs" else "tiles"
    line = (
        f"{stage}: {computed} of {total} {kind} computed, "
        f"{report['voxels_computed'] / max(report['voxels_grid'], 1):.2f}x the grid's voxels"
    )
    budget = report["memory_budget"]
    return line + (", no memory budget" if budget is None else f", budget {human_bytes(budget)}")


def _summary(result, timings: dict[str, float], outputs: Sequence[Path]) -> str:
    lines = ["times (s):"]
    lines += [f"  {name:<14}{seconds:8.2f}" for name, seconds in timings.items()]
    lines.append(
        f"C1 (body) {100 * result.c1_fraction:.1f}% of the volume, "
        f"C2 (candidates) {100 * result.c2_fraction:.1f}%"
    )
    for stage, (computed, total) in result.tiles.items():
        lines.append(_stage_line(stage, computed, total, result.passes.get(stage)))
    lines.append("wrote " + ", ".join(str(p) for p in outputs))
    return "\n".join(lines)
