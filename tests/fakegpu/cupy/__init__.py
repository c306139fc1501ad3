"""A strict fake CuPy for CPU tests: NumPy arrays behind the walls a GPU puts around its memory.

Select it as the real one is selected: PYTHONPATH=<repo>/tests/fakegpu:<repo>. Device arrays
wrap NumPy arrays but are neither NumPy arrays nor buffers; host and device meet only through
explicit copies (`asarray`, `.set()`, `.get()`, `asnumpy`), counted in `cupy._fake`. Any NumPy
function is available as `cupy.<name>` (device arrays in, device arrays out).
"""

from __future__ import annotations

import sys
import types
import weakref
from collections.abc import Callable
from typing import Any

import numpy as _np
from numpy.lib.mixins import NDArrayOperatorsMixin

from . import _fake, cuda
from ._fake import Buffer, HazardError

__all__ = ["HazardError", "asarray", "asnumpy", "cuda", "get_array_module", "ndarray"]
__version__ = "13.6.0+fake"

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. "
    "Please use `.get()` to construct a NumPy array explicitly."
)
# kDLCUDA; DLPack is what mpi4py >= 4 asks for first, before __cuda_array_interface__
_DLPACK_CUDA = 2
# the result may be a view of the input: no kernel unless NumPy had to copy
_VIEWS = {"reshape", "transpose", "swapaxes", "ravel", "view", "squeeze", "expand_dims"}
_VIEWS |= {"moveaxis", "broadcast_to", "diagonal", "atleast_1d", "atleast_2d", "atleast_3d"}
_MUTATORS = {"copyto", "put", "place", "putmask", "fill_diagonal", "fill", "sort", "partition"}
_META = {"shape", "ndim", "size", "result_type", "shares_memory", "may_share_memory"}
_SCATTER_ADD_TYPES = {_np.dtype(t) for t in ("int32", "uint32", "uint64", "f2", "f4", "f8")}


class HostArrayError(TypeError, ValueError):
    """A host array where a device array is needed (CuPy raises TypeError in operations and
    ValueError in assignments; this is both)."""


def _host_array(x: Any) -> HostArrayError:
    return HostArrayError(
        f"a host array (numpy.ndarray of shape {_np.shape(x)}) was mixed with device arrays: "
        "copy it explicitly with cupy.asarray() (CuPy refuses this: 'Unsupported type "
        "numpy.ndarray', or 'non-scalar numpy.ndarray cannot be used for fill')"
    )


def _unwrap(x: Any, bufs: list[Buffer]) -> Any:
    """NumPy view of a fake array (recording its buffer), recursively through tuples and lists;
    host arrays are refused."""
    if isinstance(x, ndarray):
        bufs.append(x._buf)
        return x._a
    if isinstance(x, _np.ndarray):
        raise _host_array(x)
    if isinstance(x, (tuple, list)):
        return type(x)(_unwrap(i, bufs) for i in x)
    return x


def _index(key: Any, bufs: list[Buffer]) -> tuple[Any, bool]:
    """(NumPy index, advanced?). Host index arrays and lists are copied to the device first,
    as CuPy does."""
    key = key if isinstance(key, tuple) else (key,)
    out, advanced = [], False
    for k in key:
        if isinstance(k, (_np.ndarray, list)):
            k = asarray(k)
        if isinstance(k, ndarray):
            bufs.append(k._buf)
            k, advanced = k._a, True
        elif isinstance(k, (bool, _np.bool_)):
            advanced = True
        out.append(k)
    return tuple(out), advanced


def _wrap(r: Any) -> Any:
    """Fake arrays for NumPy results (0-d for scalars, as CuPy returns)."""
    if isinstance(r, tuple):
        return tuple(_wrap(i) for i in r)
    if isinstance(r, _np.generic):
        r = _np.asarray(r)
    if not isinstance(r, _np.ndarray):
        return r
    return ndarray._of(r)


