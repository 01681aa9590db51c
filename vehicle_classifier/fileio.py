"""Writes that survive interruption, full disks and each other.

- `write_file`: one file, atomically and durably (a reader sees the old file or the new one,
  never half; fsync'd before and after the rename, so a power cut cannot undo it either).
- `publish`: a set of files that appear together or not at all (the training outputs), through
  a journal: a run killed in the middle is rolled back to the previous set by `recover`.
- `exclusive`: a lock (the filelock library) that names the run holding it.
- Every OSError of a write becomes a `WriteError`: one line naming the path and what to do.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from . import UserError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"  # every temporary this module makes ends so: what `clean_temporaries` removes
JOURNAL = ".publish-journal.json"  # the names being replaced; present only while a set is swapped in
BACKUP_DIR = ".publish-previous"  # hard links to the previous set while it is being replaced
REMEDY = {
    errno.ENOSPC: "the disk is full: free some space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is exhausted: free some space or choose a folder on another disk",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: fix the folder's permissions or choose another folder",
    errno.EPERM: "permission denied: fix the folder's permissions or choose another folder",
}


class WriteError(UserError):
    """A file could not be written; nothing half-written was left behind."""


class LockedError(UserError):
    """Another run holds the lock on a folder."""


def write_error(path: Path, exc: OSError) -> WriteError:
    remedy = REMEDY.get(exc.errno, "check that the folder exists and is writable")
    return WriteError(f"cannot write {path}: {exc.strerror or exc}; {remedy}")


def fsync_dir(folder: Path) -> None:
    """Make renames and unlinks in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_temporary(folder: Path, name: str, data: bytes) -> Path:
    """`data` in a fresh, fsync'd temporary file in `folder`, readable as a plain open() would
    make it (mkstemp's 0600 would hide the model from the service's user in its container)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:  # no inode left, a read-only folder, no permission
        raise write_error(Path(folder) / name, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
    except BaseException as exc:
        os.unlink(tmp)
        raise write_error(Path(folder) / name, exc) if isinstance(exc, OSError) else exc
    return Path(tmp)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path.parent, exc) from None


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename the finished temporary over `path`, durably."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably; a WriteError leaves the old file."""
    path = Path(path)
    _make_parent(path)
    tmp = write_temporary(path.parent, path.name, data)
    try:
        _move_into_place(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside `path` for a writer that wants a file name; it replaces
    `path` (durably, as `write_file` does) only if the block succeeds."""
    path = Path(path)
    _make_parent(path)
    tmp = write_temporary(path.parent, path.name, b"")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors) recreate the file as 0600
        _move_into_place(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        tmp.unlink(missing_ok=True)


def json_bytes(data) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json(path: Path, data) -> None:
    write_file(path, json_bytes(data))


def clean_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries that killed runs left in `folder`. Call it holding the folder's
    lock: a live run's temporaries look the same."""
    # (Earlier versions named them .NAME.XXXX.tmp.SUFFIX: those too.)
    stale = [p for pattern in (f".*{TEMP_SUFFIX}", f".*{TEMP_SUFFIX}.*") for p in Path(folder).glob(pattern)
             if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# --- a set of files, all or nothing ---------------------------------------------------------
def publish(folder: Path, files: dict[str, bytes], replaces: tuple[str, ...] = ()) -> None:
    """Put `files` ({name: content}) into `folder` as one set: after a crash at any point the
    folder holds either the whole previous set or the whole new one (once `recover` ran).
    Names in `replaces` that are not in `files` are removed, as part of the same set."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from None
    recover(folder)
    staged = {}
    try:
        for name, data in files.items():  # the slow part: a failure here changes nothing
            staged[name] = write_temporary(folder, name, data)
        _swap(folder, staged, sorted(set(files) | set(replaces)))
    except WriteError as exc:
        raise WriteError(f"{exc} (nothing in {folder} was changed)") from None
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def _swap(folder: Path, staged: dict[str, Path], names: list[str]) -> None:
    backup = folder / BACKUP_DIR
    current = ""
    try:
        shutil.rmtree(backup, ignore_errors=True)
        backup.mkdir()
        for name in names:
            if (folder / name).is_file():
                os.link(folder / name, backup / name)
        current = str(folder / JOURNAL)
        write_file(folder / JOURNAL, json_bytes({"names": names}))
        # From here on a crash is rolled back by `recover`: the previous set is in `backup`.
        for name in names:
            current = str(folder / name)
            if name in staged:
                os.replace(staged[name], folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        fsync_dir(folder)
        current = str(folder / JOURNAL)
        (folder / JOURNAL).unlink()  # the commit point
        fsync_dir(folder)
    except OSError as exc:
        recover(folder)
        raise write_error(Path(current or backup), exc) from None
    except BaseException:
        recover(folder)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def recover(folder: Path) -> bool:
    """Roll back a `publish` that a crash interrupted; True if there was one to roll back."""
    folder = Path(folder)
    journal, backup = folder / JOURNAL, folder / BACKUP_DIR
    rolled_back = journal.is_file()
    if rolled_back:
        try:
            names = json.loads(journal.read_text())["names"]
        except (OSError, ValueError, KeyError):
            names = []  # torn journal: it was being written, so nothing was replaced yet
        for name in names:
            if (backup / name).is_file():
                os.replace(backup / name, folder / name)
            else:
                (folder / name).unlink(missing_ok=True)
        fsync_dir(folder)
        journal.unlink()
        fsync_dir(folder)
    shutil.rmtree(backup, ignore_errors=True)
    return rolled_back


def in_transition(folder: Path) -> bool:
    """True while (or after a crash during) a `publish` into `folder`: its files may be mixed."""
    return (Path(folder) / JOURNAL).exists()


# --- locks ----------------------------------------------------------------------------------
def _holder(owner_file: Path) -> str:
    try:
        owner = json.loads(owner_file.read_text())
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError):
        return "another process"


LOCK_FILE, OWNER_FILE = ".lock", ".lock.owner"  # in the folder locked: the lock, and who holds it


@contextmanager
def exclusive(folder: Path, what: str, wait: bool, setting: str | None = None):
    """Hold `folder`'s lock for the block (the folder is made if need be). Held by another run:
    raise LockedError naming it and asking for another `what` (wait=False; `setting`: the
    LockedError's), or say so once and wait for it (wait=True). The lock is the kernel's (flock,
    through filelock), so a killed holder frees it at once. A block that leaves the folder holding
    nothing behind (a first run that failed) leaves no folder it made either (`_tidy`); no run
    leaves the lock's files."""
    folder = Path(folder)
    lock, made = _acquire(folder, what, wait, setting)
    try:
        write_json(folder / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(),
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)})
        yield
    finally:
        try:
            _tidy(folder, made)
        finally:
            lock.release()


def _acquire(folder: Path, what: str, wait: bool, setting: str | None) -> tuple[FileLock, list[Path]]:
    """The lock, held, and the folders made for it (deepest first)."""
    while True:
        lock = FileLock(folder / LOCK_FILE)
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            try:
                lock.acquire(timeout=0)
            except Timeout:
                holder = _holder(folder / OWNER_FILE)
                if not wait:
                    raise LockedError(f"{folder} is in use by another run ({holder}); wait for it to finish "
                                      f"or choose another {what}", setting=setting) from None
                log.warning("waiting for %s: in use by another run (%s)", folder, holder)
                lock.acquire()
            return lock, made
        except (FileNotFoundError, FileExistsError) as exc:  # (mkdir's, when the folder goes as it looks)
            if not folder.is_dir():
                continue  # the run that held the lock removed the folder as it left (_tidy): make it again
            raise write_error(folder / LOCK_FILE, exc) from None
        except OSError as exc:
            raise write_error(folder / LOCK_FILE, exc) from None


def _tidy(folder: Path, made: list[Path]) -> None:
    """Still holding the lock: remove the lock's files (a finished run leaves none behind), then
    the folders `exclusive` made, each only while empty. Safe for a run waiting for the lock:
    - the lock file is unlinked while held, and filelock (>= 4.3.1) counts a flock won on an inode
      unlinked meanwhile as not acquired and tries the path again, so two runs never hold two
      inodes of one name;
    - a run that creates a new lock file once this one is unlinked holds the lock at once; all
      that is left to do here is rmdir, which fails on a folder holding that file (the folder
      stays, the new holder's);
    - a waiter whose folder vanished makes it again (_acquire);
    - the owner file goes first: once the lock file is gone, a new holder may write its own."""
    try:
        (folder / OWNER_FILE).unlink(missing_ok=True)
        (folder / LOCK_FILE).unlink(missing_ok=True)
        for empty in made:
            empty.rmdir()
    except OSError:
        pass  # only tidying: a folder someone writes into, or cannot list, keeps its files
