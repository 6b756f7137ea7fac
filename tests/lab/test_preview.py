"""The flow users are promised, on the lab: `pyinfra inventory/lab.py deploy.py` without `-y`
previews what will change per host and asks; `--dry` prints the same and exits 0; Enter
at the prompt converges; `ipvs-fleet rollout --dry` lists the same pending changes from
pyinfra's own dry run; rollouts can be run again and again; host keys are strict by default.

Each step is checked on the hosts themselves: a preview or dry run must leave every managed
file (down to its change time), the module tree and every live value as they were.

The module starts from stock hosts (it rolls every host back first), so it runs anywhere in
the session. Cost on the 2-VM lab: one rollback, two deploys, two rollouts (verification
gate), a few dry runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipvs_fleet.policy import KNOB, load_policy
from tests.fixtures.lab import FINGERPRINT

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")
CLI = Path(sys.executable).with_name("ipvs-fleet")
pytestmark = [pytest.mark.lab, pytest.mark.destructive]
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SET_KNOB = f"Set net.ipv4.vs.{KNOB} live"


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def out(self) -> str:
        return ANSI.sub("", self.stdout + self.stderr)

    @property
    def doc(self) -> dict:
        return json.loads(self.stdout) if self.stdout.strip().startswith("{") else {}

    def will(self) -> dict[str, list[str]]:
        """Host -> its preview lines (`[host] will ...`)."""
        out: dict[str, list[str]] = {}
        for line in ANSI.sub("", self.stderr).splitlines():
            m = re.match(r"^\s*\[([^\]]+)\]\s+will (.*)$", line)
            if m:
                out.setdefault(m.group(1).strip(), []).append(m.group(2).strip())
        return out

    def changes(self) -> dict[str, list[str]]:
        """Operation (short name) -> hosts, from a --json dry run's plan."""
        return {
            op["name"].split(" | ")[-1]: op["hosts_with_change"]
            for op in self.doc.get("plan", [])
            if op["hosts_with_change"]
        }


@pytest.fixture(scope="module")
def env(lab, artifacts) -> dict[str, str]:
    return {
        **os.environ,
        "IPVS_FLEET_LAB_DIR": str(lab.dir),
        "IPVS_FLEET_ARTIFACTS": str(next(iter(artifacts.values())).path.parent),
    }


@pytest.fixture(scope="module")
def run(env):
    def run(*cmd: str | Path, stdin: str | None = None, timeout: float = 1200) -> Run:
        t0 = time.monotonic()
        r = subprocess.run(
            [str(c) for c in cmd],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=timeout,
        )
        return Run(r.returncode, r.stdout, r.stderr, time.monotonic() - t0)

    return run


def pyinfra(run, lab, *args: str, deploy: str = "deploy.py", stdin: str | None = None) -> Run:
    return run(PYINFRA, *args, lab.inventory_path, deploy, stdin=stdin)


def fingerprints(lab) -> dict[str, str]:
    return {h: lab.run(h, FINGERPRINT).stdout for h in lab.hosts}


def live(lab, host: str, key: str) -> str:
    return lab.run(host, f"cat /proc/sys/net/ipv4/vs/{key} 2>/dev/null", check=False).stdout.strip()


def class_sysctls(lab, host: str) -> dict[str, int]:
    return load_policy().for_host(host, {"ipvs_host_class": lab.hosts[host].host_class}).sysctls


def assert_converged(lab, artifacts, host: str) -> None:
    set_id = artifacts[lab.hosts[host].kernel_release].set_id
    assert lab.run(host, "cat /sys/module/ip_vs_reuse/version").stdout.strip() == set_id, host
    for key, value in class_sysctls(lab, host).items():
        assert live(lab, host, key) == str(value), f"{host}: {key}"


@pytest.fixture(scope="module")
def stock(lab, run):
    """Every host without the fix module and the deploy's files (a fresh host)."""
    r = pyinfra(run, lab, "-y", deploy="deploy/rollback.py")
    assert r.rc == 0, r.out[-4000:]
    for h in lab.hosts:
        assert live(lab, h, KNOB) == "", f"{h}: the knob survived the rollback"


