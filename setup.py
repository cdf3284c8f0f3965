"""The one compiled module (vaultfs/store/_predictor.c); everything else is in pyproject.toml.
pip builds it with gcc and the Python headers (python3-dev)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("vaultfs.store._predictor", ["vaultfs/store/_predictor.c"],
                             extra_compile_args=["-O3"])])
