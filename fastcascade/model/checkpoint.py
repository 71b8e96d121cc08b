"""Model files: shipped cascades (safetensors + JSON) and training checkpoints.

A shipped or exported cascade is two files side by side:

- ``model.safetensors``: both stages' weights under ``stage1.*`` and ``stage2.*`` (the
  modules' ``state_dict`` keys, BatchNorm running statistics included), floating tensors
  stored in float16 by default;
- ``model.json``: ``CascadeConfig.to_dict()`` plus ``"format": "fastcascade-cascade"``.

Training checkpoints are one ``torch.save`` file of plain containers and tensors (model,
optimizer, scaler, RNG, sampler and data-source state), read back with
``torch.load(..., weights_only=True)``. Every write goes to a temporary file in the target
directory first and is renamed into place, so an interrupted write never leaves a
truncated file under the final name.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from ..config import CascadeConfig
from ..io.atomic import atomic_write
from .unet3d import UNet3D

FORMAT = "fastcascade-cascade"
STAGES = ("stage1", "stage2")


def model_paths(path: str | Path) -> tuple[Path, Path]:
    """``(weights, config)`` paths for ``model.safetensors``, ``model.json``, ``model``
    (stem) or a directory (which holds ``model.safetensors`` + ``model.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


# -- shipped cascades -------------------------------------------------------------------------
def save_cascade(
    path: str | Path,
    config: CascadeConfig,
    stage1: nn.Module,
    stage2: nn.Module,
    dtype: torch.dtype = torch.float16,
) -> tuple[Path, Path]:
    """Write a cascade as ``<path>.safetensors`` + ``<path>.json`` (see ``model_paths``).

    ``stage1`` / ``stage2``: the two ``UNet3D`` modules, whose architectures must match
    ``config.stage1/2.architecture``. Floating tensors are cast to ``dtype`` (float16 by
    default; float32 or bfloat16 also allowed); integer buffers are kept as they are.
    Returns the two paths written.

    >>> from fastcascade.config import CascadeConfig
    >>> cfg = CascadeConfig()
    >>> s1 = UNet3D.from_architecture(cfg.stage1.architecture)  # doctest: +SKIP
    >>> save_cascade("out/model", cfg, s1, s1)  # doctest: +SKIP
    """
    if not isinstance(config, CascadeConfig):
        raise TypeError(f"config must be a CascadeConfig, got {type(config).__name__}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    tensors = {}
    for name, module in zip(STAGES, (stage1, stage2), strict=True):
        arch = getattr(module, "architecture", None)
        want = getattr(config, name).architecture
        if arch is not None and arch != want:
            raise ValueError(f"{name}'s architecture {arch} differs from the config's {want}")
        for key, t in module.state_dict().items():
            t = t.detach().to("cpu")
            if t.is_floating_point():
                t = t.to(dtype)
            tensors[f"{name}.{key}"] = t.contiguous()
    weights, cfg_path = model_paths(path)
    meta = {"format": FORMAT, "schema_version": str(config.schema_version)}
    blob = safetensors_bytes(tensors, meta)
    atomic_write(weights, lambda tmp: Path(tmp).write_bytes(blob))
    text = json.dumps({"format": FORMAT, **config.to_dict()}, indent=2) + "\n"
    atomic_write(cfg_path, lambda tmp: Path(tmp).write_text(text))
    return weights, cfg_path


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of ``tensors`` with its JSON header's keys sorted, so that the
    same weights and metadata always give the same bytes (safetensors itself writes the
    metadata in a hash map's order, which varies from run to run)."""
    from safetensors.torch import save

    blob = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    header = header.encode()
    if len(header) > n:  # cannot happen for the same content; keep safetensors' own bytes
        return blob
    return blob[:8] + header + b" " * (n - len(header)) + blob[8 + n :]


def load_config(path: str | Path) -> CascadeConfig:
    """The ``CascadeConfig`` of a cascade's JSON (``ValueError`` on format or schema)."""
    _, cfg_path = model_paths(path)
    if not cfg_path.exists():
        raise FileNotFoundError(
            f"model config {cfg_path} not found: a cascade is a .safetensors file with a "
            "JSON config of the same name beside it"
        )
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{cfg_path} is not a readable JSON model config ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{cfg_path} holds a JSON {type(data).__name__}; expected an object with the "
            "cascade's config"
        )
    if data.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} has format {data.get('format')!r}; expected {FORMAT!r}")
    data = {k: v for k, v in data.items() if k != "format"}
    try:
        return CascadeConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{cfg_path} does not follow the cascade config schema: {err}") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU; ``ValueError`` naming the file when it
    is truncated, corrupt or not safetensors at all."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path}: cannot read it as safetensors weights ({err}); the file is truncated, "
            "corrupt or of another format"
        ) from err


