"""Activation that survives faults, on a real lab host (k8s-canary, 6.1): the module swap
(`ipvs-swap.sh`, run by the pyinfra deploy and rollback) killed at each of its stages, and the
controller killed mid-swap. After each fault the same command is run again, as an operator
or `rollout --resume` would: the host must end on the build that command asks for, with the
IPVS table, timeouts and sync daemon identical to what it had, and nothing left pending.

`make test` runs them on the side lab (lab/fleet-side.yml, marker `side_lab`), beside the
main lab's tests; on the main lab they run the same.

The tests run in this order and each leaves the state the next starts from (stated in
each); run alone, each still passes. Cost: 18 pyinfra runs limited to one host (~11 min under
TCG); the reboot and next-boot test (`slow`) two reboots more.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.deploy import PYINFRA, REPO
from tests.fixtures.lab import FINGERPRINT, on_stock
from tests.lab.test_deploy import assert_converged, live_state

pytestmark = [pytest.mark.lab, pytest.mark.side_lab]

HOST = "k8s-canary"
STATE = "/var/lib/ipvs-fleet"
# 3 services and 8 real servers (11 table lines), non-default timeouts, a backup sync daemon.
TABLE = (
    "ipvsadm -A -t 10.98.0.1:80 -s rr && ipvsadm -A -t 10.98.0.2:443 -s wrr -p 300 "
    "&& ipvsadm -A -u 10.98.0.3:53 -s sh "
    "&& for i in 1 2 3; do ipvsadm -a -t 10.98.0.1:80 -r 10.98.1.$i:80 -m -w $i; done "
    "&& for i in 4 5 6; do ipvsadm -a -t 10.98.0.2:443 -r 10.98.1.$i:443 -m; done "
    "&& for i in 7 8; do ipvsadm -a -u 10.98.0.3:53 -r 10.98.1.$i:53 -m; done "
    "&& ipvsadm --set 901 121 301 && ipvsadm --start-daemon backup --mcast-interface eth0"
)
UNDO = (
    "for s in -t\\ 10.98.0.1:80 -t\\ 10.98.0.2:443 -u\\ 10.98.0.3:53; do "
    "ipvsadm -D $s 2>/dev/null; done; ipvsadm --stop-daemon backup 2>/dev/null; "
    "ipvsadm --set 900 120 300; true"
)
STATE_READ = (
    "ipvsadm-save -n; ipvsadm -L --timeout; ipvsadm -L --daemon; "
    f"ls -d {STATE}/swap.pending 2>/dev/null; true"
)
# (stage the worker dies after, the command that swaps: rollback to stock or deploy patched)
FAULTS = [
    ("saved", "deploy/rollback.py"),
    ("cleared", "deploy.py"),
    ("unloaded", "deploy/rollback.py"),
    ("loaded", "deploy.py"),
    ("restored", "deploy/rollback.py"),
]


@pytest.fixture
def table(lab, deployed):
    lab.run(HOST, UNDO)
    lab.run(HOST, TABLE)
    before = lab.run(HOST, STATE_READ).stdout
    lines = before.splitlines()
    assert sum(x.startswith("-A") for x in lines) == 3, before
    assert sum(x.startswith("-a") for x in lines) == 8, before
    assert "901 121 301" in before and "backup sync daemon" in before
    yield before
    lab.run(HOST, f"rm -f {STATE}/fault-at; " + UNDO, check=False)


def wait_for(done: Callable[[], bool], seconds: float, step: float) -> None:
    """Poll `done` until it holds or `seconds` pass (the caller asserts what it needs)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done():
        time.sleep(step)


def redeploy(lab, artifacts, deployer, table: str) -> None:
    """Back on the patched set, converged, the table as it was: where each test leaves it."""
    assert deployer.run("deploy.py", "--limit", HOST).rc == 0
    assert_converged(lab, artifacts, HOST)
    assert lab.run(HOST, STATE_READ).stdout == table


def assert_on(lab, artifacts, deploy: str) -> None:
    if deploy == "deploy.py":
        assert_converged(lab, artifacts, HOST)
    else:
        st = live_state(lab, HOST)
        assert "O" not in st["taint"], f"stock ip_vs expected after rollback: {st}"


