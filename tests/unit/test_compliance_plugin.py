"""The checks' pytest plugin: plain `pytest checks/` and `ipvs-fleet check` give one verdict.

The checks folder here is the real one's conftest.py and pytest.ini next to a test module of
three stand-in checks whose outcome each inventory host states in its data (`fake`: check ->
fail or unreachable), so the waivers, exit status, JUnit file and host lines are pytest's
own on a real pytest run, without a host. Each run is a child process, as CI runs it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from ipvs_fleet.resources import checks_dir

XSD = Path(__file__).parents[1] / "data" / "junit.xsd"
BIN = Path(sys.executable).parent

FAKE_CHECKS = """
import pytest
from ipvs_fleet.compliance.remote import HostUnreachable


def outcome(target, expect, check):
    fake = target.host.data.get("fake") or {}
    if fake.get(check) == "fail":
        expect.differ("net.ipv4.vs.expire_nodest_conn", 1, 0)
    expect.details(seen=check)
    expect.done(f"{check} differs")


@pytest.fixture
def reach(target):
    # as the real checks' facts fixture: an unreachable host fails the setup
    if "unreachable" in (target.host.data.get("fake") or {}).values():
        raise HostUnreachable("127.0.0.1:1: Connection refused")


def test_sysctls(target, expect, reach):
    outcome(target, expect, "sysctls")


def test_knob_present(target, expect, reach):
    outcome(target, expect, "knob_present")


def test_patched_module(target, expect, reach):
    outcome(target, expect, "patched_module")
"""


@pytest.fixture(scope="module")
def fake_checks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("checks")
    for name in ("conftest.py", "pytest.ini"):
        shutil.copy(checks_dir() / name, d / name)
    (d / "test_fake.py").write_text(FAKE_CHECKS)
    return d


def inventory(tmp_path: Path, faults: dict[str, dict[str, str]]) -> Path:
    """k8s-a and k8s-b (group k8s_nodes), ftp-c (ftp_hosts); faults: host -> check -> how."""
    inv = tmp_path / "inv.py"

    def host(name: str, cls: str) -> tuple[str, dict[str, object]]:
        return (name, {"ipvs_host_class": cls, "fake": faults.get(name, {})})

    inv.write_text(
        f"k8s_nodes = {[host('k8s-a', 'k8s_node'), host('k8s-b', 'k8s_node')]!r}\n"
        f"ftp_hosts = {[host('ftp-c', 'ftp')]!r}\n"
    )
    return inv


def waivers(tmp_path: Path, *entries: str) -> Path:
    p = tmp_path / "waivers.yml"
    p.write_text("waivers:\n" + "".join(entries))
    return p


def waiver(check: str, expires: dt.date, target: str = "host: k8s-b") -> str:
    return (
        f"  - {target}\n    check: {check}\n    justification: TICKET-9 kernel ahead\n"
        f"    expires: {expires.isoformat()}\n"
    )


@dataclass
class Run:
    rc: int
    out: str
    err: str
    junit: etree._Element | None


def _run(cmd: list[str], junit: Path, checks: Path, cwd: Path) -> Run:
    env = dict(os.environ, IPVS_FLEET_CHECKS=str(checks))
    env.pop("IPVS_FLEET_POLICY", None)
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    doc = etree.parse(str(junit)).getroot() if junit.exists() else None
    return Run(r.returncode, r.stdout, r.stderr, doc)


def plain_pytest(checks: Path, tmp: Path, *args: str) -> Run:
    junit = tmp / "plain.xml"
    cmd = [sys.executable, "-m", "pytest", str(checks), "--junitxml", str(junit), *args]
    return _run(cmd, junit, checks, tmp)


def wrapper(checks: Path, tmp: Path, inv: Path, *args: str) -> tuple[Run, dict]:
    junit, js = tmp / "wrapper.xml", tmp / "wrapper.json"
    cmd = [
        str(BIN / "ipvs-fleet"),
        "check",
        str(inv),
        "--junitxml",
        str(junit),
        "--json",
        str(js),
        *args,
    ]
    run = _run(cmd, junit, checks, tmp)
    return run, (json.loads(js.read_text()) if js.exists() else {})


def junit_statuses(root: etree._Element) -> dict[tuple[str, str], str]:
    """(host, check) -> passed/failed/error/waived from pytest's JUnit testcases."""
    out = {}
    for case in root.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iterfind("properties/property")}
        kids = {c.tag: c for c in case if c.tag in ("failure", "error", "skipped")}
        if "failure" in kids:
            status = "failed"
        elif "error" in kids:
            status = "error"
        elif "skipped" in kids:
            status = "waived" if kids["skipped"].get("type") == "pytest.xfail" else "skipped"
        else:
            status = "passed"
        out[(props["host"], props["check"])] = status
    return out


