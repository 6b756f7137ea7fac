"""What can still go wrong in the activation, seen on a real lab host (k8s-canary, 6.1).

The deploy loads the fix module ip_vs_reuse beside the distro's own ip_vs under the host
lock (modprobe); the rollback unloads only it. IPVS is never unloaded, so no fault here may
touch it: each test sets an IPVS table (services, real servers, timeouts, a sync daemon)
first, makes its fault fail a run, and shows the table as it was, ip_vs the distro's own,
and the next ordinary run converging. The faults: the host lock held by another controller
(install, configure and activation wait, then fail naming the holder), two deploys at once,
a module built for another kernel (the install's checksums pass; the kernel refuses it, or
on a host whose fix module is loaded already, nothing would load it before the next boot), a
failing drain hook, a controller killed in the middle of a deploy; and `next-boot`, which
loads nothing now.

`make test` runs them on the side lab (lab/fleet-side.yml, marker `side_lab`), beside the
main lab's tests; on the main lab they run the same. Each test starts from the state it
states (on_stock, a converged host) and leaves the canary converged; run alone, each still
passes. Each prints what its runs took. Cost: 7 tests, ~29 pyinfra runs limited to the
canary, 5-6 min under TCG on an idle machine; the reboot test (`slow`) two reboots more.
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

from ipvs_fleet.kernel import MODULE_NAME
from tests.fixtures.deploy import PYINFRA, REPO, Deployer, PyinfraRun
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
TABLE_READ = "ipvsadm-save -n; ipvsadm -L --timeout; ipvsadm -L --daemon"


@pytest.fixture
def table(lab, deployed) -> Iterator[str]:
    """The canary's IPVS table, set for the test (ip_vs loaded for it, as kube-proxy would):
    what every fault must leave as it is."""
    lab.run(HOST, "modprobe ip_vs && " + UNDO)
    lab.run(HOST, TABLE)
    before: str = lab.run(HOST, TABLE_READ).stdout
    lines = before.splitlines()
    assert sum(x.startswith("-A") for x in lines) == 3, before
    assert sum(x.startswith("-a") for x in lines) == 8, before
    assert "901 121 301" in before and "backup sync daemon" in before
    yield before
    lab.run(HOST, UNDO, check=False)


class Timings:
    """Seconds of each named run of a test, printed at its end."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.runs: list[tuple[str, float]] = []

    def add(self, what: str, run: PyinfraRun) -> PyinfraRun:
        self.runs.append((what, run.seconds))
        return run

    def report(self, test: str) -> None:
        runs = ", ".join(f"{w} {s:.1f} s" for w, s in self.runs)
        print(f"{test}: {time.monotonic() - self.t0:.0f} s in all; {runs}")


@pytest.fixture
def timings(request: pytest.FixtureRequest) -> Iterator[Timings]:
    t = Timings()
    yield t
    t.report(request.node.name)


def wait_for(done: Callable[[], bool], seconds: float, step: float) -> None:
    """Poll `done` until it holds or `seconds` pass (the caller asserts what it needs)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not done():
        time.sleep(step)


def fix_loaded(lab) -> str:
    """The loaded fix module's version ("" when it is not loaded)."""
    return str(live_state(lab, HOST)["loaded"])


def assert_ipvs_untouched(lab, table: str) -> None:
    """ip_vs still loaded and the distro's own, its table, timeouts and daemon as they were."""
    assert lab.run(HOST, "test -d /sys/module/ip_vs", check=False).rc == 0, "ip_vs unloaded"
    assert live_state(lab, HOST)["taint"] == "", "ip_vs is not the distro's own build"
    assert lab.run(HOST, TABLE_READ).stdout == table


def failed(run: PyinfraRun, *expected: str) -> str:
    """The output of a run that must have failed, saying each of `expected`."""
    out = run.stdout + run.stderr
    assert run.rc != 0, f"the faulted run passed:\n{out[-3000:]}"
    for text in expected:
        assert text in out, f"{text!r} not in:\n{out[-3000:]}"
    return out


def redeploy(lab, artifacts, deployer, table: str, timings: Timings) -> None:
    """The next ordinary deploy converges the canary, its table as it was: where each test
    leaves it."""
    timings.add("redeploy", deployer.run("deploy.py", "--limit", HOST))
    assert_converged(lab, artifacts, HOST)
    assert_ipvs_untouched(lab, table)


