"""The rollout journal: one JSON object per line, fsync'ed before the step it records proceeds.

Events (`event` key):
- `start`: a run began (`run`, `inventory`, `waves` as [[spec, [hosts]]], `resume`, `limit`,
  `artifacts`: the id of the artifacts it deploys)
- `host`: a host changed state (`host`, `state`, `wave`, `detail`; `set`: with `verified`, the
  id of the artifacts it was verified with, `ipvs_fleet.build.artifact.artifacts_id`)
- `wave`: a wave finished (`wave`, `passed`, `failed` hosts)
- `end`: the run ended (`outcome`: completed | halted)

Host states, in order: deploying -> deployed -> gating -> verified | failed; then for failed
hosts rolling-back -> rolled-back | rollback-failed. A host whose last state is not verified,
rolled-back or failed was interrupted mid-step: its state is unknown until it is deployed again.
A torn last line (the controller killed mid-write) is ignored; a record that is not what the
rollout writes (no `host`, a wave that is not a number) is an error naming file, line and key.

A journal holds one rollout (and the runs that resumed it). Once it completed, the next
rollout archives it next to itself, timestamped (`archive`), and starts a new one.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.validation import invalid, shown

DEPLOYING, DEPLOYED, GATING = "deploying", "deployed", "gating"
VERIFIED, FAILED = "verified", "failed"
ROLLING_BACK, ROLLED_BACK, ROLLBACK_FAILED = "rolling-back", "rolled-back", "rollback-failed"
# The deploy's preflight refused the host: nothing was changed on it, it is on its old state.
REFUSED = "refused"
HOST_STATES = (
    REFUSED,
    DEPLOYING,
    DEPLOYED,
    GATING,
    VERIFIED,
    FAILED,
    ROLLING_BACK,
    ROLLED_BACK,
    ROLLBACK_FAILED,
)

# What the report calls each journal state.
OLD, NEW_VERIFIED = "old", "new-verified"
REPORT_ROLLED_BACK, FAILED_UNKNOWN = "rolled-back", "failed-unknown"


def report_state(journal_state: str | None) -> str:
    """old | new-verified | rolled-back | failed-unknown, from a host's last journal state."""
    if journal_state is None or journal_state == REFUSED:
        return OLD
    if journal_state == VERIFIED:
        return NEW_VERIFIED
    if journal_state == ROLLED_BACK:
        return REPORT_ROLLED_BACK
    return FAILED_UNKNOWN


@dataclass
class HostRecord:
    state: str
    wave: int
    detail: str = ""
    history: list[str] = field(default_factory=list)
    set_id: str = ""  # the artifacts id it was verified with ("" for other states)


@dataclass
class JournalView:
    """What a journal says: the planned waves of its first run and each host's last state."""

    waves: list[tuple[str, list[str]]] = field(default_factory=list)
    hosts: dict[str, HostRecord] = field(default_factory=dict)
    runs: int = 0
    outcome: str | None = None
    inventory: str | None = None
    limit: list[str] = field(default_factory=list)  # the first run's --limit ([]: none)
    last_ts: float | None = None  # time of the last record

    @property
    def completed(self) -> bool:
        """Whether the rollout's last run completed (nothing is left to resume)."""
        return self.runs > 0 and self.outcome == "completed"


