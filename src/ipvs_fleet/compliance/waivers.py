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
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, model_validator
from pydantic_core import ErrorDetails

from ipvs_fleet.errors import ConfigError, load_yaml_file
from ipvs_fleet.validation import StrictModel, dotted, shown, validated

DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


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


def _date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str) and DATE_RE.fullmatch(value.strip()):
        try:
            return dt.date.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"not a valid date: {value.strip()}") from None
    raise ValueError(f"must be a date YYYY-MM-DD, got {shown(value)}")


def _text(what: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{what}, got {shown(value)}")
        return value.strip()

    return BeforeValidator(check)


Name = Annotated[str, _text("must be a name")]
# What a waiver without the field is told.
REQUIRED = {
    "check": "check is required (a check name from the report)",
    "justification": "a waiver needs a justification",
    "expires": "expires is required (YYYY-MM-DD)",
}


class WaiverEntry(StrictModel):
    """One entry of `waivers:`."""

    host: Name | None = None
    group: Name | None = None
    check: Annotated[str, _text("must be a check name from the report")]
    justification: Annotated[str, _text("must be a non-empty justification")]
    expires: Annotated[dt.date, BeforeValidator(_date)]

    @model_validator(mode="before")
    @classmethod
    def _target_and_required(cls, data: Any) -> Any:
        """The entry's own errors, said as a waiver's author thinks of them."""
        if isinstance(data, dict):
            if (data.get("host") is None) == (data.get("group") is None):
                raise ValueError("give exactly one of host or group")
            for name, why in REQUIRED.items():
                if name not in data:
                    raise ValueError(why)
        return data


class WaiversFile(StrictModel):
    waivers: list[WaiverEntry] | None = None


def _labels(entries: list[dict[str, Any]]) -> Callable[[ErrorDetails], str]:
    """How an error names its key: an entry's own error by index and target
    (`waivers[0] (host lab-2)`), a field's by its dotted key (`waivers[0].expires`)."""

    def key(err: ErrorDetails) -> str:
        loc = err["loc"]
        if len(loc) == 2 and loc[0] == "waivers" and isinstance(loc[1], int):
            e = entries[loc[1]]
            for t in ("host", "group"):
                if e.get(t) is not None:
                    return f"waivers[{loc[1]}] ({t} {e[t]})"
        return dotted(loc)

    return key


def parse_waivers(doc: Any, source: str) -> list[Waiver]:
    """Validated waivers from a parsed YAML document (a mapping with `waivers:`, or the list
    alone); `source` names the file in errors."""
    if doc is None:
        return []
    if isinstance(doc, list):
        doc = {"waivers": doc}
    entries = doc.get("waivers") if isinstance(doc, dict) else None
    entries = entries if isinstance(entries, list) else []
    by_index = [e if isinstance(e, dict) else {} for e in entries]
    wf = validated(WaiversFile, doc, source, key=_labels(by_index))
    return [
        Waiver(
            check=w.check,
            justification=w.justification,
            expires=w.expires,
            host=w.host,
            group=w.group,
            where=f"{source}: waivers[{i}] ({'host ' + w.host if w.host else f'group {w.group}'})",
        )
        for i, w in enumerate(wf.waivers or [])
    ]


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
