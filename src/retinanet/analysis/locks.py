"""Claim files: several processes (or torchrun ranks, or machines sharing a folder) share a grid's cells.

A process claims a cell by creating `<cell>.lock` with os.open(O_CREAT | O_EXCL), which exactly one process can
do; the file holds the holder's pid, host and start time, and the holder touches it every HEARTBEAT seconds while
the cell runs. A lock is stale, and may be broken, when
- its host is this host (same hostname) and its pid is no longer alive (a killed or crashed run), or
- it has not been touched for STALE_AFTER seconds (a dead machine, or a pid that was reused).
Breaking is serialised by `mutex` on a second O_EXCL file, `.breaking`, held for milliseconds (and itself removed
when older than a minute, after its holder died), so that two processes cannot both break a lock and both take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

__all__ = ["HEARTBEAT", "STALE_AFTER", "CellLock", "claim", "read_lock", "is_stale", "mutex"]

HEARTBEAT = 30.0  # seconds between touches of a held lock
STALE_AFTER = 600.0  # a lock not touched for this long is stale, whoever holds it
_MUTEX_STALE = 60.0  # a mutex is held for milliseconds: one this old was left by a process that died


class CellLock:
    """A held claim on one cell; `release()` (or leaving the `with` block) removes it and stops the heartbeat."""

    def __init__(self, path: Path, info: dict[str, Any]):
        self.path, self.info = path, info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat {path.name}")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        self._stop.set()
        if read_lock(self.path) == self.info:  # never remove a lock that is not ours any more
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "CellLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_lock(path: Path) -> dict[str, Any] | None:
    """The lock's content, {} for one being written or unreadable, None when there is no lock."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def is_stale(path: Path, info: dict[str, Any], now: float | None = None) -> bool:
    """Whether the lock at `path` with content `info` may be broken (the rule in the module docstring)."""
    try:
        age = (now if now is not None else time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: nothing to break
    if age > STALE_AFTER:
        return True
    same_host = info.get("host") == socket.gethostname()
    pid = info.get("pid")
    return same_host and isinstance(pid, int) and not _pid_alive(pid)


@contextlib.contextmanager
def mutex(path: Path, timeout: float = 10.0) -> Iterator[bool]:
    """Hold the O_EXCL file `path` for a short critical section (yield True), or give up after `timeout` seconds
    (yield False)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            break
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - path.stat().st_mtime > _MUTEX_STALE:
                    path.unlink()
                    continue
            if time.monotonic() > deadline:
                yield False
                return
            time.sleep(0.05)
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)


def _break_if_stale(path: Path) -> bool:
    with mutex(path.parent / ".breaking") as held:
        if not held:
            return False
        info = read_lock(path)
        if info is None:
            return True  # released meanwhile: free to claim
        if not is_stale(path, info):  # an empty lock (its writer died at once) goes stale by age alone
            return False
        path.unlink(missing_ok=True)
        return True


def claim(path: str | Path) -> CellLock | None:
    """Take the lock file at `path` (breaking it first if it is stale), or None if another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if attempt == 0 and _break_if_stale(path):
                continue
            return None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": uuid.uuid4().hex}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(info))
        return CellLock(path, info)
    return None
