"""Argument types, options and checks the commands share.

Each type turns the text of one argument into its value or raises
``argparse.ArgumentTypeError`` with what was expected, which argparse reports as a usage
error (exit status 2).

>>> positive_int("3")
3
>>> radii("0,1,2")
(0, 1, 2)
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable
from pathlib import Path


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}; expected auto, cpu, cuda or cuda:N")
    return text


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}; expected an integer >= 1")
    return value


def positive_float(text: str) -> float:
    """A positive finite number (a length in mm)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value}; expected a positive finite number (mm)")
    return value


def radii(text: str) -> tuple[int, ...]:
    """Comma-separated dilation radii in voxels, each >= 0."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}; expected comma-separated integers, e.g. 0,1,2,3"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}; radii must be >= 0 (voxels)")
    return values


#: The option's name in messages about a label map (``presets.read_label_map``).
LABEL_MAP_OPTION = "--label-map"


def add_label_map(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help: str) -> None:
    """``--label-map NAME|none|FILE``: a dataset's label ids onto the model's classes,
    resolved by the command with ``presets.read_label_map(args.label_map, LABEL_MAP_OPTION)``."""
    parser.add_argument(LABEL_MAP_OPTION, default=None, help=help)


def refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    """Raise ``FileExistsError`` naming those of ``paths`` that exist, unless
    ``overwrite`` (the command's ``--overwrite``) is set; checked before the work."""
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); pass --overwrite to replace them"
        )
