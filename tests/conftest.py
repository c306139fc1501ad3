"""The `mpi` marker: tests that start the program through tests/mpirun.py (under mpiexec, or as
one process that still initializes MPI). CI runs the whole suite under MPICH, then
`pytest -m openmpi` (a chosen subset of the `mpi` tests: one per path that can differ between MPI
libraries) under Open MPI.

A test is marked when its body, a fixture it uses, or a function of its module that either
calls reaches `mpirun.run`, `mpirun.train`, `mpirun.layouts` or `mpirun.mpiexec` (read from the
compiled code, so no test has to remember a decorator). A test that launches mpiexec some other
way, unmarked, fails: it would silently never run under the second MPI.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterator

import pytest

from tests import mpirun

LAUNCHERS = {"run", "train", "mpiexec", "layouts"}


def _codes(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _launches(func: object, module: types.ModuleType, seen: set[int]) -> bool:
    """Does `func`, or a function of `module` it names, call into tests/mpirun.py?"""
    func = inspect.unwrap(func)  # type: ignore[arg-type]
    code = getattr(func, "__code__", None)
    if code is None or id(code) in seen:
        return False
    seen.add(id(code))
    for c in _codes(code):
        names = set(c.co_names)
        if "mpirun" in names and names & LAUNCHERS:
            return True
        for name in names:
            obj = vars(module).get(name)
            if getattr(inspect.unwrap(obj), "__module__", None) == module.__name__ and _launches(
                obj, module, seen
            ):
                return True
    return False


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "mpi: starts the program through tests/mpirun.py (set by tests/conftest.py)"
    )
    config.addinivalue_line(
        "markers", "mpich_launcher: tests a behaviour of MPICH's mpiexec itself (pass 1 only)"
    )
    config.addinivalue_line(
        "markers",
        "openmpi: CI runs it again under Open MPI (pass 2): one test per path that can differ "
        "between MPI libraries (launch, p2p bytes, collectives, abort, signals, staging)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not isinstance(item, pytest.Function) or getattr(item.module, "mpirun", None) is None:
            continue
        module = item.module
        funcs = [item.function, *(vars(module).get(f) for f in item.fixturenames)]
        if any(f is not None and _launches(f, module, set()) for f in funcs):
            item.add_marker(pytest.mark.mpi)
    for item in items:
        if item.get_closest_marker("openmpi") and not item.get_closest_marker("mpi"):
            raise pytest.UsageError(f"{item.nodeid} is marked openmpi but launches no MPI job")


@pytest.fixture(autouse=True)
def _launching_tests_are_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    before = mpirun.launches
    yield
    if mpirun.launches != before and request.node.get_closest_marker("mpi") is None:
        pytest.fail(
            "this test launched mpiexec but is not marked `mpi`, so CI's second-MPI pass would "
            "skip it: call tests/mpirun.py from the test, a fixture or a function of its module"
        )
