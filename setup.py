# SPDX-License-Identifier: Apache-2.0
"""Build script. The pure-Python package always installs; the CUDA extension
teacache_fast._C is added by build_cuda.py when nvcc is found (see README)."""
from setuptools import setup

setup()