class Journal:
    """Append-only, fsync'ed JSON-lines journal."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        # A torn last line from a killed controller: end it so the next record parses.
        size = os.fstat(self._fd).st_size
        if size:
            with self.path.open("rb") as f:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    os.write(self._fd, b"\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, event: str, **fields: Any) -> None:
        if self._fd is None:
            self.open()
        assert self._fd is not None
        rec = {"ts": round(time.time(), 3), "event": event, **fields}
        os.write(self._fd, (json.dumps(rec, sort_keys=True) + "\n").encode())
        os.fsync(self._fd)

    def host(self, host: str, state: str, wave: int, detail: str = "", set_id: str = "") -> None:
        assert state in HOST_STATES, state
        extra = {"set": set_id} if set_id else {}
        self.write("host", host=host, state=state, wave=wave, detail=detail, **extra)

    def hosts(
        self, hosts: list[str] | tuple[str, ...], state: str, wave: int, set_id: str = ""
    ) -> None:
        """One record per host, one fsync for all (a wave of 25 hosts is one disk flush)."""
        if self._fd is None:
            self.open()
        assert self._fd is not None
        ts = round(time.time(), 3)
        lines = "".join(
            json.dumps(
                {
                    "ts": ts,
                    "event": "host",
                    "host": h,
                    "state": state,
                    "wave": wave,
                    "detail": "",
                    **({"set": set_id} if set_id else {}),
                },
                sort_keys=True,
            )
            + "\n"
            for h in hosts
        )
        os.write(self._fd, lines.encode())
        os.fsync(self._fd)


class _Record(BaseModel):
    """A journal record: what replay reads is checked; other fields (each event has more,
    and later versions may add some) are left alone."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    event: str
    ts: float | None = None


class StartRecord(_Record):
    waves: list[tuple[str, list[str]]] = []
    inventory: str | None = None
    limit: list[str] | None = None


class HostEvent(_Record):
    host: str
    state: Literal[HOST_STATES]  # type: ignore[valid-type]
    wave: int
    detail: str = ""
    set_id: str | None = Field(None, alias="set")


class EndRecord(_Record):
    outcome: str | None = None


RECORDS: dict[str, type[_Record]] = {"start": StartRecord, "host": HostEvent, "end": EndRecord}


def parse_record(line: str, where: str) -> _Record | None:
    """One journal line as its record; None for a torn write (a killed controller) or an event
    replay does not read; ConfigError naming `where` (file:line) and the key otherwise."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None  # torn write of a killed controller
    if not isinstance(rec, dict):
        raise ConfigError(f"{where}: not a journal record (a JSON object), got {shown(rec)}")
    model = RECORDS.get(rec["event"]) if isinstance(rec.get("event"), str) else _Record
    if model is None:
        return None
    try:
        return model.model_validate_json(line)
    except ValidationError as e:
        raise invalid(e, where) from None


def read_journal(path: Path | str) -> JournalView:
    """Replay a journal file (missing file: empty view); ConfigError naming the file, line
    and key for a record that is not what the rollout wrote."""
    p = Path(path)
    view = JournalView()
    try:
        text = p.read_text()
    except FileNotFoundError:
        return view
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f"{p}: cannot read journal: {why}") from e
    for n, line in enumerate(text.splitlines(), 1):
        rec = parse_record(line, f"{p}:{n}") if line.strip() else None
        if isinstance(rec, StartRecord):
            view.runs += 1
            if not view.waves:
                view.waves = [(s, list(h)) for s, h in rec.waves]
                view.inventory = rec.inventory
                view.limit = list(rec.limit or [])
            view.outcome = None
        elif isinstance(rec, HostEvent):
            h = view.hosts.get(rec.host)
            if h is None:
                h = view.hosts[rec.host] = HostRecord(rec.state, rec.wave)
            h.state, h.wave, h.detail = rec.state, rec.wave, rec.detail
            h.set_id = rec.set_id or ""
            h.history.append(rec.state)
        elif isinstance(rec, EndRecord):
            view.outcome = rec.outcome
        if rec is not None and rec.ts is not None:
            view.last_ts = rec.ts
    return view


def archive(path: Path | str, when: float | None = None) -> Path:
    """Move a journal aside as `<stem>.<UTC time>.jsonl` next to it (the time of its last
    record, else now; `-N` added if taken) and return the new path. The same name at the
    same place is then free for a new rollout."""
    p = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(when if when is not None else None))
    dest = p.with_name(f"{p.stem}.{stamp}{p.suffix}")
    n = 1
    while dest.exists():
        dest = p.with_name(f"{p.stem}.{stamp}-{n}{p.suffix}")
        n += 1
    os.replace(p, dest)
    return dest
