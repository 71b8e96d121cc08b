"""Many scans with one loaded model: which inputs, which outputs, which part of the work
is this process's, what is already done, and the loop that reads the next scan while the
current one runs.

The command line (``fastcascade segment IN1 IN2 … -o OUTDIR``) is built on these; they
know no argument parser. A job is one input and its label file ``OUTDIR/<stem>.nii.gz``
(beside it ``<stem>.json`` with the label names and the completion marker
``<stem>.done.json``).

>>> jobs = plan_jobs(["b.nii.gz", "a.nii.gz"], "out")  # doctest: +SKIP
>>> [j.output.name for j in select_part(jobs, 2, 0)]  # doctest: +SKIP
['a.nii.gz']
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io.atomic import atomic_write, inside, same_file
from .io.nifti import completion_marker_path

PathLike = str | os.PathLike

#: File names read as one scan each when a folder of them is given.
SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass(frozen=True)
class Job:
    """One input scan and its label file; ``error``: why it cannot run (it is then
    reported as a failure without being read)."""

    input: Path
    output: Path
    error: str | None = None

    @property
    def marker(self) -> Path:
        """The completion marker beside the label file."""
        return completion_marker_path(self.output)


@dataclass
class BatchReport:
    """What a batch did: inputs segmented, skipped (already done) and failed
    (``{"input", "reason"}`` each)."""

    segmented: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)


def scan_stem(path: PathLike) -> str:
    """The name of a scan without its format's suffix: ``a/ct.nii.gz`` → ``ct``; a DICOM
    folder ``a/case1/`` → ``case1``, ``case1.zip`` → ``case1``."""
    name = Path(path).name
    for suffix in (*SCAN_SUFFIXES, ".zip"):
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


def is_scan_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SCAN_SUFFIXES)


def is_scan_folder(path: PathLike) -> bool:
    """Whether ``path`` is a folder of scan files (NIfTI, NRRD, MetaImage at its top
    level), read as many scans; any other folder is one DICOM series."""
    path = Path(path)
    return path.is_dir() and any(is_scan_file(p) for p in path.iterdir())


def read_list(path: PathLike) -> list[Path]:
    """The inputs named in a list file: one path per line; blank lines and lines starting
    with ``#`` are ignored; relative paths are taken from the list file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    found = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line).expanduser()
            found.append(entry if entry.is_absolute() else path.parent / entry)
    return found


def expand_inputs(inputs: Iterable[PathLike]) -> list[Path]:
    """Every scan the inputs name: a folder of scan files gives its files (sorted, not
    recursive), anything else (a file, a DICOM folder or zip, a missing path) itself."""
    found: list[Path] = []
    for entry in map(Path, inputs):
        if is_scan_folder(entry):
            found += sorted(p for p in entry.iterdir() if is_scan_file(p))
        else:
            found.append(entry)
    return found


def plan_jobs(inputs: Iterable[PathLike], outdir: PathLike) -> list[Job]:
    """One job per distinct scan of ``inputs`` (folders of scan files expanded by
    :func:`expand_inputs`; sorted by path, duplicates dropped), its label file
    ``outdir/<stem>.nii.gz``. A missing input becomes a job with ``error`` set.

    Raises ``ValueError`` where ``outdir`` lies in an input folder (its outputs would be
    read as inputs), where an output would be an input, or where two inputs share one
    stem (their outputs would collide), naming them.
    """
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise NotADirectoryError(f"output folder {outdir} is a file; expected a folder")
    inputs = [Path(p) for p in inputs]
    for folder in inputs:
        if folder.is_dir() and inside(outdir, folder):
            raise ValueError(
                f"output folder {outdir} is inside the input folder {folder}; its outputs "
                "would be read as inputs (choose a folder outside it)"
            )
    unique: dict[str, Path] = {}
    for p in expand_inputs(inputs):
        unique.setdefault(os.path.realpath(p), p)
    jobs: list[Job] = []
    stems: dict[str, Path] = {}
    for p in sorted(unique.values(), key=str):
        stem = scan_stem(p)
        if stem in stems:
            raise ValueError(
                f"{stems[stem]} and {p} would both write {outdir / (stem + '.nii.gz')}; "
                "rename one or segment them into different folders"
            )
        stems[stem] = p
        output = outdir / f"{stem}.nii.gz"
        if same_file(output, p):
            raise ValueError(f"refusing to write {output}: it is an input scan")
        error = None
        if not p.exists():
            error = "broken symbolic link" if p.is_symlink() else "does not exist"
        jobs.append(Job(p, output, error))
    return jobs