# -- the host lock ---------------------------------------------------------------------------


def module_tree(lab) -> str:
    """FINGERPRINT without the lock's own records under /var/lib/ipvs-fleet (the upload of an
    archive lands there before any step takes the lock)."""
    out = lab.run(HOST, FINGERPRINT).stdout.splitlines()
    return "\n".join(x for x in out if not x.startswith(STATE))


@contextmanager
def lock_held(lab) -> Iterator[None]:
    """Another controller holds the host lock (a process on the host, named in lock.holder)."""
    pidfile = f"{STATE}/test-holder.pid"
    holder = f"echo $$ > {pidfile}; echo 'the test, pid '$$ > {STATE}/lock.holder; exec sleep 299"
    # In a subshell of its own: `a && b &` would background the whole list, whose shell
    # keeps the SSH session's output open until the holder ends.
    lab.run(
        HOST,
        f"mkdir -p {STATE} && (setsid nohup flock {STATE}/lock sh -c "
        f"{shlex.quote(holder)} >/dev/null 2>&1 < /dev/null &)",
    )
    try:
        wait_for(
            lambda: lab.run(HOST, f"flock -n {STATE}/lock true", check=False).rc != 0,
            seconds=30,
            step=0.5,
        )
        yield
    finally:
        # the holder's own pid (flock, its parent, then ends and frees the lock)
        lab.run(HOST, f"kill $(cat {pidfile}); rm -f {pidfile}", check=False)


def refused_for_the_lock(deployer: Deployer, timings: Timings, step: str) -> str:
    """A deploy that waits 5 s for the held lock: it fails at `step` naming the holder."""
    r = timings.add(
        f"refused at {step}",
        deployer.run(
            "deploy.py", "--limit", HOST, "--data", "ipvs_lock_wait_seconds=5", check=False
        ),
    )
    out = failed(r, step)
    assert re.search(rf"the host lock {STATE}/lock stayed held for 5 s by: the test, pid", out), (
        out[-3000:]
    )
    return out


@pytest.mark.destructive
def test_a_held_host_lock_fails_install_configure_and_activation_naming_the_holder(
    lab, artifacts, deployer, table, timings
):
    """Another controller holds the host lock: each step that needs it (the install, a
    managed file's write, the activation) waits its ipvs_lock_wait_seconds, then fails naming
    the holder, with nothing of its own changed; once the lock is free the deploy converges."""
    on_stock(lab, deployer, HOST)
    # The install: nothing installed, nothing loaded.
    with lock_held(lab):
        before = module_tree(lab)
        refused_for_the_lock(deployer, timings, "Install the fix module")
        assert module_tree(lab) == before
    assert fix_loaded(lab) == ""
    assert_ipvs_untouched(lab, table)
    redeploy(lab, artifacts, deployer, table, timings)
    # A managed file's write: on the converged host, one changed by hand is not rewritten.
    conf = "/etc/sysctl.d/90-ipvs-fleet.conf"
    lab.run(HOST, f"echo '# changed by hand' >> {conf}; rm -rf {STATE}/staging")
    changed = lab.run(HOST, f"sha256sum {conf}").stdout
    with lock_held(lab):
        refused_for_the_lock(deployer, timings, f"Write {conf}")
        # uploaded beside the state, not renamed into place
        assert lab.run(HOST, f"sha256sum {conf}").stdout == changed
        staged = lab.run(HOST, f"ls {STATE}/staging/*{conf}", check=False)
        assert staged.rc == 0 and staged.stdout.count("\n") == 1, staged
    # the refused run's staged copy is left; the next run's rename removes it a day later
    redeploy(lab, artifacts, deployer, table, timings)
    assert "changed by hand" not in lab.run(HOST, f"cat {conf}").stdout
    # The activation: installed and configured, the fix module unloaded by hand; the deploy
    # does not load it while the lock is held.
    lab.run(HOST, f"rmmod {MODULE_NAME}")
    with lock_held(lab):
        refused_for_the_lock(deployer, timings, "Load the fix module (reload)")
        assert fix_loaded(lab) == ""
    assert_ipvs_untouched(lab, table)
    redeploy(lab, artifacts, deployer, table, timings)


