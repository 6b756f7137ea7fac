"""Waivers: validation, matching by host or group, expiry (applied: test_compliance_plugin)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ipvs_fleet.compliance.waivers import check_names, load_waivers, parse_waivers, waiver_for
from ipvs_fleet.errors import ConfigError

TODAY = dt.date(2026, 11, 26)


def waiver(**kw: object) -> dict[str, object]:
    return {
        "host": "lab-2",
        "check": "patched_module",
        "justification": "TICKET-1",
        "expires": "2026-12-31",
        **kw,
    }


def found(
    entries: list[dict[str, object]],
    host: str = "lab-2",
    check: str = "patched_module",
    groups: tuple[str, ...] = ("k8s_nodes",),
) -> tuple[str, bool] | None:
    """(justification, expired) of the waiver for a failure of `check` on `host`, or None."""
    got = waiver_for(parse_waivers({"waivers": entries}, "w.yml"), host, check, groups, TODAY)
    return None if got is None else (got[0].justification, got[1])


def test_valid_waiver_covers_the_failure() -> None:
    assert found([waiver()]) == ("TICKET-1", False)


def test_expired_waiver_is_found_as_expired() -> None:
    assert found([waiver(expires="2026-11-25")]) == ("TICKET-1", True)


def test_a_valid_waiver_wins_over_an_expired_one() -> None:
    entries = [waiver(expires="2026-11-25", justification="old"), waiver(justification="new")]
    assert found(entries) == ("new", False)


def test_waiver_is_valid_through_its_expiry_day() -> None:
    assert found([waiver(expires=TODAY)]) == ("TICKET-1", False)


def test_group_waiver_matches_members_only() -> None:
    entries = [{**waiver(), "host": None, "group": "k8s_nodes"}]
    entries = [{k: v for k, v in e.items() if v is not None} for e in entries]
    assert found(entries) == ("TICKET-1", False)
    assert found(entries, host="ftp-1", groups=("ftp_hosts",)) is None


def test_other_check_is_not_waived() -> None:
    assert found([waiver()], check="sysctls") is None


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (waiver(justification=""), "waivers[0].justification: must be a non-empty justification"),
        (
            {k: v for k, v in waiver().items() if k != "justification"},
            "waivers[0] (host lab-2): a waiver needs a justification",
        ),
        (waiver(justification="   "), "must be a non-empty justification"),
        ({k: v for k, v in waiver().items() if k != "expires"}, "expires is required"),
        (
            waiver(expires="next week"),
            "waivers[0].expires: must be a date YYYY-MM-DD, got 'next week'",
        ),
        (waiver(group="g"), "exactly one of host or group"),
        ({**waiver(), "host": None}, "exactly one of host or group"),
        (waiver(check=""), "check: must be a check name"),
        (
            waiver(reason="x"),
            "waivers[0] (host lab-2): a mapping with keys check, expires, "
            "group, host, justification (unknown: reason)",
        ),
    ],
)
def test_bad_waivers_are_rejected_naming_file_and_entry(entry: dict, needle: str) -> None:
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        parse_waivers({"waivers": [entry]}, "ci/waivers.yml")
    assert "ci/waivers.yml: waivers[0]" in str(e.value)
    assert needle in str(e.value)


def test_unknown_check_name_is_rejected() -> None:
    with pytest.raises(ConfigError, match="unknown check 'patched_modul'"):
        check_names(parse_waivers([waiver(check="patched_modul")], "w.yml"), {"patched_module"})


def test_load_waivers_file(tmp_path: Path) -> None:
    p = tmp_path / "w.yml"
    p.write_text(
        "waivers:\n  - group: k8s_nodes\n    check: latency_budget\n"
        "    justification: lab is slow\n    expires: 2027-01-31\n"
    )
    [w] = load_waivers(p)
    assert (w.group, w.check, w.expires) == ("k8s_nodes", "latency_budget", dt.date(2027, 1, 31))
    with pytest.raises(ConfigError, match="cannot read waivers"):
        load_waivers(tmp_path / "missing.yml")
    p.write_text("waivers: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_waivers(p)