def test_dry_run_and_preview_of_fresh_hosts_list_every_step_and_change_nothing(lab, run, stock):
    before = fingerprints(lab)
    dry = pyinfra(run, lab, "--dry", "--json")
    print(f"dry run of fresh hosts: {dry.seconds:.1f} s")
    assert dry.rc == 0, dry.out[-4000:]
    for h in lab.hosts:
        will = dry.will()[h]
        assert will[0].startswith("install patch set "), will
        for f in (
            "/etc/sysctl.d/90-ipvs-fleet.conf",
            "/etc/modules-load.d/ipvs-fleet.conf",
            "/etc/modprobe.d/ipvs-fleet.conf",
        ):
            assert any(w.startswith(f"create {f}") for w in will), (f, will)
        assert any(w.startswith("load ") and "ip_vs_reuse" in w for w in will), will
        assert not [w for w in will if "unload" in w or "reboot" in w], will
        assert (
            f"set net.ipv4.vs.{KNOB} = {class_sysctls(lab, h)[KNOB]} (the key appears once "
            "the modules above are active)" in will
        )
        for op in ("Install the fix module", "Load the fix module (reload)", SET_KNOB):
            assert h in dry.changes()[op], (op, dry.changes())
    preview = pyinfra(run, lab, stdin="no\n")  # anything but Enter: pyinfra stops
    assert preview.rc == 0, preview.out[-4000:]
    assert "Detected changes" in preview.out and "Beginning operation run" not in preview.out
    assert preview.will() == dry.will()
    assert fingerprints(lab) == before


CONNMARK_RULE = "-t mangle -A PREROUTING -j CONNMARK --restore-mark"


@pytest.mark.parametrize("fault", ["ftp service", "connmark rule"])
def test_a_refusal_on_one_host_changes_no_host_while_the_others_are_on_stock(
    lab, run, stock, fault
):
    """The canary relies on conntrack (an FTP virtual service, or a CONNMARK rule) while
    its class wants knob=1: the deploy refuses it. Every other host is on stock and would
    be changed by a run that went on: none is."""
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    setup, undo, named = {
        "ftp service": (
            "ipvsadm -A -t 10.99.0.1:21 -s rr",
            "ipvsadm -D -t 10.99.0.1:21",
            "10.99.0.1:21",
        ),
        "connmark rule": (
            f"iptables -w {CONNMARK_RULE}",
            f"iptables -w {CONNMARK_RULE.replace(' -A ', ' -D ')}",
            "CONNMARK",
        ),
    }[fault]
    lab.run(canary, setup)
    try:
        before = fingerprints(lab)
        r = pyinfra(run, lab, "-y")
        assert r.rc != 0, r.out[-4000:]
        assert canary in r.out, r.out[-4000:]
        assert re.search(
            rf"{KNOB}=1 refused: host uses {fault.split()[0]} \(.*"
            rf"{re.escape(named)}",
            r.out,
        ), r.out[-4000:]
        assert "Beginning operation run" not in r.out
        assert fingerprints(lab) == before
    finally:
        lab.run(canary, undo)


def test_an_archive_changed_after_the_controller_checked_it_is_refused_on_the_host(
    lab, artifacts, stock, env, tmp_path
):
    """The artifact is verified on the controller and shown in the preview; then, before
    Enter, its archive changes on disk. The host checks the sha256 again before unpacking:
    the install fails there and the host keeps its stock modules."""
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    kr = lab.hosts[canary].kernel_release
    arts = tmp_path / "artifacts"
    shutil.copytree(artifacts[kr].path, arts / kr)
    tarball = next((arts / kr).glob("*.tar.gz"))
    before = lab.run(canary, FINGERPRINT).stdout
    proc = subprocess.Popen(
        [str(PYINFRA), str(lab.inventory_path), "deploy.py", "--limit", canary],
        cwd=REPO,
        env=dict(env, IPVS_FLEET_ARTIFACTS=str(arts)),
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    seen: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: seen.extend(iter(lambda: stdout.read(1), "")))
    reader.start()
    try:
        deadline = time.monotonic() + 600
        while "Press enter to execute" not in "".join(seen):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-4000:]
            time.sleep(0.5)
        with tarball.open("ab") as f:
            f.write(b"tampered after the controller's check")
        # Enter, then wait: communicate() would read stdout too, racing the reader thread
        # for the output (and closing the pipe under it).
        assert proc.stdin is not None
        proc.stdin.write("\n")
        proc.stdin.close()
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
        reader.join(timeout=60)
        stdout.close()
    out = ANSI.sub("", "".join(seen))
    assert proc.returncode != 0, out[-4000:]
    assert "will install patch set" in out, out[-4000:]
    assert "on the host does not match the sha256 the controller checked" in out, out[-4000:]
    # the changed bytes did reach the host: its own check is what stopped them
    # (the run's own upload name: the archive's, a dot and a token)
    newest = f"ls -t /var/lib/ipvs-fleet/incoming/{tarball.name}.* | head -1"
    on_host = lab.run(canary, f"sha256sum $({newest})").stdout
    assert on_host.split()[0] == hashlib.sha256(tarball.read_bytes()).hexdigest()
    assert on_host.split()[0] != artifacts[kr].tarball_sha256
    after = lab.run(canary, FINGERPRINT).stdout
    unchanged = [x for x in before.splitlines() if "/var/lib/ipvs-fleet" not in x]
    assert [x for x in after.splitlines() if "/var/lib/ipvs-fleet" not in x] == unchanged
    assert "updates/ipvs-fleet absent" in after


