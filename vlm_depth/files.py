"""Crash-safe output: every file and folder the package writes appears whole or not at all, an output folder has one
writer at a time and is never silently reused, and one test hook kills the process at named points.

- `atomic_path` / `atomic_write`: THE way a file is written: into a hidden temporary file beside the target (same
  suffix, so cv2/numpy/matplotlib still read the format from it), fsync, then `os.replace`. `atomic_dir` and
  `replace_dir` do the same for folders (checkpoints, final/, the tiny base). A SIGKILL leaves the old file or
  none, never a torn one; leftovers are hidden `.NAME.tmp-PID.EXT` files and `.tmp-NAME` folders.
- `append_line`: a log row, appended in one write and fsynced (log.jsonl is rewritten through `atomic_write`);
  `read_jsonl` drops a torn last line (power loss) with a warning and refuses damage anywhere else.
- `claim_output`: the output-folder lock (`.vlm-depth.lock` holding the writer's pid; a lock whose process is gone
  is taken over with a warning) and the "this folder already holds a run" check (`--overwrite` empties it).
- `fault_point`: with the environment variable VLM_DEPTH_FAULT set to a point's name, the process SIGKILLs itself
  there (tests/test_kill_resume.py); a no-op otherwise. Points: `tiny-base`, `step@N`, `log@N`, `checkpoint@N`,
  `prune@N`, `final`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vlm_depth.errors import DataError, RunFolderError

logger = logging.getLogger(__name__)

FAULT_ENV = "VLM_DEPTH_FAULT"
LOCK_NAME = ".vlm-depth.lock"


def fault_armed(name: str) -> bool:
    """True when VLM_DEPTH_FAULT names the point `name` (test hook, see the module docstring)."""
    return os.environ.get(FAULT_ENV) == name


def fault_point(name: str) -> None:
    """SIGKILL this process when VLM_DEPTH_FAULT == `name` (test hook); nothing otherwise."""
    if fault_armed(name):
        os.kill(os.getpid(), signal.SIGKILL)


def make_folder(path: str | Path) -> Path:
    """`path` as an existing folder (created with its parents); RunFolderError when it is a file or cannot be
    created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"--out {path} is not a folder but an existing file; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(
            f"--out: cannot create the folder {path} ({err.strerror or err}); choose a writable one"
        ) from err
    return path


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for a writer to fill; it becomes `path` (fsync + rename) when the block ends
    without an exception, and is removed otherwise."""
    path = Path(path)
    make_folder(path.parent)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(
            f"cannot write {path} ({err.strerror or err}); check the space and rights of --out"
        ) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` atomically (see `atomic_path`); returns `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def append_line(path: str | Path, line: str, fault: str = "") -> None:
    """Append one text line to `path` in a single write, then fsync. `fault`: a fault point (test hook) at which
    the process dies with half the line written."""
    data = (line.rstrip("\n") + "\n").encode()
    with Path(path).open("ab") as f:
        if fault and fault_armed(fault):
            f.write(data[: len(data) // 2])
            f.flush()
            fault_point(fault)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON rows of a log file (none when it does not exist). A torn last line (a crash while appending) is
    dropped with a warning; a damaged line anywhere else is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                logger.warning("%s: torn last line %d dropped (an interrupted write): %.60r", path, number, line)
                break
            raise DataError(f"{path} line {number} is not JSON ({err}); repair or delete that line") from err
    return rows


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older `final` (renames only, no partial copies)."""
    old = final.with_name(f".old-{final.name}")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def remove_dir(folder: Path) -> None:
    """Delete `folder` so that a crash never leaves half of it under its name (renamed first, then deleted)."""
    gone = folder.with_name(f".del-{folder.name}")
    if gone.exists():
        shutil.rmtree(gone)
    os.replace(folder, gone)
    shutil.rmtree(gone)


@contextlib.contextmanager
def atomic_dir(folder: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `folder` to fill; it replaces `folder` when the block ends without an
    exception (deleted otherwise)."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    make_folder(folder.parent)
    if tmp.exists():
        shutil.rmtree(tmp)
    make_folder(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _create(lock: Path, mine: Path) -> bool:
    """Create `lock` with the contents of `mine` unless it exists; False when it does."""
    try:
        os.link(mine, lock)  # atomic, and never leaves an empty lock behind
        return True
    except FileExistsError:
        return False
    except OSError:  # a file system without hard links
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(mine.read_text())
        return True


def _lock(out: Path) -> Path:
    """Take the lock file of `out` for this process (see `claim_output`)."""
    lock = out / LOCK_NAME
    mine = atomic_write(out / f"{LOCK_NAME}.{os.getpid()}", f"{os.getpid()}\n")
    try:
        while not _create(lock, mine):
            text = lock.read_text(errors="replace").strip() if lock.exists() else ""
            holder = int(text) if text.isdigit() else None
            if holder is not None and _alive(holder):
                raise RunFolderError(
                    f"{out} is in use by process pid {holder} (lock file {lock}); wait for that run to end or choose "
                    "another --out"
                )
            logger.warning("%s: stale lock of process %s (no longer running): taking the folder over", out, text)
            lock.unlink(missing_ok=True)
        return lock
    finally:
        mine.unlink(missing_ok=True)


def _empty(out: Path) -> None:
    """Delete everything in `out` but its lock; refuses folders that hold the working directory or the home."""
    resolved = out.resolve()
    for precious in (Path.cwd().resolve(), Path.home().resolve()):
        if precious == resolved or resolved in precious.parents:
            raise RunFolderError(f"--overwrite would empty {out}, which holds {precious}; choose a dedicated --out")
    for entry in out.iterdir():
        if entry.name != LOCK_NAME:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


@contextlib.contextmanager
def claim_output(
    out: str | Path,
    command: str,
    markers: Sequence[str],
    *,
    overwrite: bool = False,
    reuse: bool = False,
    hint: str = "pass --overwrite to replace it or choose another --out",
) -> Iterator[Path]:
    """Hold the output folder `out` of `command` for the block: created, locked against a second writer (the lock
    names this pid), and checked for a previous run. The folder holds a run when one of the glob patterns `markers`
    matches in it; then it is refused (RunFolderError ending with `hint`) unless `reuse` (the caller continues
    that run) or `overwrite` (emptied first). Files that no marker matches are left alone."""
    if not str(out).strip():
        raise RunFolderError("--out must not be empty: give an output folder")
    out = make_folder(out)
    lock = _lock(out)
    try:
        found = sorted({str(p.relative_to(out)) for pattern in markers for p in out.glob(pattern)})
        if found and not reuse:
            if not overwrite:
                listed = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
                raise RunFolderError(f"{out} holds another {command} run ({listed}): {hint}")
            logger.warning("--overwrite: emptying %s (it held %s)", out, ", ".join(found[:3]))
            _empty(out)
        yield out
    finally:
        if lock.is_file() and lock.read_text(errors="replace").strip() == str(os.getpid()):
            lock.unlink()
