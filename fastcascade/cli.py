"""The ``fastcascade`` command: ``segment``, ``env``, ``phantom`` (and ``train``,
``finetune``, ``evaluate`` where their modules provide them).

Every command is a function ``_cmd_<name>(args) -> int`` (the exit status) set as the
subparser's ``func``. Commands defined elsewhere join through a ``register(subparsers)``
function in their module (``fastcascade.train.commands``, ``fastcascade.evaluate``),
which adds its subparsers the same way; a module that cannot be imported leaves a stub
command that explains why, so the other commands keep working.

User errors (``ValueError``, ``TypeError``, missing files, permissions) end with one line
on stderr and exit status 2, without a traceback; other I/O errors (a full disk) end the
same way with status 1.

    $ fastcascade segment ct.nii.gz -o seg.nii.gz
    $ fastcascade phantom -o ct.nii.gz --labels seg.nii.gz --seed 1
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: Modules that add subcommands through ``register(subparsers)``, and the commands each
#: is expected to add (used for the stub when the module cannot be imported).
EXTENSION_COMMANDS: dict[str, tuple[str, ...]] = {
    "fastcascade.train.commands": ("train", "finetune"),
    "fastcascade.evaluate": ("evaluate",),
}

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
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "stub", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
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
    """The full parser, extension commands included."""
    parser = argparse.ArgumentParser(
        prog="fastcascade",
        description="Cascaded 3D U-Net segmentation of abdominal CT (Roth et al. 2018).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_segment(sub)
    _add_env(sub)
    _add_phantom(sub)
    # Commands written in their own modules (training, evaluation) join here.
    for module, commands in EXTENSION_COMMANDS.items():
        _register_extension(sub, module, commands)
    return parser


# --------------------------------------------------------------------------- segment


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a CT scan (NIfTI) into organ labels",
        description="Segment INPUT (a .nii/.nii.gz CT in HU) and write the labels on its "
        "own grid, with a JSON of label names beside them.",
    )
    p.add_argument("input", metavar="INPUT", type=Path, help="CT scan, .nii or .nii.gz")
    p.add_argument("-o", "--output", required=True, type=Path, help="label file (.nii or .nii.gz)")
    p.add_argument("--model", default=None, help="saved cascade (default: the embedded model)")
    p.add_argument(
        "--device",
        default="auto",
        type=_device,
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
    p.add_argument(
        "--no-overlap", action="store_true", help="stage 2 on non-overlapping tiles (faster)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=2, help="tiles per batch (default: 2)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.set_defaults(func=_cmd_segment, parser=p)


def _cmd_segment(args: argparse.Namespace) -> int:
    import fastcascade  # segment() looked up at call time (tests replace it)
    from fastcascade.io.atomic import same_file
    from fastcascade.io.nifti import label_names_path

    if args.fp16_probabilities and args.probabilities is None:
        args.parser.error("--fp16-probabilities needs --probabilities FILE")
    source: Path = args.input
    if not source.exists():
        raise FileNotFoundError(f"input scan {source} does not exist")
    outputs = [args.output, label_names_path(args.output)]
    if args.probabilities is not None:
        outputs += [args.probabilities, label_names_path(args.probabilities)]
        if same_file(args.probabilities, args.output):
            raise ValueError("--probabilities and --output name the same file")
    for out in outputs:  # checked before the work, and again by the writers
        if same_file(out, source):
            raise ValueError(f"refusing to write {out}: it is the input scan")
        if not out.parent.is_dir():
            raise FileNotFoundError(f"output folder {out.parent} does not exist")

    progress = _TileProgress(disable=args.quiet)
    try:
        result = fastcascade.segment(
            str(source),
            model=args.model,
            device=args.device,
            overlap=not args.no_overlap,
            probabilities=args.probabilities is not None,
            batch_size=args.batch_size,
            progress=progress,
        )
    finally:
        progress.close()

    t0 = time.perf_counter()
    result.save(
        args.output,
        args.probabilities,
        "float16" if args.fp16_probabilities else "float32",
    )
    if not args.quiet:
        timings = {**result.timings, "write": time.perf_counter() - t0}
        print(_summary(result, timings, outputs))
    return 0


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


def _summary(result, timings: dict[str, float], outputs: Sequence[Path]) -> str:
    lines = ["times (s):"]
    lines += [f"  {name:<14}{seconds:8.2f}" for name, seconds in timings.items()]
    lines.append(
        f"C1 (body) {100 * result.c1_fraction:.1f}% of the volume, "
        f"C2 (candidates) {100 * result.c2_fraction:.1f}%"
    )
    for stage, (computed, total) in result.tiles.items():
        lines.append(f"{stage}: {computed} of {total} tiles computed")
    lines.append("wrote " + ", ".join(str(p) for p in outputs))
    return "\n".join(lines)


def _device(text: str) -> str:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r}; expected auto, cpu, cuda or cuda:N")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}; expected an integer >= 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{value}; expected a positive finite number (mm)")
    return value


# --------------------------------------------------------------------------- env


def _add_env(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="versions, CUDA devices and available backends")
    p.set_defaults(func=_cmd_env)


def _cmd_env(args: argparse.Namespace) -> int:
    import torch

    print(f"fastcascade {_version()}")
    print(f"python      {platform.python_version()} ({platform.platform()})")
    for name in ("torch", "triton", "numpy", "scipy", "nibabel"):
        print(f"{name:<11} {_module_version(name)}")
    print(f"torch CUDA  {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(
                f"cuda:{i}      {props.name}, sm_{props.major}{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB"
            )
    else:
        print("CUDA        no device available")
    from fastcascade.ops import _backend

    print("backends:")
    for key, value in _backend.summary().items():
        print(f"  {key:<17} {value}")
    return 0


def _module_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return "not installed"
    return str(getattr(module, "__version__", "unknown"))


def _version() -> str:
    import fastcascade

    return fastcascade.__version__


# --------------------------------------------------------------------------- phantom


def _add_phantom(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "phantom",
        help="write a synthetic abdominal CT and its labels",
        description="Write a synthetic abdominal CT (HU) and its label map (the package's "
        "class list) as NIfTI, with a JSON of label names beside the labels.",
    )
    p.add_argument("-o", "--output", required=True, type=Path, help="CT file (.nii/.nii.gz)")
    p.add_argument("--labels", required=True, type=Path, help="label file (.nii/.nii.gz)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--shape", type=_positive_int, nargs=3, metavar=("X", "Y", "Z"), help="voxels")
    p.add_argument(
        "--spacing", type=_positive_float, nargs=3, metavar=("SX", "SY", "SZ"), help="mm"
    )
    p.add_argument("--contrast", choices=("none", "portal_venous"), default=None)
    p.set_defaults(func=_cmd_phantom)


def _cmd_phantom(args: argparse.Namespace) -> int:
    import numpy as np

    from fastcascade.config import CLASS_NAMES
    from fastcascade.io.atomic import same_file
    from fastcascade.io.nifti import label_names_path, save_nifti, write_labels

    label_names_path(args.output)  # checks both suffixes before the work
    label_names_path(args.labels)
    if same_file(args.output, args.labels):
        raise ValueError("-o and --labels name the same file")
    phantom = importlib.import_module("fastcascade.phantom")  # looked up at call time
    # Only what was given: the generator's own defaults apply to the rest.
    given = {"shape": args.shape, "spacing": args.spacing, "seed": args.seed}
    given["contrast"] = args.contrast
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None}
    ph = phantom.make_phantom(**kwargs)
    ct_img, seg_img = ph.to_nifti()
    save_nifti(ct_img, args.output)
    labels = np.asarray(seg_img.dataobj)  # uint8 class ids
    write_labels(args.labels, labels, seg_img.affine, CLASS_NAMES, header=seg_img.header)
    print(f"wrote {args.output}, {args.labels}")
    return 0


# --------------------------------------------------------------------------- extensions


def _register_extension(
    sub: argparse._SubParsersAction, module: str, commands: tuple[str, ...]
) -> None:
    """Let ``module.register(sub)`` add its commands, or add stubs saying why it cannot."""
    try:
        register = importlib.import_module(module).register
    except (ImportError, AttributeError) as e:
        reason = f"{module} is not available ({e})"
        for name in commands:
            if name in sub.choices:
                continue
            p = sub.add_parser(name, help=f"(unavailable: needs {module})", add_help=False)
            p.set_defaults(func=_unavailable(name, reason), stub=True)
        return
    register(sub)


def _unavailable(name: str, reason: str):
    def run(args: argparse.Namespace) -> int:
        print(f"fastcascade {name}: this command is unavailable: {reason}", file=sys.stderr)
        return 2

    return run


if __name__ == "__main__":
    sys.exit(main())