def _torch_load(path: Path, what: str):
    """``torch.load(path, weights_only=True)`` on the CPU; ``ValueError`` naming the file
    when it is not a PyTorch file of plain containers and tensors (never unpickled)."""
    import pickle
    import zipfile

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, OSError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: cannot read it as a {what} ({first}); expected a file written by "
            "fastcascade (truncated, corrupt, or another kind of file)"
        ) from err


def check_state_dict(
    module: nn.Module, state: dict[str, torch.Tensor], what: str = "state"
) -> None:
    """Raise ``ValueError`` naming missing/unexpected keys or mismatched shapes."""
    want = module.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(
            f"{what} does not match the model: missing keys {missing}, unexpected keys {extra}"
        )
    bad = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in want.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if bad:
        raise ValueError(f"{what} has shape mismatches: " + "; ".join(bad))


def load_cascade(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[CascadeConfig, UNet3D, UNet3D]:
    """Read a cascade written by ``save_cascade``.

    Returns ``(config, stage1, stage2)``, both ``UNet3D`` in eval mode on ``device`` with
    float32 weights (whatever the file's dtype). Raises ``FileNotFoundError`` for a
    missing file and ``ValueError`` for a wrong format or schema, missing or unexpected
    keys (named) and shape mismatches.

    >>> config, stage1, stage2 = load_cascade("weights/model.safetensors")  # doctest: +SKIP
    """
    weights, _ = model_paths(path)
    config = load_config(path)
    if not weights.exists():
        raise FileNotFoundError(f"model weights {weights} not found")
    tensors = _read_safetensors(weights)
    stray = sorted(k for k in tensors if k.split(".", 1)[0] not in STAGES)
    if stray:
        raise ValueError(f"{weights} holds keys outside stage1.*/stage2.*: {stray}")
    models = []
    for name in STAGES:
        arch = getattr(config, name).architecture
        prefix = name + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        # shapes only, on the meta device: a config the file does not match allocates nothing
        with torch.device("meta"):
            check_state_dict(UNet3D.from_architecture(arch), state, f"{weights} ({name})")
        model = UNet3D.from_architecture(arch)
        ref = model.state_dict()
        state = {k: v.to(ref[k].dtype) for k, v in state.items()}
        model.load_state_dict(state)
        models.append(model.to(device).eval())
    return config, models[0], models[1]


def load_state_any(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``state_dict`` from a user's file: ``.safetensors`` or a PyTorch file read with
    ``torch.load(weights_only=True)`` (a bare state dict, or one under ``"state_dict"``
    or ``"model"``, as training checkpoints hold it). Tensors land on the CPU.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    obj = _torch_load(path, "PyTorch weights file")
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} does not hold a state dict (a mapping of names to tensors), "
            f"got {type(obj).__name__}"
        )
    return dict(obj)


# -- training checkpoints ---------------------------------------------------------------
def save_training_checkpoint(path: str | Path, state: dict) -> Path:
    """Write a training checkpoint (plain containers and tensors only) atomically."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_checkpoint(path: str | Path) -> dict:
    """Read a training checkpoint with ``torch.load(weights_only=True)`` onto the CPU."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training checkpoint not found: {path}")
    state = _torch_load(path, "training checkpoint")
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} holds a {type(state).__name__}; expected a training checkpoint (a dict)"
        )
    return state
