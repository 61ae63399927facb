# cython: language_level=3
"""Layer base class and input validation shared by every layer.

Design: a layer validates its input once, at the Python boundary
(``prepare_input`` / ``prepare_grad``), then hands raw pointers of
C-contiguous, aligned arrays of its own dtype to ``nogil`` kernels. The fast
path (already a C-contiguous array of the right dtype and width) costs a
handful of C checks; anything else (Fortran order, strided views, read-only
or misaligned memory, other numeric dtypes) is copied once. Everything a
kernel could trip on (rank, width, empty batch, non-numeric dtype) raises
here with the layer, the shape and the dtype in the message.
"""

import numpy as np
cimport numpy as cnp

cnp.import_array()

ABI_VERSION = NNRT_ABI_VERSION

cdef extern from *:
    """
    #ifdef NNRT_DEBUG_BUILD
    #define NNRT_DEBUG_BUILD_FLAG 1
    #else
    #define NNRT_DEBUG_BUILD_FLAG 0
    #endif
    """
    int NNRT_DEBUG_BUILD_FLAG

# True when compiled with NNRT_DEBUG_BUILD=1 (setup.py: boundscheck, wraparound and
# initializedcheck on, -O0 -g); tests/debug_build.sh checks it.
DEBUG_BUILD = bool(NNRT_DEBUG_BUILD_FLAG)


def _bounds_probe(double[::1] a, Py_ssize_t i):
    """``a[i]`` through a typed memoryview (not public API).

    Only for tests/debug_build.sh: in a debug build an out-of-range ``i`` raises
    IndexError, proving the bounds checks are compiled in. Never call it with an
    out-of-range index on a release build.
    """
    return a[i]


# Largest element count a kernel may index with a C int (BLAS takes int).
cdef Py_ssize_t _MAX_ELEMENTS = 2147483647


def check_abi(int compiled_version, str plugin):
    """Raise ImportError when a compiled plugin was built against another ABI.

    Compiled plugins call ``check_abi(NNRT_ABI_VERSION, __name__)`` at import
    time; ``NNRT_ABI_VERSION`` comes from ``nnrt/layer.pxd`` at *their* build.
    """
    if compiled_version != NNRT_ABI_VERSION:
        raise ImportError(
            f"nnrt plugin {plugin!r} was compiled against nnrt ABI version "
            f"{compiled_version}, but the installed nnrt has ABI version "
            f"{NNRT_ABI_VERSION}; rebuild the plugin against this nnrt "
            f"(pip install --force-reinstall --no-binary :all: <its package>)"
        )
    return True


cdef inline bint _is_float_typenum(int t) noexcept:
    return t == cnp.NPY_FLOAT32 or t == cnp.NPY_FLOAT64


def _describe_array(X):
    if isinstance(X, np.ndarray):
        return f"shape {X.shape} dtype {X.dtype}"
    return f"a {type(X).__name__} object"


cdef cnp.ndarray reuse_buffer(object out, Py_ssize_t rows, Py_ssize_t cols, int typenum):
    cdef cnp.ndarray arr
    # Only a C-contiguous, writeable, aligned ndarray of the exact shape and
    # dtype is reused (a buffer restored read-only, e.g. from a memory-mapped
    # pickle, is replaced rather than written through).
    if out is not None and isinstance(out, np.ndarray):
        arr = <cnp.ndarray>out
        if (cnp.PyArray_TYPE(arr) == typenum and cnp.PyArray_NDIM(arr) == 2
                and cnp.PyArray_DIM(arr, 0) == rows and cnp.PyArray_DIM(arr, 1) == cols
                and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISWRITEABLE(arr)
                and cnp.PyArray_ISALIGNED(arr)):
            return arr
    cdef cnp.npy_intp dims[2]
    dims[0] = rows
    dims[1] = cols
    return cnp.PyArray_EMPTY(2, dims, typenum, 0)


def _writeable_copy(value):
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    return value


def _rebuild_layer(cls, config, dtype, params, buffers):
    layer = cls(**config)
    if dtype is not None:
        layer.to_dtype(dtype)
    for live, saved in ((layer.params(), params), (layer.buffers(), buffers)):
        for key, value in saved.items():
            np.copyto(live[key], value, casting="unsafe")
    return layer


def _rebuild_python_layer(cls, in_features, out_features, dtype, attrs):
    layer = cls.__new__(cls)
    layer.in_features = in_features
    layer.out_features = out_features
    layer.dtype = dtype
    layer.__dict__.update({k: _writeable_copy(v) for k, v in attrs.items()})
    return layer


