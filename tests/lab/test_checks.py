"""`ipvs-fleet check` against the converged lab: compliant, drift, no fix module, waivers.

Each run is the real CLI in a subprocess (as CI runs it) against the lab's pyinfra inventory.
Destructive tests put back what they changed before they finish. A test-only build of the fix
module is loaded with `insmod` beside the stock ip_vs (after `rmmod ip_vs_reuse`), never by
unloading IPVS; `modprobe ip_vs_reuse` puts the fleet's build back.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from ipvs_fleet.policy import KNOB
from tests.fixtures.checks import Checker, CheckRun
from tests.fixtures.inventory import inventory_with
from tests.fixtures.lab import KUBE_PROXY_NAT, KUBE_PROXY_NAT_UNDO

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
XSD = REPO / "tests" / "data" / "junit.xsd"
PYINFRA = Path(sys.executable).with_name("pyinfra")
SYSCTL_FILE = "/etc/sysctl.d/90-ipvs-fleet.conf"
FIX = "ip_vs_reuse"
# The fleet's build back, as boot loads it (modprobe.d applies the class's values after it).
FLEET_FIX = f"modprobe {FIX} && sysctl -qp {SYSCTL_FILE}"
# Checks a host with only the stock modules (but the fleet's files) fails.
STOCK_FAILS = {"patched_module", "knob_present", "sysctls", "latency_budget"}


def _insmod_variant(lab: Any, host: str, artifact: Any, d: str) -> None:
    """`artifact`'s ip_vs_reuse.ko loaded on `host` in place of the fleet's build, beside the
    stock ip_vs (IPVS and its tables stay), with the class's values applied as modprobe does."""
    data = base64.b64encode(artifact.tarball.read_bytes()).decode()
    lab.run(host, f"rm -rf {d} && mkdir -p {d} && base64 -d | tar -xzf - -C {d}", input=data)
    lab.run(
        host,
        f"{{ [ ! -d /sys/module/{FIX} ] || rmmod {FIX}; }} && "
        f"insmod {d}/{FIX}.ko && sysctl -qp {SYSCTL_FILE}",
    )


def _fleet_fix_back(lab: Any, host: str, d: str) -> None:
    lab.run(host, f"rm -rf {d}; {{ [ ! -d /sys/module/{FIX} ] || rmmod {FIX}; }} && {FLEET_FIX}")


@pytest.fixture(scope="module")
def k8s_host(lab: Any) -> str:
    return next(n for n, h in sorted(lab.hosts.items()) if h.host_class == "k8s_node")


def _valid_junit(path: Path) -> etree._Element:
    schema = etree.XMLSchema(etree.parse(str(XSD)))
    doc = etree.parse(str(path))
    assert schema.validate(doc), schema.error_log
    return doc.getroot()


def test_converged_lab_is_compliant(checker: Checker, lab: Any) -> None:
    run = checker.run()
    assert run.rc == 0, run.out
    root = _valid_junit(run.junit)
    cases = root.findall(".//testcase")
    assert len(cases) == 13 * len(lab.hosts)  # a testcase per host and check
    # pytest's JUnit: a passing testcase holds only its properties (host, class, check)
    assert all([k.tag for k in c] == ["properties"] for c in cases), "every testcase passes"
    # pytest's JUnit: the counts are on its one testsuite
    [suite] = root.findall("testsuite")
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert suite.get("tests") == str(len(cases))
    # Speed is measured, not asserted (under TCG on a loaded 2-core host the wall time varies
    # from 25 to 47 s): the figure is printed for the notes.
    print(f"check wall time: {run.doc['wall_seconds']} s for {len(lab.hosts)} hosts")


