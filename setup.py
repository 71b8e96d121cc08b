"""Pure-Python install by default; ``FASTCASCADE_BUILD_EXT=1`` adds nothing yet that needs
a compiler at install time (CUDA sources in ``csrc/`` are compiled at run time on a GPU)."""

from setuptools import setup

setup()