def _ufunc(ufunc: _np.ufunc, method: str, inputs: tuple[Any, ...], kw: dict[str, Any]) -> Any:
    reads: list[Buffer] = []
    writes: list[Buffer] = []
    if method == "at":  # ufunc.at(target, indices, values): target read and written
        target, index, *rest = inputs
        if not isinstance(target, ndarray):
            raise _host_array(target)
        if ufunc is _np.add and target.dtype not in _SCATTER_ADD_TYPES:
            raise TypeError(
                "scatter_add only supports int32, float16, float32, float64, uint32, uint64, "
                f"as data type (not {target.dtype})"
            )
        writes.append(target._buf)
        index, _ = _index(index, reads)
        args = (target._a, index if len(index) > 1 else index[0], *_unwrap(rest, reads))
    else:
        args = _unwrap(inputs, reads)
    out = kw.get("out")
    if out is not None:
        kw["out"] = _unwrap(out if isinstance(out, tuple) else (out,), writes)
    kw = {k: v if k == "out" else _unwrap(v, reads) for k, v in kw.items()}
    _fake.launch(reads, writes)
    result = getattr(ufunc, method)(*args, **kw)
    if out is not None:
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out
    return _wrap(result)


class _Ufunc:
    """`cupy.exp` etc.: NumPy's ufunc on device arrays, with `.at`, `.reduce`, `.outer`..."""

    def __init__(self, ufunc: _np.ufunc) -> None:
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *inputs: Any, **kw: Any) -> Any:
        return _ufunc(self._ufunc, "__call__", inputs, kw)

    def __getattr__(self, name: str) -> Any:
        if name in ("at", "reduce", "accumulate", "reduceat", "outer"):
            return lambda *inputs, **kw: _ufunc(self._ufunc, name, inputs, kw)
        return getattr(self._ufunc, name)

    def __repr__(self) -> str:
        return f"<fake ufunc '{self.__name__}'>"


