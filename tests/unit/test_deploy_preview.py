"""The deploy's preview, dry run and execution-time verification, through the real pyinfra
CLI against pyinfra's `@fake` connector: each fake host answers the deploy's fact commands
from a scripted state (fresh, converged, drifted), so what pyinfra would do is checked
without a VM. (The same flows on real hosts: tests/lab/test_preview.py.)

A fake host's facts never change: an execution here shows which commands run and that a
host whose state does not converge fails at its verification step, by a command, not by an
exception while pyinfra prepares the operations.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.util import get_template

from ipvs_fleet.deploy.operations import MANAGED_FILES, TEMPLATES
from ipvs_fleet.policy import KNOB, load_policy
from ipvs_fleet.rollout.runner import plan_outcomes
from tests.fixtures.loaded import loaded_output

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")
KR = "6.1.0-57-cloud-amd64"
SET_ID = "3.0+fake"
OLD_ID = "3.0+older"  # an earlier build of the fix module
FOREIGN_ID = "2.0+old"  # a patched ip_vs set of ipvs-fleet 2.x
FIX = "ip_vs_reuse"
MODULES = {f"{FIX}.ko": hashlib.sha256(FIX.encode()).hexdigest()}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# What would take IPVS (and its tables) down: no command of the deploy may contain it.
UNLOADS_IPVS = re.compile(r"modprobe\s+(-\w*r|--remove)|rmmod\s+(-\S+\s+)*ip_vs(?!_reuse\b)")

# The inventory: hosts and their scripted answers from $FAKE_FLEET (JSON), as @fake hosts.
INVENTORY = """
import json, os, re
_spec = json.load(open(os.environ["FAKE_FLEET"]))
def _host(name, h):
    return ("@fake/" + name, {**h["data"], "fake_delay": 0, "fake_delay_jitter": 0,
            "fake_responses": {re.compile(k): v for k, v in h["responses"]}})
for _group, _names in _spec["groups"].items():
    globals()[_group] = [_host(n, _spec["hosts"][n]) for n in _names]
"""


def sha256_of_template(path: str, host_class: str) -> str:
    s = load_policy().for_host("x", {"ipvs_host_class": host_class})
    out = get_template(str(TEMPLATES / MANAGED_FILES[path]), {"trim_blocks": True}).render(
        ipvs_host_class=s.host_class, ipvs_sysctls=s.sysctls, ipvs_modules=list(s.modules)
    )
    return hashlib.sha256(out.encode()).hexdigest()


@dataclass
class FakeHost:
    """A host's state as its facts tell it."""

    host_class: str = "k8s_node"
    installed: bool = False  # the fix module in updates/, depmod'ed
    # none | stock (the class's distro modules, no fix module) | current (and the fix module
    # of SET_ID) | older (and the fix module of OLD_ID) | foreign (the class's IPVS modules
    # from a 2.x patched set, out of tree, no fix module)
    loaded: str = "none"
    sysctls: dict[str, int] = field(default_factory=dict)
    files: bool = False  # the managed files written and their backups kept
    usage: list[str] = field(default_factory=list)  # IpvsUsage output lines
    unloaded: tuple[str, ...] = ()  # class modules not loaded, whatever `loaded` says
    data: dict[str, Any] = field(default_factory=dict)  # more host data

    def loaded_rows(self) -> list[str]:
        """IpvsLoadedModules rows (tests.fixtures.loaded) of the loaded modules."""
        if self.loaded == "none":
            return []
        distro = [
            m
            for m in load_policy().for_host("x", {"ipvs_host_class": self.host_class}).modules
            if m != FIX and m not in self.unloaded
        ]
        if self.loaded == "foreign":
            return [f"{m}|{FOREIGN_ID}|-|OE|-|-|-|-" for m in distro]
        rows = [f"{m}|-|-|-|-|-|-|-" for m in distro]
        inst = f"{SET_ID}|-|{SET_ID}|prekill" if self.installed else "-|-|-|-"
        if self.loaded in ("current", "older"):
            rows.append(f"{FIX}|{SET_ID if self.loaded == 'current' else OLD_ID}|-|OE|{inst}")
        return rows

    def responses(self) -> list[tuple[str, Any]]:
        loaded = self.loaded_rows()
        out: list[tuple[str, Any]] = [
            # the deploy's failing step (operations.fail): fails here too (-vv shows its text)
            (r">&2; exit 1$", {"success": False}),
            (r"^uname -r$", KR),
            (r"echo lockdown=", ["lockdown=none", "sig_enforce=N", "secure_boot=0"]),
            (r"echo '## lsmod'", ["## lsmod", *(r.split("|")[0] for r in loaded), *self.usage]),
            (
                r"sha256sum -- \*\.ko",
                [f"{sha}  {n}" for n, sha in MODULES.items()]
                if self.installed
                else ["depmod-missing"],
            ),
            (r"for d in /sys/module/ip_vs ", loaded_output(loaded)),
            (
                r"/proc/sys/net/ipv4/vs/\*",
                [f"/proc/sys/net/ipv4/vs/{k}:{v}" for k, v in self.sysctls.items()],
            ),
        ]
        if self.files:
            for path in MANAGED_FILES:
                # the deploy's fact of a managed file (ManagedFile): the backup kept, the
                # file as the class's template renders it
                sha = sha256_of_template(path, self.host_class)
                out.append(
                    (
                        rf"^f={re.escape(path)}; b=",
                        ["backup=yes", "exists=yes", f"mode=644 sha256={sha}"],
                    )
                )
        return out


