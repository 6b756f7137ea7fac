"""The Ansible path on the lab, as a user runs it: the collection ipvs_fleet.fleet built with
`ansible-galaxy collection build`, installed offline from its tarball, and
`ansible-playbook -i lab.ansible.yml ipvs_fleet.fleet.site` run by FQCN from a directory outside
the checkout. It converges stock hosts to the very state the pyinfra deploy produces, reruns
with changed=0, and the checks pass after it; `--check --diff` on a drifted host reports the
pending change and changes and fails nothing; `--tags verify` verifies only; the rollback
playbook brings a host to the state pyinfra's rollback leaves. As real fleets
run it: the inventory connects as the non-root user `fleet` with become (sudo); the checks and
pyinfra, reading the same inventory, connect as `fleet` and use sudo too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvs_fleet.ansible_inventory import write_lab_inventory
from ipvs_fleet.policy import load_policy
from tests.fixtures.collection import collection_env

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STATE_DIR = "/var/lib/ipvs-fleet"
# Two waves, the canary then both other hosts together (the default [1, '10%', '100%'] makes
# three one-host waves of the 3-VM lab; its order is unit-tested, tests/unit/test_rollout.py).
CANARY_THEN_ALL = '{"ipvs_fleet_serial": [1, "100%"]}'
ANSIBLE_USER = "fleet"  # passwordless sudo on every lab VM (become: sudo)
# Everything the deploy owns on a host, as one comparable text: the loaded builds, the live
# IPVS sysctls, the installed fix module, the managed files (content, mode, owner), the
# backups.
SNAPSHOT = (
    "for d in /sys/module/ip_vs /sys/module/ip_vs_* /sys/module/xt_ipvs; do [ -d $d ] && "
    "echo loaded ${d##*/} $(cat $d/version 2>/dev/null) $(cat $d/taint); done; "
    "grep -H '' /proc/sys/net/ipv4/vs/* 2>/dev/null; "
    "u=/lib/modules/$(uname -r)/updates; ls $u; "
    "(cd $u/ipvs-fleet 2>/dev/null && sha256sum *.ko); "
    "for f in /etc/sysctl.d/90-ipvs-fleet.conf /etc/modules-load.d/ipvs-fleet.conf "
    "/etc/modprobe.d/ipvs-fleet.conf; do echo file $f $(stat -c '%a %U:%G' $f) "
    "$(sha256sum < $f); done; "
    # the lock and its holder record differ by run history, not by engine
    f"(cd {STATE_DIR} && find . \\( -path ./incoming -o -name 'lock*' \\) -prune "
    "-o -print | sort)"
)


def snapshot(lab, name: str) -> str:
    return lab.run(name, SNAPSHOT, check=False).stdout


def is_loaded(snap: str, module: str) -> bool:
    """Whether a SNAPSHOT lists `module` loaded (a stock one has no version and no taint)."""
    return re.search(rf"^loaded {module}( |$)", snap, re.M) is not None


class Playbook:
    """ansible-playbook runs the installed collection's playbooks (by FQCN, from `cwd`, a
    directory outside the checkout) against the session's lab (inventory/lab.ansible.yml)."""

    def __init__(self, inventory: Path, env: dict[str, str], cwd: Path) -> None:
        self.inventory, self.env, self.cwd = inventory, env, cwd

    def run(self, playbook: str = "ipvs_fleet.fleet.site", *args: str) -> tuple[int, str, float]:
        t0 = time.monotonic()
        r = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(self.inventory), playbook, *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        return r.returncode, r.stdout + r.stderr, time.monotonic() - t0


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP -> {host: {ok, changed, unreachable, failed, ...}}."""
    hosts = {}
    for m in re.finditer(r"^(\S+)\s+:\s+((?:\w+=\d+\s*)+)$", out, re.M):
        hosts[m.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(2))}
    return hosts


@pytest.fixture(scope="session")
def playbook(lab, deployer, installed_collection, tmp_path_factory) -> Playbook:
    user_dir = tmp_path_factory.mktemp("ansible")
    inv = write_lab_inventory(lab, user_dir / "lab.ansible.yml", user=ANSIBLE_USER)
    return Playbook(inv, collection_env(installed_collection, deployer.env), user_dir)


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
    first = playbook.run("ipvs_fleet.fleet.site", "-e", CANARY_THEN_ALL)
    assert first[0] == 0, first[1][-6000:]
    return pyinfra_state, {n: snapshot(lab, n) for n in lab.hosts}, first


def test_a_refusal_on_one_host_stops_the_play_before_any_host_changes(lab, ansible_stock, playbook):
    """On lab VMs on stock (each would change in a play that went on): the canary has an
    FTP virtual service while its class wants knob=1. The preflight refuses it, naming host
    and reason, and no host changes (snapshots taken on the hosts)."""
    _, stock = ansible_stock
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    lab.run(canary, "ipvsadm -A -t 10.99.0.1:21 -s rr")
    try:
        rc, out, _ = playbook.run()
        assert rc != 0, out[-4000:]
        assert re.search(
            rf"host {canary} .*conn_reuse_old_conntrack=1 refused: host uses ftp "
            r"\(.*10\.99\.0\.1:21",
            out,
        ), out[-4000:]
        assert "Roll out in waves" not in out, out[-4000:]
    finally:
        lab.run(canary, "ipvsadm -D -t 10.99.0.1:21")
    assert {n: snapshot(lab, n) for n in lab.hosts} == stock


def test_ansible_converges_stock_hosts_to_the_pyinfra_state(lab, ansible_converged):
    pyinfra_state, ansible_state, (_, out, seconds) = ansible_converged
    print(f"ansible-playbook from stock: {seconds:.1f} s")
    for name in lab.hosts:
        # SNAPSHOT sees the loaded builds: the distro's ip_vs and the fix module
        assert is_loaded(pyinfra_state[name], "ip_vs"), pyinfra_state[name]
        assert is_loaded(pyinfra_state[name], "ip_vs_reuse"), pyinfra_state[name]
        assert ansible_state[name] == pyinfra_state[name], f"{name} differs"
    assert all(r["changed"] > 0 for r in recap(out).values()), out[-3000:]
    assert set(recap(out)) == set(lab.hosts)


def test_second_ansible_run_changes_nothing(lab, ansible_converged, playbook):
    rc, out, seconds = playbook.run("ipvs_fleet.fleet.site", "-e", CANARY_THEN_ALL)
    print(f"ansible-playbook no-op: {seconds:.1f} s")
    assert rc == 0, out[-4000:]
    got = recap(out)
    assert set(got) == set(lab.hosts)
    assert {h: r["changed"] for h, r in got.items()} == dict.fromkeys(lab.hosts, 0), out[-4000:]


def a_class_sysctl(lab, name: str) -> tuple[str, int]:
    """A 0/1 sysctl the host's class sets, and the value it wants."""
    wanted = load_policy().for_host(name, {"ipvs_host_class": lab.hosts[name].host_class}).sysctls
    key = next(k for k, v in sorted(wanted.items()) if v in (0, 1))
    return key, wanted[key]


