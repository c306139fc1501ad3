"""Finding checkpoints and keeping their directory: which step directories exist, which one a
resume uses (the newest that passes its checks, saying what it skipped), the writability probe
and the clean-up of killed saves at start, pruning, and the collectives that make every rank
agree on all of it."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from mpipipe.checkpoint.base import STEP_DIR, CheckpointError, Damaged
from mpipipe.checkpoint.files import errno_text, io_error
from mpipipe.checkpoint.read import load
from mpipipe.checkpoint.verify import check_structure
from mpipipe.errors import ConfigError

T = TypeVar("T")


def entries(root: Path) -> list[Path]:
    """The step directories (and anything else named step_N) in `root`, newest step first."""
    try:
        names = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name)]
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CheckpointError(f"{root}: cannot list it ({errno_text(e)})") from None
    return sorted(names, key=lambda p: int(p.name[5:]), reverse=True)


def is_step_dir(path: Path) -> bool:
    return STEP_DIR.fullmatch(path.name) is not None or (path / "manifest.json").exists()


def resolve(path: str | Path) -> Path:
    """The checkpoint a tool (inspect, verify, export) looks at: a step directory itself, or the
    newest step directory in DIR, damaged or not (so that damage is reported, not passed over)."""
    p = Path(path)
    if is_step_dir(p):
        return p
    found = entries(p)
    if found:
        return found[0]
    if (p / "latest").exists():
        raise Damaged(f"{p}: no step directory, although {_latest_note(p)}")
    raise CheckpointError(
        f"--resume {path}: no checkpoint there (expected DIR/step_N/manifest.json)"
    )


def candidates(root: Path) -> tuple[list[Path], list[str]]:
    """For --resume auto (and --resume DIR): the step directories that pass `check_structure`,
    newest first, and a note for each one skipped and for a `latest` that disagrees. ([], []):
    no checkpoint entry at all. Entries, but none usable: Damaged, naming each and why."""
    found, good, notes = entries(root), [], []
    for p in found:
        try:
            check_structure(p)
            good.append(p)
        except Damaged as e:
            notes.append(f"skipping {p.name}: {e}")
    latest = _latest_note(root, good[0] if good else None)
    if latest:
        notes.append(latest)
    if not found and not (root / "latest").exists():
        return [], []
    if not good:
        raise _none_usable(root, notes)
    return good, notes


def _none_usable(root: Path, notes: list[str]) -> Damaged:
    return Damaged(
        f"no usable checkpoint in {root}, nothing overwritten: "
        + "; ".join(n.removeprefix("skipping ") for n in notes)
        + " (repair or move them away, or use another --checkpoint-dir)"
    )


def _latest_note(root: Path, chosen: Path | None = None) -> str | None:
    """What is wrong with `latest`, or how it differs from the checkpoint chosen (None: fine)."""
    pointer = root / "latest"
    if not pointer.exists():
        return f"{pointer} is missing" if chosen is None else None
    try:
        name = pointer.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        why = errno_text(e) if isinstance(e, OSError) else "not text"
        return f"{pointer} is unreadable ({why}); the step directories decide"
    if not STEP_DIR.fullmatch(name):
        what = "empty" if not name else f"not a step name: {name[:40]!r}"
        return f"{pointer} is {what}; the step directories decide"
    if chosen is not None and name != chosen.name:
        return f"{pointer} names {name}; using {chosen.name}, the newest usable checkpoint"
    if not (root / name).exists():
        return f"{pointer} names {name}, which is not there"
    return None


def prepare_dir(root: str | Path, rank: int, writer: bool) -> list[str]:
    """Before step 1: every rank that will write creates `root` and writes, fsyncs and removes a
    probe file there (a read-only directory or a file in its place is refused now, not after the
    work). Rank 0 then removes what killed saves left (the job is the only writer, so at its
    start no save is live). Returns notes to print."""
    root = Path(root)
    flag = f"--checkpoint-dir {root}"
    if writer:
        if root.exists() and not root.is_dir():
            raise CheckpointError(f"{flag} is a file, not a directory (give a directory)")
        probe = root / f".probe-{rank}-{os.getpid()}"
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, b"\0" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as e:
            raise CheckpointError(
                f"{flag} is not writable ({io_error(e, root)}; checked on rank {rank} before "
                "step 1): fix its permissions or space, or choose another directory"
            ) from None
    if rank != 0 or not root.is_dir():
        return []
    try:
        return cleanup(root)
    except OSError as e:
        raise CheckpointError(
            f"{flag}: cannot remove what a killed save left ({io_error(e, root)})"
        ) from None


def cleanup(root: Path) -> list[str]:
    """Remove the leftovers of killed saves: `.tmp-step_*` directories and `.latest.tmp`; a
    `.old-step_N-*` (killed between the two renames of a re-save) goes back to step_N if that
    is missing, else it is removed."""
    notes = []
    for p in sorted(root.glob(".old-step_*")):
        final = root / p.name[len(".old-") :].rsplit("-", 1)[0]
        if not final.exists():
            os.rename(p, final)
            notes.append(f"restored {final} (a re-save of it was killed)")
        else:
            shutil.rmtree(p, ignore_errors=True)
    for p in sorted([*root.glob(".tmp-step_*"), *root.glob(".latest.tmp")]):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        notes.append(f"removed {p} (left by a save that was killed)")
    return notes


def prune(root: Path, keep: int, current: Path) -> list[Path]:
    """Delete usable checkpoints beyond the newest `keep`, never `current` (the one just saved,
    whose bytes were hashed as they were written): so the newest good checkpoint always stays.
    Only checkpoints that pass check_structure count; a damaged one is neither counted nor
    deleted (it is left for the user to look at). The structural check, not a full hash of every
    kept checkpoint at every save, because that would read them all each time."""
    good = []
    for p in entries(root):
        try:
            check_structure(p)
            good.append(p)
        except Damaged:
            continue
    doomed = [p for p in good[keep:] if p != current]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def agreed(comm: Any, work: Callable[[], T]) -> T:
    """job.agree for checkpoints: run `work` on every rank; a CheckpointError on any rank is
    raised on every rank, as Damaged if every rank's problem was damage (so --resume auto may
    try an older checkpoint), else as CheckpointError."""
    try:
        result, err = work(), None
    except CheckpointError as e:
        result, err = None, (isinstance(e, Damaged), str(e))
    errors = comm.allgather(err)
    bad = [r for r, e in enumerate(errors) if e]
    if bad:
        msg = errors[bad[0]][1]
        if len(bad) < comm.Get_size():
            msg += f" [on rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}]"
        raise (Damaged if all(errors[r][0] for r in bad) else CheckpointError)(msg)
    return result  # type: ignore[return-value]


def on_root(comm: Any, work: Callable[[], T]) -> T:
    """Run `work` on rank 0 only (file system look-ups that every rank would repeat) and give
    every rank its result, or raise its ConfigError on every rank."""
    result, err = None, None
    if comm.Get_rank() == 0:
        try:
            result = work()
        except ConfigError as e:
            err = e
    result, err = comm.bcast((result, err), root=0)
    if err is not None:
        raise err
    return result  # type: ignore[no-any-return]


def restore(
    comm: Any,
    path: str | Path,
    stage: Any,
    opt: Any,
    model: Any,
    fresh_ok: bool,
    cuts: dict[str, tuple[int, int]] | None = None,
    aliases: dict[str, str] | None = None,
) -> tuple[Path | None, int, list[str]]:
    """--resume PATH (a step directory, or DIR) or --resume auto (fresh_ok: DIR may hold no
    checkpoint): load the newest checkpoint that passes its checks on every rank, trying older
    ones when one is Damaged. Returns (the step directory, or None when DIR holds no checkpoint
    entry at all; its step; notes on what was skipped and why). Raises if entries exist but
    none is usable, naming each, or if the newest usable one is of another model. `cuts`:
    with --zero 1, the flat part of each parameter whose optimizer state this rank holds;
    `aliases`: parameters stored under another name (a tied head's copy)."""
    root = Path(path)
    found: list[Path]
    notes: list[str]
    if is_step_dir(root):
        found, notes = [root], []
    else:
        found, notes = on_root(comm, lambda: candidates(root))
        if not found:
            if fresh_ok:
                return None, 0, []
            raise CheckpointError(
                f"--resume {path}: no checkpoint there (expected DIR/step_N/manifest.json)"
            )
    for step_dir in found:
        try:
            step = agreed(comm, partial(load, step_dir, stage, opt, model, cuts, aliases))
            return step_dir, step, notes
        except Damaged as e:
            if found == [root]:  # a step directory given by name
                raise Damaged(f"{e} (resume another: --resume DIR/step_N or auto)") from None
            notes.append(f"skipping {step_dir.name}: {e}")
    raise _none_usable(root, notes)
