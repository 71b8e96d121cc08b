"""``fastcascade env``: versions, CUDA devices, the backends available, and which one
``backend="auto"`` picks for each op on this machine, and why."""

from __future__ import annotations

import argparse
import importlib
import platform


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``env`` to the ``fastcascade`` command's subparsers."""
    p = sub.add_parser("env", help="versions, CUDA devices and available backends")
    p.set_defaults(func=_cmd_env)


def _cmd_env(args: argparse.Namespace) -> int:
    import torch

    print(f"fastcascade {package_version()}")
    print(f"python      {platform.python_version()} ({platform.platform()})")
    for name in (
        "torch",
        "triton",
        "numpy",
        "scipy",
        "nibabel",
        "SimpleITK",
        "pydicom",
        "highdicom",
    ):
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
    from ..memory import keeping_freed_memory

    kept = (
        "kept for reuse" if keeping_freed_memory() else "returned to the system (glibc's default)"
    )
    print(f"freed memory {kept}")
    from ..ops import _backend

    print("backends:")
    for key, value in _backend.summary().items():
        print(f"  {key:<17} {value}")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    print(f"backend='auto' picks, on {device}:")
    for op, (backend, why) in _backend.auto_choices().items():
        print(f"  {op:<17} {backend:<13} {why}")
    return 0


def _module_version(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ImportError:
        return "not installed"
    return str(getattr(module, "__version__", "unknown"))


def package_version() -> str:
    """``fastcascade.__version__``."""
    import fastcascade

    return fastcascade.__version__