@pytest.mark.destructive
def test_a_swap_killed_at_each_stage_is_finished_by_the_next_run(lab, artifacts, deployer, table):
    survived = []
    for stage, deploy in FAULTS:
        lab.run(HOST, f"echo {stage} > {STATE}/fault-at")
        hit = deployer.run(deploy, "--limit", HOST, check=False)
        out = hit.stdout + hit.stderr
        assert hit.rc != 0, f"{stage}: the faulted run passed:\n{out[-3000:]}"
        assert f"fault injected: killed after {stage}" in out, out[-3000:]
        assert "the swap died on the host" in out, out[-3000:]
        pending = lab.run(HOST, f"ls -d {STATE}/swap.pending", check=False).rc == 0
        # Killed before its restore compared, the swap leaves its saved state pending.
        assert pending == (stage != "restored"), stage
        again = deployer.run(deploy, "--limit", HOST, check=False)
        out = again.stdout + again.stderr
        assert again.rc == 0, f"{stage}: the rerun failed:\n{out[-3000:]}"
        assert_on(lab, artifacts, deploy)
        assert lab.run(HOST, STATE_READ).stdout == table, f"after a fault at {stage}"
        survived.append(stage)
    print(f"faults injected and survived, table intact (11 lines): {survived}")
    # The host is on stock now (the last fault was a rollback's); the next test deploys.


def module_tree(lab) -> str:
    """FINGERPRINT without the lock's and the swap's own records under /var/lib/ipvs-fleet
    (the upload of an archive lands there before any step takes the lock)."""
    out = lab.run(HOST, FINGERPRINT).stdout.splitlines()
    return "\n".join(x for x in out if not x.startswith(STATE))


def corrupt_artifact(good: Any, other: Any, folder: Path) -> Path:
    """An artifact for `good`'s kernel whose manifest is valid (its sha256s match) but whose
    modules are `other`'s, built for another kernel: modprobe refuses them on the host."""
    kr = good.kernel_release
    shutil.copytree(good.path, folder / kr)
    doc = json.loads((folder / kr / "manifest.json").read_text())
    unpacked = folder / "unpacked"
    unpacked.mkdir()
    with tarfile.open(other.tarball) as t:
        t.extractall(unpacked, filter="data")
    kos = sorted(unpacked.glob("*.ko"))
    tarball = folder / kr / doc["tarball"]
    with tarfile.open(tarball, "w:gz") as t:
        for ko in kos:
            t.add(ko, arcname=ko.name)
    doc["modules"] = {ko.name: hashlib.sha256(ko.read_bytes()).hexdigest() for ko in kos}
    doc["tarball_sha256"] = hashlib.sha256(tarball.read_bytes()).hexdigest()
    (folder / kr / "manifest.json").write_text(json.dumps(doc))
    shutil.rmtree(unpacked)
    return folder


@pytest.mark.destructive
def test_a_set_built_for_another_kernel_brings_the_old_modules_and_table_back(
    lab, artifacts, other_kernel_artifact, deployer, table, tmp_path
):
    """A valid manifest over modules of another kernel line (6.12's under 6.1's name): the
    install passes its checksums, the swap cannot load the set, sets it aside, loads the old
    (stock) modules again and restores the table; the host fails, naming it."""
    on_stock(lab, deployer, HOST)
    kr = lab.hosts[HOST].kernel_release
    assert other_kernel_artifact.kernel_release != kr
    arts = corrupt_artifact(artifacts[kr], other_kernel_artifact, tmp_path / "artifacts")
    bad = type(deployer)(deployer.inventory, dict(deployer.env, IPVS_FLEET_ARTIFACTS=str(arts)))
    r = bad.run("deploy.py", "--limit", HOST, check=False)
    out = r.stdout + r.stderr
    assert r.rc != 0, out[-3000:]
    assert "the installed modules did not load; falling back to the stock modules" in out, \
        out[-3000:]  # fmt: skip
    assert "O" not in live_state(lab, HOST)["taint"], "not back on the stock modules"
    assert lab.run(HOST, STATE_READ).stdout == table
    # set aside outside /lib/modules (depmod would still index it there), and stock again
    # what modprobe resolves
    assert lab.run(HOST, f"test -d {STATE}/failed-set/{kr} && ! test -e "
                   f"/lib/modules/{kr}/updates/ipvs-fleet", check=False).rc == 0  # fmt: skip
    assert "/kernel/" in lab.run(HOST, "modinfo -n ip_vs").stdout
    redeploy(lab, artifacts, deployer, table)  # the good set replaces it
    deployer.run("deploy/rollback.py", "--limit", HOST)  # the rollback removes the failed set
    assert lab.run(HOST, f"test -e {STATE}/failed-set/{kr}", check=False).rc != 0
    assert lab.run(HOST, STATE_READ).stdout == table  # on stock: where the next test starts


