"""`ipvs-fleet check` against the converged lab: compliant, drift, stock modules, waivers.

Each run is the real CLI in a subprocess (as CI runs it) against the lab's pyinfra inventory.
Destructive tests put back what they changed before they finish.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.fixtures.artifacts import artifacts_with
from tests.fixtures.lab import KUBE_PROXY_NAT, KUBE_PROXY_NAT_UNDO

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
XSD = REPO / "tests" / "data" / "junit.xsd"
IPVS_FLEET = Path(sys.executable).with_name("ipvs-fleet")
PYINFRA = Path(sys.executable).with_name("pyinfra")
SYSCTL_FILE = "/etc/sysctl.d/90-ipvs-fleet.conf"
PROBE_DIR = REPO / "src" / "ipvs_fleet" / "probe"
REMOTE = "/run/ipvs-fleet-check"
SCENARIO = f"{REMOTE}/scenario.py"  # the probe's module swapper
# Checks a host with stock modules (but the fleet's files) fails.
STOCK_FAILS = {"patched_module", "knob_present", "sysctls", "latency_budget"}


@dataclass
class CheckRun:
    rc: int
    out: str
    err: str
    seconds: float
    doc: dict[str, Any]
    junit: Path

    def status(self, host: str) -> dict[str, str]:
        return {r["check"]: r["status"] for r in self.doc["results"] if r["host"] == host}


class Checker:
    def __init__(self, inventory: Path, env: dict[str, str], tmp: Path) -> None:
        self.inventory, self.env, self.tmp = inventory, env, tmp
        self.n = 0

    def run(self, *args: str) -> CheckRun:
        self.n += 1
        junit, js = self.tmp / f"junit-{self.n}.xml", self.tmp / f"check-{self.n}.json"
        cmd = [str(IPVS_FLEET), "check", str(self.inventory), "--junitxml", str(junit),
               "--json", str(js), *args]
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True,
                           timeout=300)
        secs = time.monotonic() - t0
        doc = json.loads(js.read_text()) if js.exists() else {}
        print(f"$ {' '.join(cmd)}  -> exit {r.returncode} in {secs:.1f} s\n{r.stdout}{r.stderr}")
        return CheckRun(r.returncode, r.stdout, r.stderr, secs, doc, junit)


@pytest.fixture(scope="module")
def checker(deployer: Any, deployed: Any, tmp_path_factory: pytest.TempPathFactory) -> Checker:
    return Checker(deployer.inventory, deployer.env, tmp_path_factory.mktemp("checks"))


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
    assert len(cases) == 9 * len(lab.hosts)  # a testcase per host and check
    assert all(len(c) == 0 for c in cases), "every testcase passes"
    assert root.get("failures") == "0" and root.get("errors") == "0"
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
        r = subprocess.run([str(PYINFRA), *converge[1:]], cwd=REPO, env=checker.env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert checker.run("--limit", k8s_host).rc == 0
    finally:
        lab.run(k8s_host, f"sysctl -qp {SYSCTL_FILE}", check=False)


@pytest.fixture
def stock_modules(lab: Any, k8s_host: str) -> Iterator[str]:
    """k8s_host running the kernel's stock IPVS modules, as after a kernel upgrade without an
    artifact: boot loads the stock set, then applies the fleet's sysctl file."""
    loaded = lab.run(k8s_host, "awk '$1 ~ /^(ip_vs|xt_ipvs)/ {print $1}' /proc/modules").stdout
    # ip_vs first: the others depend on it; modprobe picks the patched set from updates/.
    before = sorted(loaded.split(), key=lambda m: m != "ip_vs")
    for name in ("probe.py", "scenario.py"):
        lab.run(k8s_host, f"mkdir -p {REMOTE} && cat > {REMOTE}/{name}",
                input=(PROBE_DIR / name).read_text())
    lab.run(k8s_host, f"python3 {SCENARIO} modules stock && (sysctl -qp {SYSCTL_FILE} || true)",
            timeout=300)
    try:
        yield k8s_host
    finally:
        # Exactly the modules that were loaded before (scenario.py's own set adds ip_vs_ftp,
        # which the deploy's FTP interlock would then find on this k8s host).
        lab.run(k8s_host, f"python3 {SCENARIO} restore {' '.join(before)} && "
                f"sysctl -qp {SYSCTL_FILE}", timeout=300)


