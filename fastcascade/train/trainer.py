"""Training one stage of the cascade, resumable bit for bit on the CPU.

One iteration: draw ``batch_size`` volumes from the source; for each, its candidate
region (stage 1: the body mask C1 of the image; stage 2: C2 from ``candidate_fn``), a
sub-volume centred on a uniformly drawn voxel of that region, augmented on the fly
(spatially, then in intensity, ``intensity.IntensityAugmenter``, which also windows it);
the image through the U-Net; the paper's class-weighted cross-entropy over the region's
voxels (``loss.weighted_cross_entropy``) less the margin at faces of the field of view
that cut an organ (``sampling.cut_border_mask``); one Adam step (constant learning rate).

Checkpoints (``<out_dir>/stage<k>.ckpt``, every ``checkpoint_every`` iterations and at the
end, written atomically) hold the model, optimizer and gradient-scaler state, the torch /
NumPy / Python global RNG states, the sampler's, augmentations' and data source's
generators and counters, the iteration count, the losses so far, the config and the
training record (``training_record``: the data mix, the augmentations, the cut margin),
so that a run resumed from its last checkpoint continues exactly as the uninterrupted run
would have (bit-identical weights on the CPU with the same thread count).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import CascadeConfig
from ..io.atomic import atomic_write
from ..model.checkpoint import (
    check_state_dict,
    load_training_checkpoint,
    save_training_checkpoint,
)
from ..model.unet3d import UNet3D
from ..ops.dilate import dilate
from ..ops.intensity import apply_window
from ..ops.morphology import body_mask
from . import distributed
from .loss import weighted_cross_entropy
from .mixed import describe_source
from .sampling import SubvolumeSampler, cut_border_mask, cut_distance

#: ``candidate_fn(image_hu (x, y, z) float32 HU, labels (x, y, z) uint8) -> bool (x, y, z)``
CandidateFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Voxels of margin around a sub-volume that a custom augmentation callable sees (the
#: built-in ``Augmenter``'s margin follows from its bounds, see ``augment_context``).
AUGMENT_CONTEXT = 12

#: Draws in a row whose region is empty before training gives up.
MAX_EMPTY_DRAWS = 100

#: Voxels next to a face of the field of view that cuts an organ left out of the loss
#: (``sampling.cut_border_mask``): 9 mm on the shipped model's 3 mm grid, a few slices of
#: any CT, where labels made by a model are least sure and the organ only seems to end.
CUT_MARGIN = 3


def augment_context(augmenter, tile) -> int:
    """Voxels of margin per side so that an ``Augmenter``'s warp of a ``tile`` patch
    only moves scan content (never padding) into it: translation + elastic displacement
    + the rotation's largest move of a tile corner (three angles of at most
    ``max_rotation_deg`` compose to at most sqrt(3) times that), plus one voxel for
    interpolation. Callables without those bounds get ``AUGMENT_CONTEXT``.
    """
    try:
        t = float(augmenter.max_translation_vox)
        d = float(augmenter.max_displacement)
        angle = math.radians(float(augmenter.max_rotation_deg)) * math.sqrt(3.0)
    except AttributeError:
        return AUGMENT_CONTEXT
    half_diagonal = 0.5 * math.sqrt(sum(n * n for n in tile))
    rotation = 2.0 * half_diagonal * math.sin(min(angle, math.pi) / 2.0)
    return int(math.ceil(t + d + rotation)) + 1


# -- candidate regions -------------------------------------------------------------------
def ground_truth_candidates(config: CascadeConfig) -> CandidateFn:
    """C2 approximated from the labels: the foreground dilated by ``config.radius``.

    The paper trains stage 2 on the candidate regions of a trained stage 1; this stand-in
    is what ``train_stage(stage=2)`` uses when no ``candidate_fn`` is given. It misses the
    false positives of stage 1 that stage 2 must learn to reject.
    """

    def fn(image_hu: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return dilate(labels > 0, config.radius, tuple(config.spacing))

    return fn


@torch.no_grad()
def stage1_candidates(
    model: nn.Module, config: CascadeConfig, batch_tiles: int = 2, inference: str = "slabs"
) -> CandidateFn:
    """C2 as the paper builds it, and as inference does (``cascade.candidate_region``):
    the trained stage 1 over its body mask C1, argmax, all foreground dilated by r.
    ``inference``: how stage 1 runs (``InferenceOptions.inference``; slabs, as
    ``segment()`` does by default).

    Runs ``model`` in eval mode on its own device; the region comes back on the CPU.
    """
    from ..cascade import candidate_region
    from ..options import InferenceOptions

    options = InferenceOptions(batch_size=batch_tiles, inference=inference)
    device = next(model.parameters()).device

    def fn(image_hu: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            _, _, c2 = candidate_region(image_hu.to(device), model, config, options)
        finally:
            model.train(was_training)
        return c2.cpu()

    return fn


# -- RNG state as plain containers ---------------------------------------------------
def _rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    random.setstate(state["python"])


def _derived_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def training_record(source, augment=True, intensity=True, cut_margin: int = CUT_MARGIN) -> dict:
    """What a run trains on, as plain JSON: the source's ``describe()`` (a mix: names,
    weights and what each source holds), the spatial and intensity augmentations and
    the cut margin. ``train_stage`` keeps it in its checkpoints (and refuses to resume
    with another); ``fastcascade train`` writes it into the model's JSON
    (``CascadeConfig.training``).

    >>> training_record(PhantomSource(), augment=False)["intensity"]["kind"]  # doctest: +SKIP
    'intensity'
    """
    colour = _intensity(intensity)
    describe = getattr(colour, "describe", None)
    record = {
        "source": describe_source(source),
        "augment": _describe_callable(_augmenter(augment)),
        "intensity": describe() if callable(describe) else _describe_callable(colour),
        "cut_margin": int(cut_margin),
    }
    return json.loads(json.dumps(record))  # plain JSON: what a model's config can hold


def _describe_callable(fn) -> str | None:
    """A function by its name (its repr holds an address), an object by its own repr
    where its class has one (``Augmenter(...)`` lists its bounds), else by its class."""
    if fn is None:
        return None
    if hasattr(fn, "__qualname__"):
        return fn.__qualname__
    if type(fn).__repr__ is not object.__repr__:
        return repr(fn)
    return type(fn).__qualname__


def checkpoint_path(out_dir: str | Path, stage: int) -> Path:
    """Where ``train_stage`` keeps its last checkpoint."""
    return Path(out_dir) / f"stage{stage}.ckpt"


def train_stage(
    stage: int,
    config: CascadeConfig,
    source,
    out_dir: str | Path,
    iterations: int,
    batch_size: int = 2,
    lr: float = 1e-3,
    seed: int = 0,
    augment: bool | Callable = True,
    candidate_fn: CandidateFn | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    checkpoint_every: int = 50,
    log: Callable[[str], None] | None = print,
    *,
    resume: bool = False,
    device: str | torch.device = "cpu",
    amp: bool | None = None,
    channels_last: bool = True,
    progress: bool = False,
    intensity: bool | Callable = True,
    cut_margin: int = CUT_MARGIN,
) -> UNet3D:
    """Train stage ``stage`` (1 or 2) of ``config`` for ``iterations`` optimisation steps.

    ``source``: a ``dataset.PhantomSource`` / ``NiftiSource``, ``anatomy.SynthSource`` /
    ``RepaintSource`` or a ``mixed.MixedSource`` of them (anything with ``draw() ->
    Volume`` and ``state_dict``/``load_state_dict``) on ``config.spacing``, its volumes
    on the CPU or on ``device``. Sub-volumes of ``config.stage<k>.tile`` voxels; labels
    cut to ``UNet3D.output_size`` of the tile.
    Regions: stage 1 trains on C1, the body mask (``ops.morphology.body_mask`` at
    ``config.body_threshold``); stage 2 on C2 = ``candidate_fn(image_hu, labels)``
    (``stage1_candidates(trained_stage1, config)`` reproduces the paper; default:
    ``ground_truth_candidates(config)``, an approximation). ``candidate_fn``, when given
    for stage 1, replaces the body mask. Regions are computed once per source volume; a
    volume with an empty region is skipped (another is drawn).

    ``augment``: ``True`` for ``train.augment.Augmenter`` with the paper's elastic and
    rotation bounds (its translation left to the random sub-volume centre), ``False``
    for none, or a callable ``(image (C, x, y, z), labels (x, y, z), generator) ->
    (image, labels)``. It warps a crop with ``augment_context`` voxels of margin around
    the sub-volume, the region travelling with it, so a warp costs a sub-volume-sized
    interpolation, not a whole scan's.
    ``intensity``: ``True`` for ``intensity.IntensityAugmenter()`` after the spatial
    augmentation, ``False`` for the stage's window alone, an ``IntensityAugmenter`` or a
    callable ``(image_hu, window, generator) -> windowed image`` of its own.
    ``cut_margin``: voxels next to a face of a volume that labelled foreground touches
    left out of the loss (``sampling.cut_border_mask``; the volume's ``cut_distance``
    where it gives one); 0 for none. Centres are still drawn there.
    ``init_state``: a ``state_dict`` to start from (fine-tuning). Optimiser: Adam with a
    constant ``lr``. ``amp`` (default: on for CUDA only): float16 autocast with a
    gradient scaler. ``channels_last``: channels_last_3d activations and weights, faster
    for 3D convolutions on the CPU. ``resume=True`` continues from
    ``checkpoint_path(out_dir, stage)`` if it exists (same config, batch size, ``lr``,
    ``seed`` and ``training_record`` required); ``iterations`` is the total count,
    including the iterations already done. ``log`` receives one line per iteration
    (``None``: silent); ``progress`` shows tqdm. The torch, NumPy and Python global RNGs
    are seeded with ``seed`` (the model's initialisation draws from torch's); the
    sampler, the augmentations and the source use their own generators.

    Several processes: where a ``torch.distributed`` process group of more than one
    process is up (``distributed.init_from_env``, as ``fastcascade train`` does under
    ``torchrun``), the model trains as ``DistributedDataParallel``: each process draws
    its own ``batch_size`` sub-volumes from its own ``source`` (build each with
    ``distributed.rank_seed(seed, rank)``), its sampler and augmentations seeded from
    ``rank_seed(seed, rank)`` (rank 0: ``seed``, as one process), and the gradients are
    averaged, so one step sees ``batch_size`` x world size sub-volumes. The weights
    start equal (torch seeded with ``seed`` everywhere; DDP broadcasts rank 0's).
    BatchNorm keeps per-process statistics (DDP's default, not ``SyncBatchNorm``): each
    process normalises its own sub-volumes, as one process with ``batch_size`` does,
    and the running statistics are rank 0's, broadcast at every forward pass;
    ``SyncBatchNorm`` would add a collective per layer and does not run on gloo (CPU).
    Logged losses are the mean over processes. Rank 0 alone writes the checkpoint (the
    others wait at a barrier); it holds, under ``"ranks"``, every process's sampler,
    augmentation, source and global RNG states (``all_gather_object``), so a resume
    with the same number of processes (each reads the checkpoint) continues exactly;
    another number of processes is refused.

    Returns the trained model (the bare ``UNet3D``) in eval mode on ``device``.

    >>> src = PhantomSource(config.spacing)  # doctest: +SKIP
    >>> model = train_stage(1, config, src, "runs/a", 1000)  # doctest: +SKIP
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if iterations < 0 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError(
            "iterations >= 0, batch_size >= 1 and checkpoint_every >= 1 expected, got "
            f"{iterations}, {batch_size}, {checkpoint_every}"
        )
    stage_cfg = config.stage1 if stage == 1 else config.stage2
    arch = stage_cfg.architecture
    if arch.num_classes != config.num_classes:
        raise ValueError(
            f"stage {stage} has {arch.num_classes} output classes but the config names "
            f"{config.num_classes}"
        )
    device = torch.device(device)
    rank, world = distributed.rank_and_world()
    if rank != 0:  # one process speaks for all
        log, progress = None, False
    data_seed = distributed.rank_seed(seed, rank)
    cut_border_mask(torch.zeros(()), cut_margin)  # checks the margin before any work
    record = training_record(source, augment, intensity, cut_margin)
    out_dir = Path(out_dir)
    ckpt = checkpoint_path(out_dir, stage)
    state = load_training_checkpoint(ckpt) if resume and ckpt.exists() else None
    if state is not None:
        if state["config"] != config.to_dict() or state["stage"] != stage:
            raise ValueError(f"{ckpt} was written for another config or stage; cannot resume")
        for name, value in (("batch_size", batch_size), ("lr", lr), ("seed", seed)):
            if state[name] != value:
                raise ValueError(f"{ckpt} used {name} {state[name]!r}, not {value!r}")
        if "training" in state and state["training"] != record:
            raise ValueError(
                f"{ckpt} was trained on another data mix or augmentation; cannot resume: "
                f"{state['training']} vs {record}"
            )
        if int(state.get("world_size", 1)) != world:
            raise ValueError(
                f"{ckpt} was written by {int(state.get('world_size', 1))} training "
                f"process(es), this run has {world}; resume with as many (each holds "
                "its own sampler and source state)"
            )
    elif resume:
        _log(log, f"stage {stage}: no checkpoint at {ckpt}, starting from iteration 0")

    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    model = UNet3D.from_architecture(arch)
    if init_state is not None:
        check_state_dict(model, init_state, "init_state")
        model.load_state_dict(init_state)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    use_amp = device.type == "cuda" if amp is None else bool(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)

    tile = tuple(stage_cfg.tile)
    augmenter = _augmenter(augment)
    sampler = SubvolumeSampler(
        tile,
        model.output_size(tile),
        seed=_derived_seed(data_seed, 1),
        context=augment_context(augmenter, tile) if augmenter is not None else 0,
    )
    aug_generator = torch.Generator().manual_seed(_derived_seed(data_seed, 2))
    colour = _intensity(intensity)
    intensity_generator = torch.Generator().manual_seed(_derived_seed(data_seed, 3))
    if candidate_fn is None:
        candidate_fn = None if stage == 1 else ground_truth_candidates(config)

    start, losses = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        mine = state["ranks"][rank] if world > 1 else state
        sampler.load_state_dict(mine["sampler"])
        aug_generator.set_state(mine["augment_generator"])
        if "intensity_generator" in mine:  # checkpoints from before it existed
            intensity_generator.set_state(mine["intensity_generator"])
        source.load_state_dict(mine["source"])
        _set_rng_state(mine["rng"])
        start, losses = int(state["iteration"]), list(state["losses"])
        _log(log, f"stage {stage}: resumed from {ckpt} at iteration {start}")

    transform = None
    if augmenter is not None:

        def transform(image, labels):
            # The warp runs where the model does (on a GPU: the Triton kernel).
            return augmenter(image.to(device), labels.to(device), aug_generator)

    Regions = tuple[torch.Tensor, torch.Tensor]
    regions: OrderedDict[str, Regions | None] = OrderedDict()
    # A region per volume the source can hold at once (all of a NIfTI source's cases),
    # so that none is computed twice; phantom pools are small and refreshed.
    max_regions = max(32, len(source)) if hasattr(source, "__len__") else 32

    def region_of(volume) -> Regions | None:
        """The volume's region (where centres are drawn) and the part of it the loss
        counts (the region less the cut-border margin), cached by key and kept on the
        volume's device; ``None`` where the region is empty."""
        if volume.key not in regions:
            if candidate_fn is None:
                r = body_mask(volume.image_hu, config.body_threshold)
            else:
                r = torch.as_tensor(candidate_fn(volume.image_hu, volume.labels)).bool()
            if tuple(r.shape) != tuple(volume.image_hu.shape):
                raise ValueError(
                    f"stage-{stage} region of {volume.key} has shape {tuple(r.shape)}, "
                    f"expected the volume's {tuple(volume.image_hu.shape)}"
                )
            r = r.to(volume.image_hu.device)
            counted = r
            if cut_margin > 0:
                dist = volume.cut_distance
                if dist is None:
                    dist = cut_distance(volume.labels)
                counted = r & cut_border_mask(dist.to(r.device), cut_margin)
            regions[volume.key] = (r, counted) if bool(r.any()) else None
            while len(regions) > max_regions:
                regions.popitem(last=False)
        return regions[volume.key]

    def draw_with_region():
        # A volume whose region is empty (e.g. an early stage 1 that finds no organ
        # there) has nothing to learn from: draw another, a bounded number of times.
        for _ in range(MAX_EMPTY_DRAWS):
            volume = source.draw()
            _check_spacing(volume.spacing, config.spacing)
            region = region_of(volume)
            if region is not None:
                return volume, region
        hint = (
            "check body_threshold and the images' HU"
            if candidate_fn is None
            else "if C2 comes from stage 1, it predicts no foreground yet: train it longer, "
            "or train stage 2 on the dilated ground truth (ground_truth_candidates)"
        )
        raise ValueError(
            f"{MAX_EMPTY_DRAWS} volumes in a row had an empty stage-{stage} region; {hint}"
        )

    def save(iteration: int) -> None:
        ranks = None
        if world > 1:  # a collective: every rank takes part
            ranks = distributed.gather_objects(
                {
                    "sampler": sampler.state_dict(),
                    "augment_generator": aug_generator.get_state(),
                    "intensity_generator": intensity_generator.get_state(),
                    "source": source.state_dict(),
                    "rng": _rng_state(),
                }
            )
            if rank != 0:
                distributed.barrier()
                return
        content = {
            "format": "fastcascade-training",
            "stage": stage,
            "iteration": iteration,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "config": config.to_dict(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "sampler": sampler.state_dict(),
            "augment_generator": aug_generator.get_state(),
            "intensity_generator": intensity_generator.get_state(),
            "training": record,
            "source": source.state_dict(),
            "rng": _rng_state(),
            "losses": list(losses),
        }
        if ranks is not None:
            content.update(world_size=world, ranks=ranks)
        save_training_checkpoint(ckpt, content)
        text = json.dumps({"stage": stage, "losses": losses}) + "\n"
        atomic_write(out_dir / f"stage{stage}_losses.json", lambda tmp: Path(tmp).write_text(text))
        if world > 1:
            distributed.barrier()

    window = stage_cfg.window
    steps = range(start, iterations)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, initial=start, total=iterations, desc=f"stage {stage}")
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        for p in model.parameters():
            if p.is_contiguous() and p.stride() != p.contiguous().view(-1).view(p.shape).stride():
                # Weights with a dimension of 1 (1x1x1 kernels, one input channel) are
                # channels_last and contiguous at once; their gradients come with the
                # contiguous strides, which DDP's buckets must share (else it warns).
                p.data = p.data.clone(memory_format=torch.contiguous_format)
        ids = None
        if device.type == "cuda":
            ids = [torch.cuda.current_device() if device.index is None else device.index]
        net = DistributedDataParallel(model, device_ids=ids)  # broadcasts rank 0's weights
    model.train()
    for it in steps:
        t0 = time.perf_counter()
        images, labels, masks = [], [], []
        for _ in range(batch_size):
            volume, (region, counted) = draw_with_region()
            patch = sampler.sample(
                volume.image_hu, volume.labels, region, counted, transform=transform
            )
            if colour is None:
                image = apply_window(patch.image_hu, window)
            else:
                image = colour(patch.image_hu, window, intensity_generator)
            # A mix may hold volumes on the CPU (phantoms) and on the device (synth).
            images.append(image.to(device, non_blocking=True))
            labels.append(patch.labels.to(device, non_blocking=True))
            masks.append(patch.region.to(device, non_blocking=True))
        x = torch.stack(images)[:, None].to(device, non_blocking=True)
        x = x.contiguous(memory_format=memory_format)
        y = torch.stack(labels).to(device=device, dtype=torch.long)
        m = torch.stack(masks).to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            logits = net(x)
        loss = weighted_cross_entropy(logits, y, m)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        value = float(distributed.mean_across(loss.detach())) + 0.0  # no '-0.0' in logs
        losses.append(value)
        _log(
            log,
            f"stage {stage} iteration {it + 1}/{iterations} loss {value:.5f} "
            f"({time.perf_counter() - t0:.2f} s)",
        )
        if (it + 1) % checkpoint_every == 0 or it + 1 == iterations:
            save(it + 1)
    if start == iterations and state is None:
        save(iterations)
    return model.eval()


def _augmenter(augment):
    if augment is False or augment is None:
        return None
    if augment is True:
        from .augment import Augmenter

        # The random sub-volume centre already translates the content; a translation in
        # the warp would only widen the context crop that every warp must cover.
        return Augmenter(max_translation_vox=0.0)
    if callable(augment):
        return augment
    raise TypeError(f"augment must be True, False or a callable, got {type(augment).__name__}")


def _intensity(intensity):
    if intensity is False or intensity is None:
        return None
    if intensity is True:
        from .intensity import IntensityAugmenter

        return IntensityAugmenter()
    if callable(intensity):
        return intensity
    raise TypeError(f"intensity must be True, False or a callable, got {type(intensity).__name__}")


def _check_spacing(spacing, want) -> None:
    if not np.allclose(spacing, want, rtol=0.05, atol=0.0):  # voxel counts round
        raise ValueError(
            f"source volume has spacing {tuple(spacing)} mm but the config's working "
            f"spacing is {tuple(want)} mm; build the source with spacing=config.spacing"
        )


def _log(log, line: str) -> None:
    if log is not None:
        log(line)