def converged(host_class: str = "k8s_node") -> FakeHost:
    s = load_policy().for_host("x", {"ipvs_host_class": host_class})
    return FakeHost(host_class, True, "current", dict(s.sysctls), True)


def stock_sysctls() -> dict[str, int]:
    """A stock module's values (no knob)."""
    return {
        "conn_reuse_mode": 1,
        "conntrack": 0,
        "expire_nodest_conn": 0,
        "expire_quiescent_template": 0,
    }


@dataclass
class Run:
    rc: int
    doc: dict[str, Any]
    stderr: str

    def changes(self) -> dict[str, list[str]]:
        """Operation (short name) -> hosts pyinfra says it would change."""
        out = {}
        for op in self.doc.get("plan") or []:
            if op["hosts_with_change"]:
                out[op["name"].split(" | ")[-1]] = op["hosts_with_change"]
        return out

    def _lines(self, host: str, mark: str) -> list[str]:
        """What follows `mark` on the lines of one host (pyinfra pads short host names)."""
        line = re.compile(rf"\s*\[@fake/{re.escape(host)}\]\s+{re.escape(mark)}(.*)")
        return [
            m.group(1).strip()
            for ln in ANSI.sub("", self.stderr).splitlines()
            if (m := line.match(ln))
        ]

    def will(self, host: str) -> list[str]:
        """The preview lines of one host."""
        return self._lines(host, "will ")

    def commands(self, host: str) -> list[str]:
        """The shell commands an execution with -vv ran on one host, in order."""
        return self._lines(host, ">>> ")


@pytest.fixture
def fleet(tmp_path):
    """Writes a fake fleet and an artifact for KR; returns run(hosts, *pyinfra args)."""
    art = tmp_path / "artifacts" / KR
    art.mkdir(parents=True)
    tarball = art / "ipvs-fleet-modules.tar.gz"
    with tarfile.open(tarball, "w:gz"):
        pass
    manifest = {
        "format": 1,
        "kernel_release": KR,
        "release": "bookworm",
        "line": "6.1",
        "tarball": tarball.name,
        "tarball_sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
        "modules": MODULES,
        "modinfo": {"ipvs_fleet": SET_ID, "ipvs_fleet_reuse": "prekill"},
        "reuse_design": "prekill",
        "vermagic": KR,
    }
    (art / "manifest.json").write_text(json.dumps(manifest))
    inv = tmp_path / "inventory.py"
    inv.write_text(INVENTORY)

    def run(
        hosts: dict[str, FakeHost],
        *args: str,
        deploy: str = "deploy.py",
        groups: dict[str, list[str]] | None = None,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
    ) -> Run:
        spec: dict[str, Any] = {
            "groups": groups or {"fleet": list(hosts)},
            "hosts": {
                n: {
                    "data": {"ipvs_host_class": h.host_class, **h.data},
                    "responses": h.responses(),
                }
                for n, h in hosts.items()
            },
        }
        (tmp_path / "fleet.json").write_text(json.dumps(spec))
        e = {
            **os.environ,
            "FAKE_FLEET": str(tmp_path / "fleet.json"),
            "IPVS_FLEET_ARTIFACTS": str(tmp_path / "artifacts"),
            **(env or {}),
        }
        r = subprocess.run(
            [str(PYINFRA), *args, str(inv), deploy],
            cwd=REPO,
            env=e,
            text=True,
            capture_output=True,
            timeout=90,
            input=stdin,
        )
        doc = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
        return Run(r.returncode, doc, r.stderr)

    return run


