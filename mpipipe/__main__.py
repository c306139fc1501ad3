"""`python -m mpipipe <command>`: an uncaught exception on any rank aborts every rank.

This is mpi4py.run's machinery (set_abort_status -> MPI_Abort at exit): the failing rank prints
its traceback, then the whole job ends instead of hanging in a receive that will never match.
Configuration errors are agreed on collectively and end every rank cleanly with status 2.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from mpi4py.run import set_abort_status

    from mpipipe import cli

    try:
        code = cli.main(argv)
    except SystemExit as exc:
        set_abort_status(exc)
        raise
    except BaseException:
        set_abort_status(1)
        _name_the_rank()
        raise
    sys.exit(code)


def _name_the_rank() -> None:
    """Say which rank failed (its traceback follows) before MPI_Abort ends every rank."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        world = mpi.COMM_WORLD
        print(
            f"mpipipe: rank {world.Get_rank()} of {world.Get_size()} failed; aborting the job",
            file=sys.stderr,
            flush=True,
        )


if __name__ == "__main__":
    main()
