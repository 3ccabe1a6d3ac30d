"""One writer per output folder: a second pipeline, trainer or gallery writing into the same folder is refused.

    with folder_lock(out, "--out"):   # else: error: OUT is in use by another run (pid N); wait for it or
        ...write into out...          #       choose another --out

The lock is an exclusive, non-blocking `flock` on `<folder>/.maskdistill.lock`, which holds the holder's pid.
The kernel releases it when the holder exits, a crash or a kill included, so a stale lock never blocks
a later run. flock locks belong to an open file description: two opens conflict even within one process.
A clean release deletes the lock file (and the folder, when the lock made it and it is still empty), so
the outputs hold nothing of it; after a crash the file stays, harmless. (flock is reliable on local disks;
on NFS it depends on the server.)
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from utils.errors import UserError

LOCK_FILE = ".maskdistill.lock"


class LockHeld(Exception):
    """The file is locked by another open; `holder` is what its holder wrote in it."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def open_locked(path: Path) -> int:
    """A descriptor of `path` (created if needed) holding an exclusive, non-blocking `flock`; LockHeld if another
    open holds it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(holder) from None
    return fd


def record_holder(fd: int, note: str) -> None:
    """Write who holds the lock (read by the runs it refuses) into the locked file."""
    os.ftruncate(fd, 0)
    os.write(fd, note.encode())


class FolderLock:
    """The lock of one output folder (see the module docstring); `acquire` refuses when another run holds it."""

    def __init__(self, folder: str | os.PathLike, flag: str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.flag = flag  # the command's flag naming the folder, for the message
        self.fd: int | None = None
        self.made_folder = False

    def acquire(self) -> "FolderLock":
        self.made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = open_locked(self.path)
            except LockHeld as held:
                raise UserError(f"{self.folder} is in use by another run (pid {held.holder}); wait for it or "
                                f"choose another {self.flag}") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder released and deleted this file meanwhile: lock the one at the path now
        record_holder(fd, str(os.getpid()))
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while held: a run that opened it meanwhile sees it gone, and retries
        os.close(self.fd)
        self.fd = None
        if self.made_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()  # only when empty: a run refused before writing leaves nothing

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit, too late to matter: the kernel releases
            self.release()  # a holder dropped without release (e.g. a trainer that never trained) lets go

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def folder_lock(folder: str | os.PathLike, flag: str) -> FolderLock:
    """A context manager holding `folder`'s lock; `flag` (e.g. "--out") names the folder in the refusal."""
    return FolderLock(folder, flag)

