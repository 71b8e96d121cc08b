"""The package's import layering: lower layers never import higher ones.

Every import statement counts, those inside functions too: a lazy import still ties the
two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastcascade"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _files(subpackage: str) -> list[Path]:
    return sorted((PACKAGE / subpackage).rglob("*.py"))


def _ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(PACKAGE)) for p in paths]


def _ours(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m == "fastcascade" or m.startswith("fastcascade.")}


@pytest.mark.parametrize("path", _files("io"), ids=_ids(_files("io")))
def test_io_imports_nothing_from_model(path):
    bad = sorted(m for m in imported_modules(path) if m.startswith("fastcascade.model"))
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("io"), ids=_ids(_files("io")))
def test_io_imports_only_io_and_ops(path):
    """Files in and out know no config, preset, model or pipeline; they may use the ops
    (the lowest floor: a scan resamples itself onto a working grid)."""
    bad = sorted(m for m in _ours(path) if not m.startswith(("fastcascade.io", "fastcascade.ops")))
    assert bad == [], f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("ops"), ids=_ids(_files("ops")))
def test_ops_import_only_ops(path):
    """An op knows no file, network, pipeline or configuration."""
    bad = sorted(m for m in _ours(path) if not m.startswith("fastcascade.ops"))
    assert bad == [], f"{path.name} imports {bad}"


def test_config_imports_nothing_of_the_package():
    assert _ours(PACKAGE / "config.py") == set()


def test_presets_build_on_config_only():
    modules = _ours(PACKAGE / "presets.py")
    assert "fastcascade.config" in modules
    assert all(m.startswith("fastcascade.config") for m in modules), sorted(modules)


def test_imported_modules_resolves_relative_imports():
    modules = imported_modules(PACKAGE / "model" / "checkpoint.py")
    assert {"fastcascade.io.atomic", "fastcascade.model.unet3d", "fastcascade.config"} <= modules


ALL_FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_argument_parsing_only_in_the_cli(path):
    if path.is_relative_to(PACKAGE / "cli"):
        return
    assert "argparse" not in imported_modules(path), f"{path.name} parses arguments"


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_only_the_cli_and_the_module_runners_import_the_cli(path):
    runners = {PACKAGE / "__main__.py", PACKAGE / "demo" / "__main__.py"}
    if path.is_relative_to(PACKAGE / "cli") or path in runners:
        return
    bad = sorted(m for m in _ours(path) if m.startswith("fastcascade.cli"))
    assert bad == [], f"{path.name} imports {bad}"


def test_the_cli_imports_its_commands_explicitly():
    """No importlib lookups of command modules that could turn a bug into a stub."""
    init = PACKAGE / "cli" / "__init__.py"
    modules = imported_modules(init)
    assert "importlib" not in modules
    for command in ("segment", "env", "phantom", "train", "evaluate", "demo", "export"):
        assert f"fastcascade.cli.{command}" in modules