def select_part(jobs: Sequence[Job], num_parts: int, part_id: int) -> list[Job]:
    """This process's share: every ``num_parts``-th job of the sorted list from
    ``part_id`` on. The parts are disjoint and together cover every job."""
    if not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(f"the number of parts must be an integer >= 1, got {num_parts!r}")
    if not isinstance(part_id, int) or not 0 <= part_id < num_parts:
        raise ValueError(f"the part id must be in 0..{num_parts - 1}, got {part_id!r}")
    ordered = sorted(jobs, key=lambda j: str(j.input))
    return ordered[part_id::num_parts]


def part_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``(num_parts, part_id)`` from torchrun's ``WORLD_SIZE`` and ``RANK``; ``None``
    where neither is set. One without the other, or a value that is not an integer,
    raises ``ValueError``."""
    env = os.environ if environ is None else environ
    world, rank = env.get("WORLD_SIZE"), env.get("RANK")
    if world is None and rank is None:
        return None
    if world is None or rank is None:
        raise ValueError("RANK and WORLD_SIZE must be set together (as torchrun sets them)")
    try:
        return int(world), int(rank)
    except ValueError:
        raise ValueError(f"RANK={rank!r} and WORLD_SIZE={world!r}: expected integers") from None


def failures_path(outdir: PathLike, num_parts: int = 1, part_id: int = 0) -> Path:
    """Where a part reports its failures: ``failures.json``, or
    ``failures.part-K-of-N.json`` when the work is split (no two parts write one file)."""
    name = "failures.json" if num_parts == 1 else f"failures.part-{part_id}-of-{num_parts}.json"
    return Path(outdir) / name


def write_failures(path: PathLike, failures: Sequence[Mapping[str, str]]) -> None:
    """Write ``failures`` (``[{"input", "reason"}, …]``) as JSON atomically; with none,
    remove an old file of that name so it cannot be taken for this run's."""
    path = Path(path)
    if not failures:
        path.unlink(missing_ok=True)
        return
    text = json.dumps(list(failures), indent=1) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def completion_record(
    source: PathLike,
    *,
    model: PathLike | None,
    options: Mapping[str, Any],
    postprocess: Mapping[str, Any],
    device: str,
    threads: int | None,
    series: str | None = None,
    fp16_probabilities: bool = False,
) -> dict[str, Any]:
    """What the completion marker of ``source``'s outputs records, before the outputs'
    list is added (``SegmentationResult.save(marker=...)`` adds it): the input as it is
    read now, the model, the options and the package's version. A later run that builds
    the same record has nothing to do (:func:`marker_matches`).

    - ``source``: the input scan (a file, or a DICOM folder or zip); recorded as its
      resolved path, size in bytes and latest modification (ns); for a folder, over
      all its files, with their count.
    - ``model``: the saved cascade's path (resolved), or ``None`` for the embedded
      model (recorded as ``"default"``).
    - ``options``: the keyword arguments given to ``Predictor.segment`` (the fields of
      :class:`~fastcascade.options.InferenceOptions`); tuples are recorded as lists.
    - ``postprocess``: the label clean-up asked for (``{"organs": [...] | None,
      "largest_component": bool}``); ``device``, ``threads``, ``series`` (a DICOM
      series UID or ``None``) and ``fp16_probabilities``: as given.

    Returns a dict of JSON values (keys in a fixed order: the marker's file reads the
    same from run to run).

    >>> completion_record("ct.nii.gz", model=None, options={"overlap": False},
    ...                   postprocess={"organs": None, "largest_component": False},
    ...                   device="auto", threads=None)["model"]  # doctest: +SKIP
    'default'
    """
    from . import __version__

    return {
        "format": "fastcascade-segment",
        "version": __version__,
        "input": _input_record(Path(source)),
        "series": series,
        "model": "default" if model is None else str(Path(model).resolve()),
        "options": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
            "fp16_probabilities": fp16_probabilities,
        },
        "postprocess": dict(postprocess),
        "device": device,
        "threads": threads,
    }