def test_enter_at_the_prompt_converges_and_then_nothing_is_pending(lab, artifacts, run, stock):
    # pyinfra 3's prompt is "Press enter to execute..."; any other answer (even "y") stops it
    r = pyinfra(run, lab, stdin="\n")
    print(f"deploy through the prompt: {r.seconds:.1f} s")
    assert r.rc == 0, r.out[-4000:]
    assert "Press enter to execute" in r.out and "Beginning operation run" in r.out
    for h in lab.hosts:
        assert_converged(lab, artifacts, h)
    dry = pyinfra(run, lab, "--dry", "--json")
    assert dry.rc == 0 and dry.changes() == {} and dry.will() == {}, dry.out[-4000:]


@pytest.mark.slow  # ~2 min; make test previews fresh hosts and confirms at the prompt
def test_drift_is_listed_exactly_and_changes_nothing_until_confirmed(lab, run, tmp_path):
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    want = class_sysctls(lab, canary)[KNOB]
    lab.run(canary, f"sysctl -w net.ipv4.vs.{KNOB}={1 - want}")
    before = fingerprints(lab)
    preview = pyinfra(run, lab, stdin="no\n")
    dry = pyinfra(run, lab, "--dry")
    dry_json = pyinfra(run, lab, "--dry", "--json")
    for r in (preview, dry, dry_json):
        assert r.rc == 0, r.out[-4000:]
        assert "Operation error" not in r.out
        assert r.will() == {canary: [f"set net.ipv4.vs.{KNOB} = {want} (live {1 - want})"]}
    assert re.search(rf"{re.escape(SET_KNOB)}\s+1 \({canary}\)", preview.out), preview.out
    assert dry_json.changes() == {SET_KNOB: [canary]}
    assert fingerprints(lab) == before
    # the rollout's plan lists it too, per wave, from pyinfra's own dry run
    plan = run(
        CLI,
        "rollout",
        lab.inventory_path,
        "--dry",
        "--waves",
        "canary,100%",
        "--journal",
        tmp_path / "j.jsonl",
    )
    assert plan.rc == 0, plan.out[-4000:]
    assert f"set net.ipv4.vs.{KNOB} = {want} (live {1 - want})" in plan.stdout
    assert "nothing (converged)" in plan.stdout  # the other wave
    assert fingerprints(lab) == before
    # Enter: converged, and only the canary's value moved
    r = pyinfra(run, lab, stdin="\n")
    assert r.rc == 0, r.out[-4000:]
    assert live(lab, canary, KNOB) == str(want)
    after = fingerprints(lab)
    for h in lab.hosts:
        if h != canary:
            assert after[h] == before[h], f"{h} was touched"


def test_plan_names_a_host_the_deploy_would_refuse(lab, run, tmp_path):
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    lab.run(canary, "ipvsadm -A -t 10.99.0.1:21 -s rr")
    try:
        before = fingerprints(lab)
        plan = run(
            CLI,
            "rollout",
            lab.inventory_path,
            "--dry",
            "--waves",
            "canary,100%",
            "--journal",
            tmp_path / "j.jsonl",
        )
        assert plan.rc == 1, plan.out[-4000:]
        assert re.search(
            rf"{canary}: the deploy would refuse it: .*{KNOB}=1 refused.*"
            r"10\.99\.0\.1:21",
            plan.stderr,
        ), plan.stderr[-3000:]
        assert "nothing (converged)" in plan.stdout  # the others were planned
        assert fingerprints(lab) == before
    finally:
        lab.run(canary, "ipvsadm -D -t 10.99.0.1:21")


