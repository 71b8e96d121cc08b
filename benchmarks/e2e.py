"""End-to-end benchmark: ``segment()`` on phantoms, case A, case A at 0.8 mm and case E.

    python benchmarks/e2e.py --device cpu             # the full CPU run
    python benchmarks/e2e.py --quick                  # one phantom + case A, 1 repeat
    python benchmarks/e2e.py --device cuda --paper-net

Cases (``--cases``): ``phantom`` (two generated phantoms of the default size, 122x101x112
voxels at 3 mm, seeds never used for training), ``case_a`` (the real CT as it is,
122x101x112 at 3 mm), ``case_a_08mm`` (case A resampled trilinearly to 0.8 mm isotropic
in memory: 458x379x420 voxels, the size of a clinical scan; its reference labels follow
by nearest neighbour), ``case_e`` (the second real CT, arterial phase, 512x512x133 at
0.7x0.7x2.5 mm) and ``phantom_small`` (61x51x56 at 6 mm, for smoke tests).

Providers (``--providers``), all in the same run on the same inputs:

====================  ====================================================================
``fastcascade``       default options: slab passes over each stage's region, stage 2 in
                      four pooling-phase passes, fp32 (on a GPU the fused kernels)
``every_tile``        the original's approach: every tile computed, non-overlapping stage
                      2, the body mask in SciPy on the host (``skip_empty=False,
                      overlap=False, body_mask_backend="scipy"``), same networks
``torch_best``        the best pure-PyTorch fast cascade: tiles skipped, overlap, the
                      networks with PyTorch's own conv/BN/ReLU (no fastcascade kernels),
                      channels-last, ``torch.compile``; bf16 autocast on a GPU, fp32 on
                      the CPU (bf16 conv3d is a slow path there). On the CPU fastcascade
                      itself is pure PyTorch, so this differs from it only by the compile.
``tiles_overlap``     fastcascade on model-sized tiles (empty ones skipped), overlapping
                      stage 2: like for like with ``fastcascade``
``slabs_single``      slabs, one pass per region in both stages: like for like with
                      ``every_tile``
``fastcascade_bf16``  GPU only: fastcascade in bf16 autocast, like for like with torch_best
====================  ====================================================================

Models: the embedded default model, or a random initialisation of its architecture
(``default_config(base_channels=6)``) while its weights do not exist yet (``--model``);
with ``--paper-net`` (GPU only) also the paper-size network (base 32, 4 levels, valid
convolutions, 132x132x116 tiles, 11 classes, 1.5 mm grid) with random weights.

Timed region: one ``Predictor.segment()`` call on an in-memory float32 HU volume with its
affine, returning NumPy labels on the input grid: upload, resampling to the working grid,
C1, stage 1, C2, stage 2, back to the input grid, download. Per-stage seconds are the
result's own ``timings`` (each lap synchronises on a GPU). For each case and provider:
one untimed warm-up run that also counts host syncs under ``SyncCounter`` (the dispatch
mode slows every op, so it never runs during a timed run), then ``--repeats`` timed runs
(medians). Compiled providers get one more plain warm-up first, so that recompiles for a
new tile-batch shape land in neither the counted nor the timed runs; the first of those
calls, minus the provider's median total on that case, is reported as compile time.

Output: ``<out>/e2e-<device-slug>-<YYYY-MM-DD>[-quick].json``, rewritten atomically after
every run, and a markdown table printed at the end and saved beside it as ``.md``.
A benchmark reports; it never asserts a time.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Runnable from a checkout without installing the package.
sys.path[:0] = [p for p in (str(ROOT), str(HERE)) if p not in sys.path]

from common import (  # noqa: E402
    add_allocator_argument,
    environment,
    load_average,
    result_path,
    uptime,
    use_allocator,
    write_atomic,
    write_json,
)
from e2e_cases import CASES, DEFAULT_CASES, data_dir, iter_cases  # noqa: E402
from e2e_measure import measure  # noqa: E402
from e2e_providers import (  # noqa: E402
    PROVIDERS,
    compile_probe,
    load_benchmark_model,
    make_providers,
    random_model,
)
from e2e_report import compare, table  # noqa: E402

from fastcascade.api import resolve_device  # noqa: E402
from fastcascade.config import CLASS_NAMES  # noqa: E402
from fastcascade.presets import paper_config  # noqa: E402

QUICK_COMPILE_BUDGET_S = 120.0


# -- main --------------------------------------------------------------------------------
def _list(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(
            f"{what}: expected a comma-separated subset of {','.join(allowed)}, got {value!r}"
        )
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/e2e.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="one phantom + case A, 1 repeat; on the CPU torch_best only if a "
        "compile probe finishes within --compile-budget",
    )
    p.add_argument(
        "--cases",
        type=lambda v: _list(v, CASES, "--cases"),
        default=None,
        help=f"comma-separated, from {','.join(CASES)} (default: "
        f"{','.join(DEFAULT_CASES)}; --quick: phantom,case_a)",
    )
    p.add_argument(
        "--providers",
        type=lambda v: _list(v, PROVIDERS, "--providers"),
        default=None,
        help="comma-separated (default: fastcascade,every_tile,"
        "torch_best, plus fastcascade_bf16 on a GPU)",
    )
    p.add_argument(
        "--paper-net",
        action="store_true",
        help="also the paper-size network with random weights (GPU only)",
    )
    p.add_argument(
        "--model",
        default="auto",
        help="'auto' (the embedded default model, or a random init of its "
        "architecture while its weights do not exist), 'random', or a path",
    )
    p.add_argument("--batch-size", type=int, default=2, help="tiles per network call")
    p.add_argument("--seed", type=int, default=0, help="seed of random initialisations")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per case and provider (default: 1 on the CPU, 3 on a GPU)",
    )
    p.add_argument(
        "--compile-budget",
        type=float,
        default=None,
        help="seconds a CPU compile probe may take before torch_best is skipped "
        f"(default with --quick: {QUICK_COMPILE_BUDGET_S:.0f}; else no probe)",
    )
    add_allocator_argument(p)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the shared data folder (default: $FASTCASCADE_DATA or ../shared/data)",
    )
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.paper_net and device.type != "cuda":
        print("--paper-net needs a GPU (--device cuda)", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    repeats = args.repeats or (1 if args.quick or not gpu else 3)
    cases = args.cases or (["phantom", "case_a"] if args.quick else list(DEFAULT_CASES))
    providers = args.providers or (list(PROVIDERS) if gpu else list(PROVIDERS[:5]))
    if not gpu and "fastcascade_bf16" in providers:
        print("fastcascade_bf16 needs a GPU", file=sys.stderr)
        return 2
    budget = args.compile_budget
    if budget is None and args.quick and not gpu:
        budget = QUICK_COMPILE_BUDGET_S

    notes: list[str] = [f"Allocator: {use_allocator(args.allocator)}."]
    if not gpu:
        notes.append(
            "CPU: fastcascade is pure PyTorch here, so torch_best differs only by "
            "torch.compile; it runs fp32 because bf16 conv3d is a slow path on CPUs."
        )
    models = [load_benchmark_model(args.model, args.seed)]
    if args.paper_net:
        models.append(
            random_model(
                paper_config(CLASS_NAMES),
                args.seed,
                "paper_net",
                "paper-size network, random weights",
            )
        )
    path = result_path(args.out, "e2e", device, "-quick" if args.quick else "")
    report = {
        "benchmark": "e2e",
        "started": datetime.now().isoformat(timespec="seconds"),
        "finished": None,
        "environment": environment(device),
        "options": {
            "quick": args.quick,
            "cases": cases,
            "providers": providers,
            "repeats": repeats,
            "batch_size": args.batch_size,
            "device": str(device),
            "allocator": args.allocator,
        },
        "timed_region": "Predictor.segment() on an in-memory float32 HU volume + affine, to "
        "NumPy labels on the input grid; per-step seconds from its timings",
        "models": {m.name: m.identity for m in models},
        "compile": {},
        "notes": notes,
        "records": [],
    }
    write_json(path, report)
    print(f"writing {path}", flush=True)

    for model in models:
        names = list(providers)
        if "torch_best" in names and budget is not None:
            probe = compile_probe(
                model.config.stage1.architecture, model.config.stage1.tile, args.batch_size, budget
            )
            report["compile"][f"{model.name}/probe"] = {**probe, "budget_s": budget}
            if not probe["within_budget"]:
                names.remove("torch_best")
                notes.append(
                    f"torch_best skipped for {model.name}: compiling one stage took "
                    f"over {budget:.0f} s ({probe.get('error', 'budget exceeded')})"
                )
            write_json(path, report)
        provs = make_providers(model, device, names, args.batch_size)
        first_case = True
        for case in iter_cases(cases, args.data or data_dir(), args.quick, notes):
            case_records, labels = [], {}
            for prov in provs:
                print(
                    f"[{model.name}] {case.name} {tuple(case.volume.shape)}: {prov.name} …",
                    flush=True,
                )
                record, labels[prov.name] = measure(prov, case, device, repeats)
                record = {
                    "model": model.name,
                    "case": case.name,
                    "case_description": case.description,
                    "shape": list(case.volume.shape),
                    "spacing_mm": [round(s, 4) for s in case.spacing],
                    "provider": prov.name,
                    "provider_description": prov.description,
                    "options": prov.options,
                    "precision": prov.predictor.precision,
                    "compile": prov.compiled,
                    "repeats": repeats,
                    **record,
                }
                if prov.compiled and first_case:
                    report["compile"][f"{model.name}/{prov.name}"] = {
                        "case": case.name,
                        "first_call_s": record["warmup_s"],
                        "median_total_s": record["timings_s"]["total"],
                        "compile_s_estimate": record["warmup_s"] - record["timings_s"]["total"],
                        "note": "only what the on-disk Inductor cache did not already hold",
                    }
                t = record["timings_s"]
                print(
                    f"    total {t['total']:.2f} s (stage 1 {t['stage1']:.2f}, stage 2 "
                    f"{t['stage2']:.2f}); tiles {record['tiles']['stage1']['computed']}/"
                    f"{record['tiles']['stage1']['total']}, "
                    f"{record['tiles']['stage2']['computed']}/"
                    f"{record['tiles']['stage2']['total']}; syncs {record['host_syncs']}",
                    flush=True,
                )
                case_records.append(record)
                report["records"].append(record)
                compare(case_records, labels, case, model.config.class_names)
                write_json(path, report)
            first_case = False
            del labels

    report["finished"] = datetime.now().isoformat(timespec="seconds")
    report["load_average_end"] = load_average()
    report["uptime_end"] = uptime()
    write_json(path, report)
    text = table(report)
    write_atomic(path.with_suffix(".md"), text)
    print()
    print(text)
    print(f"results: {path} and {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
