"""Many scans across the machines of a Ray cluster (``pip install 'fastcascade[cluster]'``).

:func:`segment_on_ray` plans the jobs as ``fastcascade segment IN… -o OUTDIR`` does
(:mod:`fastcascade.batch`: one ``OUTDIR/<stem>.nii.gz`` per scan, its ``<stem>.json``
and completion marker ``<stem>.done.json``), then hands them to a pool of Ray actors
through Ray Data. Each actor loads the model once and runs its share of the scans with
:func:`fastcascade.batch.run_batch`, the command's own loop: the same completion marker
(a scan done by the command is skipped here, and the other way round), the same
failure handling, and ``SegmentationResult.save(marker=...)`` writing the files.
``OUTDIR/failures.json`` lists the scans that failed.

Every machine must see the inputs, the model and ``OUTDIR`` under the same paths (a
shared file system); the driver only plans and collects the report. It lives beside the
command because it runs the command's own batch steps (its options, its marker).

>>> from fastcascade.cli.ray_batch import segment_on_ray  # doctest: +SKIP
>>> report = segment_on_ray(["scans/"], "segs/", address="head-node:6379",
...                         gpus_per_actor=1)  # one actor per GPU  # doctest: +SKIP
>>> report = segment_on_ray(["scans/"], "segs/", threads=4)  # CPU actors, 4 threads each
...                                                           # doctest: +SKIP
>>> len(report.segmented), len(report.skipped), report.failures  # doctest: +SKIP
(12, 0, [])
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..batch import BatchReport, Job, PathLike

INSTALL_CLUSTER = "pip install 'fastcascade[cluster]'"


def segment_on_ray(
    inputs: Iterable[PathLike],
    outdir: PathLike,
    *,
    model: PathLike | None = None,
    device: str = "auto",
    threads: int | None = None,
    gpus_per_actor: float = 0,
    num_actors: int | None = None,
    address: str | None = None,
    overwrite: bool = False,
    organs: str | None = None,
    largest_component: bool = False,
    connect_timeout: float = 10.0,
    **options: Any,
) -> BatchReport:
    """Segment every scan ``inputs`` names into ``outdir`` on Ray actors; returns what
    was segmented, skipped (already done) and failed (``{"input", "reason"}`` each, also
    written to ``outdir/failures.json``; removed when none failed).

    - ``inputs``: scan files, DICOM folders or zips, folders of scan files (as the
      command reads them); ``outdir``: the output folder (created if missing).
    - ``model``: a saved cascade (``None``: the embedded model); ``device``: ``"auto"``,
      ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` inside each actor.
    - ``gpus_per_actor``: GPUs Ray reserves per actor (``1``: one actor per GPU; ``0``,
      the default: CPU actors). ``threads``: PyTorch threads per actor, also the CPUs Ray
      reserves for a CPU actor (``None``: one CPU reserved, and PyTorch's thread count as
      Ray leaves it: Ray sets ``OMP_NUM_THREADS`` to an actor's reserved CPUs).
    - ``num_actors``: the pool's size (``None``: as many as the cluster's GPUs, or CPUs
      over ``threads``, allow; never more than the scans).
    - ``address``: the cluster (``"host:6379"``, ``"ray://host:10001"``, ``"auto"``);
      ``None`` joins the one this process already joined, else ``RAY_ADDRESS``, else
      starts one on this machine. An address nobody answers at within
      ``connect_timeout`` seconds raises ``RuntimeError`` naming it.
    - ``overwrite``, ``organs``, ``largest_component`` and ``**options`` (the fields of
      :class:`~fastcascade.options.InferenceOptions` but ``probabilities``): as the
      command's ``--overwrite``, ``--organs``, ``--largest-component`` and inference flags.

    Raises ``ValueError`` for an option the command does not have and for what
    :func:`~fastcascade.batch.plan_jobs` refuses (two scans of one name, ``outdir``
    inside an input folder).
    """
    from ..batch import failures_path, plan_jobs, write_failures
    from ..io.atomic import output_folders

    ray = _import_ray()
    # Absolute paths: an actor's working folder is not the driver's.
    outdir = os.path.abspath(outdir)
    model = None if model is None else os.path.abspath(model)
    args = _arguments(outdir, model, device, threads, overwrite, organs, largest_component, options)
    jobs = plan_jobs([os.path.abspath(p) for p in inputs], args.output)
    if gpus_per_actor < 0:
        raise ValueError(f"gpus_per_actor must be >= 0, got {gpus_per_actor!r}")
    if num_actors is not None and (not isinstance(num_actors, int) or num_actors < 1):
        raise ValueError(f"num_actors must be an integer >= 1 or None, got {num_actors!r}")
    _connect(ray, address, connect_timeout)
    cpus_per_actor = 0 if gpus_per_actor else (threads or 1)
    kind, need = ("GPU", gpus_per_actor) if gpus_per_actor else ("CPU", cpus_per_actor)
    have = ray.cluster_resources().get(kind, 0)
    if have < need:  # Ray would wait for it forever
        raise RuntimeError(
            f"the Ray cluster has {have:g} {kind}(s) and an actor needs {need:g} "
            f"({'gpus_per_actor' if gpus_per_actor else 'threads'})"
        )
    if num_actors is None:
        num_actors = int(have // need)
    num_actors = max(1, min(num_actors, len(jobs)))

    report = BatchReport()
    with output_folders([args.output]):
        if jobs:
            rows = [
                {"input": str(j.input), "output": str(j.output), "error": j.error} for j in jobs
            ]
            results = (
                ray.data.from_items(rows)
                .map_batches(
                    _SegmentActor,
                    fn_constructor_kwargs={"args": args},
                    batch_size=1,
                    batch_format="pandas",
                    concurrency=num_actors,
                    num_gpus=gpus_per_actor,
                    num_cpus=cpus_per_actor,
                )
                .take_all()
            )
            for row in sorted(results, key=lambda r: r["input"]):
                if row["status"] == "segmented":
                    report.segmented.append(Path(row["input"]))
                elif row["status"] == "skipped":
                    report.skipped.append(Path(row["input"]))
                else:
                    report.failures.append({"input": row["input"], "reason": row["reason"]})
        write_failures(failures_path(args.output), report.failures)
    return report


class _SegmentActor:
    """One Ray actor: the model loaded once; each batch of jobs run as the command runs
    its share (``segment_batch.job_steps``: the same reading, saving and marker)."""

    def __init__(self, args) -> None:
        import fastcascade

        from . import segment_options

        self.args = args
        self.options = segment_options.options(args)
        with segment_options.threads(args.threads):
            self.predictor = fastcascade.load_model(args.model, device=args.device)

    def __call__(self, batch):
        import pandas as pd

        from ..batch import run_batch
        from . import segment_batch, segment_options

        args = self.args
        jobs = [
            Job(Path(i), Path(o), None if _missing(e) else e)
            for i, o, e in zip(batch["input"], batch["output"], batch["error"], strict=True)
        ]
        load, process, done = segment_batch.job_steps(args, self.options, self.predictor)
        with segment_options.threads(args.threads):
            report = run_batch(jobs, load, process, done=done, show_progress=False)
        rows = [(str(p), "segmented", "") for p in report.segmented]
        rows += [(str(p), "skipped", "") for p in report.skipped]
        rows += [(f["input"], "failed", f["reason"]) for f in report.failures]
        return pd.DataFrame(rows, columns=["input", "status", "reason"])


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # None or NaN


def _arguments(outdir, model, device, threads, overwrite, organs, largest_component, options):
    """The ``segment`` command's namespace for these settings, so that the completion
    marker, the options and the clean-up are exactly the command's."""
    from . import arguments, build_parser, segment_options, segment_outputs

    unknown = set(options) - (set(segment_options.FLAGS) - {"probabilities"})
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))}; expected InferenceOptions "
            f"fields: {', '.join(sorted(set(segment_options.FLAGS) - {'probabilities'}))}"
        )
    try:
        arguments.device(device)
    except (argparse.ArgumentTypeError, TypeError):
        raise ValueError(f"device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
    args = build_parser().parse_args(["segment", "placeholder", "-o", os.fspath(outdir)])
    args.device, args.threads = device, threads
    args.model = None if model is None else os.fspath(model)
    args.overwrite = bool(overwrite)
    args.organs = organs
    args.largest_component = bool(largest_component)
    for name, value in options.items():
        setattr(args, name, tuple(value) if isinstance(value, list) else value)
    segment_outputs.check(args)  # organ names against the model's classes
    del args.parser, args.func  # not picklable for the actors, not needed there
    return args


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ImportError(f"segment_on_ray needs Ray Data: {INSTALL_CLUSTER}") from None
    return ray


def _connect(ray, address: str | None, timeout: float) -> None:
    """Join the cluster at ``address`` (see :func:`segment_on_ray`). Ray itself retries
    an address nobody answers at for minutes; a plain TCP connection is tried first."""
    if ray.is_initialized() and address is None:
        return
    target = address if address is not None else os.environ.get("RAY_ADDRESS")
    if target not in (None, "", "auto", "local"):
        host, _, port = target.removeprefix("ray://").rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                pass
        except (OSError, ValueError) as e:
            raise RuntimeError(
                f"cannot reach the Ray cluster at {target} ({type(e).__name__}: {e}); "
                "expected host:port of a running head node (ray start --head)"
            ) from None
    try:
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    except ConnectionError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot reach the Ray cluster at {target}: {first}") from None
