"""The ``fastcascade`` command: ``segment``, ``phantom``, ``train``, ``finetune``,
``evaluate``, ``demo`` and ``env``.

Each command lives in a module of this package (``segment.py``, ``phantom.py``,
``train.py`` for ``train`` and ``finetune``, ``evaluate.py``, ``demo.py``, ``env.py``)
whose ``register(subparsers)`` adds its subparser(s); every command is a function
``_cmd_<name>(args) -> int`` (the exit status) set as the subparser's ``func``. Argument
types they share are in ``arguments.py``. Argument parsing lives here only; the commands
call the library. Heavy modules (torch, the cascade) are imported inside the command
functions, so building the parser stays cheap.

User errors (``ValueError``, ``TypeError``, missing files, permissions) end with one line
on stderr and exit status 2, without a traceback; other I/O errors (a full disk) end the
same way with status 1. Anything else is a bug and keeps its traceback.

    $ fastcascade segment ct.nii.gz -o seg.nii.gz
    $ fastcascade phantom -o ct.nii.gz --labels seg.nii.gz --seed 1
    $ python -m fastcascade.cli env
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import demo, env, evaluate, phantom, segment, train

__all__ = ["build_parser", "main"]

#: The command modules, in the order their commands are listed in ``--help``.
COMMAND_MODULES = (segment, env, phantom, train, evaluate, demo)

_USER_ERRORS = (
    ValueError,
    TypeError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


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
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        print("fastcascade: interrupted", file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        print(f"fastcascade {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, I/O errors: the environment, not the input
        print(f"fastcascade {args.command}: error: {e}", file=sys.stderr)
        return 1
    except MemoryError as e:
        print(f"fastcascade {args.command}: out of memory ({e})", file=sys.stderr)
        return 1
    except Exception as e:
        import torch

        if isinstance(e, torch.OutOfMemoryError):
            # segment already fell back to single tiles and slabs before this reached here
            hint = "--device cpu" if args.command == "segment" else "--batch-size 1 or --device cpu"
            print(
                f"fastcascade {args.command}: out of GPU memory; try {hint}",
                file=sys.stderr,
            )
            return 1
        raise
    return 0 if status is None else int(status)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(
        prog="fastcascade",
        description="Cascaded 3D U-Net segmentation of abdominal CT (Roth et al. 2018).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {env.package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser
