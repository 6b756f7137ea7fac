"""The keepalived checks (checks/test_ipvs_host.py) on facts captured from a lab director:
passing on a sound one, failing with what differs on each fault, and not applying (passing,
`keepalived: not configured` in their details) on a host without keepalived."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from ipvs_fleet.compliance import facts as facts_mod
from ipvs_fleet.compliance.expect import EXPECT_KEY, Expect
from ipvs_fleet.compliance.keepalived import NOT_CONFIGURED, Director, director
from ipvs_fleet.compliance.render import FIXES_FILE
from tests.unit.test_keepalived_live import DATA, captured

CHECKS = Path(__file__).resolve().parents[2] / "checks" / "test_ipvs_host.py"
_spec = importlib.util.spec_from_file_location("ipvs_host_checks_ka", CHECKS)
assert _spec is not None and _spec.loader is not None
host_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_checks)
KEEPALIVED_CHECKS = ("keepalived_config", "keepalived_table", "keepalived_vrrp", "keepalived_sync")


def run(check: str, ka: Director | None) -> tuple[str, dict[str, Any]]:
    """(the failure message or "" when it passes, what the check recorded)."""
    node = SimpleNamespace(stash=pytest.Stash(), user_properties=[])
    expect = Expect(node)  # type: ignore[arg-type]  # a stand-in item: stash and properties
    try:
        getattr(host_checks, f"test_{check}")(keepalived=ka, expect=expect)
    except pytest.fail.Exception as e:
        return str(e.msg), node.stash[EXPECT_KEY]
    return "", node.stash[EXPECT_KEY]


def lab(name: str) -> Director:
    return director(captured(name), None)


@pytest.mark.parametrize("check", KEEPALIVED_CHECKS)
def test_a_host_without_keepalived_passes_as_not_configured(check: str) -> None:
    msg, found = run(check, None)
    assert msg == ""
    assert found["details"] == {"keepalived": NOT_CONFIGURED}


@pytest.mark.parametrize("check", KEEPALIVED_CHECKS)
def test_the_lab_master_passes(check: str) -> None:
    assert run(check, lab("ka1-master"))[0] == ""


def test_its_missing_real_servers_are_notes_in_the_details() -> None:
    _, found = run("keepalived_table", lab("ka1-master"))
    assert len(found["details"]["keepalived_notes"]) == 2


def test_a_failing_config_test_names_exit_and_output() -> None:
    d = lab("ka1-master")
    d.facts.config_test_rc = 5
    d.facts.config_test_out = (
        "Virtual server [10.0.9.100]:tcp:80: no scheduler set, setting default 'wlc'"
    )
    msg, found = run("keepalived_config", d)
    assert msg.splitlines() == [
        "keepalived's configuration fails its own test",
        "  Virtual server [10.0.9.100]:tcp:80: no scheduler set, setting default 'wlc'",
        "  keepalived --config-test -f /etc/keepalived/keepalived.conf: expected exit 0, "
        "actual exit 5",
    ]


def test_each_fault_fails_its_check_alone() -> None:
    failing = {
        name: {c for c in KEEPALIVED_CHECKS if run(c, lab(name))[0]}
        for name in ("ka1-extra", "ka1-syncid52", "ka1-fault-drain", "ka1-stopped")
    }
    assert failing == {
        "ka1-extra": {"keepalived_table"},
        "ka1-syncid52": {"keepalived_sync"},
        "ka1-fault-drain": {"keepalived_vrrp", "keepalived_sync"},
        "ka1-stopped": {"keepalived_table", "keepalived_vrrp", "keepalived_sync"},
    }
    msg, _ = run("keepalived_vrrp", lab("ka1-stopped"))
    assert msg.splitlines() == [
        "keepalived's VRRP instances are not in a sound state",
        "  keepalived is not running",
    ]


def test_the_facts_script_output_carries_the_section() -> None:
    section = (DATA / "ka1-master.txt").read_text()
    out = f"@@@ kernel\n6.1.0-57-cloud-amd64\n12288\n@@@ keepalived\n{section}@@@ other\n"
    hf = facts_mod.parse(out)
    assert hf.keepalived is not None and hf.keepalived.pid == 342
    absent = "@@@ kernel\n6.1.0-57-cloud-amd64\n0\n@@@ keepalived\n@@ka pid none\n"
    no_conf = absent + "@@ka conf /etc/keepalived/keepalived.conf\n@@ka absent\n"
    assert facts_mod.parse(no_conf).keepalived is None
    assert facts_mod.parse(absent).keepalived is None
    assert "keepalived --config-test" in facts_mod.gather_command([])


def test_every_keepalived_check_has_a_fix() -> None:
    fixes = yaml.safe_load(FIXES_FILE.read_text())
    assert set(KEEPALIVED_CHECKS) <= set(fixes)
