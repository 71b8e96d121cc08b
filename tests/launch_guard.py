"""Shared by the ops' tests: which tensor's device guard (``_backend.on_device``) was held
when a Triton kernel was launched.

Triton launches on the current CUDA device, so every launcher wraps its launch in
``with _backend.on_device(tensor):``. Without a second GPU the switch itself cannot run
here; these helpers check, in the interpreter, that each launch happens inside the guard
and that the guard was given a tensor of the op.
"""

from __future__ import annotations

import contextlib

from fastcascade.ops import _backend


class _Recorded:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records the tensors
    whose guards are held at the launch, then launches the real kernel."""

    def __init__(self, kernel, held, launches):
        self._kernel, self._held, self._launches = kernel, held, launches

    def __getitem__(self, grid):
        launch = self._kernel[grid]

        def run(*args, **kwargs):
            self._launches.append(list(self._held))
            return launch(*args, **kwargs)

        return run


def record_launches(monkeypatch, module, *kernel_names) -> list[list]:
    """Patch ``module``'s kernels ``kernel_names`` and ``_backend.on_device``; returns a
    list that gets, per launch, the tensors whose guards were held (innermost last)."""
    held: list = []
    launches: list[list] = []
    real = _backend.on_device

    @contextlib.contextmanager
    def guard(tensor):
        with real(tensor):  # still the real helper: a no-op on the CPU
            held.append(tensor)
            try:
                yield
            finally:
                held.pop()

    monkeypatch.setattr(_backend, "on_device", guard)
    for name in kernel_names:
        monkeypatch.setattr(module, name, _Recorded(getattr(module, name), held, launches))
    return launches