def valid_junit(root: etree._Element) -> None:
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    assert schema.validate(root), schema.error_log


TODAY = dt.date.today()
SCENARIOS = {
    # name: (faults, waiver entries, exit code)
    "compliant": ({}, [], 0),
    "waived": ({"k8s-b": {"sysctls": "fail"}}, [waiver("sysctls", TODAY)], 0),
    "group waiver": (
        {"k8s-b": {"sysctls": "fail"}, "ftp-c": {"sysctls": "fail"}},
        [waiver("sysctls", TODAY, "group: k8s_nodes")],
        1,
    ),
    "expired": ({"k8s-b": {"sysctls": "fail"}}, [waiver("sysctls", TODAY - dt.timedelta(1))], 1),
    "unreachable": (
        {"k8s-b": {"sysctls": "fail"}, "ftp-c": {"knob_present": "unreachable"}},
        [],
        2,
    ),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_wrapper_verdict_equals_plain_pytest(name: str, fake_checks: Path, tmp_path: Path) -> None:
    faults, entries, code = SCENARIOS[name]
    inv = inventory(tmp_path, faults)
    opts = ["--inventory", str(inv)]
    wopts = []
    if entries:
        w = waivers(tmp_path, *entries)
        opts += ["--waivers", str(w)]
        wopts += ["--waivers", str(w)]
    plain = plain_pytest(fake_checks, tmp_path, *opts)
    wrapped, doc = wrapper(fake_checks, tmp_path, inv, *wopts)
    assert plain.rc == code, plain.out + plain.err
    assert wrapped.rc == code, wrapped.out + wrapped.err
    assert plain.junit is not None and wrapped.junit is not None
    valid_junit(plain.junit)
    valid_junit(wrapped.junit)
    statuses = {(r["host"], r["check"]): r["status"] for r in doc["results"]}
    assert len(statuses) == 9
    assert junit_statuses(plain.junit) == statuses == junit_statuses(wrapped.junit)
    assert doc["exit_code"] == code
    # a line per host as it completes, from pytest itself as from the wrapper
    for run in (plain, wrapped):
        assert "k8s-a: 3 passed" in run.out, run.out


def test_plain_pytest_from_a_repository_root_with_its_own_pytest_config(
    fake_checks: Path, tmp_path: Path
) -> None:
    """`pytest checks/ --inventory inventory/x.py` from a repository's root: pytest takes the
    repository's own config (the inventory's path counts when it finds the rootdir), this
    project's included, with warnings as errors. Seen failing: the conftest imported the
    plugin before pytest registered it, a PytestAssertRewriteWarning, exit 1 before any host."""
    repo = tmp_path / "repo"
    shutil.copytree(fake_checks, repo / "checks")
    (repo / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nfilterwarnings = ["error", "ignore::DeprecationWarning"]\n'
    )
    (repo / "inventory").mkdir()
    inv = inventory(repo / "inventory", {"k8s-b": {"sysctls": "fail"}})
    junit = tmp_path / "plain.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "checks/",
        "--inventory",
        str(inv.relative_to(repo)),
        "--junitxml",
        str(junit),
    ]
    plain = _run(cmd, junit, repo / "checks", repo)
    assert "configfile: pyproject.toml" in plain.out, plain.out + plain.err
    assert plain.rc == 1, plain.out + plain.err
    assert plain.junit is not None
    assert "k8s-b: 2 passed, 1 failed" in plain.out, plain.out


