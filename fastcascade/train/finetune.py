"""Fine-tuning a shipped cascade to a new class list (Roth et al. 2018, Sec. 3.3).

Everything but the 1x1x1 classifier is kept; the classifier's rows (output channels) of
classes whose names appear in both lists are copied, the rows of new classes keep a fresh
initialisation; both stages are then trained with a learning rate 10x smaller than from
scratch (``lr_scale = 0.1``), as the paper does when it fine-tunes to another dataset.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..config import CascadeConfig
from ..model.checkpoint import load_cascade, save_cascade
from ..model.unet3d import UNet3D
from .trainer import CUT_MARGIN, CandidateFn, stage1_candidates, train_stage, training_record

CLASSIFIER = ("classifier.weight", "classifier.bias")


def with_classes(config: CascadeConfig, class_names: Sequence[str]) -> CascadeConfig:
    """``config`` with another class list (both stages' ``num_classes`` follow)."""
    names = tuple(str(n) for n in class_names)
    if len(names) < 2:
        raise ValueError(f"a model needs at least two classes, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")

    def stage(s):
        arch = dataclasses.replace(s.architecture, num_classes=len(names))
        return dataclasses.replace(s, architecture=arch)

    return dataclasses.replace(
        config, class_names=names, stage1=stage(config.stage1), stage2=stage(config.stage2)
    )


def adapt_state(
    state: dict[str, torch.Tensor],
    old_names: Sequence[str],
    new_model: UNet3D,
    new_names: Sequence[str],
) -> dict[str, torch.Tensor]:
    """A ``state_dict`` for ``new_model`` (classes ``new_names``) from ``state`` (classes
    ``old_names``): every tensor but the classifier copied; classifier rows of the
    classes present in both lists copied by name; rows of new classes taken from
    ``new_model``'s own (fresh) initialisation.
    """
    out = {k: v.detach().clone() for k, v in new_model.state_dict().items()}
    missing = sorted(set(out) - set(state))
    if missing:
        raise ValueError(f"the model to fine-tune lacks keys {missing}")
    for key, value in state.items():
        if key in CLASSIFIER or key not in out:
            continue
        if value.shape != out[key].shape:
            raise ValueError(
                f"{key}: shape {tuple(value.shape)} does not fit the new model's "
                f"{tuple(out[key].shape)}"
            )
        out[key] = value.detach().clone().to(out[key].dtype)
    old_index = {name: i for i, name in enumerate(old_names)}
    for j, name in enumerate(new_names):
        i = old_index.get(name)
        if i is not None:
            for key in CLASSIFIER:
                out[key][j] = state[key][i].to(out[key].dtype)
    return out


def finetune(
    model_files: str | Path,
    new_class_names: Sequence[str],
    source,
    out_dir: str | Path,
    iterations: int | tuple[int, int],
    lr_scale: float = 0.1,
    lr: float = 1e-3,
    batch_size: int = 2,
    seed: int = 0,
    augment: bool | Callable = True,
    candidate_fn: CandidateFn | None = None,
    checkpoint_every: int = 50,
    log: Callable[[str], None] | None = print,
    *,
    source2=None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
    intensity: bool | Callable = True,
    cut_margin: int = CUT_MARGIN,
) -> tuple[CascadeConfig, UNet3D, UNet3D]:
    """Fine-tune the cascade in ``model_files`` (see ``model.checkpoint.load_cascade``) to
    ``new_class_names``, writing ``<out_dir>/model.safetensors`` + ``model.json``.

    ``source`` (and ``source2`` for stage 2, default: ``source``) yields volumes on the
    model's working spacing whose labels index ``new_class_names``. ``iterations``: per
    stage, an int for both or ``(stage1, stage2)``; 0 leaves a stage as loaded (with its
    classifier adapted). Both stages train with ``lr * lr_scale`` (the paper: 10x
    smaller than training from scratch). Stage 2 trains on the candidate regions of the
    fine-tuned stage 1 (``stage1_candidates``) unless ``candidate_fn`` is given.
    Checkpoints go to ``<out_dir>/stage<k>.ckpt`` (``resume=True`` continues them).
    ``intensity`` and ``cut_margin`` are ``train_stage``'s. The new config's
    ``training`` field records this run (``trainer.training_record`` of ``source``, the
    model fine-tuned from, ``lr_scale`` and the iterations), not the original model's.

    Returns ``(config, stage1, stage2)`` with the models in eval mode.

    >>> names = ["background", "liver", "kidney"]
    >>> finetune("weights/model.safetensors", names, src, "ft", 500)  # doctest: +SKIP
    """
    if not lr_scale > 0:
        raise ValueError(f"lr_scale must be positive, got {lr_scale}")
    its = (iterations, iterations) if isinstance(iterations, int) else tuple(iterations)
    if len(its) != 2:
        raise ValueError(f"iterations must be an int or (stage1, stage2), got {iterations!r}")
    old_config, old1, old2 = load_cascade(model_files)
    record = training_record(source, augment, intensity, cut_margin)
    if source2 is not None:
        record["source2"] = training_record(source2, augment, intensity, cut_margin)["source"]
    record.update(finetuned_from=Path(model_files).name, lr_scale=lr_scale, iterations=list(its))
    config = with_classes(old_config, new_class_names)
    config = dataclasses.replace(config, training=None)  # this run's record comes at the end
    out_dir = Path(out_dir)
    models = []
    for stage, old in ((1, old1), (2, old2)):
        arch = (config.stage1 if stage == 1 else config.stage2).architecture
        torch.manual_seed(seed + stage)  # the fresh rows of new classes
        init = adapt_state(
            old.state_dict(),
            old_config.class_names,
            UNet3D.from_architecture(arch),
            config.class_names,
        )
        fn = None  # stage 1: the body mask
        if stage == 2:
            fn = candidate_fn or stage1_candidates(models[0], config)
        model = train_stage(
            stage,
            config,
            source if stage == 1 or source2 is None else source2,
            out_dir,
            its[stage - 1],
            batch_size=batch_size,
            lr=lr * lr_scale,
            seed=seed,
            augment=augment,
            candidate_fn=fn,
            init_state=init,
            checkpoint_every=checkpoint_every,
            log=log,
            resume=resume,
            device=device,
            progress=progress,
            intensity=intensity,
            cut_margin=cut_margin,
        )
        models.append(model)
    # Recorded only now: checkpoints compare configs on resume, and a resume may ask
    # for more iterations.
    config = dataclasses.replace(config, training=record)
    save_cascade(out_dir / "model", config, models[0], models[1])
    return config, models[0], models[1]
