"""Build the extension against the *installed* nnrt's .pxd files.

``nnrt/layer.pxd`` ships inside the nnrt package; the directory that holds the
``nnrt`` package goes on Cython's include path so ``from nnrt.layer cimport
Layer`` resolves (this also works for an editable nnrt, whose package
directory is the source checkout).
"""

import os

import nnrt
import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

# -fno-trapping-math: nothing here relies on FP exceptions, and it lets the
# compiler turn the element-wise selects of the kernels into SIMD blends.
COMPILE_ARGS = ["/O2"] if os.name == "nt" else ["-O3", "-fno-trapping-math"]

nnrt_root = os.path.dirname(os.path.dirname(os.path.abspath(nnrt.__file__)))

extensions = [
    Extension(
        "nnrt_relu_cython._relu",
        ["src/nnrt_relu_cython/_relu.pyx"],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        include_path=[nnrt_root],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    ),
    zip_safe=False,
)
