"""The compiled modules (vaultfs/store/_predictor.c, vaultfs/sync/_xor.c); everything else is in
pyproject.toml. pip builds them with gcc and the Python headers (python3-dev)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(name, [source], extra_compile_args=["-O3"]) for name, source in (
    ("vaultfs.store._predictor", "vaultfs/store/_predictor.c"),
    ("vaultfs.sync._xor", "vaultfs/sync/_xor.c"))])
