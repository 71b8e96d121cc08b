"""The ``segment`` command's inference flags: one for every field of
:class:`~fastcascade.options.InferenceOptions`, and ``--threads``.

Defaults and choices are read from ``InferenceOptions`` and the constants beside it, so
the command offers what ``segment()`` accepts; :data:`FLAGS` names each field's flag
(``tests/test_cli_segment_options.py`` checks that every field has one and that each
reaches ``segment()``).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

from ..io.limits import parse_bytes
from ..ops.morphology import BACKENDS as BODY_MASK_BACKENDS
from ..options import HU_CHECKS, INFERENCE, PRECISIONS, WEIGHTS, InferenceOptions
from . import arguments

#: The flag of each ``InferenceOptions`` field (``probabilities`` is set by naming its
#: output file; ``--strict`` is a shorthand for ``--hu-check error``).
FLAGS: dict[str, str] = {
    "overlap": "--no-overlap",
    "overlap_step": "--overlap-step",
    "weights": "--weights",
    "skip_empty": "--no-skip",
    "batch_size": "--batch-size",
    "probabilities": "--probabilities",
    "memory_budget": "--memory-budget",
    "body_mask_backend": "--body-mask-backend",
    "precision": "--precision",
    "compile": "--compile",
    "inference": "--inference",
    "hu_check": "--hu-check",
}

DEFAULTS = InferenceOptions()


def memory_size(text: str) -> int | str | None:
    """``auto``, ``none``, or a positive number of bytes with an optional K, M, G or T
    suffix (``4G``)."""
    if text.strip().lower() in ("auto", "none"):
        return None if text.strip().lower() == "none" else "auto"
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{e}, or auto, or none") from None


def fractions3(text: str) -> tuple[float, float, float]:
    """Three comma-separated fractions in (0, 1] (``0.5,0.5,1``)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(
            f"{text!r}; expected three fractions in (0, 1] of the output tile, e.g. 0.5,0.5,1"
        )
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the inference flags (and ``--threads``) as one group of ``parser``."""
    g = parser.add_argument_group("inference options (see InferenceOptions)")
    g.add_argument(
        "--inference",
        choices=INFERENCE,
        default=DEFAULTS.inference,
        help="how a stage runs its network: slabs as large as --memory-budget allows, or "
        f"tiles of the model's trained size (default: {DEFAULTS.inference})",
    )
    g.add_argument(
        "--no-overlap",
        dest="overlap",
        action="store_false",
        default=DEFAULTS.overlap,
        help="stage 2 seen once instead of 4 times, averaged (faster)",
    )
    step = ",".join(f"{s:g}" for s in DEFAULTS.overlap_step)
    g.add_argument(
        "--overlap-step",
        type=fractions3,
        metavar="SX,SY,SZ",
        default=DEFAULTS.overlap_step,
        help=f"tiles only: the overlap lattice's step as fractions of the output tile "
        f"(default: {step})",
    )
    g.add_argument(
        "--weights",
        choices=WEIGHTS,
        default=DEFAULTS.weights,
        help=f"how overlapping tiles are averaged (default: {DEFAULTS.weights})",
    )
    g.add_argument(
        "--no-skip",
        dest="skip_empty",
        action="store_false",
        default=DEFAULTS.skip_empty,
        help="compute the whole grid, not only the stage's candidate region (the original's "
        "every-tile way; slower)",
    )
    g.add_argument(
        "--batch-size",
        type=arguments.positive_int,
        default=DEFAULTS.batch_size,
        help=f"tiles only: tiles per network call (default: {DEFAULTS.batch_size})",
    )
    g.add_argument(
        "--memory-budget",
        type=memory_size,
        metavar="BYTES",
        default=DEFAULTS.memory_budget,
        help="memory a pass may use, e.g. 4G or 512M; sets the slab size; auto: a share "
        "of the memory free on the device when a stage starts; none: no limit beyond the "
        f"2^31-element one (default: {DEFAULTS.memory_budget})",
    )
    g.add_argument(
        "--precision",
        choices=("auto", *PRECISIONS),
        default=DEFAULTS.precision,
        help="the networks' precision: auto is bf16 on a GPU of compute capability 8.0 or "
        f"newer and fp32 elsewhere (default: {DEFAULTS.precision})",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        default=DEFAULTS.compile,
        help="torch.compile both networks on first use",
    )
    g.add_argument(
        "--body-mask-backend",
        choices=BODY_MASK_BACKENDS,
        default=DEFAULTS.body_mask_backend,
        help="labelling of the body mask C1 (all give the same mask; `fastcascade env` shows "
        f"what auto picks) (default: {DEFAULTS.body_mask_backend})",
    )
    g.add_argument(
        "--hu-check",
        choices=HU_CHECKS,
        default=DEFAULTS.hu_check,
        help="a scan whose intensities do not look like HU: warn, refuse it (error) or say "
        f"nothing (off) (default: {DEFAULTS.hu_check})",
    )
    g.add_argument(
        "--strict",
        dest="hu_check",
        action="store_const",
        const="error",
        default=argparse.SUPPRESS,
        help="the same as --hu-check error",
    )
    g.add_argument(
        "--threads",
        type=arguments.positive_int,
        metavar="N",
        default=None,
        help="CPU threads PyTorch may use (default: PyTorch's choice, one per core)",
    )


def options(args: argparse.Namespace) -> dict[str, Any]:
    """Every ``InferenceOptions`` field, as the flags set it, for ``segment(**options)``."""
    given = {name: getattr(args, name) for name in FLAGS if name != "probabilities"}
    given["probabilities"] = args.probabilities is not None
    return given


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``count`` for the block (``None``: left
    as it is), restored after."""
    if count is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
