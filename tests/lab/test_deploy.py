"""The main job end to end on the lab: `pyinfra -y inventory/lab.py deploy.py` on real VMs."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import pytest

from ipvs_fleet.kernel import MODULE_NAME
from ipvs_fleet.policy import KNOB, load_policy
from ipvs_fleet.probe.inflight import held
from tests.fixtures.artifacts import FOREIGN, artifacts_with
from tests.fixtures.lab import KUBE_PROXY_NAT, KUBE_PROXY_NAT_UNDO, OE_TAINT

pytestmark = pytest.mark.lab

MANAGED = "/etc/sysctl.d/90-ipvs-fleet.conf /etc/modules-load.d/ipvs-fleet.conf"
TAINT_USER = 64  # U: set from user space


def live_state(lab, name: str) -> dict:
    """What a host runs now: ip_vs's taint, the fix module's loaded and installed build, the
    IPVS sysctls, managed files."""
    r = lab.run(
        name,
        "u=/lib/modules/$(uname -r)/updates/ipvs-fleet; "
        "echo taint=$(cat /sys/module/ip_vs/taint 2>/dev/null); "
        f"echo loaded=$(cat /sys/module/{MODULE_NAME}/version 2>/dev/null); "
        f"echo fix_taint=$(cat /sys/module/{MODULE_NAME}/taint 2>/dev/null); "
        f"echo set=$(modinfo -F ipvs_fleet $u/{MODULE_NAME}.ko 2>/dev/null); "
        "cd /proc/sys/net/ipv4/vs 2>/dev/null && for f in *; do echo vs.$f=$(cat $f); done; "
        f"echo files=$(cat {MANAGED} 2>/dev/null | md5sum | cut -c1-8)",
        check=False,
    )
    out = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition("=")
        out[k] = v
    return out


def expected_sysctls(lab, name: str) -> dict[str, int]:
    return load_policy().for_host(name, {"ipvs_host_class": lab.hosts[name].host_class}).sysctls


def assert_converged(lab, artifacts, name: str) -> None:
    st = live_state(lab, name)
    kr = lab.hosts[name].kernel_release
    assert st["taint"] == "", f"{name}: ip_vs is not the distro's own build: {st}"
    assert st["loaded"] == st["set"] == artifacts[kr].set_id, f"{name}: {st}"
    assert "O" in st["fix_taint"], st
    for key, value in expected_sysctls(lab, name).items():
        assert st.get(f"vs.{key}") == str(value), f"{name}: {key} {st.get('vs.' + key)} != {value}"


def test_fresh_deploy_converges_every_host(lab, artifacts, deployed):
    print(f"fresh deploy: {deployed.seconds:.1f} s")
    for name in lab.hosts:
        assert_converged(lab, artifacts, name)


def test_connections_in_flight_survive_rollback_and_activation_on_every_line(
    lab, artifacts, deployer, deployed
):
    """100 connections held open through an IPVS NAT service on every host (each kernel
    line) across a rollback (the fix module unloaded) and a deploy (loaded again): none
    breaks, the table stays, and the kernel logs no warning. The module swap of 2.x broke
    20 of 20 on the canary."""
    with ExitStack() as stack:
        holds = {h: stack.enter_context(held(lab, h, 100)) for h in sorted(lab.hosts)}
        back = deployer.run("deploy/rollback.py")
        print(f"rollback with connections held: {back.seconds:.1f} s")
        for h in lab.hosts:
            st = live_state(lab, h)
            assert st["loaded"] == "" and f"vs.{KNOB}" not in st and st["taint"] == "", st
        again = deployer.run("deploy.py")
        print(f"deploy with connections held: {again.seconds:.1f} s")
        for h in lab.hosts:
            assert_converged(lab, artifacts, h)
        for h, x in holds.items():
            st = x.status()
            assert st["broken"] == 0, (h, st)
    for h, x in holds.items():
        r = x.result
        print(
            f"{h}: {r['connections']} held {r['seconds']} s, {r['exchanges']} exchanges, "
            f"{r['broken']} broken"
        )
        assert r["connections"] == 100 and r["broken"] == 0, (h, r)
        assert r["exchanges"] >= 100 * 10, (h, r)  # every connection kept talking throughout
        warn = lab.run(h, "dmesg | grep -E 'WARNING|BUG:' | grep -v 'BUG: -' ; true").stdout
        assert not warn.strip(), (h, warn)


def test_second_run_changes_nothing(deployer, deployed):
    again = deployer.run()
    print(f"no-op deploy: {again.seconds:.1f} s")
    assert again.rc == 0
    assert again.totals["success"] == 0, f"changed on a no-op run: {again.changed()}"
    assert again.totals["error"] == 0
    assert again.totals["no_change"] > 0


def test_bad_host_class_touches_nothing(lab, deployer, deployed):
    before = {n: live_state(lab, n) for n in lab.hosts}
    r = deployer.run("deploy.py", "--data", "ipvs_host_class=web", check=False)
    assert r.rc != 0
    assert "unknown host class 'web'" in r.stdout + r.stderr
    assert {n: live_state(lab, n) for n in lab.hosts} == before


def test_missing_artifact_is_named_and_touches_nothing(lab, deployer, deployed, tmp_path):
    before = {n: live_state(lab, n) for n in lab.hosts}
    env = dict(deployer.env, IPVS_FLEET_ARTIFACTS=str(tmp_path))
    r = type(deployer)(deployer.inventory, env).run(check=False)
    assert r.rc != 0
    assert "no module artifact for kernel" in r.stdout + r.stderr
    assert {n: live_state(lab, n) for n in lab.hosts} == before


def test_interlock_refuses_knob_on_host_with_ftp_service(lab, deployer, deployed):
    lab.run("k8s-canary", "ipvsadm -A -t 10.99.0.1:21 -s rr")
    try:
        before = {n: live_state(lab, n) for n in lab.hosts}
        r = deployer.run(check=False)
        out = r.stdout + r.stderr
        assert r.rc != 0
        assert "k8s-canary" in out and f"{KNOB}=1 refused" in out and "10.99.0.1:21" in out
        assert {n: live_state(lab, n) for n in lab.hosts} == before
    finally:
        lab.run("k8s-canary", "ipvsadm -D -t 10.99.0.1:21")


def test_interlock_refuses_a_module_without_a_design_under_kube_proxy_nat_rules(
    lab, artifacts, nodesign_artifact, deployer, deployed, tmp_path
):
    """A fix module for k8s-canary's kernel that declares no reuse design (the test-only
    `nodesign` variant: unknown, so unsafe behind nat rules) and kube-proxy's nat rules on
    that host: the deploy refuses knob=1 there, naming the host, the design and the rule,
    and no host changes (the other hosts get their shipped modules from the same folder)."""
    arts = artifacts_with(artifacts, nodesign_artifact, tmp_path / "artifacts")
    lab.run("k8s-canary", KUBE_PROXY_NAT)
    try:
        before = {n: live_state(lab, n) for n in lab.hosts}
        env = dict(deployer.env, IPVS_FLEET_ARTIFACTS=str(arts))
        r = type(deployer)(deployer.inventory, env).run(check=False)
        out = r.stdout + r.stderr
        assert r.rc != 0
        assert "k8s-canary" in out and f"{KNOB}=1 refused" in out, out[-3000:]
        assert "reuse design is 'none'" in out, out[-3000:]
        assert "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000" in out, out[-3000:]
        assert {n: live_state(lab, n) for n in lab.hosts} == before
    finally:
        lab.run("k8s-canary", KUBE_PROXY_NAT_UNDO, check=False)


def test_a_foreign_ipvs_module_is_refused_live_and_nothing_changes(
    lab, artifacts, deployer, deployed, foreign_module
):
    """An out-of-tree IPVS module that is not the fix module (as a 2.x patched ip_vs would
    be) loaded on the canary: replacing it would unload IPVS, so the deploy (activation
    reload) fails that host naming the module and the way out (a reboot), changes nothing
    there, and IPVS and its table stay; once it is gone, the deploy converges."""
    host = "k8s-canary"
    data = base64.b64encode(foreign_module.read_bytes()).decode()
    lab.run(host, "base64 -d > /root/foreign.ko", input=data)
    lab.run(
        host,
        "ipvsadm -A -t 10.99.0.3:80 -s rr && ipvsadm -a -t 10.99.0.3:80 -r "
        f"10.99.1.3:80 -m && rmmod {MODULE_NAME} && insmod /root/foreign.ko",
    )
    table = lab.run(host, "ipvsadm-save -n").stdout
    try:
        before = live_state(lab, host)
        r = deployer.run("deploy.py", "--limit", host, check=False)
        out = r.stdout + r.stderr
        assert r.rc != 0
        assert f"{FOREIGN}: loaded from an out-of-tree build that is not" in out, out[-3000:]
        assert "reboot the host (host data ipvs_activation: reboot)" in out, out[-3000:]
        assert live_state(lab, host) == before
        assert lab.run(host, "ipvsadm-save -n").stdout == table
        assert lab.run(host, f"test -d /sys/module/{FOREIGN}", check=False).rc == 0
    finally:
        lab.run(
            host,
            f"rmmod {FOREIGN}; rm -f /root/foreign.ko; ipvsadm -D -t 10.99.0.3:80",
            check=False,
        )
    deployer.run("deploy.py", "--limit", host)
    assert_converged(lab, artifacts, host)


@pytest.mark.slow  # ~40 s; the in-flight test above goes both ways with connections held
def test_activation_and_rollback_keep_the_service_table(lab, artifacts, deployer, deployed):
    host = "k8s-canary"
    lab.run(
        host,
        "ipvsadm -A -t 10.99.0.2:80 -s rr && ipvsadm -a -t 10.99.0.2:80 -r 10.99.1.1:80 -m "
        "&& ipvsadm -a -t 10.99.0.2:80 -r 10.99.1.2:80 -m -w 3",
    )
    table = lab.run(host, "ipvsadm-save -n").stdout
    try:
        back = deployer.run("deploy/rollback.py", "--limit", host)
        assert back.rc == 0
        st = live_state(lab, host)
        assert st["loaded"] == "", f"no fix module expected after rollback: {st}"
        assert f"vs.{KNOB}" not in st, "the knob must disappear with the fix module"
        assert lab.run(host, "ipvsadm-save -n").stdout == table
        again = deployer.run("deploy.py", "--limit", host)
        assert again.rc == 0
        assert_converged(lab, artifacts, host)
        assert lab.run(host, "ipvsadm-save -n").stdout == table
    finally:
        lab.run(host, "ipvsadm -D -t 10.99.0.2:80", check=False)


def test_a_taint_fails_its_check_until_the_host_boots_again(lab, artifacts, checker):
    """A taint bit the modules do not cause (U: root wrote /proc/sys/kernel/tainted) fails
    the taint check, and only it, naming the bit; a taint clears only at boot. The host
    reboots: the fix module and the class's values come back, and every check passes."""
    node = next(
        n
        for n, h in sorted(lab.hosts.items())
        if h.host_class == "k8s_node" and "canary" not in h.groups
    )
    lab.run(node, f"echo {TAINT_USER} > /proc/sys/kernel/tainted")
    run = checker.run("--limit", node)
    assert run.rc == 1, run.out
    assert {c for c, s in run.status(node).items() if s != "passed"} == {"taint"}, run.out
    [res] = [r for r in run.doc["results"] if r["check"] == "taint"]
    [drift] = res["drift"]
    assert drift["expected"] == f"{OE_TAINT} (O+E) or less", drift
    assert drift["actual"] == f"{OE_TAINT | TAINT_USER} (UOE; unexpected U)", drift
    assert "boots again" in res["fix"] and res["converge"] is None
    lab.reboot(node)
    assert_converged(lab, artifacts, node)
    after = checker.run("--limit", node)
    assert after.rc == 0, after.out


@pytest.mark.slow  # every host reboots under TCG (~4 min in CI): make test-full
def test_a_reboot_of_every_host_keeps_the_fix_module_and_the_values(lab, artifacts, checker):
    """The hosts reboot together: each comes back with the fix module and its class's
    values (persisted), and every check passes."""
    with ThreadPoolExecutor(len(lab.hosts)) as pool:
        list(pool.map(lab.reboot, lab.hosts))
    for name in lab.hosts:
        assert_converged(lab, artifacts, name)
    after = checker.run()
    assert after.rc == 0, after.out


def test_fresh_deploy_reports_changes_per_host(lab, deployed):
    # Run first in the session on a fresh lab, so every host had something to change.
    assert deployed.totals["error"] == 0, json.dumps(deployed.doc)[:2000]
    assert set(deployed.changed()) == set(lab.hosts)
