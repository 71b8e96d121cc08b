"""Block configurations of the kernel: the committed per-shape table, the defaults for
shapes not in it, the candidates a tuning run times, and opt-in run-time autotuning.

The committed table, ``table.json`` beside this module, says how each conv-BN-ReLU layer
shape runs on a GPU in eval mode; it is loaded at import into :data:`CONFIGS` and
:data:`TUNED_ON`. It is keyed by layer shape ``(in_channels, out_channels)`` (3x3x3
kernels, stride 1). Each entry names the provider that runs it (``"triton"``:
fastcascade's fused kernel with the block sizes given; ``"cudnn"``:
``torch.cudnn_convolution_relu`` with BatchNorm folded) and the kernel's block
configuration for 16-bit inputs (fp32 inputs halve ``BLOCK_K``). The entries cover every
layer of ``UNet3D`` with base widths 8, 16 and 32 (four levels, the paper's network being
base 32); other shapes get :func:`default_config`.

``"tuned": false`` marks a default that has not been measured: such a layer runs cuDNN,
the faster of PyTorch's paths, until ``benchmarks/gpu_check.sh --area tune`` has timed
our kernel's candidates (:func:`candidate_configs`, bf16) against it on a GPU and
rewritten the table with the winners. ``"tuned_on"`` names the device, date and PyTorch
version of that run; it is ``null`` while untuned. Run-time autotuning is opt-in
(``FASTCASCADE_AUTOTUNE=1``).

The file is ``{"tuned_on": str | null, "configs": [entry, ...]}``, each entry an object
with ``in_channels``, ``out_channels`` and the :data:`FIELDS`. :func:`dump_table` writes
it (entries sorted by shape, fields in a fixed order, one entry a line), so that a
rewritten table differs from the committed one only where an entry changed;
:func:`load_table` reads it back. The choice of provider and block sizes reads this
module's :data:`CONFIGS` when called: replace that (not the package's re-export of it)
to change what runs.

>>> CONFIGS[(64, 64)]["provider"] in ("triton", "cudnn")
True
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import _backend

#: The committed table, installed as package data beside this module.
TABLE_PATH = Path(__file__).with_name("table.json")

#: The fields of a table entry besides its shape, in the order the file lists them.
FIELDS = ("provider", "BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "tuned")


# -- the committed table ----------------------------------------------------------------
def load_table(path: str | Path = TABLE_PATH) -> tuple[dict[tuple[int, int], dict], str | None]:
    """Read a table written by :func:`dump_table`: ``({(C_in, C_out): entry}, tuned_on)``,
    the entries in the file's order, each a dict of the :data:`FIELDS`."""
    path = Path(path)
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or set(data) != {"tuned_on", "configs"}:
        raise ValueError(f"{path}: expected an object with 'tuned_on' and 'configs'")
    expected = {"in_channels", "out_channels", *FIELDS}
    configs: dict[tuple[int, int], dict] = {}
    for i, entry in enumerate(data["configs"]):
        if not isinstance(entry, dict) or set(entry) != expected:
            got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{path}: entry {i} must have the keys {sorted(expected)}, got {got}")
        key = (entry["in_channels"], entry["out_channels"])
        if key in configs:
            raise ValueError(f"{path}: layer shape {key} appears twice")
        configs[key] = {k: entry[k] for k in FIELDS}
    return configs, data["tuned_on"]


def dump_table(configs: dict[tuple[int, int], dict], tuned_on: str | None) -> str:
    """The text of ``table.json`` for ``configs`` ``{(C_in, C_out): entry}`` (each entry
    holding at least the :data:`FIELDS`) and ``tuned_on``; the same input always gives
    the same text."""
    rows = []
    for cin, cout in sorted(configs):
        entry = {"in_channels": cin, "out_channels": cout}
        entry.update((k, configs[(cin, cout)][k]) for k in FIELDS)
        rows.append("    " + json.dumps(entry))
    body = ",\n".join(rows)
    return f'{{\n  "tuned_on": {json.dumps(tuned_on)},\n  "configs": [\n{body}\n  ]\n}}\n'


#: ``{(C_in, C_out): entry}`` from ``table.json``, and the device and date of the tuning
#: run that wrote it (None while untuned).
CONFIGS, TUNED_ON = load_table()

#: Under TRITON_INTERPRET=1 programs run one after another in Python: few, large ones.
INTERPRETER_CONFIG = {"BLOCK_M": 512, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}