SET_KNOB = "Set net.ipv4.vs.conn_reuse_old_conntrack live"


def test_dry_run_of_a_drifted_host_lists_exactly_its_drift(fleet):
    drifted = converged()
    drifted.sysctls["conn_reuse_old_conntrack"] = 0
    r = fleet({"drifted": drifted, "ok": converged("ftp")}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    assert r.changes() == {SET_KNOB: ["@fake/drifted"]}
    assert r.will("drifted") == ["set net.ipv4.vs.conn_reuse_old_conntrack = 1 (live 0)"]
    assert r.will("ok") == []
    assert "Operation error" not in r.stderr


def test_preview_without_yes_shows_the_change_and_asks(fleet):
    drifted = converged()
    drifted.sysctls["conn_reuse_old_conntrack"] = 0
    # not Enter: pyinfra does not execute
    r = fleet({"drifted": drifted}, stdin="no\n")
    assert r.rc == 0, r.stderr[-3000:]
    out = ANSI.sub("", r.stderr)
    assert "Detected changes" in out and "Press enter to execute" in out
    assert re.search(rf"{re.escape(SET_KNOB)}\s+1 \(@fake/drifted\)", out), out[-3000:]
    assert "Beginning operation run" not in out


LOAD = "Load the fix module (reload)"


def test_dry_run_of_a_fresh_host_lists_every_step(fleet):
    fresh = FakeHost(loaded="stock", sysctls=stock_sysctls())
    r = fleet({"fresh": fresh}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    sysctls = load_policy().for_host("x", {"ipvs_host_class": "k8s_node"}).sysctls
    differ = [k for k, v in sysctls.items() if stock_sysctls().get(k) != v]
    assert "conn_reuse_mode" not in differ  # 1 on the stock module already: no change
    assert set(r.changes()) == {
        "Install the fix module",
        *(f"Write {p}" for p in MANAGED_FILES),
        LOAD,
        *(f"Set net.ipv4.vs.{k} live" for k in differ),
    }
    will = r.will("fresh")
    assert will[0].startswith(
        f"install patch set {SET_ID} for {KR}: {FIX}.ko into /lib/modules/{KR}/updates/ipvs-fleet"
    )
    # the distro's IPVS modules stay loaded: only the fix module is loaded beside them
    assert f"load {FIX}" in will
    # the knob appears with the fix module: planned, not an error
    assert (
        "set net.ipv4.vs.conn_reuse_old_conntrack = 1 (the key appears once the modules "
        "above are active)" in will
    )


def test_nothing_loaded_plans_a_load_of_the_class_modules_and_the_fix(fleet):
    r = fleet({"bare": FakeHost()}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    assert LOAD in r.changes()
    assert f"load ip_vs, ip_vs_rr, ip_vs_wrr, ip_vs_sh, {FIX}" in r.will("bare")


def test_converged_host_dry_run_and_execution_change_nothing(fleet):
    hosts = {"a": converged(), "b": converged("ftp")}
    assert fleet(hosts, "--dry", "--json").changes() == {}
    r = fleet(hosts, "-y", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    totals = r.doc["results"]["totals"]
    assert totals["success"] == 0 and totals["error"] == 0 and totals["no_change"] > 0


def test_verification_fails_the_host_at_execution_with_its_problems(fleet):
    # The fake host's facts never change, so the set value stays drifted: the verification
    # step (a command) fails the host, naming the value; no exception at prepare time.
    drifted = converged()
    drifted.sysctls["conn_reuse_old_conntrack"] = 0
    r = fleet({"drifted": drifted, "ok": converged()}, "-y", "--json", "-vv")
    assert r.rc == 1
    assert r.doc["results"]["failed_hosts"] == ["@fake/drifted"]
    assert (
        "verification failed on @fake/drifted: net.ipv4.vs.conn_reuse_old_conntrack: "
        "expected 1, live 0" in ANSI.sub("", r.stderr)
    )
    assert "Operation error" not in r.stderr


def test_an_older_fix_module_is_reloaded_alone_ipvs_stays(fleet):
    older = converged()
    older.loaded = "older"
    r = fleet({"n": older, "ok": converged()}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    assert r.changes() == {LOAD: ["@fake/n"]}
    assert r.will("n") == [
        f"unload {FIX} {OLD_ID} (IPVS stays loaded, its tables untouched); load {FIX}"
    ]
    # Executed: one command under the host lock unloads the fix module alone and loads it
    # again; the facts never change here, so the verification then fails the host.
    r = fleet({"n": older}, "-y", "--json", "-vv")
    assert r.rc == 1
    [act] = [c for c in r.commands("n") if "ipvs-fleet activate" in c]
    assert act.startswith("mkdir -p /var/lib/ipvs-fleet && exec 9>> /var/lib/ipvs-fleet/lock")
    assert act.endswith(
        f'&& true && rmmod {FIX} && for m in {FIX} ; do modprobe "$m" || exit 1; done'
    )
    assert (
        f"ip_vs_reuse: the loaded build is not patch set {SET_ID} (version {OLD_ID})"
        in ANSI.sub("", r.stderr)
    )


def test_a_foreign_ipvs_build_refuses_reload_and_is_rebooted_with_reboot(fleet):
    """A 2.x patched ip_vs set is loaded: replacing it live would unload IPVS, so `reload`
    fails the host saying how to fix it, and `reboot` reboots into the stock modules."""
    foreign = converged()
    foreign.loaded = "foreign"
    names = "ip_vs, ip_vs_rr, ip_vs_sh, ip_vs_wrr"
    refusal = (
        f"{names}: loaded from an out-of-tree build that is not the fix module; "
        "replacing it would unload IPVS and drop its tables and connections: reboot the "
        "host (host data ipvs_activation: reboot)"
    )
    r = fleet({"n": foreign}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    assert r.changes() == {LOAD: ["@fake/n"]}
    assert r.will("n") == [f"fail the host: {refusal}"]
    r = fleet({"n": foreign, "ok": converged()}, "-y", "--json", "-vv")
    assert r.rc == 1 and r.doc["results"]["failed_hosts"] == ["@fake/n"]
    assert refusal in ANSI.sub("", r.stderr)
    assert not [c for c in r.commands("n") if "ipvs-fleet activate" in c or "rmmod" in c]
    boot = ["--data", "ipvs_activation=reboot"]
    r = fleet({"n": foreign}, "--dry", "--json", *boot)
    assert r.rc == 0, r.stderr[-3000:]
    assert r.changes() == {"Load the fix module (reboot)": ["@fake/n"]}
    assert r.will("n") == [f"reboot for {FIX} {SET_ID} (and stock {names})"]
    # next-boot leaves the running kernel alone: no activation, no verification
    r = fleet({"n": foreign}, "--dry", "--json", "--data", "ipvs_activation=next-boot")
    assert r.rc == 0, r.stderr[-3000:]
    assert r.changes() == {}


def test_reboot_strategy_reboots_a_host_without_the_fix_module(fleet):
    stock = converged()
    stock.loaded = "stock"
    r = fleet({"n": stock}, "--dry", "--json", "--data", "ipvs_activation=reboot")
    assert r.rc == 0, r.stderr[-3000:]
    assert r.will("n") == [f"reboot for {FIX} {SET_ID}"]


HOOKS = [
    "--data",
    'ipvs_pre_activate=["drain one", "drain two"]',
    "--data",
    "ipvs_post_activate=uncordon",
]


def test_drain_hooks_wrap_the_activation_and_are_previewed(fleet):
    stale = converged()
    stale.loaded = "stock"  # the fix module not loaded yet
    r = fleet({"n": stale}, "--dry", "--json", *HOOKS)
    assert r.rc == 0, r.stderr[-3000:]
    assert r.will("n") == [
        f"run 2 pre-activation hook(s); load {FIX}; run 1 post-activation hook(s)"
    ]
    # Executed: the hooks run in order around the activation (-vv lists each command run).
    r = fleet({"n": stale}, "-y", "--json", "-vv", *HOOKS)
    cmds = r.commands("n")
    at = [
        next((i for i, c in enumerate(cmds) if s in c), -1)
        for s in ("sh -c 'drain one'", "sh -c 'drain two'", "ipvs-fleet activate", "sh -c uncordon")
    ]
    assert -1 not in at and at == sorted(at), at


def test_drain_hooks_do_not_run_when_the_fix_module_is_already_active(fleet):
    """Loading a class's scheduler that is missing changes nothing for the traffic the
    hooks drain: it is loaded, and no hook runs."""
    host = converged()
    host.unloaded = ("ip_vs_sh",)
    r = fleet({"n": host}, "--dry", "--json", *HOOKS)
    assert r.rc == 0, r.stderr[-3000:]
    assert r.will("n") == ["load ip_vs_sh"]
    r = fleet({"n": host}, "-y", "--json", "-vv", *HOOKS)
    cmds = r.commands("n")
    [act] = [c for c in cmds if "ipvs-fleet activate" in c]
    assert act.endswith('&& true && for m in ip_vs_sh ; do modprobe "$m" || exit 1; done')
    assert not [c for c in cmds if "drain" in c or "uncordon" in c]


ROLLBACK = "deploy/rollback.py"


def test_rollback_turns_the_knob_off_removes_the_files_then_unloads_only_the_fix(fleet):
    r = fleet({"a": converged()}, "--dry", "--json", deploy=ROLLBACK)
    assert r.rc == 0, r.stderr[-3000:]
    assert set(r.changes()) == {
        "Set net.ipv4.vs.conn_reuse_old_conntrack to 0",
        "Remove the fix module's files",
        *(f"Restore the previous {p}" for p in MANAGED_FILES),
        "Unload the fix module (reload)",
    }
    will = r.will("a")
    assert will[0] == "set net.ipv4.vs.conn_reuse_old_conntrack = 0 (live 1)"
    assert will[1] == (
        f"remove the ipvs-fleet module set for {KR} ({FIX}.ko in "
        f"/lib/modules/{KR}/updates/ipvs-fleet), depmod"
    )
    assert any(w.startswith("restore /etc/sysctl.d/90-ipvs-fleet.conf") for w in will)
    assert will[-1] == f"unload {FIX} {SET_ID} (IPVS stays loaded, its tables untouched)"
    # Executed, in that order; the facts never change here, so the verification fails.
    r = fleet({"a": converged()}, "-y", "--json", "-vv", deploy=ROLLBACK)
    cmds = r.commands("a")
    at = [
        next((i for i, c in enumerate(cmds) if s in c), -1)
        for s in (
            "sysctl -w net.ipv4.vs.conn_reuse_old_conntrack=0",
            f"rm -rf /lib/modules/{KR}/updates/ipvs-fleet && depmod",
            f"rmmod {FIX}",
        )
    ]
    assert -1 not in at and at == sorted(at), at
    assert f"verification failed on @fake/a: {FIX} is still loaded" in ANSI.sub("", r.stderr)
    # a host already without the fix module: nothing to roll back
    stock = FakeHost(loaded="stock", sysctls=stock_sysctls())
    assert fleet({"s": stock}, "--dry", "--json", deploy=ROLLBACK).changes() == {}


@pytest.mark.parametrize(
    "host, deploy",
    [
        (FakeHost(), "deploy.py"),
        (FakeHost(loaded="stock", sysctls=stock_sysctls()), "deploy.py"),
        (FakeHost(installed=True, loaded="older", files=True), "deploy.py"),
        (FakeHost(installed=True, loaded="current", sysctls={KNOB: 1}, files=True), ROLLBACK),
    ],
    ids=["fresh", "stock", "older", "rollback"],
)
def test_no_command_ever_unloads_ipvs(fleet, host, deploy):
    r = fleet({"n": host}, "-y", "--json", "-vv", *HOOKS, deploy=deploy)
    cmds = r.commands("n")
    assert any("ipvs-fleet activate" in c for c in cmds), cmds  # it did activate
    assert not [c for c in cmds if UNLOADS_IPVS.search(c)]


def test_the_ipvs_unload_pattern_catches_every_way_of_unloading():
    for cmd in (
        "rmmod ip_vs",
        "rmmod ip_vs_rr ip_vs",
        "rmmod -f ip_vs_sh",
        "modprobe -r ip_vs",
        "modprobe -rv ip_vs_reuse",
        "modprobe --remove ip_vs_reuse",
    ):
        assert UNLOADS_IPVS.search(cmd), cmd
    assert not UNLOADS_IPVS.search(f"true && rmmod {FIX} && modprobe {FIX}")


FTP_SERVICE = ["## ipvsadm", "TCP  10.0.0.1:21 rr"]


def test_a_refusal_aborts_the_run_by_default(fleet):
    bad = converged()
    bad.usage = FTP_SERVICE
    r = fleet({"bad": bad, "ok": converged()}, "--dry", "--json")
    assert r.rc != 0
    assert "conn_reuse_old_conntrack=1 refused" in r.stderr and "10.0.0.1:21" in r.stderr


def test_a_plan_reports_each_refusal_and_plans_the_other_hosts(fleet):
    bad = converged()
    bad.usage = FTP_SERVICE
    drifted = converged("ftp")
    drifted.sysctls["conntrack"] = 0
    hosts = ["@fake/bad", "@fake/drifted", "@fake/ok"]
    r = fleet(
        {"bad": bad, "drifted": drifted, "ok": converged()},
        "--dry",
        "--json",
        env={"IPVS_FLEET_PREFLIGHT": "report"},
    )
    plans = plan_outcomes(r.doc, r.stderr, hosts)
    assert "conn_reuse_old_conntrack=1 refused" in plans["@fake/bad"].refused
    assert plans["@fake/bad"].changes == []
    assert plans["@fake/drifted"].ok
    assert plans["@fake/drifted"].changes == ["set net.ipv4.vs.conntrack = 1 (live 0)"]
    assert plans["@fake/ok"].ok and plans["@fake/ok"].changes == []


@pytest.mark.parametrize("deploy", ["deploy.py", ROLLBACK])
def test_a_run_taking_both_members_of_a_failure_domain_is_refused(fleet, deploy):
    """pyinfra runs each operation on all its hosts at once: both directors of a pair would
    drain and activate together. The run is refused before any operation, naming the
    domain and its members; one member per run goes, and so does the rollout's plan of all
    hosts (it puts the members in waves of their own)."""
    pair = {"ipvs_failure_domain": "pair-1"}

    def hosts() -> dict[str, FakeHost]:
        return {n: FakeHost(data=pair) for n in ("lvs-a", "lvs-b")} | {"other": FakeHost()}

    r = fleet(hosts(), "-y", "-vv", deploy=deploy)
    assert r.rc != 0
    flat = " ".join(ANSI.sub("", r.stderr).split())
    assert re.search(
        r"host @fake/lvs-(a|b): ipvs_failure_domain pair-1: this run also takes @fake/lvs-(b|a);",
        flat,
    ), flat[-2000:]
    assert "Starting operation" not in flat  # refused while preparing: nothing ran
    one = fleet(hosts(), "--limit", "@fake/lvs-a", "--dry", "--json", deploy=deploy)
    assert one.rc == 0, one.stderr[-2000:]
    planned = fleet(hosts(), "--dry", "--json", env={"IPVS_FLEET_DOMAINS": "planned"})
    assert planned.rc == 0, planned.stderr[-2000:]