@pytest.mark.destructive
def test_two_deploys_at_once_both_converge_the_host(lab, artifacts, deployer, table, timings):
    """Two controllers deploy the host at the same moment (both read it unconverged): the
    host lock serialises their install and activation, both succeed, the fix module is
    loaded once and IPVS is untouched."""
    on_stock(lab, deployer, HOST)
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [str(PYINFRA), "-y", "--limit", HOST, str(deployer.inventory), "deploy.py"],
            cwd=REPO,
            env=deployer.env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outs = []
    for n, p in enumerate(procs, 1):
        outs.append(p.communicate(timeout=1200)[0])
        timings.runs.append((f"deploy {n} of 2", time.monotonic() - t0))
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert_converged(lab, artifacts, HOST)
    assert_ipvs_untouched(lab, table)
    again = timings.add("no-op deploy", deployer.run("deploy.py", "--limit", HOST))
    assert again.totals["success"] == 0, again.changed()


# -- a module the kernel refuses ---------------------------------------------------------------


def other_kernels_module(good: Any, other: Any, folder: Path) -> Path:
    """An artifact for `good`'s kernel whose manifest is valid (its sha256s match) but whose
    module is `other`'s, built for another kernel: modprobe refuses it on the host."""
    kr = good.kernel_release
    shutil.copytree(good.path, folder / kr)
    doc = json.loads((folder / kr / "manifest.json").read_text())
    unpacked = folder / "unpacked"
    unpacked.mkdir()
    with tarfile.open(other.tarball) as t:
        t.extractall(unpacked, filter="data")
    kos = sorted(unpacked.glob("*.ko"))
    assert [k.name for k in kos] == [f"{MODULE_NAME}.ko"], kos
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
def test_a_module_built_for_another_kernel_fails_the_host_and_leaves_ipvs_alone(
    lab, artifacts, other_kernel_artifact, deployer, table, timings, tmp_path
):
    """A valid manifest over 6.12's ip_vs_reuse.ko under 6.1's name: the install passes its
    checksums, modprobe refuses the module, the host fails naming it; ip_vs and its table
    are untouched and the fix module is not loaded. The next deploy with the right artifact
    replaces the file and converges."""
    on_stock(lab, deployer, HOST)
    kr = lab.hosts[HOST].kernel_release
    assert other_kernel_artifact.kernel_release != kr
    arts = other_kernels_module(artifacts[kr], other_kernel_artifact, tmp_path / "artifacts")
    bad = Deployer(deployer.inventory, dict(deployer.env, IPVS_FLEET_ARTIFACTS=str(arts)))
    r = timings.add(
        "deploy of the other kernel's module", bad.run("deploy.py", "--limit", HOST, check=False)
    )
    out = failed(r, MODULE_NAME)
    # refused by modprobe in the activation, or (better) by the install, naming the kernel
    assert (
        f"could not insert '{MODULE_NAME}'" in out or other_kernel_artifact.kernel_release in out
    ), out[-3000:]
    print(
        "the host's failure:", *[x for x in out.splitlines() if MODULE_NAME in x][-3:], sep="\n  "
    )
    assert fix_loaded(lab) == ""
    assert_ipvs_untouched(lab, table)
    redeploy(lab, artifacts, deployer, table, timings)
    assert vermagic(lab).startswith(kr + " ")


def vermagic(lab) -> str:
    """The installed fix module's vermagic (its first word: the kernel it was built for)."""
    return str(
        lab.run(
            HOST,
            f"modinfo -F vermagic /lib/modules/$(uname -r)/updates/ipvs-fleet/{MODULE_NAME}.ko",
        ).stdout
    )


