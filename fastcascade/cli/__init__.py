"""The ``fastcascade`` command: ``segment``, ``phantom``, ``train``, ``finetune``,
``evaluate``, ``demo``, ``export`` and ``env``.

Each command lives in a module of this package (``segment.py``, with its inference
flags in ``segment_options.py`` and its extra outputs in ``segment_outputs.py``;
``segment_batch.py`` for many scans; ``phantom.py``, ``train.py`` for ``train`` and
``finetune``, ``evaluate.py``, ``demo.py``, ``export.py``, ``env.py``) whose
``register(subparsers)`` adds its subparser(s); every command is a function
``_cmd_<name>(args) -> int`` (the exit status) set as the subparser's ``func``. Argument
types they share are in ``arguments.py``. Argument parsing lives here only; the commands
call the library. Heavy modules (torch, the cascade) are imported inside the command
functions, so building the parser stays cheap.

User errors (``ValueError``, ``TypeError``, missing files, permissions) end with one line
on stderr and exit status 2, without a traceback; other I/O errors (a full disk), a
missing optional dependency (the message names the extra to install) and running out
of memory (on the CPU or a GPU) end the same way with status 1. Anything else
is a bug and keeps its traceback; ``fastcascade --debug COMMAND`` shows the traceback of
every error.

    $ fastcascade segment ct.nii.gz -o seg.nii.gz
    $ fastcascade phantom -o ct.nii.gz --labels seg.nii.gz --seed 1
    $ python -m fastcascade.cli env
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from . import demo, env, evaluate, export, phantom, segment, train

__all__ = ["build_parser", "main", "run"]

#: The command modules, in the order their commands are listed in ``--help``.
COMMAND_MODULES = (segment, env, phantom, train, evaluate, demo, export)

_USER_ERRORS = (
    ValueError,
    FileExistsError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def run(argv: Sequence[str] | None = None) -> int:
    """The ``fastcascade`` command's entry point: :func:`main` in a process of its own.

    Before the command, glibc is asked to keep freed memory for reuse
    (:func:`fastcascade.memory.keep_freed_memory`: CPU passes no longer fault every
    layer's output in again), unless ``FASTCASCADE_KEEP_FREED_MEMORY=0``. :func:`main`
    leaves the process as it found it (its one-line warnings end with the command), so
    a program may call it.
    """
    import os

    if os.environ.get("FASTCASCADE_KEEP_FREED_MEMORY", "1").strip() != "0":
        from ..memory import keep_freed_memory

        keep_freed_memory()
    return main(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    >>> main(["env"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        print("fastcascade: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        status, line = _known_error(e, args.command)
        if status is None or args.debug:
            raise
        print(f"fastcascade {args.command}: {line}", file=sys.stderr)
        return status
    finally:
        warnings.formatwarning = previous  # one-line warnings for the command only
    return 0 if status is None else int(status)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings of the library as one line each, without the source line."""
    if issubclass(category, UserWarning):
        return f"fastcascade: warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def _known_error(e: Exception, command: str) -> tuple[int | None, str]:
    """``(exit status, one line)`` for an error of the input or the environment, or
    ``(None, "")`` for anything else (a bug: its traceback is shown)."""
    if isinstance(e, _USER_ERRORS):
        return 2, f"error: {e}"
    from ..io.sitk import MissingDependencyError

    if isinstance(e, MissingDependencyError):  # an optional extra not installed
        return 1, f"error: {e}"
    if isinstance(e, OSError):  # disk full, I/O errors: the environment, not the input
        return 1, f"error: {e}"
    if isinstance(e, MemoryError) or _cpu_out_of_memory(e):
        first = str(e).strip().splitlines()[0] if str(e).strip() else "MemoryError"
        return 1, (
            f"out of memory ({first}); try a machine with more memory, or a smaller job "
            "(no --probabilities, --fp16-probabilities)"
        )
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        # segment already fell back to single tiles and slabs before this reached here
        hint = "--device cpu" if command == "segment" else "--batch-size 1 or --device cpu"
        return 1, f"out of GPU memory; try {hint}"
    return None, ""


def _cpu_out_of_memory(e: Exception) -> bool:
    """PyTorch's CPU allocator reports a failed allocation as a plain ``RuntimeError``."""
    text = str(e)
    return isinstance(e, RuntimeError) and (
        "DefaultCPUAllocator: can't allocate memory" in text
        or "DefaultCPUAllocator: not enough memory" in text
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(
        prog="fastcascade",
        description="Cascaded 3D U-Net segmentation of abdominal CT (Roth et al. 2018).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {env.package_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser
