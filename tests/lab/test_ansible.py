"""The Ansible path on the lab: `ansible-playbook -i inventory/lab.ansible.yml site.yml`
converges stock hosts to the very state the pyinfra deploy produces, reruns with changed=0,
and the checks pass after it. As real fleets run it: the inventory connects as the
non-root user `fleet` with `ansible_become` (sudo); the checks and pyinfra, reading the same
inventory, connect as `fleet` and use sudo too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvs_fleet.ansible_inventory import write_lab_inventory

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STATE_DIR = "/var/lib/ipvs-fleet"
# Two waves, the canary then both other hosts together (the default [1, '10%', '100%'] makes
# three one-host waves of the 3-VM lab; its order is unit-tested, tests/unit/test_rollout.py).
CANARY_THEN_ALL = '{"ipvs_fleet_serial": [1, "100%"]}'
ANSIBLE_USER = "fleet"  # passwordless sudo on every lab VM (become: sudo)
# Everything the deploy owns on a host, as one comparable text: the loaded build, the live
# IPVS sysctls, the installed modules, the managed files (content, mode, owner), the backups.
SNAPSHOT = (
    "for d in /sys/module/ip_vs /sys/module/ip_vs_* /sys/module/xt_ipvs; do [ -d $d ] && "
    "echo loaded ${d##*/} $(cat $d/version 2>/dev/null) $(cat $d/taint); done; "
    "grep -H '' /proc/sys/net/ipv4/vs/* 2>/dev/null; "
    "u=/lib/modules/$(uname -r)/updates; ls $u; "
    "(cd $u/ipvs-fleet 2>/dev/null && sha256sum *.ko); "
    "for f in /etc/sysctl.d/90-ipvs-fleet.conf /etc/modules-load.d/ipvs-fleet.conf "
    "/etc/modprobe.d/ipvs-fleet.conf; do echo file $f $(stat -c '%a %U:%G' $f) "
    "$(sha256sum < $f); done; "
    # the swap's own records (logs, saved tables, the lock) differ by run, not by engine
    f"(cd {STATE_DIR} && find . \\( -path ./incoming -o -name 'swap.*' -o -name 'lock*' "
    "-o -name 'table.*' \\) -prune "
    "-o -print | sort; stat -c '%n %a' ipvs-swap.sh; sha256sum ipvs-swap.sh)"
)


def snapshot(lab, name: str) -> str:
    return lab.run(name, SNAPSHOT, check=False).stdout


class Playbook:
    """ansible-playbook runs against the session's lab (inventory/lab.ansible.yml form)."""

    def __init__(self, inventory: Path, env: dict[str, str]) -> None:
        self.inventory, self.env = inventory, env

    def run(self, playbook: str = "site.yml", *args: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        r = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.inventory), playbook, *args],
            cwd=REPO, env=self.env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        return r.returncode, r.stdout + r.stderr, time.monotonic() - t0


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP -> {host: {ok, changed, unreachable, failed, ...}}."""
    hosts = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", out, re.M):
        hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return hosts


@pytest.fixture(scope="session")
def playbook(lab, deployer, tmp_path_factory) -> Playbook:
    inv = write_lab_inventory(
        lab, tmp_path_factory.mktemp("ansible") / "lab.ansible.yml", user=ANSIBLE_USER
    )
    env = dict(deployer.env, ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
    return Playbook(inv, env)


@pytest.fixture(scope="session")
def ansible_stock(lab, deployer, deployed):
    """pyinfra state of every host, then the same hosts rolled back to stock by pyinfra:
    (pyinfra snapshots, stock snapshots)."""
    pyinfra_state = {n: snapshot(lab, n) for n in lab.hosts}
    deployer.run("deploy/rollback.py")
    stock = {n: snapshot(lab, n) for n in lab.hosts}
    assert all(stock[n] != pyinfra_state[n] for n in lab.hosts), "rollback changed nothing"
    return pyinfra_state, stock


@pytest.fixture(scope="session")
def ansible_converged(lab, ansible_stock, playbook):
    """The stock hosts converged by ansible-playbook:
    (pyinfra snapshots, ansible snapshots, first run)."""
    pyinfra_state, _ = ansible_stock
    first = playbook.run("site.yml", "-e", CANARY_THEN_ALL)
    assert first[0] == 0, first[1][-6000:]
    return pyinfra_state, {n: snapshot(lab, n) for n in lab.hosts}, first


def test_a_refusal_on_one_host_stops_the_play_before_any_host_changes(
    lab, ansible_stock, playbook
):
    """On lab VMs on stock (each would change in a play that went on): the canary has an
    FTP virtual service while its class wants knob=1. The preflight refuses it, naming host
    and reason, and no host changes (snapshots taken on the hosts)."""
    _, stock = ansible_stock
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    lab.run(canary, "ipvsadm -A -t 10.99.0.1:21 -s rr")
    try:
        rc, out, _ = playbook.run()
        assert rc != 0, out[-4000:]
        assert re.search(rf"host {canary} .*conn_reuse_old_conntrack=1 refused: host uses ftp "
                         r"\(.*10\.99\.0\.1:21", out), out[-4000:]  # fmt: skip
        assert "Roll out in waves" not in out, out[-4000:]
    finally:
        lab.run(canary, "ipvsadm -D -t 10.99.0.1:21")
    assert {n: snapshot(lab, n) for n in lab.hosts} == stock


def test_ansible_converges_stock_hosts_to_the_pyinfra_state(lab, ansible_converged):
    pyinfra_state, ansible_state, (_, out, seconds) = ansible_converged
    print(f"ansible-playbook from stock: {seconds:.1f} s")
    for name in lab.hosts:
        assert "loaded ip_vs " in pyinfra_state[name]  # SNAPSHOT sees the loaded build
        assert ansible_state[name] == pyinfra_state[name], f"{name} differs"
    assert all(r["changed"] > 0 for r in recap(out).values()), out[-3000:]
    assert set(recap(out)) == set(lab.hosts)


def test_second_ansible_run_changes_nothing(lab, ansible_converged, playbook):
    rc, out, seconds = playbook.run("site.yml", "-e", CANARY_THEN_ALL)
    print(f"ansible-playbook no-op: {seconds:.1f} s")
    assert rc == 0, out[-4000:]
    got = recap(out)
    assert set(got) == set(lab.hosts)
    assert {h: r["changed"] for h, r in got.items()} == dict.fromkeys(lab.hosts, 0), out[-4000:]


@pytest.mark.slow  # ~50 s; make test compares the Ansible path's hosts with pyinfra's state
def test_checks_pass_after_the_ansible_path(lab, ansible_converged, deployer, tmp_path):
    env = dict(deployer.env, IPVS_FLEET_ANSIBLE_INVENTORY=str(playbook_inventory(tmp_path, lab)))
    r = subprocess.run(
        [str(BIN / "ipvs-fleet"), "check", "inventory/from_ansible.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def playbook_inventory(tmp_path: Path, lab) -> Path:
    return write_lab_inventory(lab, tmp_path / "lab.ansible.yml", user=ANSIBLE_USER)


@pytest.mark.slow  # ~50 s: make test-full
def test_pyinfra_reads_the_ansible_inventory(lab, ansible_converged, deployer, tmp_path):
    """The pyinfra deploy, driven by the Ansible inventory, sees nothing left to do."""
    env = dict(os.environ, **deployer.env)
    env["IPVS_FLEET_ANSIBLE_INVENTORY"] = str(playbook_inventory(tmp_path, lab))
    run = type(deployer)(REPO / "inventory" / "from_ansible.py", env).run()
    assert run.totals["success"] == 0, run.changed()
