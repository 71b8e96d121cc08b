"""One measurement of the end-to-end benchmark: a provider's ``segment()`` on one case.

An untimed warm-up counts the host syncs under ``SyncCounter`` (its dispatch mode slows
every op, so it never runs during a timed run); the timed runs follow, and the record
holds their per-step medians, the tile counts, the candidate fractions and peak memory.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import load_average, peak_memory_mb, reset_peak_memory, stats
from e2e_cases import Case
from e2e_providers import Provider

from fastcascade.diagnostics import SyncCounter

STEPS = ("load", "to_working_grid", "c1", "stage1", "c2", "stage2", "to_input_grid", "total")


def measure(
    provider: Provider, case: Case, device: torch.device, repeats: int
) -> tuple[dict, np.ndarray]:
    """Warm up (counting host syncs), then time ``repeats`` runs; returns the record and
    the last run's labels."""

    def call():
        return provider.predictor.segment(case.volume, affine=case.affine, **provider.options)

    record = {"load_average_before": load_average()}
    if provider.compiled:
        t0 = time.perf_counter()
        call()
        record["warmup_s"] = time.perf_counter() - t0
    with SyncCounter() as counter:
        call()
    reset_peak_memory(device)
    runs = []
    for _ in range(repeats):
        runs.append(call())
    peak, peak_kind = peak_memory_mb(device)
    last = runs[-1]
    totals = [r.timings["total"] for r in runs]
    voxels = int(np.prod(case.volume.shape))
    record.update(
        {
            "timings_s": {k: stats([r.timings[k] for r in runs])["median"] for k in STEPS},
            "total_s": stats(totals),
            "voxels_per_s": voxels / stats(totals)["median"],
            "tiles": {
                stage: {"computed": c, "total": t, "skipped": t - c}
                for stage, (c, t) in last.tiles.items()
            },
            "c1_fraction": last.c1_fraction,
            "c2_fraction": last.c2_fraction,
            "host_syncs": counter.syncs,
            "host_syncs_by_op": dict(counter.by_op),
            "transfers": {
                "count": len(counter.transfers),
                "bytes": sum(b for _, _, b in counter.transfers),
            },
            "peak_memory_mb": peak,
            "peak_memory_kind": peak_kind,
        }
    )
    return record, np.asarray(last.labels)