def test_check_diff_reports_a_drifted_sysctl_and_changes_nothing(lab, ansible_converged, playbook):
    """A converged host whose class sysctl was changed by hand: `--check --diff` exits 0,
    counts the host as changed, names the value it would set, and the host is as before
    (snapshot). `--tags verify` (no --check) then fails that host naming the drift, and a
    real run puts the value back."""
    name = next(iter(lab.hosts))
    key, want = a_class_sysctl(lab, name)
    path = f"/proc/sys/net/ipv4/vs/{key}"
    lab.run(name, f"echo {1 - want} > {path}")
    try:
        drifted = snapshot(lab, name)
        rc, out, seconds = playbook.run(
            "ipvs_fleet.fleet.site", "--check", "--diff", "--limit", name
        )
        print(f"ansible-playbook --check --diff, one drifted host: {seconds:.1f} s")
        assert rc == 0, out[-4000:]
        got = recap(out)[name]
        assert got["failed"] == 0 and got["changed"] >= 1, out[-4000:]
        assert f"set net.ipv4.vs.{key} = {want} (live {1 - want})" in out, out[-4000:]
        assert snapshot(lab, name) == drifted  # nothing changed on the host
        assert lab.run(name, f"cat {path}").stdout.strip() == str(1 - want)

        rc, out, _ = playbook.run("ipvs_fleet.fleet.site", "--tags", "verify", "--limit", name)
        assert rc != 0, out[-4000:]
        assert f"{name} not verified" in out and key in out, out[-4000:]
        assert "Install the fix module" not in out and "Set live the IPVS" not in out
        assert snapshot(lab, name) == drifted
    finally:
        rc, out, _ = playbook.run("ipvs_fleet.fleet.site", "--limit", name)
    assert rc == 0, out[-4000:]
    assert lab.run(name, f"cat {path}").stdout.strip() == str(want)


