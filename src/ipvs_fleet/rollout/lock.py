"""One controller per journal: an flock on `<journal>.lock`, held for the rollout's life.

Two controllers on one journal would interleave their waves and records; the second one
refuses at once, naming the holder (pid, host, start time, command) written in the lock
file. The kernel drops an flock when its holder dies, however it dies, so the file a killed
controller leaves behind blocks nothing: it is never deleted (deleting it would let a third
controller lock a new file while the second still holds the old one).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ipvs_fleet.errors import FleetError
from ipvs_fleet.redact import masked_argv


class JournalLocked(FleetError):
    """Another controller holds the journal: nothing was done."""


def lock_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".lock")


def _holder(path: Path) -> str:
    """Who holds the lock, from its file (the holder writes it right after locking)."""
    for _ in range(10):
        try:
            h = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            h = None
        if isinstance(h, dict):
            return (
                f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}: "
                f"{h.get('command')}"
            )
        time.sleep(0.05)
    return "holder unknown"


@contextmanager
def journal_lock(journal: Path, command: Sequence[str] | None = None) -> Iterator[Path]:
    """Hold the journal's lock for the block; JournalLocked (exit 2) if another process holds
    it. `command` (default sys.argv) is recorded with its secrets masked."""
    path = lock_path(journal)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JournalLocked(
                f"{journal}: another rollout is running on this journal ({_holder(path)}); "
                f"wait for it to end, or stop it (lock: {path})"
            ) from None
        os.fchmod(fd, 0o600)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(masked_argv(sys.argv if command is None else command)),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # released: the file names no holder
    finally:
        os.close(fd)  # drops the flock
