"""Waivers: validation, matching by host or group, expiry."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from ipvs_fleet.compliance.model import FAILED, PASSED, WAIVED, CheckResult
from ipvs_fleet.compliance.waivers import apply_waivers, check_names, load_waivers, parse_waivers
from ipvs_fleet.errors import ConfigError

TODAY = dt.date(2026, 11, 26)


def res(host: str = "lab-2", check: str = "patched_module", status: str = FAILED,
        groups: tuple[str, ...] = ("k8s_nodes",)) -> CheckResult:
    return CheckResult(host, check, status, "k8s_node", groups, message="stock module loaded")


def waiver(**kw: object) -> dict[str, object]:
    return {"host": "lab-2", "check": "patched_module", "justification": "TICKET-1",
            "expires": "2026-12-31", **kw}


def test_valid_waiver_marks_failure_waived() -> None:
    r = res()
    unused = apply_waivers([r], parse_waivers({"waivers": [waiver()]}, "w.yml"), TODAY)
    assert r.status == WAIVED
    assert r.waiver is not None and r.waiver["justification"] == "TICKET-1"
    assert unused == []


def test_expired_waiver_fails_again_and_says_so() -> None:
    r = res()
    apply_waivers([r], parse_waivers([waiver(expires="2026-11-25")], "w.yml"), TODAY)
    assert r.status == FAILED
    assert "waiver expired on 2026-11-25" in r.message
    assert r.waiver is not None and r.waiver["expired"] is True


def test_waiver_is_valid_through_its_expiry_day() -> None:
    r = res()
    apply_waivers([r], parse_waivers([waiver(expires=TODAY)], "w.yml"), TODAY)
    assert r.status == WAIVED


def test_group_waiver_matches_members_only() -> None:
    member, other = res(), res(host="ftp-1", groups=("ftp_hosts",))
    ws = parse_waivers([{**waiver(), "host": None, "group": "k8s_nodes"}], "w.yml")
    apply_waivers([member, other], ws, TODAY)
    assert (member.status, other.status) == (WAIVED, FAILED)


def test_waiver_does_not_touch_passing_checks_and_is_reported_unused() -> None:
    r = res(status=PASSED)
    unused = apply_waivers([r], parse_waivers([waiver()], "w.yml"), TODAY)
    assert r.status == PASSED and len(unused) == 1


def test_other_check_is_not_waived() -> None:
    r = res(check="sysctls")
    apply_waivers([r], parse_waivers([waiver()], "w.yml"), TODAY)
    assert r.status == FAILED


@pytest.mark.parametrize(
    ("entry", "needle"),
    [
        (waiver(justification=""), "waivers[0] (host lab-2): a waiver needs a justification"),
        ({k: v for k, v in waiver().items() if k != "justification"}, "needs a justification"),
        (waiver(justification="   "), "needs a justification"),
        ({k: v for k, v in waiver().items() if k != "expires"}, "expires is required"),
        (waiver(expires="next week"), "expires must be a date"),
        (waiver(group="g"), "exactly one of host or group"),
        ({**waiver(), "host": None}, "exactly one of host or group"),
        (waiver(check=""), "check is required"),
        (waiver(reason="x"), "unknown field(s) reason"),
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