@pytest.mark.destructive
def test_a_module_built_for_another_kernel_fails_a_converged_host_too(
    lab, artifacts, other_kernel_artifact, deployer, table, timings, tmp_path
):
    """The same artifact on a host whose fix module is loaded already, from the same source
    (same set id): there is nothing to load, so no modprobe meets the file; still the host
    must fail, naming the kernel the module was built for, not report success with a module
    the next boot cannot load. The loaded module and IPVS stay as they are."""
    timings.add("deploy", deployer.run("deploy.py", "--limit", HOST))
    kr = lab.hosts[HOST].kernel_release
    loaded = fix_loaded(lab)
    assert loaded == artifacts[kr].set_id == other_kernel_artifact.set_id
    arts = other_kernels_module(artifacts[kr], other_kernel_artifact, tmp_path / "artifacts")
    bad = Deployer(deployer.inventory, dict(deployer.env, IPVS_FLEET_ARTIFACTS=str(arts)))
    r = timings.add(
        "deploy of the other kernel's module", bad.run("deploy.py", "--limit", HOST, check=False)
    )
    print(f"installed now: {vermagic(lab).split()[0]}")
    failed(r, other_kernel_artifact.kernel_release)
    assert fix_loaded(lab) == loaded
    assert_ipvs_untouched(lab, table)
    redeploy(lab, artifacts, deployer, table, timings)
    assert vermagic(lab).startswith(kr + " ")


# -- drain hooks -----------------------------------------------------------------------------


@pytest.mark.destructive
def test_drain_hooks_run_in_order_around_the_activation_and_a_failing_pre_hook_stops_it(
    lab, artifacts, deployer, table, timings
):
    """A failing pre-hook fails the host there: the module is installed but not loaded.
    Hooks that pass run in order around the activation, both ways: before the deploy's
    the fix module is not loaded, after it it is; the rollback's see the reverse."""
    on_stock(lab, deployer, HOST)
    log = f"{STATE}/hooks.log"
    lab.run(HOST, f"mkdir -p {STATE} && rm -f {log}")
    failing = f'ipvs_pre_activate=["echo pre >> {log}", "exit 7"]'
    r = timings.add(
        "deploy, pre-hook 2 fails",
        deployer.run("deploy.py", "--limit", HOST, "--data", failing, check=False),
    )
    failed(r, "pre-activation hook 2 failed (exit 7;")
    assert fix_loaded(lab) == "", "loaded despite a failing pre-hook"
    assert lab.run(HOST, f"cat {log}").stdout == "pre\n"
    assert_ipvs_untouched(lab, table)
    state = f"$(test -d /sys/module/{MODULE_NAME} && echo loaded || echo absent)"
    hooks = (
        "--data",
        f'ipvs_pre_activate=["echo pre1 {state} >> {log}", "echo pre2 >> {log}"]',
        "--data",
        f"ipvs_post_activate=echo post {state} >> {log}",
    )
    for deploy, before, after in (
        ("deploy.py", "absent", "loaded"),
        ("deploy/rollback.py", "loaded", "absent"),
    ):
        lab.run(HOST, f"rm -f {log}")
        timings.add(f"{deploy} with hooks", deployer.run(deploy, "--limit", HOST, *hooks))
        got = lab.run(HOST, f"cat {log}").stdout.split("\n")
        assert got == [f"pre1 {before}", "pre2", f"post {after}", ""], (deploy, got)
        assert_ipvs_untouched(lab, table)
    # A run with nothing to activate runs no hook.
    lab.run(HOST, f"rm -f {log}")
    timings.add(
        "rollback again, hooks", deployer.run("deploy/rollback.py", "--limit", HOST, *hooks)
    )
    assert lab.run(HOST, f"test -e {log}", check=False).rc != 0, "a hook ran with no change"
    redeploy(lab, artifacts, deployer, table, timings)


# -- next-boot -------------------------------------------------------------------------------