def test_rollback_preview_lists_the_rollback_and_changes_nothing(lab, run):
    before = fingerprints(lab)
    dry = pyinfra(run, lab, "--dry", "--json", deploy="deploy/rollback.py")
    assert dry.rc == 0, dry.out[-4000:]
    hosts = sorted(lab.hosts)
    assert dry.changes() == {
        f"Set net.ipv4.vs.{KNOB} to 0": sorted(h for h in hosts if live(lab, h, KNOB) == "1"),
        "Remove the fix module's files": hosts,
        "Restore the previous /etc/sysctl.d/90-ipvs-fleet.conf": hosts,
        "Restore the previous /etc/modules-load.d/ipvs-fleet.conf": hosts,
        "Restore the previous /etc/modprobe.d/ipvs-fleet.conf": hosts,
        "Unload the fix module (reload)": hosts,
    }
    assert fingerprints(lab) == before


@pytest.mark.slow  # two rollouts of every host (~2 min); test_sudo and test_rollout_lab roll out
def test_two_rollouts_in_a_row_both_complete(lab, artifacts, run, tmp_path):
    # The pyinfra verification gate (the checks gate is tested by test_rollout_lab.py).
    cfg = tmp_path / "rollout.yml"
    cfg.write_text("waves: ['100%']\ngate: {checks: false}\n")
    journal = tmp_path / "lab.jsonl"
    args = ("rollout", lab.inventory_path, "--config", cfg, "--journal", journal)
    first = run(CLI, *args, "--json", tmp_path / "1.json")
    assert first.rc == 0, first.out[-4000:]
    # something for the second rollout to do: the canary's knob drifted
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    want = class_sysctls(lab, canary)[KNOB]
    lab.run(canary, f"sysctl -w net.ipv4.vs.{KNOB}={1 - want}")
    second = run(CLI, *args, "--json", tmp_path / "2.json", "--parallel", "2")
    print(f"rollouts: {first.seconds:.1f} s, {second.seconds:.1f} s")
    assert second.rc == 0, second.out[-4000:]
    assert "is archived" in second.stderr
    for n in (1, 2):
        doc = json.loads((tmp_path / f"{n}.json").read_text())
        assert doc["outcome"] == "completed"
        assert {h["state"] for h in doc["hosts"].values()} == {"new-verified"}
    [old] = tmp_path.glob("lab.*.jsonl")
    assert '"outcome": "completed"' in old.read_text()
    assert run(CLI, *args, "--resume").rc == 2  # nothing to resume
    for h in lab.hosts:
        assert_converged(lab, artifacts, h)


def test_host_keys_are_strict_unless_asked(lab, run, tmp_path):
    host = next(iter(lab.hosts))
    known = tmp_path / "known_hosts"
    known.write_text("")
    inv = tmp_path / "inv.py"
    # The lab's connection data without its own host key settings: the repository's default.
    inv.write_text(
        f"exec(open({str(lab.inventory_path)!r}).read())\n"
        "for _g in [v for k, v in list(globals().items()) if isinstance(v, list)]:\n"
        "    for _i, _h in enumerate(_g):\n"
        "        _d = {k: v for k, v in _h[1].items() if k != 'ssh_strict_host_key_checking'}\n"
        f"        _g[_i] = (_h[0], {{**_d, 'ssh_known_hosts_file': {str(known)!r}}})\n"
    )

    def uname(*args: str) -> Run:
        return run(PYINFRA, "-y", "--limit", host, *args, inv, "exec", "--", "uname", "-r")

    strict = uname()
    assert strict.rc != 0 and "No host key" in strict.out, strict.out[-3000:]
    assert known.read_text() == ""
    tofu = uname("--data", "ssh_strict_host_key_checking=accept-new")
    assert tofu.rc == 0, tofu.out[-3000:]
    assert known.read_text().strip(), "accept-new did not record the key"
    assert uname().rc == 0  # now known: strict connects
    # a changed key is refused even when trusting new ones
    other = next((n for n in lab.hosts if n != host), None)
    if other:
        theirs = (lab.dir / "ssh" / "known_hosts").read_text().splitlines()
        key = next(
            ln.split(None, 1)[1]
            for ln in theirs
            if ln.startswith(f"[127.0.0.1]:{lab.hosts[other].port} ")
        )
        known.write_text(known.read_text().split()[0] + " " + key + "\n")
        changed = uname("--data", "ssh_strict_host_key_checking=accept-new")
        assert changed.rc != 0, changed.out[-3000:]
