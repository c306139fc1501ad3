"""Run many command lines through `mpipipe.cli.main` in ONE MPI launch (imports and MPI start-up
paid once), each with its own captured stdout and stderr on every rank.

    mpiexec -n 2 python tests/scripts/fault_cases.py CASES.json OUT.json

CASES.json: [{"id": str, "argv": [...], "everywhere": bool}] (not everywhere: rank 0 only, for
commands that use no MPI). OUT.json (written by rank 0): {id: [per rank: {"code": exit status
or "raised", "stdout": str, "stderr": str}, or None where the case did not run]}. An exception
that escapes cli.main is recorded with its traceback (the real entry point would abort the job).
"""

import json
import os
import sys
import tempfile
import traceback

from mpi4py import MPI

from mpipipe import cli


def captured(argv: list[str]) -> dict:
    files = [tempfile.TemporaryFile() for _ in range(2)]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    for fd, f in zip((1, 2), files, strict=True):
        os.dup2(f.fileno(), fd)
    try:
        code = cli.main(argv)
    except BaseException:  # noqa: BLE001 - recorded: the test fails on it
        code = "raised"
        print(traceback.format_exc(), file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
        f.close()
    return {"code": code, "stdout": texts[0], "stderr": texts[1]}


def main() -> None:
    cases_file, out_file = sys.argv[1:3]
    comm = MPI.COMM_WORLD
    with open(cases_file) as fh:
        cases = json.load(fh)
    results = {}
    for case in cases:
        comm.Barrier()
        mine = case["everywhere"] or comm.Get_rank() == 0
        results[case["id"]] = comm.gather(captured(case["argv"]) if mine else None, root=0)
    if comm.Get_rank() == 0:
        with open(out_file, "w") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main()
