"""Build script: every Cython extension and its compiler directives live here.

Set NNRT_DEBUG_BUILD=1 to rebuild with bounds checks, wraparound and
initialized-check on (and -O0 -g), so an out-of-bounds access in a kernel
raises IndexError instead of corrupting memory.
Set NNRT_NATIVE=1 to add -march=native (not portable; off by default).
"""

import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("NNRT_DEBUG_BUILD", "") not in ("", "0")
NATIVE = os.environ.get("NNRT_NATIVE", "") not in ("", "0")

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
    "binding": True,
}

if sys.platform == "win32":
    compile_args = ["/O2"]
else:
    compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]
    compile_args += ["-fno-strict-aliasing", "-Wno-unused-function"]
    if NATIVE and not DEBUG:
        compile_args.append("-march=native")

macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if DEBUG:
    macros.append(("NNRT_DEBUG_BUILD", "1"))


def ext(name: str, source: str) -> Extension:
    return Extension(
        name,
        [source],
        include_dirs=[np.get_include(), "."],
        define_macros=macros,
        extra_compile_args=compile_args,
    )


extensions = [
    # core
    ext("nnrt.layer", "nnrt/layer.pyx"),
    ext("nnrt.dense", "nnrt/dense.pyx"),
    # ext("nnrt._kernels", "nnrt/_kernels.pyx"),
    # built-in plugins (cimport nnrt's .pxd files as a third party would)
    ext("nnrt_plugins._sigmoid", "plugins/_sigmoid.pyx"),
    ext("nnrt_plugins._batchnorm", "plugins/_batchnorm.pyx"),
    ext("nnrt_plugins._dense_nobias", "plugins/_dense_nobias.pyx"),
    # compiled part of the test suite (collected through tests/test_cython_suite.py)
    # ext("nnrt_cytests._cy_layer_tests", "tests/cython/_cy_layer_tests.pyx"),
]

setup(
    packages=["nnrt", "nnrt_plugins", "nnrt_cytests"],
    package_dir={"nnrt": "nnrt", "nnrt_plugins": "plugins", "nnrt_cytests": "tests/cython"},
    package_data={
        "nnrt": ["*.pxd", "*.pyi", "py.typed", "data/*"],
        "nnrt_plugins": ["*.pxd", "*.pyi"],
    },
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        include_path=["."],
        annotate=False,
    ),
    zip_safe=False,
)