@pytest.mark.destructive
def test_stock_modules_waived_then_expired(
    checker: Checker, stock_modules: str, tmp_path: Path
) -> None:
    host = stock_modules

    def waivers(expires: dt.date) -> Path:
        p = tmp_path / f"waivers-{expires}.yml"
        p.write_text("waivers:\n" + "".join(
            f"  - host: {host}\n    check: {c}\n"
            f"    justification: kernel upgrade ahead of its module build (TEST-1)\n"
            f"    expires: {expires.isoformat()}\n"
            for c in sorted(STOCK_FAILS)
        ))
        return p

    today = dt.date.today()
    waived = checker.run("--limit", host, "--waivers", str(waivers(today + dt.timedelta(7))))
    assert waived.rc == 0, waived.out
    assert set(waived.status(host).items()) >= {(c, "waived") for c in STOCK_FAILS}
    assert "Waivers:" in waived.out and "TEST-1" in waived.out
    root = _valid_junit(waived.junit)
    assert len(root.findall(".//testcase/skipped")) == len(STOCK_FAILS)

    expired = checker.run("--limit", host, "--waivers", str(waivers(today - dt.timedelta(1))))
    assert expired.rc == 1
    assert "stock module loaded: ip_vs" in expired.out
    assert "waiver expired on" in expired.out
    assert {c for c, s in expired.status(host).items() if s == "failed"} == STOCK_FAILS


@pytest.mark.destructive
def test_reuse_safety_fails_for_a_retrack_build_behind_kube_proxy_nat(
    checker: Checker, lab: Any, k8s_host: str, artifacts: Any, retrack_artifact: Any,
    deployer: Any, tmp_path: Path,
) -> None:
    """A host that runs a 1.x (re-track) set with knob=1, then gets kube-proxy's masquerade
    rules: the reuse_safety check fails naming the design and the rule (the deploy would now
    refuse it: tests/lab/test_deploy.py). The host gets the shipped set back afterwards."""
    if lab.hosts[k8s_host].kernel_release != retrack_artifact.kernel_release:
        pytest.fail(f"the retrack variant is built for {retrack_artifact.kernel_release}; "
                    f"{k8s_host} runs {lab.hosts[k8s_host].kernel_release}")
    arts = artifacts_with(artifacts, retrack_artifact, tmp_path / "artifacts")
    retrack = type(deployer)(deployer.inventory, dict(deployer.env, IPVS_FLEET_ARTIFACTS=str(arts)))
    retrack.run("deploy.py", "--limit", k8s_host)  # no nat rule yet: the interlock lets it in
    lab.run(k8s_host, KUBE_PROXY_NAT)
    try:
        run = checker.run("--limit", k8s_host)
        assert run.rc == 1
        status = run.status(k8s_host)
        assert status["reuse_safety"] == "failed", status
        [res] = [r for r in run.doc["results"]
                 if r["host"] == k8s_host and r["check"] == "reuse_safety"]
        message = " ".join(res["message"].split())
        assert "reuse design is 'consistent'" in message, message
        assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in message, message
        # besides: the loaded set is not the fleet's build (the check names the retrack set);
        # the knob, the values and the persisted files are the class's
        assert {c for c, s in status.items() if s == "failed"} == {
            "reuse_safety", "patched_module"}, status
        assert ".retrack" in run.out, run.out
    finally:
        lab.run(k8s_host, KUBE_PROXY_NAT_UNDO, check=False)
        deployer.run("deploy.py", "--limit", k8s_host)