def test_waived_failure_is_xfailed_with_justification_and_expiry(
    fake_checks: Path, tmp_path: Path
) -> None:
    inv = inventory(tmp_path, {"k8s-b": {"sysctls": "fail", "knob_present": "fail"}})
    w = waivers(tmp_path, waiver("sysctls", TODAY), waiver("knob_present", TODAY - dt.timedelta(3)))
    plain = plain_pytest(
        fake_checks, tmp_path, "--inventory", str(inv), "--waivers", str(w), "-rxf"
    )
    assert plain.rc == 1, plain.out
    reason = f"waived until {TODAY}: TICKET-9 kernel ahead ({w}: waivers[0] (host k8s-b))"
    assert f"test_fake.py::test_sysctls[k8s-b] - {reason}" in plain.out, plain.out
    expired = f"waiver expired on {(TODAY - dt.timedelta(3)).isoformat()}: {w}: waivers[1]"
    assert expired in plain.out
    assert "k8s-b: 1 passed, 1 failed, 1 waived" in plain.out
    assert plain.junit is not None
    [skipped] = plain.junit.findall(".//testcase/skipped")
    assert skipped.get("type") == "pytest.xfail" and skipped.get("message") == reason
    [failure] = plain.junit.findall(".//testcase/failure")
    props = {p.get("name"): p.get("value") for p in failure.getparent().iter("property")}
    assert props["drift"] == "net.ipv4.vs.expire_nodest_conn: expected 1, actual 0"
    assert props["host"] == "k8s-b" and props["host_class"] == "k8s_node"
    assert props["check"] == "knob_present" and props["groups"] == "k8s_nodes,inv"
    assert props["fix"].endswith(f": pyinfra -y {inv} deploy.py --limit k8s-b")
    assert expired in (failure.text or "")
    valid_junit(plain.junit)
    del plain.junit.find(".//testcase").attrib["classname"]
    assert not etree.XMLSchema(etree.parse(str(XSD))).validate(plain.junit), "the schema bites"

    wrapped, doc = wrapper(fake_checks, tmp_path, inv, "--waivers", str(w))
    assert wrapped.rc == 1
    res = {r["check"]: r for r in doc["results"] if r["host"] == "k8s-b"}
    assert res["sysctls"]["status"] == "waived"
    assert res["sysctls"]["waiver"]["justification"] == "TICKET-9 kernel ahead"
    assert res["sysctls"]["details"] == {"seen": "sysctls"}
    assert res["knob_present"]["waiver"]["expired"] is True
    assert res["knob_present"]["drift"] == [
        {"key": "net.ipv4.vs.expire_nodest_conn", "expected": "1", "actual": "0"}
    ]
    assert "k8s-b / sysctls: waived until" in wrapped.out
    assert expired in wrapped.out


def test_a_waiver_for_an_unknown_check_is_a_usage_error_before_any_host(tmp_path: Path) -> None:
    """With the real checks: the inventory's host listens on loopback and is never called."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        srv.setblocking(False)
        port = srv.getsockname()[1]
        known = tmp_path / "known_hosts"
        known.write_text("")
        inv = tmp_path / "inv.py"
        inv.write_text(
            f'hosts = [("h1", {{"ipvs_host_class": "k8s_node", "ssh_hostname": '
            f'"127.0.0.1", "ssh_port": {port}, "ssh_known_hosts_file": "{known}"}})]\n'
        )
        w = waivers(tmp_path, waiver("sysctl", TODAY, "host: h1"))
        checks = checks_dir()
        plain = plain_pytest(checks, tmp_path, "--inventory", str(inv), "--waivers", str(w))
        wrapped, _ = wrapper(checks, tmp_path, inv, "--waivers", str(w))
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected
    assert plain.rc == pytest.ExitCode.USAGE_ERROR and wrapped.rc == 2
    for run in (plain, wrapped):
        assert f"{w}: waivers[0] (host h1): unknown check 'sysctl'" in run.err, run.err
        assert "Traceback" not in run.err


def test_real_checks_on_an_unreachable_host_give_one_verdict(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends
    known = tmp_path / "known_hosts"
    known.write_text("")
    inv = tmp_path / "inv.py"
    inv.write_text(
        f'hosts = [("gone", {{"ipvs_host_class": "k8s_node", "ssh_hostname": '
        f'"127.0.0.1", "ssh_port": {port}, "ssh_known_hosts_file": "{known}"}})]\n'
    )
    checks = checks_dir()
    plain = plain_pytest(checks, tmp_path, "--inventory", str(inv))
    wrapped, doc = wrapper(checks, tmp_path, inv)
    assert plain.rc == wrapped.rc == 2, plain.out + wrapped.out
    assert plain.junit is not None and wrapped.junit is not None
    valid_junit(plain.junit)
    statuses = {(r["host"], r["check"]): r["status"] for r in doc["results"]}
    assert len(statuses) == 13 and set(statuses.values()) == {"error"}
    assert junit_statuses(plain.junit) == statuses == junit_statuses(wrapped.junit)
    assert "gone: 13 error" in plain.out and "gone: 13 error" in wrapped.out