def _function(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """`cupy.<name>`: NumPy's function on the unwrapped device arrays, results wrapped."""

    def call(*args: Any, **kw: Any) -> Any:
        reads: list[Buffer] = []
        writes: list[Buffer] = []
        out, given = kw.get("out"), args
        args = _unwrap(args, reads)
        kw = {k: _unwrap(v, writes if k == "out" else reads) for k, v in kw.items()}
        if name in _META:
            return f(*args, **kw)
        if name in _VIEWS:
            r = f(*args, **kw)
            if isinstance(r, _np.ndarray) and _fake.buffer_of(r)[0] in reads:  # no kernel
                same = [a for a in given if isinstance(a, ndarray) and a._a is r]
                return same[0] if same else ndarray._of(r)
        if name in _MUTATORS and reads:
            writes.append(reads[0])
        if name.endswith("_like"):  # only the prototype's shape and dtype are read
            reads.clear()
        _fake.launch(reads, writes)
        r = f(*args, **kw)
        return out if out is not None else _wrap(r)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"numpy.{name} on device arrays (fake CuPy)."
    return call


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 - CuPy's name
    """A device array: a NumPy array the host may not touch without an explicit copy."""

    __slots__ = ("_a", "_buf", "__weakref__")
    __hash__ = None  # type: ignore[assignment]

    def __init__(
        self,
        shape: Any,
        dtype: Any = float,
        memptr: Any = None,
        strides: Any = None,
        order: str = "C",
    ) -> None:
        if memptr is not None or strides is not None:
            raise NotImplementedError("the fake ndarray takes no memptr or strides")
        _fake.launch((), ())  # an allocation, ordered on the current stream
        self._set(_np.empty(shape, dtype, order=order))

    def _set(self, a: _np.ndarray) -> None:
        self._a = a
        self._buf, new = _fake.buffer_of(a)
        if new:
            _fake.produced(self._buf)
            self._buf.wrapper = weakref.ref(self)

    @classmethod
    def _of(cls, a: _np.ndarray) -> ndarray:
        x = cls.__new__(cls)
        x._set(a)
        return x

    # -- the wall between host and device ----------------------------------------------------
    def __array__(self, dtype: Any = None, copy: Any = None) -> _np.ndarray:
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc: _np.ufunc, method: str, *inputs: Any, **kw: Any) -> Any:
        return _ufunc(ufunc, method, inputs, kw)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        return _function(func.__name__, func)(*args, **kwargs)

    def get(
        self,
        stream: cuda.Stream | None = None,
        order: str = "C",
        out: Any = None,
        blocking: bool = True,
    ) -> _np.ndarray:
        """Copy to the host: on `stream` (default: the current one); `blocking=False` returns
        at once, and `out` holds the data only once the stream's work is known finished."""
        if out is None:
            out = _np.empty(self.shape, self.dtype)
        elif not isinstance(out, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        elif out.dtype != self.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        elif out.shape != self.shape:
            raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, got {out.shape}")
        elif not (out.flags.c_contiguous and self.flags.c_contiguous):
            raise RuntimeError("Non-contiguous array is not supported by the fake get(out=)")
        s = cuda.get_current_stream() if stream is None else stream
        if stream is not None and not blocking and not _fake.is_pinned(out):
            _fake.counts["pageable_async_copies"] += 1
        src = self._a
        _fake.copy(s, self._buf, out, False, lambda: out.__setitem__(..., src))
        if blocking:
            s.synchronize()
        return out

    def set(self, arr: _np.ndarray, stream: cuda.Stream | None = None) -> None:
        """Copy host `arr` in: asynchronously on `stream` if given, else synchronously."""
        if not isinstance(arr, _np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        if not self.flags.c_contiguous:
            raise RuntimeError("Cannot set to non-contiguous array")
        s = cuda.get_current_stream() if stream is None else stream
        _h2d(s, self, arr, async_=stream is not None)
        if stream is None:
            s.run_until(s.issued)

    def _host(self) -> _np.ndarray:
        """The data for the host to read: a blocking device -> host copy."""
        _fake.host_read(self._buf, self.nbytes)
        return self._a

    def item(self) -> Any:
        return self._host().item()

    def tolist(self) -> Any:
        return self._host().tolist()

    def __float__(self) -> float:
        return float(self._host())

    def __int__(self) -> int:
        return int(self._host())

    def __bool__(self) -> bool:
        return bool(self._host())

    def __repr__(self) -> str:
        return repr(self._host())

    def __str__(self) -> str:
        return str(self._host())

    def __format__(self, spec: str) -> str:
        return format(self._host(), spec)

    def __reduce__(self) -> Any:  # pickling copies to the host and back, as CuPy's does
        return asarray, (self.get(),)

    def __copy__(self) -> ndarray:
        return self.copy()

    def __deepcopy__(self, memo: Any) -> ndarray:
        return self.copy()

    # -- handing device memory to MPI ---------------------------------------------------------
    def __dlpack_device__(self) -> tuple[int, int]:
        return _DLPACK_CUDA, self._buf.device

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Any = None,
        dl_device: Any = None,
        copy: Any = None,
    ) -> Any:
        _fake.handoff(self._buf)
        kw = {k: v for k, v in (("max_version", max_version), ("copy", copy)) if v is not None}
        return self._a.__dlpack__(**kw)

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        _fake.handoff(self._buf)
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self._a.ctypes.data, False),
            "strides": None if self.flags.c_contiguous else self.strides,
            "version": 3,
            "stream": None,
        }

    # -- indexing -----------------------------------------------------------------------------
    def __getitem__(self, key: Any) -> ndarray:
        reads = [self._buf]
        key, advanced = _index(key, reads)
        if advanced:
            _fake.launch(reads, ())
        elif not any(k is Ellipsis for k in key):
            key += (Ellipsis,)  # a 0-d view, not a NumPy scalar, as CuPy returns
        return ndarray._of(self._a[key])

    def __setitem__(self, key: Any, value: Any) -> None:
        reads: list[Buffer] = []
        key, _ = _index(key, reads)
        if isinstance(value, ndarray):
            reads.append(value._buf)
            value = value._a
        elif isinstance(value, (list, tuple)) or (
            isinstance(value, _np.ndarray) and value.ndim > 0
        ):
            raise _host_array(value)
        _fake.launch(reads, (self._buf,))
        self._a[key] = value

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    # -- attributes and methods ---------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)
    device = property(lambda self: cuda.Device(self._buf.device))
    T = property(lambda self: self.transpose())

    @property
    def base(self) -> ndarray | None:
        """The array owning the memory, for a view (the same object each time, as in CuPy)."""
        if self._a.base is None:
            return None
        owner = self._buf.wrapper() if self._buf.wrapper else None
        if owner is None or owner._a is not self._buf.owner:
            owner = ndarray._of(self._buf.owner)
            self._buf.wrapper = weakref.ref(owner)
        return owner