@contextmanager
def lock_held(lab) -> Iterator[None]:
    """Another controller holds the host lock (a process on the host, named in lock.holder)."""
    holder = f"echo 'the test, pid '$$ > {STATE}/lock.holder; exec sleep 299"
    # In a subshell of its own: `a && b &` would background the whole list, whose shell
    # keeps the SSH session's output open until the holder ends.
    lab.run(HOST, f"mkdir -p {STATE} && (setsid nohup flock {STATE}/lock sh -c "
            f"{shlex.quote(holder)} >/dev/null 2>&1 < /dev/null &)")  # fmt: skip
    try:
        wait_for(lambda: lab.run(HOST, f"flock -n {STATE}/lock true", check=False).rc != 0,
                 seconds=30, step=0.5)  # fmt: skip
        yield
    finally:
        lab.run(HOST, "pkill -f 'sleep 299'", check=False)


def refused_for_the_lock(deployer) -> str:
    """A deploy that waits 5 s for the held lock: it fails naming the holder; its output."""
    r = deployer.run("deploy.py", "--limit", HOST, "--data", "ipvs_lock_wait_seconds=5",
                     check=False)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.rc != 0, out[-3000:]
    assert re.search(rf"the host lock {STATE}/lock stayed held for 5 s by: the test, pid",
                     out), out[-3000:]  # fmt: skip
    return out


