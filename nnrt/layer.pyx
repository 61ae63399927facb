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

import operator

import numpy as np
cimport numpy as cnp
from libc.string cimport memcpy

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


cdef cnp.ndarray cache_input(object X, cnp.ndarray Xa, object buf, bint trusted):
    if trusted or Xa is not X:
        return Xa
    cdef cnp.ndarray out = reuse_buffer(unaliased(buf, Xa), cnp.PyArray_DIM(Xa, 0),
                                        cnp.PyArray_DIM(Xa, 1), cnp.PyArray_TYPE(Xa))
    # Xa was validated C-contiguous 2-D; out has its dims and dtype
    if cnp.PyArray_NBYTES(out) != cnp.PyArray_NBYTES(Xa) or not cnp.PyArray_IS_C_CONTIGUOUS(Xa):
        raise RuntimeError(
            f"the input array changed while it was being cached: {_describe_array(X)}"
        )
    memcpy(cnp.PyArray_DATA(out), cnp.PyArray_DATA(Xa), cnp.PyArray_NBYTES(Xa))
    return out


def _writeable_copy(value):
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        return value.copy()
    return value


def _rebuild_layer(cls, config, dtype, params, buffers, attrs=None):
    layer = cls(**config)
    if dtype is not None:
        layer.to_dtype(dtype)
    for live, saved in ((layer.params(), params), (layer.buffers(), buffers)):
        for key, value in saved.items():
            np.copyto(live[key], value, casting="unsafe")
    if attrs:
        # a Python subclass of a compiled layer: its own attributes
        layer.__dict__.update({k: _writeable_copy(v) for k, v in attrs.items()})
    return layer


def _rebuild_python_layer(cls, in_features, out_features, dtype, attrs):
    layer = cls.__new__(cls)
    layer.in_features = in_features
    layer.out_features = out_features
    layer.dtype = dtype
    layer.__dict__.update({k: _writeable_copy(v) for k, v in attrs.items()})
    return layer


def _width_value(Layer layer, str name, value):
    # in_features/out_features assigned from Python: refused on a compiled layer,
    # else None (-1) or a positive int
    if layer._flags & LAYER_FROZEN:
        raise AttributeError(
            f"{type(layer).__name__}.{name} is read-only: a compiled layer's widths are "
            f"those of its own parameters; build a new layer instead"
        )
    if value is None:
        return -1
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{type(layer).__name__}: {name} must be an int or None, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{type(layer).__name__}: {name} must be an int or None, got {value!r}"
        ) from None
    if n <= 0 or n > _MAX_ELEMENTS:
        raise ValueError(
            f"{type(layer).__name__}: {name} must be a positive int (at most "
            f"{_MAX_ELEMENTS}) or None, got {value!r}"
        )
    return n


cdef cnp.ndarray grad_as(Layer layer, object dY, Py_ssize_t rows, Py_ssize_t cols,
                         int typenum):
    cdef cnp.ndarray arr
    if type(dY) is np.ndarray:
        arr = <cnp.ndarray>dY
        if (cnp.PyArray_NDIM(arr) == 2
                and cnp.PyArray_TYPE(arr) == typenum
                and cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
                and cnp.PyArray_ISNOTSWAPPED(arr)
                and cnp.PyArray_DIM(arr, 0) == rows and cnp.PyArray_DIM(arr, 1) == cols):
            return arr
    return _grad_slow(layer, dY, (rows, cols), cnp.PyArray_DescrFromType(typenum))


def _grad_slow(layer, dY, shape, dtype):
    if not isinstance(dY, np.ndarray):
        try:
            dY = np.asarray(dY)
        except Exception as exc:
            raise TypeError(
                f"{layer!r}: backward expected a gradient array, got {_describe_array(dY)}"
            ) from exc
    if dY.dtype.kind not in "fiub":
        raise TypeError(
            f"{layer!r}: backward expected a real numeric gradient, got {_describe_array(dY)}"
        )
    if dY.shape != shape:
        raise ValueError(
            f"{layer!r}: backward expected a gradient of shape {shape} "
            f"(the output of the last training forward), got {_describe_array(dY)}"
        )
    out = np.empty(shape, dtype=dtype)
    np.copyto(out, dY, casting="unsafe")
    return out


