"""Host time per fused conv-BN-ReLU call: the Python a layer costs before any GPU work.

Run through ``benchmarks/run.py --area host [--baseline REV]``. A small network's tile
does about 0.1 ms of GPU work per layer, so the Python of each eval-mode call decides
whether a GPU waits on the host. This measures it on the CPU: ``conv_bn_relu(x, module)``
(what ``ConvBNReLU.forward`` calls on a GPU) runs its dispatch path as on a GPU, with the
GPU work replaced by stand-ins: every tensor counts as a CUDA tensor with cuDNN present
(``_backend.on_cuda`` and ``_backend.cudnn_available`` answer yes),
``torch.cudnn_convolution_relu`` returns a preallocated output and the Triton kernel's
launch does nothing. The timed region is everything else: the input checks, the
module's cached checks and folded weights, the provider choice, the fallback lookup and
the launcher (the output allocation included). Each stand-in counts its calls, so a
record shows that the fused path ran (``stand_in_calls`` is 1 per call).

Not included: Triton's own launch (binding ~20 arguments, on a GPU tens of µs more per
Triton layer) and CUDA's kernel launch; a cuDNN call's host time beyond its Python.

The working tree and a baseline revision (``--baseline``, default :data:`BASELINE`: the
code before the per-module cache; ``none`` skips it) run in the same invocation, each in
a subprocess of its own that imports its own copy of fastcascade (the baseline extracted
with ``git archive``), under the same harness, in ``ROUNDS`` alternating rounds so that a
change in the machine's load hits both alike. Per case: ``CALLS`` calls per repetition,
``REPS`` repetitions per round after a warm-up; the median, 20th and 80th percentile of
the per-call wall-clock time over all repetitions, and the median of the thread's CPU
time (``time.thread_time``), which leaves out the time other processes held the cores.
Cases: cuDNN's and Triton's path (through the committed table, every entry set to that
provider), an fp32 input, and a bf16 input under bf16 autocast (the activations of a bf16
network), under ``torch.inference_mode()`` and ``torch.no_grad()``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The revision before eval-mode calls reused a per-module cache and skipped the custom op.
BASELINE = "6efe811"
#: The layer: tiny on purpose (the work is replaced; only the Python is timed).
CIN, COUT, SIZE = 16, 16, (6, 6, 6)
CALLS, REPS, WARMUP, ROUNDS = 500, 5, 200, 3
DRY_CALLS, DRY_REPS, DRY_WARMUP = 20, 3, 5

COLUMNS = [
    ("provider", "provider", ""),
    ("dtype", "dtype", ""),
    ("grad mode", "grad_mode", ""),
    ("code", "code", ""),
    ("median µs/call", "median_us", ".1f"),
    ("p20 µs", "p20_us", ".1f"),
    ("p80 µs", "p80_us", ".1f"),
    ("CPU µs/call", "cpu_median_us", ".1f"),
    ("× vs baseline", "speedup_vs_baseline", ".2f"),
    ("× CPU time", "cpu_speedup_vs_baseline", ".2f"),
]


# -- the worker: one copy of fastcascade, stand-ins for the GPU ----------------------------
class _Counter:
    def __init__(self):
        self.calls = 0


def _worker(calls: int, reps: int, warmup: int) -> list[dict]:
    import torch

    import fastcascade
    import fastcascade.ops.conv_bn_relu as cbr
    from fastcascade.model import ConvBNReLU
    from fastcascade.ops import _backend
    from fastcascade.ops.conv_bn_relu import configs, kernel

    _backend.on_cuda = lambda tensor: True  # the auto choice runs as on a GPU
    _backend.cudnn_available = lambda: True
    counter = _Counter()
    outputs: dict = {}

    def cudnn_stand_in(x, weight, bias, *args):
        counter.calls += 1
        return outputs[x.dtype]

    class NoLaunch:  # kernel[grid](...) does nothing
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                counter.calls += 1

            return launch

    torch.cudnn_convolution_relu = cudnn_stand_in
    kernel._conv3x3x3_bias_relu_kernel = NoLaunch()

    torch.manual_seed(0)
    layer = ConvBNReLU(CIN, COUT)
    with torch.no_grad():
        layer.bn.running_mean.normal_(0, 0.1)
        layer.bn.running_var.uniform_(0.5, 1.5)
    layer.eval()
    out_size = tuple(s - 2 for s in SIZE)
    table = dict(configs.CONFIGS)
    grad_modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    records = []
    for provider in ("cudnn", "triton"):
        configs.CONFIGS = {k: {**v, "provider": provider} for k, v in table.items()}
        for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            x = torch.randn(1, CIN, *SIZE, dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last_3d)
            outputs[dtype] = torch.empty(1, COUT, *out_size, dtype=dtype).contiguous(
                memory_format=torch.channels_last_3d
            )
            autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
            for mode, grad_mode in grad_modes.items():
                with grad_mode(), autocast:

                    def call(x=x):
                        return cbr.conv_bn_relu(x, layer)

                    for _ in range(warmup):
                        call()
                    counter.calls = 0
                    times, cpu_times = [], []
                    for _ in range(reps):
                        start, cpu_start = time.perf_counter(), time.thread_time()
                        for _ in range(calls):
                            call()
                        cpu_times.append((time.thread_time() - cpu_start) / calls * 1e6)
                        times.append((time.perf_counter() - start) / calls * 1e6)
                    stand_in_calls = counter.calls / (reps * calls)
                records.append(
                    dict(
                        op="conv_bn_relu host time",
                        layer=f"{CIN}→{COUT} @{'x'.join(map(str, SIZE))} valid",
                        shape=f"1x{CIN}x{'x'.join(map(str, SIZE))}→{COUT}",
                        provider=provider,
                        dtype=dtype_name,
                        grad_mode=mode,
                        times_us=times,
                        cpu_times_us=cpu_times,
                        stand_in_calls=stand_in_calls,
                        calls=calls,
                        reps=reps,
                        fastcascade_file=fastcascade.__file__,
                    )
                )
    return records


def _run_worker(root: Path, calls: int, reps: int, warmup: int) -> list[dict]:
    """The worker in a fresh interpreter importing fastcascade from ``root``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a GPU's path
    env["PYTHONPATH"] = str(root)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    command += ["--calls", str(calls), "--reps", str(reps), "--warmup", str(warmup)]
    done = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"host benchmark worker in {root} failed:\n{done.stderr[-4000:]}")
    records = json.loads(done.stdout.strip().splitlines()[-1])
    for r in records:
        if not Path(r["fastcascade_file"]).resolve().is_relative_to(Path(root).resolve()):
            raise RuntimeError(f"the worker imported {r['fastcascade_file']}, not from {root}")
    return records


