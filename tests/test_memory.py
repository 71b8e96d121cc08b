"""Host memory: what an automatic ``memory_budget`` may take (the kernel's estimate, a
container's limit, ``FASTCASCADE_MAX_MEMORY``, the process's own free heap), and glibc
keeping freed blocks instead of faulting them in again. Anything that changes the
process's allocator runs in a child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastcascade import memory
from fastcascade.io.limits import physical_memory

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(memory._glibc() is None, reason="glibc only")


def test_meminfo_available_is_read_in_kilobytes(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n")
    assert memory._meminfo_available(str(info)) == 2048 * 1024
    info.write_text("MemTotal:       24000000 kB\n")  # old kernels have no MemAvailable
    assert memory._meminfo_available(str(info)) is None
    assert memory._meminfo_available(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "files, headroom",
    [
        ({"memory.max": "max\n", "memory.current": "5\n"}, None),
        ({"memory.max": "1000\n", "memory.current": "300\n"}, 700),
        ({"memory.max": "1000\n", "memory.current": "1200\n"}, 0),
        ({"memory/memory.limit_in_bytes": "4096", "memory/memory.usage_in_bytes": "96"}, 4000),
        ({"memory/memory.limit_in_bytes": str(2**63), "memory/memory.usage_in_bytes": "1"}, None),
        ({}, None),
    ],
    ids=["v2-no-limit", "v2", "v2-over", "v1", "v1-no-limit", "none"],
)
def test_cgroup_headroom_is_its_limit_less_its_usage(tmp_path, files, headroom):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert memory._cgroup_headroom(str(tmp_path)) == headroom


def test_available_memory_is_the_least_known_plus_the_free_heap(monkeypatch):
    monkeypatch.delenv("FASTCASCADE_MAX_MEMORY", raising=False)
    monkeypatch.setattr(memory, "heap_free", lambda: 0)
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 8 * 2**30)
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: 3 * 2**30)
    assert memory.available_memory() == 3 * 2**30
    monkeypatch.setattr(memory, "heap_free", lambda: 2**30)  # held by us, ours to reuse
    assert memory.available_memory() == 4 * 2**30
    monkeypatch.setenv("FASTCASCADE_MAX_MEMORY", "1G")
    assert memory.available_memory() == 2**30
    monkeypatch.setattr(memory, "_cgroup_headroom", lambda: None)
    monkeypatch.setenv("FASTCASCADE_MAX_MEMORY", "16G")
    assert memory.available_memory() == 9 * 2**30
    monkeypatch.delenv("FASTCASCADE_MAX_MEMORY")
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)  # not Linux
    assert memory.available_memory() == physical_memory()


def test_available_memory_on_this_machine_is_within_its_physical_memory():
    free, physical = memory.available_memory(), physical_memory()
    if free is None or physical is None:
        pytest.skip("this system reports neither")
    assert 0 < free <= physical + memory.heap_free()


def test_without_glibc_nothing_changes_and_it_says_so(monkeypatch):
    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.keep_freed_memory() is False
    assert memory.release_freed_memory() is False
    assert memory.heap_free() == 0


#: A child process: blocks of 256 and 85 MiB written and freed, four times over; the page
#: faults of the last round (getrusage, an independent oracle) say whether glibc reused
#: the memory it kept or mapped it afresh.
CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from fastcascade import memory

    kept = memory.keep_freed_memory() if sys.argv[1] == "keep" else False
    n = 64 * 2**20  # float32: 256 MiB

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x, y = torch.ones(n), torch.ones(n // 3)
        del x, y
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    rounds = [faults() for _ in range(4)]
    free_after = memory.heap_free()
    released = memory.release_freed_memory()
    print(json.dumps(dict(kept=kept, keeping=memory.keeping_freed_memory(), faults=rounds[-1],
                          free_after=free_after, released=released)))
    """
)


def python(*argv: str, **env: str) -> str:
    """stdout of a child Python without glibc's own MALLOC_ variables, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        env=clean | env,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    return done.stdout


def child(mode: str) -> dict:
    return json.loads(python("-c", CHILD, mode).strip().splitlines()[-1])


@glibc
def test_kept_blocks_are_reused_without_page_faults():
    pages = 256 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    plain, kept = child("plain"), child("keep")
    assert not plain["kept"] and not plain["keeping"]
    assert plain["faults"] > pages // 2  # glibc unmapped the block: faulted in again
    assert kept["kept"] and kept["keeping"]
    assert kept["faults"] < pages // 50  # reused from the heap
    assert kept["free_after"] >= 256 * 2**20  # the freed block, held for reuse
    assert kept["released"]  # and handed back on request


@glibc
def test_the_command_keeps_freed_memory_unless_told_not_to():
    def env_line(**env):
        out = python("-m", "fastcascade", "env", **env)
        (line,) = [s for s in out.splitlines() if s.startswith("freed memory")]
        return line

    assert "kept for reuse" in env_line()
    assert "returned to the system" in env_line(FASTCASCADE_KEEP_FREED_MEMORY="0")
