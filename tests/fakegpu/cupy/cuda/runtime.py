"""cupy.cuda.runtime of the fake: FAKE_CUPY_DEVICES devices (default 1) named "Fake GPU"."""

from __future__ import annotations

from typing import Any

from .. import _fake
from .._fake import CUDARuntimeError

__all__ = ["CUDARuntimeError", "getDeviceCount", "getDeviceProperties"]
VERSION = 12080  # what CUDA 12.8 reports


def getDeviceCount() -> int:  # noqa: N802 - CUDA's names
    return _fake.DEVICES


def runtimeGetVersion() -> int:  # noqa: N802
    return VERSION


def driverGetVersion() -> int:  # noqa: N802
    return VERSION


def getDevice() -> int:  # noqa: N802
    return _fake.Device().id


def setDevice(device: int) -> None:  # noqa: N802
    _fake.Device(device).use()


def deviceSynchronize() -> None:  # noqa: N802
    _fake.Device().synchronize()


def getDeviceProperties(device: int) -> dict[str, Any]:  # noqa: N802
    _fake.check_device(device)
    return {
        "name": b"Fake GPU",
        "totalGlobalMem": 80 * 2**30,
        "multiProcessorCount": 132,
        "major": 9,
        "minor": 0,
        "pciBusID": device,
    }
