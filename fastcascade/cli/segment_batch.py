"""``fastcascade segment`` with many scans: several INPUTs, a folder of scan files, or
``--list FILE``, into the output folder ``-o OUTDIR`` (``OUTDIR/<name>.nii.gz``, its
``<name>.json`` and ``<name>.done.json`` per scan).

The model is loaded once; the next scan is read in a background thread while the current
one runs (``fastcascade.batch.run_batch``). A scan that fails is recorded in
``OUTDIR/failures.json`` (input and reason) and the others go on; the exit status is 1
if any failed. A re-run skips the scans whose completion marker matches this run's
input, model and options (``--overwrite`` redoes them). ``--num-parts N --part-id K``,
or torchrun's ``WORLD_SIZE``/``RANK`` where the flags are absent, give this process
every N-th scan of the sorted list from the K-th on.

$ fastcascade segment scans/ -o segs/
$ fastcascade segment --list cases.txt -o segs/ --num-parts 2 --part-id 1
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import segment_options, segment_outputs

if TYPE_CHECKING:
    from ..batch import Job

#: Flags that name one output file, which several scans cannot share.
_ONE_FILE_FLAGS = {
    "probabilities": "--probabilities",
    "preview": "--preview",
    "statistics": "--statistics",
    "split": "--split",
    "dicom_seg": "--dicom-seg",
    "series": "--series",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the many-scans flags as one group of ``parser``."""
    g = parser.add_argument_group(
        "many scans (several INPUTs, a folder of scan files, or --list; -o is then a folder)"
    )
    g.add_argument(
        "--list",
        metavar="FILE",
        type=Path,
        default=None,
        help="a text file naming one scan per line (# starts a comment; relative paths "
        "are taken from the file's folder); a missing scan is recorded as a failure",
    )
    g.add_argument(
        "--num-parts",
        metavar="N",
        type=int,
        default=None,
        help="split the sorted scans into N parts, one per process (default: torchrun's "
        "WORLD_SIZE, else 1)",
    )
    g.add_argument(
        "--part-id",
        metavar="K",
        type=int,
        default=None,
        help="the part this process runs, 0..N-1: every N-th scan from the K-th "
        "(default: torchrun's RANK, else 0)",
    )


def is_batch(args: argparse.Namespace) -> bool:
    """Whether the command line asks for many scans (else one, as always)."""
    from ..batch import is_scan_folder

    return (
        args.list is not None
        or len(args.inputs) > 1
        or args.num_parts is not None
        or args.part_id is not None
        or is_scan_folder(args.inputs[0])
    )


def run(args: argparse.Namespace) -> int:
    """Segment every scan of this process's part; returns 0, or 1 if any failed."""
    from ..batch import failures_path, plan_jobs, read_list, run_batch, select_part, write_failures
    from ..io.atomic import output_folders

    for name, flag in _ONE_FILE_FLAGS.items():
        if getattr(args, name) is not None:
            raise ValueError(
                f"{flag} names one file (or scan series); it cannot be used with many scans"
            )
    outdir: Path = args.output
    if outdir.name.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"-o {outdir}: with many scans, -o is an output folder, not a file")
    num_parts, part_id = _part(args)
    listed = [] if args.list is None else read_list(args.list)
    jobs = plan_jobs([*args.inputs, *listed], outdir)
    mine = select_part(jobs, num_parts, part_id)
    segment_outputs.check(args)
    options = segment_options.options(args)

    import fastcascade  # load_model looked up at call time

    with segment_options.threads(args.threads):
        predictor = fastcascade.load_model(args.model, device=_device(args.device))
        load, process, done = job_steps(args, options, predictor)
        with output_folders([outdir]):
            report = run_batch(
                mine,
                load,
                process,
                done=done,
                show_progress=not args.quiet,
                raise_errors=args.debug,
            )
            failures = failures_path(outdir, num_parts, part_id)
            write_failures(failures, report.failures)
    if not args.quiet:
        part = "" if num_parts == 1 else f" (part {part_id} of {num_parts})"
        print(
            f"{len(report.segmented)} segmented, {len(report.skipped)} already done, "
            f"{len(report.failures)} failed{part}; outputs in {outdir}",
            file=sys.stderr,
        )
    for failure in report.failures:
        print(
            f"fastcascade segment: failed: {failure['input']}: {failure['reason']}", file=sys.stderr
        )
    if report.failures:
        print(f"fastcascade segment: failures listed in {failures}", file=sys.stderr)
        return 1
    return 0


def job_steps(
    args: argparse.Namespace, options: dict[str, Any], predictor
) -> tuple[Callable[[Job], Any], Callable[[Job, Any], None], Callable[[Job], bool]]:
    """The command's ``load``, ``process`` and ``done`` for
    :func:`fastcascade.batch.run_batch` (also what each Ray actor runs,
    ``fastcascade.cli.ray_batch``): read a scan and its completion record, segment it with
    ``predictor`` (a :class:`~fastcascade.api.Predictor`) and ``options`` (from
    ``segment_options.options(args)``), apply the clean-up flags and save the labels with
    their marker; a job is done when its marker matches (unless ``--overwrite``)."""
    from ..batch import marker_matches
    from ..io.scan import load_scan

    def load(job: Job) -> tuple[dict[str, Any], Any]:
        record = marker_record(args, job.input, options)  # the input as it is read
        return record, load_scan(str(job.input), hu_check=options["hu_check"])

    def process(job: Job, loaded: tuple[dict[str, Any], Any]) -> None:
        record, scan = loaded
        result = predictor.segment(scan, **options)
        result = segment_outputs.apply(result, args)
        result.save(job.output, marker=record)

    def done(job: Job) -> bool:
        return not args.overwrite and marker_matches(job, marker_record(args, job.input, options))

    return load, process, done


def marker_record(args: argparse.Namespace, source: Path, options: dict[str, Any]) -> dict:
    """The completion record (:func:`fastcascade.batch.completion_record`) of the
    command's outputs for ``source``: its model, ``options``
    (``segment_options.options(args)``), clean-up, device, threads and series flags."""
    from ..batch import completion_record

    return completion_record(
        source,
        model=args.model,
        options=options,
        postprocess=segment_outputs.record(args),
        device=args.device,
        threads=args.threads,
        series=args.series,
        fp16_probabilities=args.fp16_probabilities,
    )


def _part(args: argparse.Namespace) -> tuple[int, int]:
    """``(num_parts, part_id)`` from the flags, else torchrun's environment, else (1, 0)."""
    from ..batch import part_from_environment

    if (args.num_parts is None) != (args.part_id is None):
        args.parser.error("--num-parts and --part-id go together")
    if args.num_parts is not None:
        parts = args.num_parts, args.part_id
    else:
        parts = part_from_environment() or (1, 0)
    num_parts, part_id = parts
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(
            f"part {part_id} of {num_parts}: expected --num-parts >= 1 and "
            "0 <= --part-id < --num-parts"
        )
    return num_parts, part_id


def _device(device: str) -> str:
    """Under torchrun (``LOCAL_RANK`` set) ``auto`` means this process's own GPU."""
    local = os.environ.get("LOCAL_RANK")
    if device != "auto" or local is None:
        return device
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(local) % torch.cuda.device_count()}"
