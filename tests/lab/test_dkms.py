"""Build mode (`ipvs_install: dkms`) end to end: a bookworm VM whose image carries dkms, the
compiler and its kernel's own headers builds the fix module itself.

- a host missing its kernel's headers is refused up front, by name and version, nothing
  changed;
- the deploy builds with DKMS on the host, installs the build under updates/ipvs-fleet,
  loads it beside the stock ip_vs and sets the class's values; the loaded ip_vs_reuse
  carries the source's set id;
- a second run changes nothing; the checks pass; rollback removes the build and the DKMS
  registration and unloads the fix module.

Not in `make test` (the build under TCG takes minutes): `make test-dkms`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.lab import Lab
from ipvs_fleet.policy import KNOB
from tests.fixtures.deploy import Deployer
from tests.fixtures.lab import one_host_lab

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ipvs-fleet")
HOST = "dkms-node"
pytestmark = [pytest.mark.lab, pytest.mark.dkms, pytest.mark.destructive]
STATE = (
    "kr=$(uname -r); u=/lib/modules/$kr/updates/ipvs-fleet; "
    "echo loaded=$(cat /sys/module/ip_vs_reuse/version 2>/dev/null); "
    "echo installed=$(ls $u 2>/dev/null | wc -l); "
    "echo dkms=$(ls /var/lib/dkms/ipvs-fleet 2>/dev/null | tr '\\n' ' '); "
    f"echo knob=$(cat /proc/sys/net/ipv4/vs/{KNOB} 2>/dev/null)"
)


def state(lab: Lab) -> dict[str, str]:
    out = lab.run(HOST, STATE).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def dkms_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with one_host_lab(tmp_path_factory, HOST, build_tools=True, memory_mb=1536) as lab:
        yield lab


@pytest.fixture(scope="module")
def deployer(dkms_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Deployer:
    # No artifacts at all: build mode must not need one.
    env = dict(
        os.environ,
        IPVS_FLEET_LAB_DIR=str(dkms_lab.dir),
        IPVS_FLEET_ARTIFACTS=str(tmp_path_factory.mktemp("no-artifacts")),
    )
    return Deployer(dkms_lab.inventory_path, env)


def test_missing_headers_are_refused_by_name_and_version(dkms_lab, deployer):  # type: ignore[no-untyped-def]
    build = "/lib/modules/$(uname -r)/build"
    before = state(dkms_lab)
    dkms_lab.run(HOST, f"mv {build} /root/headers-build")
    try:
        r = deployer.run("deploy.py", "--data", "ipvs_install=dkms", check=False)
    finally:
        dkms_lab.run(HOST, f"mv /root/headers-build {build}")
    out = r.stdout + r.stderr
    assert r.rc != 0
    assert f"host {HOST}" in out and "ipvs_install=dkms: linux-headers-" in out, out[-3000:]
    assert "is not installed" in out, out[-3000:]
    assert state(dkms_lab) == before


def test_build_mode_builds_on_the_host_and_converges(dkms_lab, deployer):  # type: ignore[no-untyped-def]
    sid = kernel.set_id(kernel.module_sources())
    dkms_lab.run(
        HOST,
        "modprobe ip_vs && ipvsadm -A -t 10.99.0.5:80 -s rr && "
        "ipvsadm -a -t 10.99.0.5:80 -r 10.99.1.5:80 -m",
    )
    assert state(dkms_lab)["loaded"] == ""  # the stock build is loaded (no version field)
    r = deployer.run("deploy.py", "--data", "ipvs_install=dkms")
    print(f"build-mode deploy (DKMS build on a TCG VM included): {r.seconds:.1f} s")
    st = state(dkms_lab)
    assert st["loaded"] == sid, st
    assert st["installed"] == "1" and st["dkms"].split() == [sid], st
    assert st["knob"] == "1"
    # The activation kept the service table.
    assert "10.99.1.5:80" in dkms_lab.run(HOST, "ipvsadm -Ln").stdout
    again = deployer.run("deploy.py", "--data", "ipvs_install=dkms")
    assert again.totals["success"] == 0, f"changed on a no-op run: {again.changed()}"
    report = dkms_lab.dir / "check.json"
    env = dict(deployer.env)
    c = subprocess.run(
        [str(CLI), "check", str(dkms_lab.inventory_path), "--json", str(report)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert c.returncode == 0, c.stdout[-3000:] + c.stderr[-2000:]
    doc = json.loads(report.read_text())
    assert doc["exit_code"] == 0 and doc["classes"]["k8s_node"]["compliant"] == [HOST], doc
    assert not [r for r in doc["results"] if r["status"] in ("failed", "error")], doc["results"]


def test_rollback_removes_the_build_and_its_dkms_registration(dkms_lab, deployer):  # type: ignore[no-untyped-def]
    deployer.run("deploy/rollback.py")
    st = state(dkms_lab)
    assert st["loaded"] == "" and st["installed"] == "0" and st["dkms"] == "", st
    assert st["knob"] == ""
    assert not dkms_lab.run(HOST, "ls -d /usr/src/ipvs-fleet-* 2>/dev/null", check=False).stdout
