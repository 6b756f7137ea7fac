"""Waivers: a known failure excused, with a justification, until an expiry date.

File format (YAML), as InSpec waivers but per host or inventory group:

    waivers:
      - host: lab-2                 # or `group: <inventory group>`; exactly one of the two
        check: patched_module       # a check name, as in the report
        justification: kernel 6.12 artifact not built yet, see TICKET-42
        expires: 2026-12-31         # the waiver applies up to and including this day

The fleet checks' pytest plugin (ipvs_fleet.compliance.plugin) applies them as pytest
makes each report: a waived failure is xfailed; after the expiry date it fails again. An entry
without a justification, expiry or target is rejected (ConfigError naming file and entry).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError, load_yaml_file

FIELDS = {"host", "group", "check", "justification", "expires"}


@dataclass(frozen=True)
class Waiver:
    """One entry of a waivers file."""

    check: str
    justification: str
    expires: dt.date
    host: str | None = None
    group: str | None = None
    where: str = ""

    @property
    def target(self) -> str:
        return f"host {self.host}" if self.host else f"group {self.group}"

    def matches(self, host: str, check: str, groups: tuple[str, ...]) -> bool:
        if check != self.check:
            return False
        return host == self.host if self.host else self.group in groups

    def expired(self, today: dt.date) -> bool:
        return today > self.expires

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "group": self.group,
            "check": self.check,
            "justification": self.justification,
            "expires": self.expires.isoformat(),
            "where": self.where,
        }


def _date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{where}: expires must be a date YYYY-MM-DD, got {value!r}")


def parse_waivers(doc: Any, source: str) -> list[Waiver]:
    """Validated waivers from a parsed YAML document; `source` names the file in errors."""
    entries = doc.get("waivers") if isinstance(doc, dict) else doc
    if doc is None or entries is None:
        return []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: expected a list under `waivers:`")
    out: list[Waiver] = []
    for i, e in enumerate(entries):
        where = f"{source}: waivers[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: must be a mapping with {', '.join(sorted(FIELDS))}")
        extra = set(e) - FIELDS
        if extra:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(map(str, extra)))}")
        host, group = e.get("host"), e.get("group")
        if (host is None) == (group is None):
            raise ConfigError(f"{where}: give exactly one of host or group")
        where = f"{where} ({'host ' + str(host) if host else 'group ' + str(group)})"
        check = e.get("check")
        if not isinstance(check, str) or not check.strip():
            raise ConfigError(f"{where}: check is required (a check name from the report)")
        just = e.get("justification")
        if not isinstance(just, str) or not just.strip():
            raise ConfigError(f"{where}: a waiver needs a justification")
        if "expires" not in e:
            raise ConfigError(f"{where}: expires is required (YYYY-MM-DD)")
        out.append(
            Waiver(
                check=check.strip(),
                justification=just.strip(),
                expires=_date(e["expires"], where),
                host=str(host) if host is not None else None,
                group=str(group) if group is not None else None,
                where=where,
            )
        )
    return out


def load_waivers(path: str | Path) -> list[Waiver]:
    """Parse and validate a waivers file; ConfigError names the file and the entry."""
    p = Path(path)
    doc = load_yaml_file(p, "waivers")
    return parse_waivers(doc, str(p))


def check_names(waivers: list[Waiver], known: set[str]) -> None:
    """ConfigError for a waiver naming a check that does not exist (a typo waives nothing)."""
    for w in waivers:
        if w.check not in known:
            raise ConfigError(
                f"{w.where}: unknown check {w.check!r} (checks: {', '.join(sorted(known))})"
            )


def waiver_for(
    waivers: list[Waiver], host: str, check: str, groups: tuple[str, ...], today: dt.date
) -> tuple[Waiver, bool] | None:
    """The waiver for a failure of `check` on `host`: (waiver, expired), or None.

    A valid waiver wins over an expired one; among several, the one expiring last.
    """
    matching = [w for w in waivers if w.matches(host, check, groups)]
    valid = [w for w in matching if not w.expired(today)]
    if valid:
        return max(valid, key=lambda w: w.expires), False
    if matching:
        return max(matching, key=lambda w: w.expires), True
    return None