cdef int check_array(Layer layer, object arr, str what, Py_ssize_t rows, Py_ssize_t cols,
                     int typenum, bint writeable) except -1:
    cdef cnp.ndarray a
    cdef bint shape_ok
    if isinstance(arr, cnp.ndarray):
        a = <cnp.ndarray>arr
        if cols < 0:
            shape_ok = cnp.PyArray_NDIM(a) == 1 and cnp.PyArray_DIM(a, 0) == rows
        else:
            shape_ok = (cnp.PyArray_NDIM(a) == 2 and cnp.PyArray_DIM(a, 0) == rows
                        and cnp.PyArray_DIM(a, 1) == cols)
        if (shape_ok and cnp.PyArray_TYPE(a) == typenum and cnp.PyArray_IS_C_CONTIGUOUS(a)
                and cnp.PyArray_ISALIGNED(a) and cnp.PyArray_ISNOTSWAPPED(a)
                and (not writeable or cnp.PyArray_ISWRITEABLE(a))):
            return 0
    cdef tuple shape
    if cols < 0:
        shape = (rows,)
    else:
        shape = (rows, cols)
    raise RuntimeError(
        f"{type(layer).__name__}: its {what} is no longer a C-contiguous"
        f"{' writeable' if writeable else ''} {cnp.PyArray_DescrFromType(typenum)} array of "
        f"shape {shape} (now {_describe_array(arr)}"
        f"{'' if not isinstance(arr, np.ndarray) or arr.flags.writeable else ', read-only'}"
        f"): it was changed in place (shape, dtype, strides or flags); the layer refuses to "
        f"run on it. Restore it, or load the values into a new layer"
    )


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
        self._n_in = -1
        self._n_out = -1
        self._dtype = None
        self._typenum = -1
        self._flags = 0

    # ------------------------------------------------- widths and dtype
    # NOTE: kernels trust the C fields behind these properties. A compiled layer
    # that derives them from its own parameters sets LAYER_FROZEN (in __cinit__),
    # and then Python may read them but not assign them; a Python subclass sets
    # them freely (its own forward is Python, and prepare_input checks against them).
    @property
    def in_features(self):
        """Input width (int), or None where the layer keeps the width."""
        return None if self._n_in < 0 else self._n_in

    @in_features.setter
    def in_features(self, value):
        self._n_in = _width_value(self, "in_features", value)

    @property
    def out_features(self):
        """Output width (int), or None where the layer keeps the width."""
        return None if self._n_out < 0 else self._n_out

    @out_features.setter
    def out_features(self, value):
        self._n_out = _width_value(self, "out_features", value)

    @property
    def dtype(self):
        """numpy dtype of this layer's parameters and outputs (None: follows input)."""
        return self._dtype

    @dtype.setter
    def dtype(self, value):
        if self._flags & LAYER_FROZEN:
            raise AttributeError(
                f"{type(self).__name__}.dtype is read-only: the dtype of a compiled "
                f"layer is the dtype of its own parameters; call layer.to_dtype({value!r}) "
                f"to cast them"
            )
        self._set_dtype(value)

    cdef int _set_dtype(self, object value) except -1:
        if value is None:
            self._dtype = None
            self._typenum = -1
            return 0
        dt = np.dtype(value)
        if dt != np.float32 and dt != np.float64:
            raise TypeError(f"{type(self).__name__}: dtype must be float32 or float64, got {dt}")
        self._dtype = dt
        self._typenum = dt.num
        return 0

    cdef int _check_built(self) except -1:
        if self._flags & LAYER_BUILT:
            return 0
        name = type(self).__name__
        raise RuntimeError(
            f"{name}: this layer was never initialised: its __init__ did not run "
            f"(made with {name}.__new__, or a subclass's __init__ did not call "
            f"super().__init__(...)); build it with {name}(...) or nnrt.layer(name, ...)"
        )

    cdef object _forward_from(self, object X, bint training, bint trusted):
        return self.forward(X, training)

    cpdef object to_dtype(self, object dtype):
        """Cast every parameter, gradient and buffer to ``dtype`` (float32/float64).

        The default implementation casts each floating ndarray attribute of a
        Python subclass; compiled layers override it.
        """
        self._set_dtype(dtype)
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
        if d is not None and not (self._flags & LAYER_FROZEN):
            # Python subclass: its attributes are its state
            return (_rebuild_python_layer,
                    (type(self), self.in_features, self.out_features, self._dtype, d))
        return (_rebuild_layer, (type(self), self.config(), self._dtype, state, bufs, d))

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
                    and (self._n_in < 0 or cnp.PyArray_DIM(arr, 1) == self._n_in)
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

        ``like`` is the output of the forward pass that ``dY`` belongs to. (The
        built-in layers check against the shape they recorded at forward instead:
        ``grad_as`` in ``layer.pxd``.)
        """
        if like is None or cnp.PyArray_NDIM(like) != 2:
            raise ValueError(f"{self!r}: prepare_grad needs a 2-D `like` array, got {like!r:.80}")
        return grad_as(self, dY, cnp.PyArray_DIM(like, 0), cnp.PyArray_DIM(like, 1),
                       cnp.PyArray_TYPE(like))

    def _no_forward_error(self):
        return RuntimeError(
            f"{self!r}: backward() called before forward(X, training=True); "
            f"backward uses the activations cached by the last training forward"
        )
