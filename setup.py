"""Pure-Python install: nothing is compiled here. The CUDA C++ sources of ``csrc/`` are
compiled on first use on a GPU machine (``fastcascade/ops/ccl.py``); a built package carries
them as ``fastcascade/csrc/`` (an editable install reads ``csrc/`` in place)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE_SUFFIXES = {".cu", ".cuh", ".cpp", ".h"}


class BuildPyWithCsrc(build_py):
    """``build_py`` that also copies ``csrc/``'s sources into the package."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "fastcascade" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(CSRC.iterdir()):
            if source.suffix in SOURCE_SUFFIXES:
                shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithCsrc})