def test_tags_verify_verifies_a_converged_host_and_changes_nothing(
    lab, ansible_converged, playbook
):
    rc, out, seconds = playbook.run("ipvs_fleet.fleet.site", "--tags", "verify")
    print(f"ansible-playbook --tags verify: {seconds:.1f} s")
    assert rc == 0, out[-4000:]
    assert {h: r["changed"] for h, r in recap(out).items()} == dict.fromkeys(lab.hosts, 0)
    tasks = re.findall(r"^TASK \[(?:ipvs_fleet\.fleet\.ipvs_fleet : )?(.*?)\]", out, re.M)
    assert "Verify the loaded modules and the live values" in tasks, tasks
    # only the read-only phases ran: the plan, the state read, the verification
    assert not [
        t for t in tasks if t.startswith(("Install", "Write", "Load", "Reboot", "Run", "Set"))
    ]


# slow (make test-full): a rollback and a rollout of one host (~280 s with the 2.x module
# swap; not measured since), over CI's 90 minutes in make test. The only run of the rollback
# playbook on a VM; the role's rollback tasks are syntax-checked and their plan and
# activation unit-tested (tests/unit/test_ansible_role.py); pyinfra's rollback runs in make
# test.
@pytest.mark.slow
def test_rollback_playbook_brings_a_host_to_the_pyinfra_rollback_state(
    lab, ansible_stock, ansible_converged, playbook
):
    """`ipvs_fleet.fleet.rollback` on one converged host: `--check` names the removal and
    changes nothing; the real run leaves the host exactly as pyinfra's deploy/rollback.py left
    it (snapshot: ip_vs_reuse unloaded, the stock IPVS modules still loaded, its files
    removed, files restored); the site playbook then converges it again to the pyinfra state
    (later tests find the lab converged)."""
    pyinfra_state, stock = ansible_stock
    # a host other than the canary where there is one (a one-host lab has only the canary)
    others = [n for n, h in lab.hosts.items() if "canary" not in h.groups]
    name = (others or list(lab.hosts))[0]
    before = snapshot(lab, name)
    rc, out, _ = playbook.run("ipvs_fleet.fleet.rollback", "--check", "--limit", name)
    assert rc == 0, out[-4000:]
    assert "remove the ipvs-fleet module set for " in out, out[-4000:]
    assert "unload ip_vs_reuse " in out, out[-4000:]
    assert snapshot(lab, name) == before
    try:
        rc, out, seconds = playbook.run("ipvs_fleet.fleet.rollback", "--limit", name)
        print(f"ansible-playbook ipvs_fleet.fleet.rollback, one host: {seconds:.1f} s")
        assert rc == 0, out[-4000:]
        assert recap(out)[name]["changed"] > 0, out[-4000:]
        assert snapshot(lab, name) == stock[name]
        assert is_loaded(stock[name], "ip_vs") and not is_loaded(stock[name], "ip_vs_reuse")
    finally:
        rc, out, seconds = playbook.run("ipvs_fleet.fleet.site", "--limit", name)
        print(f"ansible-playbook ipvs_fleet.fleet.site, one stock host: {seconds:.1f} s")
    assert rc == 0, out[-4000:]
    assert snapshot(lab, name) == pyinfra_state[name]


@pytest.mark.slow  # ~50 s; make test compares the Ansible path's hosts with pyinfra's state
def test_checks_pass_after_the_ansible_path(lab, ansible_converged, deployer, tmp_path):
    env = dict(deployer.env, IPVS_FLEET_ANSIBLE_INVENTORY=str(playbook_inventory(tmp_path, lab)))
    r = subprocess.run(
        [str(BIN / "ipvs-fleet"), "check", "inventory/from_ansible.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
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
