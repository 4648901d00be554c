"""One run per output directory: a lock file naming the run's pid, host and start time.

Two runs writing the same directory would interleave checkpoints and chunks; the second one stops
with one line naming the first one's pid instead. A lock left by a run that was killed (its pid is
gone, or now belongs to a younger process) is stale and taken over. A lock on a directory also
covers the directories below it: a pipeline's run dir holds every stage dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from .errors import ConfigError

LOCK = ".steerlm.lock"


class DirectoryInUse(ConfigError):
    """Another live run holds the lock of this output directory (or of one above it)."""


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the locker."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot look at another host's processes: assume it still runs
    pid = int(holder.get("pid", -1))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    started = holder.get("proc_start")
    return started is None or _proc_start(pid) in (None, started)


def _read(lock: Path) -> Optional[dict]:
    try:
        return json.loads(lock.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # not a lock a run wrote: stale
        return {}


def _refuse(directory: Path, lock: Path, holder: dict) -> None:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    where = "" if host == socket.gethostname() else f" on host {host}"
    raise DirectoryInUse(f"{directory}: in use by another run (pid {pid}{where}, started {holder.get('started', '?')}, "
                         f"lock {lock}); wait for it to finish or stop it (a lock whose run is gone is taken over)")


def _held_elsewhere(directory: Path) -> Optional[tuple[Path, dict]]:
    """The live lock of another process on `directory` or an ancestor, if any."""
    for d in (directory, *directory.parents):
        holder = _read(d / LOCK)
        if holder is None or holder.get("pid") == os.getpid():
            continue
        if holder and _alive(holder):  # an unreadable lock was not written by a run (they link whole files)
            return d / LOCK, holder
    return None


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold `directory`'s lock for the duration of the block (created if missing); stale locks are taken over."""
    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK
    held = _held_elsewhere(directory)
    if held is not None:
        _refuse(directory, *held)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "proc_start": _proc_start(os.getpid()),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    mine = lock.with_name(f"{LOCK}.{os.getpid()}")
    mine.write_text(json.dumps(me))
    try:
        if _read(lock) not in (None, me):  # stale (checked above): remove it, then race for it like everyone
            lock.unlink(missing_ok=True)
        try:
            os.link(mine, lock)  # atomic: exactly one of two racing runs creates it
        except FileExistsError:
            _refuse(directory, lock, _read(lock) or {})
    finally:
        mine.unlink(missing_ok=True)
    try:
        yield lock
    finally:
        if _read(lock) == me:
            lock.unlink(missing_ok=True)