def _extract(revision: str, into: Path) -> str:
    """``fastcascade/`` at ``revision`` into ``into``; returns the full commit hash."""
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{revision}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", "--format=tar", sha, "fastcascade"], cwd=ROOT, capture_output=True
    )
    if archive.returncode != 0:
        raise RuntimeError(archive.stderr.decode())
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return sha


def _summarise(runs: list[dict], code: str) -> dict:
    """One case's records from every round, merged: wall-clock and CPU-time statistics."""
    record = {k: v for k, v in runs[0].items() if k not in ("times_us", "cpu_times_us")}
    record.pop("fastcascade_file")
    wall = common.stats([t for r in runs for t in r["times_us"]])
    cpu = common.stats([t for r in runs for t in r["cpu_times_us"]])
    record["reps"] = sum(r["reps"] for r in runs)
    record["stand_in_calls"] = min(r["stand_in_calls"] for r in runs)
    return dict(
        record,
        code=code,
        median_us=wall["median"],
        p20_us=wall["p20"],
        p80_us=wall["p80"],
        cpu_median_us=cpu["median"],
        cpu_p20_us=cpu["p20"],
        cpu_p80_us=cpu["p80"],
        median_ms=wall["median"] / 1e3,
        p20_ms=wall["p20"] / 1e3,
        p80_ms=wall["p80"] / 1e3,
    )


def run_host(args, rec) -> None:
    calls, reps, warmup = (DRY_CALLS, DRY_REPS, DRY_WARMUP) if args.cpu else (CALLS, REPS, WARMUP)
    rounds = 1 if args.cpu else ROUNDS
    baseline = getattr(args, "baseline", None) or BASELINE
    rec.data["meta"]["timed_region"] = (
        "one conv_bn_relu(x, module) call of an eval-mode ConvBNReLU, averaged over "
        f"{calls} calls per repetition, {reps} repetitions in each of {rounds} alternating "
        "rounds per code version; GPU work replaced by stand-ins (see "
        "benchmarks/bench_host.py): checks, cached fold lookup, provider choice, fallback "
        "lookup, launcher and output allocation"
    )
    rec.data["meta"]["load_average_start"] = common.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        roots = {"current": ROOT}
        if baseline != "none":
            sha = _extract(baseline, Path(tmp))
            rec.data["meta"]["baseline_commit"] = sha
            roots = {f"baseline {sha[:7]}": Path(tmp), **roots}
        # Alternating rounds: a change in the machine's load hits both versions alike.
        runs: dict[tuple, list[dict]] = {}
        for _ in range(rounds):
            for code, root in roots.items():
                for r in _run_worker(root, calls, reps, warmup):
                    runs.setdefault((code, r["provider"], r["dtype"], r["grad_mode"]), []).append(r)
    rec.data["meta"]["load_average_end"] = common.load_average()
    rows = [_summarise(group, key[0]) for key, group in runs.items()]
    base = {(r["provider"], r["dtype"], r["grad_mode"]): r for r in rows if r["code"] != "current"}
    for r in rows:
        before = base.get((r["provider"], r["dtype"], r["grad_mode"]))
        if before and r["code"] == "current":
            r["speedup_vs_baseline"] = before["median_us"] / r["median_us"]
            r["cpu_speedup_vs_baseline"] = before["cpu_median_us"] / r["cpu_median_us"]
        rec.add(**r)
    from run import markdown_table

    meta = rec.data["meta"]
    title = f"# Host time per fused-layer call on {meta['device']}\n\n"
    title += f"Timed region: {meta['timed_region']}.\n\n"
    title += (
        "Wall clock and the thread's CPU time (which leaves out the time other processes "
        "held the cores: load average {:.1f} at the start, {:.1f} at the end, {} cores).\n\n"
    ).format(
        meta["load_average_start"].get("1min", float("nan")),
        meta["load_average_end"].get("1min", float("nan")),
        meta["load_average_start"].get("cores"),
    )
    if args.cpu:
        title += "Dry run: few repetitions, the times mean little.\n\n"
    rec.write_markdown(title + markdown_table(rows, COLUMNS))


def summarize(data: dict) -> str:
    from run import markdown_table

    return markdown_table(data["results"], COLUMNS)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the host benchmark's worker (see run.py)")
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--calls", type=int, default=CALLS)
    parser.add_argument("--reps", type=int, default=REPS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    a = parser.parse_args()
    print(json.dumps(_worker(a.calls, a.reps, a.warmup)))
