"""One training run per workdir: `WORKDIR/train.lock`, held by the running trainer.

The file names its holder (pid, host, start time) and the holder keeps an exclusive `flock` on
it, which the kernel (or an NFS server) drops when the process dies however it ends, so a lock
left by a killed run is stale and the next run takes it over. On a filesystem without working
locks, a lock whose holder is a live process on this host still counts as held.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from jaxsftdpo.errors import UserError

LOCK_FILE = "train.lock"


def _holder(path: Path) -> dict:
    """What a lock file says about its holder (`{}` when it says nothing readable)."""
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive_here(holder: dict) -> bool:
    """True when the holder is another live process on this host."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _busy(workdir: Path, holder: dict) -> UserError:
    who = (f"pid {holder['pid']} on host {holder.get('host', '?')}, started "
           f"{holder.get('started', '?')}" if "pid" in holder else f"see {workdir / LOCK_FILE}")
    return UserError(f"{workdir} is in use by another training run ({who}); wait for it to end "
                     f"or use another --workdir")


def check_free(workdir) -> None:
    """Fail at once when a live run on this host holds the workdir (reads only; `WorkdirLock`
    decides for runs on other hosts)."""
    holder = _holder(Path(workdir) / LOCK_FILE)
    if _alive_here(holder):
        raise _busy(Path(workdir), holder)


class WorkdirLock:
    """The workdir's lock, held from `acquire()` to `release()`."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd = None

    def acquire(self) -> "WorkdirLock":
        """Take the lock (creating the workdir), or raise a UserError: busy, or not writable."""
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            while self._fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                locked = _flock(fd)
                if locked is False or (locked is None and _alive_here(_holder(self.path))):
                    holder = _holder(self.path)
                    os.close(fd)
                    raise _busy(self.workdir, holder)
                if _same_file(fd, self.path):
                    self._fd = fd
                else:  # the holder removed the file between our open and our flock: again
                    os.close(fd)
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(self._fd, 0)
            os.write(self._fd, (json.dumps(me) + "\n").encode())
        except OSError as e:
            self.release()
            raise UserError(f"cannot write in --workdir {self.workdir} ({e.strerror or e}); use "
                            f"a directory you can write to") from e
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._fd, self.path):
                self.path.unlink()
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _flock(fd: int) -> bool | None:
    """Take an exclusive flock without waiting: True, False when another process holds it,
    None on a filesystem without locks (then the holder's pid is all there is to check)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
