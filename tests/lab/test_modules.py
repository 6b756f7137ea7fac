"""The built fix module on the lab's real kernels: load beside the stock ip_vs, identify,
knob, table, taint, unload; and the test-only variants the checks must catch.

Each test leaves the host's IPVS state as it found it: the loaded modules (as modprobe
resolves them), the sysctl.d values and the IPVS table are restored afterwards. No test
unloads ip_vs: the fix module comes and goes beside it.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from ipvs_fleet.build.artifact import Artifact
from ipvs_fleet.kernel import MODINFO_REUSE, MODINFO_SET, MODULE_NAME
from ipvs_fleet.kernel.sysctls import READ_ALL_IN_FRESH_NETNS, integrity_problems, parse_dump
from ipvs_fleet.lab.fleet import load_fleet
from tests.fixtures.lab import OE_TAINT

pytestmark = [pytest.mark.lab, pytest.mark.destructive]

TEST_DIR = "/root/ipvs-fleet-test"
KNOB = "/proc/sys/net/ipv4/vs/conn_reuse_old_conntrack"


def host_for(lab: Any, release: str) -> str:
    """The lab host booting `release`'s kernel (the test fails if the lab has none)."""
    for name, h in lab.hosts.items():
        if h.release == release:
            return str(name)
    raise AssertionError(f"the lab has no {release} host: {sorted(lab.hosts)}")


def sh(lab: Any, host: str, cmd: str, check: bool = True) -> str:
    return str(lab.run(host, cmd, check=check, timeout=300).stdout)


@contextmanager
def fix_module_out(lab: Any, host: str) -> Iterator[None]:
    """ip_vs_reuse unloaded for the block (IPVS and its table stay), then loaded again if it
    was, with the host's class values (sysctl.d)."""
    was = sh(lab, host, f"test -d /sys/module/{MODULE_NAME} && echo yes; true").strip() == "yes"
    table = sh(lab, host, "ipvsadm-save -n 2>/dev/null || true")
    sh(lab, host, f"rmmod {MODULE_NAME} 2>/dev/null; modprobe ip_vs; true")
    try:
        yield
    finally:
        sh(lab, host, f"rmmod {MODULE_NAME} 2>/dev/null; rm -rf {TEST_DIR}; true")
        if was:
            sh(lab, host, f"modprobe {MODULE_NAME} && sysctl --system >/dev/null")
        assert sh(lab, host, "ipvsadm-save -n 2>/dev/null || true") == table, "table changed"


def unpack(lab: Any, host: str, art: Artifact) -> str:
    """Copy the artifact's tarball to `host` and unpack it into TEST_DIR (its path back)."""
    data = base64.b64encode(art.tarball.read_bytes()).decode()
    lab.run(
        host,
        f"rm -rf {TEST_DIR} && mkdir -p {TEST_DIR} && base64 -d | tar -xzf - -C {TEST_DIR}",
        input=data,
    )
    return TEST_DIR


# The releases of the lab fleet in use (lab/fleet.yml, or lab/fleet-7.2.yml for make test-7.2).
@pytest.mark.parametrize("release", load_fleet().releases())
def test_fix_module_loads_beside_the_stock_ip_vs_and_identifies_itself(
    lab: Any, artifacts: dict[str, Artifact], release: str
) -> None:
    host = host_for(lab, release)
    kr = lab.hosts[host].kernel_release
    assert kr in artifacts, f"no artifact for {host}'s kernel {kr}"
    art = artifacts[kr]
    line = lab.hosts[host].line
    assert sorted(art.modules) == [f"{MODULE_NAME}.ko"]
    assert art.reuse_design == "prekill"
    with fix_module_out(lab, host):
        stock_ip_vs = sh(lab, host, "cat /sys/module/ip_vs/taint").strip()
        assert stock_ip_vs == "", f"ip_vs is not the distro's own build (taint {stock_ip_vs})"
        d = unpack(lab, host, art)
        sh(lab, host, f"insmod {d}/{MODULE_NAME}.ko")
        loaded = sh(lab, host, f"cat /sys/module/{MODULE_NAME}/version").strip()
        assert loaded == art.set_id
        ko = f"{d}/{MODULE_NAME}.ko"
        assert sh(lab, host, f"modinfo -F {MODINFO_SET} {ko}").strip() == art.set_id
        assert sh(lab, host, f"modinfo -F {MODINFO_REUSE} {ko}").strip() == "prekill"
        # It holds ip_vs (a module reference), and ip_vs itself is still the stock one.
        assert MODULE_NAME in sh(lab, host, "ls /sys/module/ip_vs/holders").split()
        assert sh(lab, host, "cat /sys/module/ip_vs/taint").strip() == ""

        # The knob, in a fresh netns (per-netns value; the host's own is untouched), and the
        # module's counters there.
        out = sh(
            lab,
            host,
            "unshare --net sh -c "
            + shlex.quote(
                f"cat {KNOB}; echo 0 > {KNOB} && cat {KNOB}; echo 1 > {KNOB} && cat {KNOB}; "
                f"if echo 2 > {KNOB}; then echo accepted-2; else echo refused-2; fi; cat {KNOB}; "
                "cat /proc/net/ip_vs_reuse"
            ),
        )
        # default 0 (the stock drop until the policy sets it), 0..1 only
        assert out.split()[:5] == ["0", "0", "1", "refused-2", "1"], out
        assert out.split()[5:] == ["enabled", "1", "killed_tcp", "0", "killed_udp", "0"], out

        # Table integrity: every IPVS sysctl of a fresh netns reads its documented default.
        dump = parse_dump(sh(lab, host, READ_ALL_IN_FRESH_NETNS))
        assert integrity_problems(line, dump) == []

        # Unsigned out-of-tree module: O and E, nothing else (no warning, no forced load).
        assert int(sh(lab, host, "cat /proc/sys/kernel/tainted")) == OE_TAINT
        assert "OE" in sh(lab, host, f"cat /sys/module/{MODULE_NAME}/taint")

        # Unloaded, the knob goes and ip_vs stays, the stock one.
        sh(lab, host, f"rmmod {MODULE_NAME}")
        assert sh(
            lab, host, f"test -e {KNOB} && echo knob; lsmod | grep -c '^ip_vs '; true"
        ).split() == ["1"]
        assert not [
            w for w in sh(lab, host, "dmesg").splitlines() if "WARNING" in w or "BUG" in w
        ], "a kernel warning"


def test_integrity_check_catches_a_wrong_knob_default(lab: Any, baddefault_artifact: Artifact):
    """The test-only variant whose knob reads 1 in a new netns: the check names it."""
    host = host_for(lab, baddefault_artifact.release)
    line = lab.hosts[host].line
    with fix_module_out(lab, host):
        d = unpack(lab, host, baddefault_artifact)
        sh(lab, host, f"insmod {d}/{MODULE_NAME}.ko")
        dump = parse_dump(sh(lab, host, READ_ALL_IN_FRESH_NETNS))
        problems = integrity_problems(line, dump)
        assert problems == ["conn_reuse_old_conntrack: reads 1, default is 0"], problems
