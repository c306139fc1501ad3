"""Files written so that any failure is ONE OSError naming the path and its errno: HDF5 files
through a file object that keeps the first error (h5py's own driver can crash after one), fsync,
and the sha256 of files and arrays."""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

# what h5py raises on files that are truncated, garbage or of another layout
H5_ERRORS = (OSError, KeyError, RuntimeError, ValueError, TypeError)


def io_error(e: BaseException, path: str | Path) -> str:
    """`PATH: ENOSPC (No space left on device)`, the path the error names if it names one."""
    return f"{getattr(e, 'filename', None) or path}: {errno_text(e)}"


def errno_text(e: BaseException) -> str:
    """`ENOSPC (No space left on device)` from an OSError, or from an h5py error whose errno
    is only in its message (or absent: then the message itself)."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"errno = (\d+)", str(e))):
        code = int(m.group(1))
    if code:
        return f"{errno.errorcode.get(code, f'errno {code}')} ({os.strerror(code)})"
    return getattr(e, "strerror", None) or first_line(e)


def first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


class _Sink:
    """The file h5py writes a shard through (its file-object driver) instead of opening the
    path itself. HDF5's own driver, on a write that fails (a full disk), can leave the library
    in a state that crashes in File.close (seen: a segfault); through this object the first
    OSError is kept, every later call raises it again, and the save reports that one error. It
    also completes short writes, which the file-object driver would ignore."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.path, self.pos = path, 0
        self.error: OSError | None = None

    def _failed(self, e: OSError) -> OSError:
        if self.error is None:
            self.error = OSError(e.errno, e.strerror, str(self.path))  # name the file
        return self.error

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self._check()
        self.pos = os.lseek(self.fd, pos, whence)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: Any) -> int:
        self._check()
        view = memoryview(data).cast("B")
        total = len(view)
        try:
            while view:
                n = _pwrite(self.fd, view, self.pos)
                if n == 0:
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
                self.pos += n
                view = view[n:]
        except OSError as e:
            raise self._failed(e) from None
        return total

    def readinto(self, buf: Any) -> int:
        self._check()
        view = memoryview(buf).cast("B")
        data = os.pread(self.fd, len(view), self.pos)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def read(self, size: int = -1) -> bytes:
        buf = bytearray(max(size, 0))
        return bytes(buf[: self.readinto(buf)])

    def truncate(self, size: int | None = None) -> None:
        self._check()
        try:
            os.ftruncate(self.fd, self.pos if size is None else size)
        except OSError as e:
            raise self._failed(e) from None

    def flush(self) -> None:
        self._check()

    def fsync(self) -> None:
        self._check()
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise self._failed(e) from None

    def close(self) -> None:
        os.close(self.fd)


def _pwrite(fd: int, data: memoryview, offset: int) -> int:
    """os.pwrite; a seam for tests that inject ENOSPC, EIO, ... at the shard write."""
    return os.pwrite(fd, data, offset)


def h5_write(path: Path, fill: Callable[[h5py.File], None], sync: bool = True) -> None:
    """Create the HDF5 file `path` through a _Sink and fill it (and fsync it); raise the first
    OSError (errno and all) however h5py reported it."""
    sink = _Sink(path)
    try:
        with h5py.File(sink, "w", libver=("v108", "v110")) as f:  # 1.10 tools read it
            fill(f)
        if sync:
            sink.fsync()
    except Exception as e:  # h5py may wrap or chain the driver's OSError
        if sink.error is not None:
            raise sink.error from None
        if isinstance(e, OSError):
            raise
        raise OSError(None, f"HDF5 could not write it ({first_line(e)})", str(path)) from None
    finally:
        sink.close()


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def sha256(a: np.ndarray) -> str:
    return hashlib.sha256(a.data.cast("B")).hexdigest()  # releases the GIL
