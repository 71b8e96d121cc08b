"""Host memory an automatic ``memory_budget`` may take: the kernel's estimate, a
container's limit and ``FASTCASCADE_MAX_MEMORY``, the least of them."""

from __future__ import annotations

import pytest

from fastcascade.io import limits


def test_meminfo_available_is_read_in_kilobytes(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   2048 kB\n")
    assert limits._meminfo_available(str(info)) == 2048 * 1024
    info.write_text("MemTotal:       24000000 kB\n")  # old kernels have no MemAvailable
    assert limits._meminfo_available(str(info)) is None
    assert limits._meminfo_available(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "files, headroom",
    [
        ({"memory.max": "max\n", "memory.current": "5\n"}, None),
        ({"memory.max": "1000\n", "memory.current": "300\n"}, 700),
        ({"memory.max": "1000\n", "memory.current": "1200\n"}, 0),
        ({"memory/memory.limit_in_bytes": "4096", "memory/memory.usage_in_bytes": "96"}, 4000),
        (
            {
                "memory/memory.limit_in_bytes": str(2**63 - 4096),
                "memory/memory.usage_in_bytes": "1",
            },
            None,
        ),
        ({}, None),
    ],
    ids=["v2-no-limit", "v2", "v2-over", "v1", "v1-no-limit", "none"],
)
def test_cgroup_headroom_is_its_limit_less_its_usage(tmp_path, files, headroom):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert limits._cgroup_headroom(str(tmp_path)) == headroom


def test_available_memory_is_the_least_known(monkeypatch):
    monkeypatch.delenv("FASTCASCADE_MAX_MEMORY", raising=False)
    monkeypatch.setattr(limits, "_meminfo_available", lambda: 8 * 2**30)
    monkeypatch.setattr(limits, "_cgroup_headroom", lambda: 3 * 2**30)
    assert limits.available_memory() == 3 * 2**30
    monkeypatch.setenv("FASTCASCADE_MAX_MEMORY", "1G")
    assert limits.available_memory() == 2**30
    monkeypatch.setattr(limits, "_cgroup_headroom", lambda: None)
    monkeypatch.setenv("FASTCASCADE_MAX_MEMORY", "16G")
    assert limits.available_memory() == 8 * 2**30
    monkeypatch.delenv("FASTCASCADE_MAX_MEMORY")
    monkeypatch.setattr(limits, "_meminfo_available", lambda: None)  # not Linux
    assert limits.available_memory() == limits.physical_memory()


def test_available_memory_on_this_machine_is_within_its_physical_memory():
    free = limits.available_memory()
    physical = limits.physical_memory()
    if free is None or physical is None:
        pytest.skip("this system reports neither")
    assert 0 < free <= physical