@pytest.mark.destructive
def test_next_boot_installs_and_persists_but_loads_nothing(
    lab, artifacts, deployer, table, timings
):
    """`activation: next-boot` installs the module and writes the boot-time files, and the
    running kernel keeps exactly the modules it had: no fix module, no knob, no reboot.
    A `reload` deploy afterwards only loads it (nothing left to install or write)."""
    on_stock(lab, deployer, HOST)
    boot_id = lab.run(HOST, "cat /proc/sys/kernel/random/boot_id").stdout
    mods = "awk '$1 ~ /^(ip_vs|xt_ipvs|nf_)/ {print $1}' /proc/modules | sort"
    loaded_before = lab.run(HOST, mods).stdout
    timings.add(
        "next-boot deploy",
        deployer.run("deploy.py", "--limit", HOST, "--data", "ipvs_activation=next-boot"),
    )
    assert lab.run(HOST, "cat /proc/sys/kernel/random/boot_id").stdout == boot_id
    assert lab.run(HOST, mods).stdout == loaded_before, "next-boot loaded a module"
    st = live_state(lab, HOST)
    assert st["loaded"] == "" and "vs.conn_reuse_old_conntrack" not in st, st
    kr = lab.hosts[HOST].kernel_release
    assert st["set"] == artifacts[kr].set_id, "not installed for the next boot"
    assert MODULE_NAME in lab.run(HOST, "cat /etc/modules-load.d/ipvs-fleet.conf").stdout
    assert_ipvs_untouched(lab, table)
    # what the next boot would load, loaded now by the ordinary deploy: only the activation
    # (and the knob it brings) changes
    r = timings.add("reload deploy", deployer.run("deploy.py", "--limit", HOST))
    # (pyinfra names each operation "<deploy> | <operation>")
    changed = [c.rpartition(" | ")[2] for c in r.changed().get(HOST, [])]
    assert "Load the fix module (reload)" in changed, changed
    assert not [c for c in changed if c.startswith(("Install", "Write"))], changed
    assert_converged(lab, artifacts, HOST)
    assert_ipvs_untouched(lab, table)


@pytest.mark.slow  # two reboots under TCG: ~4 min (make test-full)
@pytest.mark.destructive
def test_reboot_and_next_boot_activation(lab, artifacts, deployer, deployed, timings):
    """`activation: reboot` reboots a host whose fix module must go; `next-boot` installs
    and persists, the next boot loads the fix module, and a deploy then has nothing to do."""
    back = timings.add(
        "rollback, reboot",
        deployer.run("deploy/rollback.py", "--limit", HOST, "--data", "ipvs_activation=reboot"),
    )
    assert fix_loaded(lab) == "", back.stderr[-2000:]
    timings.add(
        "next-boot deploy",
        deployer.run("deploy.py", "--limit", HOST, "--data", "ipvs_activation=next-boot"),
    )
    assert fix_loaded(lab) == "", "next-boot loaded the fix module"
    lab.reboot(HOST)
    assert_converged(lab, artifacts, HOST)
    again = timings.add("deploy after the boot", deployer.run("deploy.py", "--limit", HOST))
    assert again.totals["success"] == 0, again.changed()


# -- the controller killed -----------------------------------------------------------------


@pytest.mark.destructive
def test_a_controller_killed_mid_deploy_leaves_a_host_the_next_run_converges(
    lab, artifacts, deployer, table, timings
):
    """The controller (pyinfra and its ssh) is killed in the middle of a deploy: installed
    and configured, its activation begun (a pre-hook running). Nothing is half-loaded, no
    lock is left held, and the next run converges the host."""
    on_stock(lab, deployer, HOST)
    mark = "/run/ipvs-fleet-test-hook"
    lab.run(HOST, f"rm -f {mark}")
    t0 = time.monotonic()
    p = subprocess.Popen(
        [
            str(PYINFRA),
            "-y",
            "--limit",
            HOST,
            "--data",
            f"ipvs_pre_activate=echo $$ > {mark}; exec sleep 120",
            str(deployer.inventory),
            "deploy.py",
        ],
        cwd=REPO,
        env=deployer.env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(
            lambda: p.poll() is not None or lab.run(HOST, f"test -e {mark}", check=False).rc == 0,
            seconds=600,
            step=0.5,
        )
        assert p.poll() is None, "the deploy ended before its activation was seen"
        os.killpg(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    timings.runs.append(("deploy, killed in its activation", time.monotonic() - t0))
    assert p.returncode == -signal.SIGKILL
    # The hook goes on without its caller (no terminal to hang up): it holds no lock, and
    # the activation it came before never runs. Ended here, by its pid, to keep the host quiet.
    lab.run(HOST, f"kill $(cat {mark}); rm -f {mark}", check=False)
    assert fix_loaded(lab) == ""
    assert lab.run(HOST, f"flock -n {STATE}/lock true", check=False).rc == 0, "lock left held"
    assert_ipvs_untouched(lab, table)
    redeploy(lab, artifacts, deployer, table, timings)
