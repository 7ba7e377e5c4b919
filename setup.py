"""Build script: the pure-Python package today.

The compiled CUDA C++ extension of ``csrc/`` is added here as ``ext_modules`` (built only
when asked with an environment flag, or when nvcc and a CUDA build of torch are both
present); until then ``pip install .`` needs no compiler and no CUDA.
"""

from setuptools import setup

setup()