@pytest.mark.destructive
def test_hand_changed_sysctl_is_drift_with_converge_command(
    checker: Checker, lab: Any, k8s_host: str
) -> None:
    lab.run(k8s_host, "sysctl -qw net.ipv4.vs.expire_nodest_conn=0")
    try:
        run = checker.run("--limit", k8s_host)
        assert run.rc == 1
        assert f"{k8s_host} / sysctls: FAILED" in run.out
        assert "net.ipv4.vs.expire_nodest_conn: expected 1, actual 0" in run.out
        [failed] = [r for r in run.doc["results"] if r["status"] == "failed"]
        assert failed["drift"] == [
            {"key": "net.ipv4.vs.expire_nodest_conn", "expected": "1", "actual": "0"}
        ]
        converge = failed["converge"].split()
        assert converge[:2] == ["pyinfra", "-y"] and converge[-2:] == ["--limit", k8s_host]
        _valid_junit(run.junit)
        # The command the report gives brings the host back.
        r = subprocess.run(
            [str(PYINFRA), *converge[1:]],
            cwd=REPO,
            env=checker.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert checker.run("--limit", k8s_host).rc == 0
    finally:
        lab.run(k8s_host, f"sysctl -qp {SYSCTL_FILE}", check=False)


@pytest.fixture
def stock_modules(lab: Any, k8s_host: str) -> Iterator[str]:
    """k8s_host running only the kernel's stock IPVS modules, as after a kernel upgrade
    without an artifact: boot loads the stock ones, ip_vs_reuse has no build to load."""
    lab.run(k8s_host, f"rmmod {FIX}")  # IPVS and its tables stay
    try:
        yield k8s_host
    finally:
        lab.run(k8s_host, FLEET_FIX)


@pytest.mark.destructive
def test_stock_modules_waived_then_expired(
    checker: Checker, stock_modules: str, tmp_path: Path
) -> None:
    host = stock_modules

    def waivers(expires: dt.date) -> Path:
        p = tmp_path / f"waivers-{expires}.yml"
        p.write_text(
            "waivers:\n"
            + "".join(
                f"  - host: {host}\n    check: {c}\n"
                f"    justification: kernel upgrade ahead of its module build (TEST-1)\n"
                f"    expires: {expires.isoformat()}\n"
                for c in sorted(STOCK_FAILS)
            )
        )
        return p

    today = dt.date.today()
    waived = checker.run("--limit", host, "--waivers", str(waivers(today + dt.timedelta(7))))
    assert waived.rc == 0, waived.out
    assert set(waived.status(host).items()) >= {(c, "waived") for c in STOCK_FAILS}
    assert "Waivers:" in waived.out and "TEST-1" in waived.out
    root = _valid_junit(waived.junit)
    skipped = root.findall(".//testcase/skipped")
    assert len(skipped) == len(STOCK_FAILS)
    # waived = pytest's xfail, its reason the waiver's expiry and justification
    assert all(
        x.get("type") == "pytest.xfail" and "TEST-1" in x.get("message", "") for x in skipped
    )

    expired = checker.run("--limit", host, "--waivers", str(waivers(today - dt.timedelta(1))))
    assert expired.rc == 1
    assert f"{FIX}: expected loaded (the build in /lib/modules/" in expired.out
    assert "absent (ip_vs_reuse not loaded)" in expired.out
    assert "waiver expired on" in expired.out
    assert {c for c, s in expired.status(host).items() if s == "failed"} == STOCK_FAILS


@pytest.mark.destructive
def test_reuse_safety_fails_for_a_module_without_a_design_behind_kube_proxy_nat(
    checker: Checker, lab: Any, k8s_host: str, nodesign_artifact: Any
) -> None:
    """A host whose ip_vs_reuse declares no reuse design (the test-only nodesign build, loaded
    beside the stock ip_vs) with knob=1, then kube-proxy's masquerade rules: the reuse_safety
    check fails naming the design and the rule (the deploy's interlock refuses such a build:
    tests/lab/test_deploy.py). The host gets the fleet's build back afterwards."""
    if lab.hosts[k8s_host].kernel_release != nodesign_artifact.kernel_release:
        pytest.fail(
            f"the nodesign variant is built for {nodesign_artifact.kernel_release}; "
            f"{k8s_host} runs {lab.hosts[k8s_host].kernel_release}"
        )
    d = "/root/ipvs-fleet-nodesign"
    _insmod_variant(lab, k8s_host, nodesign_artifact, d)
    lab.run(k8s_host, KUBE_PROXY_NAT)
    try:
        run = checker.run("--limit", k8s_host)
        assert run.rc == 1
        status = run.status(k8s_host)
        assert status["reuse_safety"] == "failed", status
        [res] = [
            r for r in run.doc["results"] if r["host"] == k8s_host and r["check"] == "reuse_safety"
        ]
        message = " ".join(res["message"].split())
        assert "reuse design is 'none'" in message, message
        assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in message, message
        # besides: the loaded ip_vs_reuse is not the fleet's build (the check names the
        # nodesign build's version); the knob, the values and the persisted files are the
        # class's
        assert {c for c, s in status.items() if s == "failed"} == {
            "reuse_safety",
            "patched_module",
        }, status
        assert ".nodesign" in run.out, run.out
    finally:
        lab.run(k8s_host, KUBE_PROXY_NAT_UNDO, check=False)
        _fleet_fix_back(lab, k8s_host, d)


# --- Every check seen failing on a real host, through `ipvs-fleet check` -------------------
# One run puts a different fault on each lab host, so one check run shows several checks
# failing; per host the test asserts exactly which checks fail (the others still pass), the
# expected and actual values and the fix the report gives.


def _result(run: CheckRun, host: str, check: str) -> dict[str, Any]:
    [res] = [r for r in run.doc["results"] if r["host"] == host and r["check"] == check]
    return res


def _failed(run: CheckRun, host: str) -> set[str]:
    return {c for c, s in run.status(host).items() if s != "passed"}


def _hosts_by_class(lab: Any) -> tuple[str, str, str]:
    """(the canary, the other k8s node, the FTP director) of the default lab fleet."""
    hosts = lab.hosts
    canary = next(n for n, h in sorted(hosts.items()) if "canary" in h.groups)
    node = next(n for n, h in sorted(hosts.items()) if h.host_class == "k8s_node" and n != canary)
    ftp = next(n for n, h in sorted(hosts.items()) if h.host_class == "ftp")
    return canary, node, ftp


def _checker_with_p99_zero(checker: Checker, lab: Any, tmp_path: Path, host_class: str) -> Checker:
    """A checker whose inventory gives the hosts of `host_class` a latency budget of p99 <= 0
    ms in their host data (over the lab's own budget), which no host meets."""
    zero = {"ipvs_latency_budget": {"p99_ms": 0}}
    hosts = [n for n, h in lab.hosts.items() if h.host_class == host_class]
    inv = inventory_with(checker.inventory, tmp_path / "inv.py", dict.fromkeys(hosts, zero))
    return Checker(inv, checker.env, tmp_path)


@pytest.mark.destructive
def test_persisted_drift_and_latency_budget_each_fail_alone(
    checker: Checker, lab: Any, tmp_path: Path
) -> None:
    """canary: its sysctl.d file says knob 0 while the live value is still 1 (the next boot
    would flip it); node: conn_reuse_mode forced to 0 as kube-proxy does; ftp: a latency
    budget (p99 <= 0 ms, in its host data) that no host can meet."""
    canary, node, ftp = _hosts_by_class(lab)
    strict = _checker_with_p99_zero(checker, lab, tmp_path, "ftp")
    lab.run(
        canary,
        f"cp -p {SYSCTL_FILE} /root/persisted.bak && sed -i "
        f"'s/^net.ipv4.vs.{KNOB} = 1$/net.ipv4.vs.{KNOB} = 0/' {SYSCTL_FILE}",
    )
    lab.run(node, "sysctl -qw net.ipv4.vs.conn_reuse_mode=0")
    try:
        run = strict.run()
        assert run.rc == 1, run.out
        _valid_junit(run.junit)
        assert _failed(run, canary) == {"persisted"}, run.status(canary)
        res = _result(run, canary, "persisted")
        assert {"key": f"{SYSCTL_FILE}: net.ipv4.vs.{KNOB}", "expected": "1", "actual": "0"} in res[
            "drift"
        ]
        assert res["fix"].startswith("rewrite the fleet's files: pyinfra -y ")
        assert res["converge"].endswith(f"deploy.py --limit {canary}")

        assert _failed(run, node) == {"sysctls", "kube_proxy_drift"}, run.status(node)
        res = _result(run, node, "kube_proxy_drift")
        [drift] = res["drift"]
        assert drift["key"] == "net.ipv4.vs.conn_reuse_mode" and drift["expected"] == "1"
        assert drift["actual"].startswith("0 (kube-proxy not running now")
        assert "kube-proxy forces conn_reuse_mode=0" in res["fix"]

        assert _failed(run, ftp) == {"latency_budget"}, run.status(ftp)
        res = _result(run, ftp, "latency_budget")
        assert re.search(r"p99 [\d.]+ ms above 0 ms", res["message"]), res["message"]
        assert "ipvs_latency_budget" in res["fix"] and res["converge"] is None
        assert f"{ftp} / latency_budget: the probe's figures are above" in run.out
    finally:
        lab.run(canary, f"mv /root/persisted.bak {SYSCTL_FILE}", check=False)
        lab.run(node, f"sysctl -qp {SYSCTL_FILE}", check=False)
    assert checker.run().rc == 0, "the faults were put back"


def test_the_strict_latency_budget_fails_on_a_patched_node_over_100_connects(
    checker: Checker, lab: Any, tmp_path: Path
) -> None:
    """The k8s_node budget as a converged node runs it (knob=1: 100 connects, no slow one
    allowed), with p99_ms 0 in its host data: latency_budget alone fails, on 100 connects,
    naming the p99 it measured. (The stock test fails the same check with 3 connects.)"""
    canary, _, _ = _hosts_by_class(lab)
    strict = _checker_with_p99_zero(checker, lab, tmp_path, "k8s_node")
    run = strict.run("--limit", canary)
    assert run.rc == 1, run.out
    assert _failed(run, canary) == {"latency_budget"}, run.status(canary)
    res = _result(run, canary, "latency_budget")
    assert re.search(r"p99 [\d.]+ ms above 0 ms", res["message"]), res["message"]
    assert "knob=1: 100 connects, 0 slow, 0 failed" in res["message"], res["message"]
    assert "ipvs_latency_budget" in res["fix"] and res["converge"] is None


@pytest.mark.destructive
def test_a_wrong_knob_default_fails_the_sysctl_table_check(
    checker: Checker, lab: Any, baddefault_artifact: Any
) -> None:
    """canary (its kernel is the baddefault variant's): ip_vs_reuse replaced by the build
    whose knob reads 1 in a new netns (the fleet's files stay). The taint check fails by a
    reboot-time fault:
    tests/lab/test_deploy.py::test_a_taint_fails_its_check_until_the_host_boots_again."""
    canary, _, _ = _hosts_by_class(lab)
    if lab.hosts[canary].kernel_release != baddefault_artifact.kernel_release:
        pytest.fail(
            f"the baddefault variant is built for {baddefault_artifact.kernel_release}; "
            f"{canary} runs {lab.hosts[canary].kernel_release}"
        )
    d = "/root/ipvs-fleet-baddefault"
    _insmod_variant(lab, canary, baddefault_artifact, d)
    try:
        run = checker.run("--limit", canary)
        assert run.rc == 1, run.out
        res = _result(run, canary, "sysctl_table")
        assert res["status"] == "failed", res
        want = (f"net.ipv4.vs.{KNOB} default in a new netns", "0", "1")
        assert want in {(x["key"], x["expected"], x["actual"]) for x in res["drift"]}, res
        assert "sysctl table is broken" in res["fix"]
        assert f"deploy/rollback.py --limit {canary}" in res["fix"]
        # The build is not the fleet's installed one: patched_module fails with it. The live
        # knob is the class's 1, the host's files, kernel and ruleset (no INVALID-drop or nat
        # rule: reuse_safety passes for a build of unknown design) are fine, and the build
        # still kills the stale entries, so the probe's reconnects stay fast.
        assert _failed(run, canary) == {"sysctl_table", "patched_module"}, run.status(canary)
    finally:
        _fleet_fix_back(lab, canary, d)
    assert checker.run("--limit", canary).rc == 0, "the host is back"