def _method(name: str) -> Callable[..., Any]:
    def call(self: ndarray, *args: Any, **kw: Any) -> Any:
        return _function(name, getattr(_np.ndarray, name))(self, *args, **kw)

    call.__name__ = name
    return call


for _name in (
    "reshape transpose swapaxes astype copy fill sum max min mean ravel view squeeze flatten "
    "prod std var any all argmax argmin cumsum dot clip round take repeat conj nonzero "
    "diagonal sort"
).split():
    setattr(ndarray, _name, _method(_name))
_VIEWS.add("astype")  # astype(copy=False) of the same dtype is the array itself


def _h2d(stream: cuda.Stream, dev: ndarray, host: _np.ndarray, async_: bool) -> None:
    """Queue host -> device. Pageable memory is staged by CUDA before the call returns; pinned
    memory is read by the copy itself, when it runs."""
    pinned = _fake.is_pinned(host)
    if async_ and not pinned:
        _fake.counts["pageable_async_copies"] += 1
    src = host if pinned else host.copy()
    target = dev._a
    _fake.copy(stream, dev._buf, host, True, lambda: target.__setitem__(..., src))


def asarray(a: Any, dtype: Any = None, order: Any = None, *, blocking: bool = False) -> ndarray:
    """A device array: `a` itself if it is one, else a copy of host data on the current stream
    (queued on a side stream under `with stream:`)."""
    if isinstance(a, ndarray):
        return a if dtype is None or _np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = _np.asarray(a, dtype=dtype, order=order)
    dev = ndarray._of(_np.empty(host.shape, host.dtype))
    s = cuda.get_current_stream()
    _h2d(s, dev, host, async_=False)
    if blocking:
        s.synchronize()
    return dev


def array(obj: Any, dtype: Any = None, copy: bool = True, order: str = "K", **kw: Any) -> ndarray:
    if isinstance(obj, ndarray):
        return obj.astype(dtype or obj.dtype, copy=copy)
    return asarray(obj, dtype=dtype)


def asnumpy(
    a: Any,
    stream: cuda.Stream | None = None,
    order: str = "C",
    out: Any = None,
    blocking: bool = True,
) -> _np.ndarray:
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return _np.asarray(a, order=order)


def get_array_module(*args: Any) -> types.ModuleType:
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else _np


def __getattr__(name: str) -> Any:
    """Every other NumPy name: functions and ufuncs work on device arrays, dtypes and
    constants pass through; submodules are not provided."""
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        obj = getattr(_np, name)
    except AttributeError:
        raise AttributeError(f"module 'cupy' (fake) has no attribute {name!r}") from None
    if isinstance(obj, types.ModuleType):
        raise AttributeError(f"the fake CuPy provides no cupy.{name} submodule")
    if isinstance(obj, _np.ufunc):
        obj = _Ufunc(obj)
    elif callable(obj) and not isinstance(obj, type):
        obj = _function(name, obj)
    globals()[name] = obj
    return obj