#: Input channels below which the kernel walks the flattened (tap, channel) K axis.
K_FLAT_BELOW = 16


# -- choosing a configuration ---------------------------------------------------------------
def default_config(cin: int, cout: int) -> dict:
    """An untuned block configuration for 16-bit inputs of a layer shape."""
    entry = {"provider": "cudnn", "num_stages": 3, "tuned": False}
    if cin < K_FLAT_BELOW:
        # Gathered element by element: small tiles keep registers from spilling
        # (tests/test_compile_sm90.py prints the resource report).
        return {**entry, "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4}
    block_n = min(128, max(16, _backend.next_pow2(cout)))
    block_k = next(bk for bk in (64, 32, 16) if cin % bk == 0 or bk == 16)
    warps = 8 if block_n >= 128 else 4
    return {**entry, "BLOCK_M": 128, "BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps}


def kernel_config(cin: int, cout: int, dtype: torch.dtype) -> dict:
    """Block sizes the kernel runs a layer with: the interpreter's fixed configuration, or
    the committed table's entry (``default_config`` for shapes not in it); fp32 inputs
    halve ``BLOCK_K`` (twice the bytes per element in shared memory)."""
    if _backend.interpreter_on():
        return dict(INTERPRETER_CONFIG)
    return _for_dtype(table_entry(cin, cout), dtype)


def table_entry(cin: int, cout: int) -> dict:
    """The committed table's entry for a layer shape, else :func:`default_config`."""
    return dict(CONFIGS.get((cin, cout)) or default_config(cin, cout))


def _for_dtype(cfg: dict, dtype: torch.dtype) -> dict:
    """``cfg`` for ``dtype``: fp32 halves ``BLOCK_K`` (twice the bytes per element)."""
    if dtype == torch.float32:
        cfg = {**cfg, "BLOCK_K": max(16, cfg["BLOCK_K"] // 2)}
    return cfg


def candidate_configs(cin: int, cout: int, limit: int = 8) -> list[dict]:
    """At most ``limit`` block configurations worth timing for a layer shape (bf16)."""
    default = default_config(cin, cout)
    cap_n = max(16, min(128, _backend.next_pow2(cout)))
    flat = cin < K_FLAT_BELOW
    grid = [
        (default["BLOCK_M"], default["BLOCK_N"], default["BLOCK_K"], default["num_warps"], 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 64, 4, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 64, 4, 3),
        (256, 64, 32, 8, 3),
        (64, 64, 64, 4, 4),
        (256, 128, 64, 8, 3),
    ]
    out, seen = [], set()
    for bm, bn, bk, warps, stages in grid:
        bn = min(bn, cap_n)
        bk = 16 if flat else (bk if cin >= bk else max(16, _backend.next_pow2(cin)))
        key = (bm, bn, bk, warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages))
    return out[:limit]


# -- opt-in run-time autotuning -------------------------------------------------------------
#: (input shape, C_out, dtype, device, padding, precision) → the fastest configuration.
_AUTOTUNED: dict[tuple, dict] = {}


def autotuned_config(x, packed, bias, padding: str, input_precision: str, launch) -> dict:
    """Opt-in run-time autotuning (``FASTCASCADE_AUTOTUNE=1``): the fastest candidate for
    this exact call shape, timed once per process with ``triton.testing.do_bench``.

    ``launch(x, packed, bias, padding, input_precision, cfg)`` runs the kernel with one
    configuration (the launcher is passed in: it lives in ``kernel.py``, which reads its
    configurations from here)."""
    cin, cout = x.shape[1], bias.shape[0]
    key = (tuple(x.shape), cout, x.dtype, x.device, padding, input_precision)
    if key not in _AUTOTUNED:
        from triton.runtime.errors import OutOfResources
        from triton.testing import do_bench

        best = (float("inf"), kernel_config(cin, cout, x.dtype))
        # do_bench's events, synchronisations and cache flush use the current CUDA device.
        with _backend.on_device(x):
            for cfg in candidate_configs(cin, cout):
                cfg = _for_dtype(cfg, x.dtype)
                try:
                    t = do_bench(
                        lambda cfg=cfg: launch(x, packed, bias, padding, input_precision, cfg)
                    )
                except OutOfResources:  # too much shared memory for this GPU
                    continue
                best = min(best, (t, cfg), key=lambda b: b[0])
        _AUTOTUNED[key] = best[1]
    return _AUTOTUNED[key]
