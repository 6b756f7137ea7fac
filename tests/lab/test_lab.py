"""The lab fleet end to end: real VMs, real Debian kernels, SSH with host keys checked.

Most tests use the session's `lab` (booted once). The life-cycle test (no-op up, a killed VM
reported as died, reboot, down stopping only its own VMs) boots one more VM in a lab dir of
its own, so the shared lab is never disturbed.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ipvs_fleet.debian import RELEASES
from ipvs_fleet.lab import Lab
from ipvs_fleet.lab.fleet import fleet_path
from tests.fixtures.deploy import REPO

pytestmark = pytest.mark.lab

PYINFRA = Path(sys.executable).with_name("pyinfra")


def cli(labdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IPVS_FLEET_LAB_DIR": str(labdir)}
    return subprocess.run(
        [sys.executable, "-m", "ipvs_fleet.cli", "lab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


def test_default_fleet_is_up(lab: Lab) -> None:
    assert {n: (h.release, h.host_class) for n, h in lab.hosts.items()} == {
        "k8s-canary": ("bookworm", "k8s_node"),
        "k8s-node-1": ("trixie", "k8s_node"),
        "ftp-director": ("bullseye", "ftp"),
    }


def test_up_with_a_fleet_file_that_differs_from_the_running_hosts_refuses(
    lab: Lab, tmp_path: Path
) -> None:
    """A running lab and a fleet file naming its hosts with another release (as after `make
    demo`, whose fleet is lab/fleet-demo.yml, then `lab up` with lab/fleet.yml): `up` says
    which host differs and how to go on, and leaves the VMs as they are."""
    names = list(lab.hosts)
    other = {"bookworm": "trixie"}.get(lab.hosts[names[0]].release, "bookworm")
    spec = yaml.safe_load(fleet_path().read_text())  # the session lab's own fleet file
    spec["hosts"][names[0]]["release"] = other
    fleet = tmp_path / "fleet.yml"
    fleet.write_text(yaml.safe_dump(spec, sort_keys=False))
    pids = {n: lab.vm_files(n).pidfile.read_text() for n in names}
    r = cli(lab.dir, "--fleet", str(fleet), "up")
    assert r.returncode == 2, r.stdout + r.stderr
    want = f"{names[0]} runs {lab.hosts[names[0]].release} as "
    assert want in r.stderr and f"wants {other} as " in r.stderr, r.stderr
    assert "ipvs-fleet lab down" in r.stderr, r.stderr
    assert all(n not in r.stderr for n in names[1:]), r.stderr  # only the one that differs
    assert {n: lab.vm_files(n).pidfile.read_text() for n in names} == pids
    assert all(lab.is_running(n) for n in names)


def test_each_vm_runs_its_own_kernel_line(lab: Lab) -> None:
    for name, h in lab.hosts.items():
        uname = lab.run(name, "uname -r").stdout.strip()
        assert uname == h.kernel_release
        assert h.line == RELEASES[h.release]
        assert uname.startswith(RELEASES[h.release] + ".")
        # The exact Debian package version the image pinned, not just the ABI name.
        assert h.kernel_version in lab.run(name, "cat /proc/version").stdout
        assert lab.run(name, "hostname").stdout.strip() == name


def test_modprobe_ip_vs_brings_its_sysctls(lab: Lab) -> None:
    for name in lab.hosts:
        loaded = lab.run(name, "grep -qw ^ip_vs /proc/modules", check=False).ok
        lab.run(name, "modprobe ip_vs")
        keys = lab.run(name, "ls /proc/sys/net/ipv4/vs/").stdout.split()
        assert {"conn_reuse_mode", "expire_nodest_conn", "conntrack"} <= set(keys), name
        if not loaded:  # leave the host as we found it
            lab.run(name, "modprobe -r ip_vs")


def test_run_reports_exit_code_and_streams(lab: Lab) -> None:
    r = lab.run("k8s-canary", "echo out; echo err >&2; exit 3", check=False)
    assert (r.rc, r.stdout, r.stderr) == (3, "out\n", "err\n")
    assert lab.run("k8s-canary", ["printf", "%s", "a b"]).stdout == "a b"
    assert lab.run("k8s-canary", "cat", input="fed").stdout == "fed"


def test_ssh_config_works_with_host_key_checking_on(lab: Lab, tmp_path: Path) -> None:
    # A connection of its own: a shared master would skip the host key check.
    ssh = ["ssh", "-F", str(lab.ssh_config), "-o", "ControlPath=none"]
    r = subprocess.run(
        [*ssh, "ftp-director", "hostname"], capture_output=True, text=True, timeout=120
    )
    assert (r.returncode, r.stdout.strip()) == (0, "ftp-director")
    # An unknown host key is refused: the check really is on.
    empty = tmp_path / "known_hosts"
    empty.touch()
    r = subprocess.run(
        [*ssh, "-o", f"UserKnownHostsFile={empty}", "ftp-director", "true"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 255
    assert "Host key verification failed" in r.stderr


def test_cli_status_and_ssh(lab: Lab) -> None:
    r = cli(lab.dir, "status")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in lab.hosts:
        assert any(line.split()[:3] == [name, "running", "ok"] for line in r.stdout.splitlines())
    r = cli(lab.dir, "ssh", "k8s-node-1", "--", "uname", "-r")
    assert (r.returncode, r.stdout.strip()) == (0, lab.hosts["k8s-node-1"].kernel_release)
    assert cli(lab.dir, "ssh", "k8s-node-1", "--", "exit 7").returncode == 7


def test_pyinfra_inventory_reaches_every_host(lab: Lab) -> None:
    env = {**os.environ, "IPVS_FLEET_LAB_DIR": str(lab.dir)}
    r = subprocess.run(
        [str(PYINFRA), "-y", str(lab.inventory_path), "exec", "--", "uname", "-r"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for name, h in lab.hosts.items():
        line = rf"^\[{re.escape(name)}\]\s+{re.escape(h.kernel_release)}$"
        assert re.search(line, r.stdout + r.stderr, re.M), (name, r.stdout)


def test_testinfra_backend_through_ssh_config(lab: Lab) -> None:
    host = lab.testinfra_host("k8s-node-1")
    assert host.check_output("uname -r") == lab.hosts["k8s-node-1"].kernel_release
    assert host.package("ipvsadm").is_installed


@pytest.mark.slow  # a lab of its own: one more VM boot and a reboot under TCG (~2 min)
def test_life_cycle_noop_up_died_vm_and_down(lab: Lab, tmp_path: Path) -> None:
    """A lab of its own: up twice, reboot, kill its QEMU (status: died), down stops only it."""
    fleet = tmp_path / "fleet.yml"
    fleet.write_text("hosts:\n  solo:\n    release: bookworm\n    host_class: k8s_node\n")
    own = Lab(tmp_path / "lab", fleet_file=fleet)
    try:
        own.up()
        pid = int(own.vm_files("solo").pidfile.read_text())
        r = cli(own.dir, "--fleet", str(fleet), "up")
        assert r.returncode == 0, r.stderr
        assert "is up" in r.stderr
        assert int(own.vm_files("solo").pidfile.read_text()) == pid  # no-op: same VM

        boot_id = "cat /proc/sys/kernel/random/boot_id"
        before = own.run("solo", boot_id).stdout
        own.reboot("solo")
        assert own.run("solo", boot_id).stdout != before
        assert own.run("solo", "uname -r").stdout.strip() == own.hosts["solo"].kernel_release

        os.kill(pid, signal.SIGKILL)
        r = cli(own.dir, "status")
        assert r.returncode == 1
        assert "died" in r.stdout and str(own.vm_files("solo").console) in r.stdout
        assert [s.state for s in own.status()] == ["died"]
    finally:
        own.down()
    assert not own.hosts
    assert cli(own.dir, "status").returncode == 0
    # The session's lab was not touched by the other lab's down.
    assert all(lab.is_running(n) for n in lab.hosts)