@pytest.mark.destructive
def test_a_held_host_lock_fails_the_step_naming_the_holder_and_two_deploys_serialise(
    lab, artifacts, deployer, table
):
    """Another controller holds the host lock: the step that needs it waits its
    ipvs_lock_wait_seconds, then fails naming the holder, with nothing changed. Then two
    deploys started together both succeed, one after the other, the table intact. On the
    converged host, a managed file changed by hand waits for the lock the same way."""
    on_stock(lab, deployer, HOST)
    with lock_held(lab):
        before = module_tree(lab)
        out = refused_for_the_lock(deployer)
        assert module_tree(lab) == before
    procs = [
        subprocess.Popen(
            [str(PYINFRA), "-y", "--limit", HOST, str(deployer.inventory), "deploy.py"],
            cwd=REPO, env=deployer.env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=1200)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    # Configure takes it too: on the converged host, a managed file changed by hand is not
    # rewritten while another controller holds the lock.
    conf = "/etc/sysctl.d/90-ipvs-fleet.conf"
    lab.run(HOST, f"echo '# changed by hand' >> {conf}; rm -rf {STATE}/staging")
    changed = lab.run(HOST, f"sha256sum {conf}").stdout
    with lock_held(lab):
        out = refused_for_the_lock(deployer)
        assert f"Write {conf}" in out, out[-3000:]
        # uploaded beside the state, not renamed into place
        assert lab.run(HOST, f"sha256sum {conf}").stdout == changed
        staged = lab.run(HOST, f"ls {STATE}/staging/*{conf}", check=False)
        assert staged.rc == 0 and staged.stdout.count("\n") == 1, staged
    # the refused run's staged copy is left; the next run's rename removes it a day later
    redeploy(lab, artifacts, deployer, table)
    assert "changed by hand" not in lab.run(HOST, f"cat {conf}").stdout


@pytest.mark.destructive
def test_a_stack_held_by_an_xt_ipvs_rule_is_not_unloaded_half_way(lab, artifacts, deployer, table):
    """An iptables rule using `-m ipvs` holds xt_ipvs: the swap sees it before unloading
    anything, restores the table into the old modules and fails the host, naming it."""
    patched = "O" in live_state(lab, HOST)["taint"]
    swap = "deploy/rollback.py" if patched else "deploy.py"  # whichever swaps from here
    rule = "INPUT -p tcp --dport 9 -m ipvs --ipvs -j ACCEPT"
    lab.run(HOST, f"iptables -w -A {rule}")
    try:
        r = deployer.run(swap, "--limit", HOST, check=False)
        out = r.stdout + r.stderr
        assert r.rc != 0, out[-3000:]
        assert "in use beyond its table: xt_ipvs (1 references)" in out, out[-3000:]
        assert ("O" in live_state(lab, HOST)["taint"]) == patched, "the old stack was unloaded"
        assert lab.run(HOST, STATE_READ).stdout == table
        assert lab.run(HOST, f"test -d {STATE}/swap.pending", check=False).rc != 0
    finally:
        lab.run(HOST, f"iptables -w -D {rule}", check=False)
    redeploy(lab, artifacts, deployer, table)


@pytest.mark.destructive
def test_a_controller_killed_mid_swap_leaves_the_swap_to_finish_on_the_host(
    lab, artifacts, deployer, table
):
    p = subprocess.Popen(
        [str(PYINFRA), "-y", "--limit", HOST, str(deployer.inventory), "deploy/rollback.py"],
        cwd=REPO, env=deployer.env, text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        # Kill the controller (and its ssh) as soon as the swap has saved the table.
        wait_for(lambda: p.poll() is not None
                 or lab.run(HOST, f"test -d {STATE}/swap.pending", check=False).rc == 0,
                 seconds=300, step=0.3)  # fmt: skip
        assert p.poll() is None, "the rollback ended before its swap was seen"
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    # The swap goes on without its caller: wait for the host lock to be free.
    wait_for(lambda: lab.run(HOST, f"flock -n {STATE}/lock true", check=False).rc == 0,
             seconds=300, step=1)  # fmt: skip
    assert lab.run(HOST, STATE_READ).stdout == table
    assert "O" not in live_state(lab, HOST)["taint"], "the detached swap did not finish"
    # The rerun finds the swap done: it swaps nothing, so no drain hook runs either.
    log = f"{STATE}/hooks.log"
    lab.run(HOST, f"rm -f {log}")
    again = deployer.run("deploy/rollback.py", "--limit", HOST,
                         "--data", f"ipvs_pre_activate=echo x >> {log}")  # fmt: skip
    assert "ipvs-swap" not in again.stdout + again.stderr
    assert lab.run(HOST, f"test -e {log}", check=False).rc != 0, "a hook ran without a swap"
    redeploy(lab, artifacts, deployer, table)


@pytest.mark.destructive
def test_drain_hooks_run_in_order_around_the_swap_and_a_failing_pre_hook_stops_it(
    lab, artifacts, deployer, table
):
    log = f"{STATE}/hooks.log"
    lab.run(HOST, f"rm -f {log}")
    # A pre-hook that fails: the host fails there, with the patched set still loaded.
    failing = f'ipvs_pre_activate=["echo pre >> {log}", "exit 7"]'
    r = deployer.run("deploy/rollback.py", "--limit", HOST, "--data", failing, check=False)
    out = r.stdout + r.stderr
    assert r.rc != 0, out[-3000:]
    assert "pre-activation hook 2 failed (exit 7;" in out, out[-3000:]
    assert "O" in live_state(lab, HOST)["taint"], "swapped despite a failing pre-hook"
    assert lab.run(HOST, f"cat {log}").stdout == "pre\n"
    assert lab.run(HOST, STATE_READ).stdout == table
    # Hooks that pass run in order around the swap: before it the patched build is loaded
    # (taint OE), after it the stock one (no taint).
    lab.run(HOST, f"rm -f {log}")
    taint = "$(cat /sys/module/ip_vs/taint)"
    r = deployer.run(
        "deploy/rollback.py", "--limit", HOST,
        "--data", f'ipvs_pre_activate=["echo pre1 {taint} >> {log}", "echo pre2 >> {log}"]',
        "--data", f"ipvs_post_activate=echo post {taint} >> {log}",
    )  # fmt: skip
    assert lab.run(HOST, f"cat {log}").stdout.split("\n") == ["pre1 OE", "pre2", "post", ""]
    assert lab.run(HOST, STATE_READ).stdout == table
    redeploy(lab, artifacts, deployer, table)


@pytest.mark.slow  # two reboots under TCG: ~4 min (make test-full)
@pytest.mark.destructive
def test_reboot_and_next_boot_activation(lab, artifacts, deployer, deployed):
    """`activation: reboot` reboots a stale host into the installed build and verifies it;
    `next-boot` installs and persists, leaves the loaded build, and the next boot has it."""
    r = deployer.run("deploy/rollback.py", "--limit", HOST, "--data", "ipvs_activation=reboot")
    assert "O" not in live_state(lab, HOST)["taint"], r.stderr[-2000:]
    boot_id = lab.run(HOST, "cat /proc/sys/kernel/random/boot_id").stdout
    deployer.run("deploy.py", "--limit", HOST, "--data", "ipvs_activation=next-boot")
    assert lab.run(HOST, "cat /proc/sys/kernel/random/boot_id").stdout == boot_id
    assert "O" not in live_state(lab, HOST)["taint"], "next-boot swapped the running stack"
    lab.reboot(HOST)
    assert_converged(lab, artifacts, HOST)
    again = deployer.run("deploy.py", "--limit", HOST)
    assert again.totals["success"] == 0, again.changed()
