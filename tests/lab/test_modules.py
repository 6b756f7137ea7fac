"""The built module sets on the lab's real kernels: install, load, identify, knob, table, taint.

Each test leaves the host's IPVS state as it found it: the loaded modules (as modprobe
resolves them), the sysctl.d values and the IPVS table are restored afterwards.
"""

from __future__ import annotations

import base64
import shlex
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from ipvs_fleet.build.artifact import Artifact
from ipvs_fleet.kernel import MODINFO_REUSE, MODINFO_SET
from ipvs_fleet.kernel.sysctls import READ_ALL_IN_FRESH_NETNS, integrity_problems, parse_dump
from ipvs_fleet.lab.fleet import load_fleet
from tests.fixtures.lab import OE_TAINT, UNLOAD_ALL

pytestmark = [pytest.mark.lab, pytest.mark.destructive]

TEST_SUBDIR = "updates/ipvs-fleet-test"


def host_for(lab: Any, release: str) -> str:
    """The lab host booting `release`'s kernel (the test fails if the lab has none)."""
    for name, h in lab.hosts.items():
        if h.release == release:
            return str(name)
    raise AssertionError(f"the lab has no {release} host: {sorted(lab.hosts)}")


def sh(lab: Any, host: str, cmd: str, check: bool = True) -> str:
    return str(lab.run(host, cmd, check=check, timeout=300).stdout)


@contextmanager
def ipvs_state_kept(lab: Any, host: str) -> Iterator[None]:
    """Save the loaded IPVS modules and table; restore them (and sysctl.d) afterwards."""
    loaded = sh(lab, host, "lsmod | awk '$1 ~ /^(ip_vs|xt_ipvs)/ {print $1}'").split()
    table = sh(lab, host, "ipvsadm-save -n 2>/dev/null || true")
    try:
        yield
    finally:
        restore = [UNLOAD_ALL, f"rm -rf /lib/modules/$(uname -r)/{TEST_SUBDIR}", "depmod -a"]
        restore += [f"modprobe {m}" for m in sorted(loaded, key=lambda m: m != "ip_vs")]
        if loaded:
            restore.append("sysctl --system >/dev/null")
        sh(lab, host, " && ".join(restore))
        if table.strip():
            lab.run(host, "ipvsadm-restore", input=table)


def install(lab: Any, host: str, art: Artifact, subdir: str) -> str:
    """Copy the artifact's tarball to `host` and unpack it into `subdir` (full path back)."""
    d = f"/lib/modules/{art.kernel_release}/{subdir}" if subdir.startswith("updates") else subdir
    data = base64.b64encode(art.tarball.read_bytes()).decode()
    lab.run(host, f"rm -rf {d} && mkdir -p {d} && base64 -d | tar -xzf - -C {d}", input=data)
    return d


# The releases of the lab fleet in use (lab/fleet.yml, or lab/fleet-7.2.yml for make test-7.2).
@pytest.mark.parametrize("release", load_fleet().releases())
def test_patched_set_loads_and_identifies_itself(
    lab: Any, artifacts: dict[str, Artifact], release: str
) -> None:
    host = host_for(lab, release)
    kr = lab.hosts[host].kernel_release
    assert kr in artifacts, f"no artifact for {host}'s kernel {kr}"
    art = artifacts[kr]
    line = lab.hosts[host].line
    with ipvs_state_kept(lab, host):
        sh(lab, host, UNLOAD_ALL)
        d = install(lab, host, art, TEST_SUBDIR)
        sh(lab, host, "depmod -a && modprobe ip_vs && modprobe ip_vs_rr && modprobe xt_ipvs")
        # The loaded module is the artifact's file, found by kmod in updates/.
        assert sh(lab, host, "modinfo -n ip_vs").strip().startswith(f"/lib/modules/{kr}/updates/")
        loaded_sv = sh(lab, host, "cat /sys/module/ip_vs/srcversion").strip()
        assert loaded_sv == sh(lab, host, f"modinfo -F srcversion {d}/ip_vs.ko").strip()
        for m in ("ip_vs", "ip_vs_rr", "xt_ipvs"):
            assert sh(lab, host, f"modinfo -F {MODINFO_SET} {m}").strip() == art.set_id
        assert sh(lab, host, f"modinfo -F {MODINFO_REUSE} ip_vs").strip() == art.reuse_design
        assert art.reuse_design == "handback"

        # The knob, in a fresh netns (per-netns value; the host's own is untouched).
        knob = "/proc/sys/net/ipv4/vs/conn_reuse_old_conntrack"
        out = sh(
            lab,
            host,
            "unshare --net sh -c "
            + shlex.quote(
                f"cat {knob}; echo 0 > {knob} && cat {knob}; echo 1 > {knob} && cat {knob}; "
                f"if echo 2 > {knob}; then echo accepted-2; else echo refused-2; fi; cat {knob}"
            ),
        )
        # default 0 (the stock drop until the policy sets it), 0..1 only
        assert out.split() == ["0", "0", "1", "refused-2", "1"], out

        # Table integrity: every IPVS sysctl of a fresh netns reads its documented default.
        dump = parse_dump(sh(lab, host, READ_ALL_IN_FRESH_NETNS))
        assert integrity_problems(line, dump) == []

        # Unsigned out-of-tree modules: O and E, nothing else (no warning, no forced load).
        assert int(sh(lab, host, "cat /proc/sys/kernel/tainted")) == OE_TAINT
        assert "OE" in sh(lab, host, "cat /sys/module/ip_vs/taint")


def test_integrity_check_catches_a_dislocated_table(lab: Any, dislocated_artifact: Artifact):
    """The seed's bug (idx++ without a vs_vars[] entry), built on purpose: the check fails."""
    host = host_for(lab, dislocated_artifact.release)
    line = lab.hosts[host].line
    with ipvs_state_kept(lab, host):
        sh(lab, host, UNLOAD_ALL)
        d = install(lab, host, dislocated_artifact, "/root/ipvs-fleet-dislocated")
        sh(lab, host, f"insmod {d}/ip_vs.ko")
        dump = parse_dump(sh(lab, host, READ_ALL_IN_FRESH_NETNS))
        problems = integrity_problems(line, dump)
        assert "schedule_icmp: reads 1, default is 0" in problems, problems
        assert "run_estimation: reads 0, default is 1" in problems, problems
        assert "conn_reuse_old_conntrack: missing" in problems, problems
        sh(lab, host, f"rm -rf {d}")