def _input_record(source: Path) -> dict[str, Any]:
    """The input as it was read: path, bytes and latest modification; for a folder, over
    all its files (a folder's own time misses a file rewritten in place)."""
    if not source.is_dir():
        stat = source.stat()
        return {"path": str(source.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    stats = [p.stat() for p in sorted(source.rglob("*")) if p.is_file()]
    return {
        "path": str(source.resolve()),
        "files": len(stats),
        "size": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=source.stat().st_mtime_ns),
    }


def marker_matches(job: Job, record: Mapping[str, Any]) -> bool:
    """Whether the job's completion marker holds ``record`` (what a new run would write:
    input, model, options) and every output it lists still exists: then there is nothing
    to do. A series UID the marker gained from a DICOM input counts as matching a
    record without one."""
    try:
        saved = json.loads(job.marker.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict):
        return False
    listed = saved.pop("outputs", None)
    if not isinstance(listed, list) or not listed:
        return False
    if not all((job.marker.parent / p).is_file() for p in listed):
        return False
    expected = json.loads(json.dumps(dict(record)))  # tuples → lists, as saved
    if expected.get("series") is None:
        saved.pop("series", None)
        expected.pop("series", None)
    return saved == expected


def run_batch(
    jobs: Sequence[Job],
    load: Callable[[Job], Any],
    process: Callable[[Job, Any], None],
    *,
    done: Callable[[Job], bool] | None = None,
    show_progress: bool = True,
    raise_errors: bool = False,
) -> BatchReport:
    """Run ``process(job, load(job))`` for every job, reading the next job's input in a
    background thread while the current one is processed (at most two loaded inputs at
    a time).

    ``done(job)``: true for a job whose outputs are already there (skipped, not read).
    A job with ``error`` set, or whose ``load`` or ``process`` raises, is recorded in
    the report's failures with the error's type and message and the others go on
    (``raise_errors``: re-raise instead, for debugging). One tqdm bar over the jobs on
    stderr (``show_progress``).
    """
    from tqdm import tqdm

    report = BatchReport()
    todo: list[Job] = []
    for job in jobs:
        if job.error is not None:
            report.failures.append({"input": str(job.input), "reason": job.error})
        elif done is not None and done(job):
            report.skipped.append(job.input)
        else:
            todo.append(job)
    bar = tqdm(total=len(todo), unit="scan", file=sys.stderr, disable=not show_progress)
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcascade-read") as pool:
            future = pool.submit(load, todo[0]) if todo else None
            for i, job in enumerate(todo):
                following = pool.submit(load, todo[i + 1]) if i + 1 < len(todo) else None
                bar.set_postfix_str(job.input.name)
                try:
                    process(job, future.result())
                    report.segmented.append(job.input)
                except Exception as e:  # one scan's failure, whatever it is, skips that scan
                    if raise_errors:
                        _cancel(following)
                        raise
                    reason = f"{type(e).__name__}: {e}".strip()
                    report.failures.append({"input": str(job.input), "reason": reason})
                except BaseException:  # Ctrl-C: do not wait for a scan nobody will use
                    _cancel(following)
                    raise
                future = following
                bar.update(1)
    finally:
        bar.close()
    return report


def _cancel(future) -> None:
    if future is not None:
        future.cancel()