cdef class Layer:
    """Base class of every nnrt layer.

    Subclass it from Python (call ``super().__init__()``, set
    ``in_features``/``out_features``, override ``forward``/``backward`` and
    whichever of ``params``/``grads``/``buffers``/``config`` apply) or from
    Cython (``from nnrt.layer cimport Layer``) for C-level dispatch.

    Members:
      forward(X, training=False) -> Y   2-D C-contiguous float arrays (batch, features)
      backward(dY) -> dX                uses what the last forward(training=True)
                                        cached; overwrites parameter gradients
      params() / grads() / buffers()    live arrays, same keys in params and grads
      config()                          JSON-able kwargs: type(layer)(**config) rebuilds it
      in_features, out_features         ints, or None where the layer keeps the width
      uses_batch_statistics             class attribute: True where the training forward
                                        depends on the whole batch (training loops then
                                        skip a batch too short for it)
    """

    uses_batch_statistics = False

    def __init__(self, *args, **kwargs):
        # Accepts (and ignores) arguments so that Python subclasses may call
        # super().__init__() however they like.
        pass

    def __cinit__(self, *args, **kwargs):
        self.in_features = None
        self.out_features = None
        self._dtype = None
        self._typenum = -1

    # ------------------------------------------------------------------ dtype
    @property
    def dtype(self):
        """numpy dtype of this layer's parameters and outputs (None: follows input)."""
        return self._dtype

    @dtype.setter
    def dtype(self, value):
        if value is None:
            self._dtype = None
            self._typenum = -1
            return
        dt = np.dtype(value)
        if dt != np.float32 and dt != np.float64:
            raise TypeError(f"{self!r}: dtype must be float32 or float64, got {dt}")
        self._dtype = dt
        self._typenum = dt.num

    cpdef object to_dtype(self, object dtype):
        """Cast every parameter, gradient and buffer to ``dtype`` (float32/float64).

        The default implementation casts each floating ndarray attribute of a
        Python subclass; compiled layers override it.
        """
        self.dtype = dtype
        d = getattr(self, "__dict__", None)
        if d is not None:
            for key, value in list(d.items()):
                if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                    d[key] = np.ascontiguousarray(value, dtype=self._dtype)
        return self

    # -------------------------------------------------------------- interface
    cpdef object forward(self, object X, bint training=False):
        raise NotImplementedError(f"{type(self).__name__} does not implement forward(X, training)")

    cpdef object backward(self, object dY):
        raise NotImplementedError(f"{type(self).__name__} does not implement backward(dY)")

    cpdef dict params(self):
        return {}

    cpdef dict grads(self):
        return {}

    cpdef dict buffers(self):
        return {}

    cpdef dict config(self):
        return {}

    def __reduce__(self):
        # Pickle what defines the layer, never its scratch buffers: compiled
        # layers are rebuilt from config() and get fresh, writeable arrays with
        # the pickled params/buffers copied in (a pickle loaded read-only, e.g.
        # joblib mmap_mode="r", must not hand read-only memory to a kernel).
        state = {k: np.array(v) for k, v in self.params().items()}
        bufs = {k: np.array(v) for k, v in self.buffers().items()}
        d = getattr(self, "__dict__", None)
        if d is not None:
            # Python subclass: its attributes are its state
            return (_rebuild_python_layer,
                    (type(self), self.in_features, self.out_features, self._dtype, d))
        return (_rebuild_layer, (type(self), self.config(), self._dtype, state, bufs))

    def __repr__(self):
        try:
            cfg = self.config()
        except Exception:
            cfg = {}
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------- validation
    cpdef cnp.ndarray prepare_input(self, object X):
        """Return ``X`` as a C-contiguous, aligned 2-D array of this layer's dtype.

        Raises TypeError for non-numeric dtypes and ValueError for a wrong
        rank, a wrong feature count or an empty batch; the message names the
        layer, the shape and the dtype. Copies only when it must.
        """
        cdef cnp.ndarray arr
        cdef int t
        if isinstance(X, np.ndarray):
            arr = <cnp.ndarray>X
            t = cnp.PyArray_TYPE(arr)
            if (cnp.PyArray_NDIM(arr) == 2
                    and (t == self._typenum or (self._typenum < 0 and _is_float_typenum(t)))
                    and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
                    and cnp.PyArray_ISNOTSWAPPED(arr)
                    and cnp.PyArray_DIM(arr, 0) > 0 and cnp.PyArray_DIM(arr, 1) > 0
                    and (self.in_features is None
                         or cnp.PyArray_DIM(arr, 1) == <Py_ssize_t>self.in_features)
                    and cnp.PyArray_SIZE(arr) <= _MAX_ELEMENTS
                    and type(arr) is np.ndarray):
                return arr
        return self._prepare_slow(X)

    def _prepare_slow(self, X):
        if not isinstance(X, np.ndarray):
            try:
                X = np.asarray(X)
            except ValueError as exc:  # e.g. a ragged list of lists
                raise ValueError(
                    f"{self!r}: expected a 2-D numeric array (shape (batch, "
                    f"{self.in_features if self.in_features is not None else 'features'}), "
                    f"a float dtype), got {_describe_array(X)} that numpy cannot convert: {exc}"
                ) from exc
            except Exception as exc:
                raise TypeError(
                    f"{self!r}: expected a 2-D numeric array, got {_describe_array(X)}"
                ) from exc
        kind = X.dtype.kind
        if kind not in "fiub":
            raise TypeError(
                f"{self!r}: expected a real numeric array (float, int or bool), "
                f"got {_describe_array(X)}"
            )
        if X.ndim != 2:
            width = self.in_features if self.in_features is not None else "features"
            raise ValueError(
                f"{self!r}: expected a 2-D array (batch, {width}), got {_describe_array(X)}"
            )
        if X.shape[0] == 0:
            raise ValueError(f"{self!r}: empty batch: got {_describe_array(X)}")
        if self.in_features is not None and X.shape[1] != self.in_features:
            raise ValueError(
                f"{self!r}: expected {self.in_features} input features, got {_describe_array(X)}"
            )
        if X.shape[1] == 0:
            raise ValueError(f"{self!r}: zero features: got {_describe_array(X)}")
        if X.size > _MAX_ELEMENTS:
            raise ValueError(
                f"{self!r}: {_describe_array(X)} has more than {_MAX_ELEMENTS} elements"
            )
        if self._dtype is not None:
            dt = self._dtype
        elif X.dtype == np.float32 or X.dtype == np.float64:
            dt = X.dtype
        else:
            dt = np.dtype(np.float64)
        if kind == "f" and dt.itemsize < X.dtype.itemsize and dt != X.dtype:
            pass  # narrowing float cast (e.g. float64 -> float32 network): intended
        out = np.empty(X.shape, dtype=dt)
        np.copyto(out, X, casting="unsafe")
        return out

    cpdef cnp.ndarray prepare_grad(self, object dY, cnp.ndarray like):
        """Return ``dY`` as a C-contiguous array with the shape and dtype of ``like``.

        ``like`` is the output of the forward pass that ``dY`` belongs to.
        """
        cdef cnp.ndarray arr
        if isinstance(dY, np.ndarray):
            arr = <cnp.ndarray>dY
            if (cnp.PyArray_NDIM(arr) == 2
                    and cnp.PyArray_TYPE(arr) == cnp.PyArray_TYPE(like)
                    and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
                    and cnp.PyArray_ISNOTSWAPPED(arr)
                    and cnp.PyArray_DIM(arr, 0) == cnp.PyArray_DIM(like, 0)
                    and cnp.PyArray_DIM(arr, 1) == cnp.PyArray_DIM(like, 1)
                    and type(arr) is np.ndarray):
                return arr
        if not isinstance(dY, np.ndarray):
            try:
                dY = np.asarray(dY)
            except Exception as exc:
                raise TypeError(
                    f"{self!r}: backward expected a gradient array, got {_describe_array(dY)}"
                ) from exc
        if dY.dtype.kind not in "fiub":
            raise TypeError(
                f"{self!r}: backward expected a real numeric gradient, got {_describe_array(dY)}"
            )
        shape = (<object>like).shape
        if dY.shape != shape:
            raise ValueError(
                f"{self!r}: backward expected a gradient of shape {shape} "
                f"(the output of the last training forward), got {_describe_array(dY)}"
            )
        out = np.empty(shape, dtype=(<object>like).dtype)
        np.copyto(out, dY, casting="unsafe")
        return out

    def _no_forward_error(self):
        return RuntimeError(
            f"{self!r}: backward() called before forward(X, training=True); "
            f"backward uses the activations cached by the last training forward"
        )
