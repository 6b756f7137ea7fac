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
from ipvs_fleet.policy import load_policy
from ipvs_fleet.rollout.runner import plan_outcomes
from tests.fixtures.loaded import loaded_output

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")
KR = "6.1.0-57-cloud-amd64"
SET_ID = "2.0+fake"
MODULES = {f"{m}.ko": hashlib.sha256(m.encode()).hexdigest()
           for m in ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_ftp")}  # fmt: skip
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# The inventory: hosts and their scripted answers from $FAKE_FLEET (JSON), as @fake hosts.
INVENTORY = '''
import json, os, re
_spec = json.load(open(os.environ["FAKE_FLEET"]))
def _host(name, h):
    return ("@fake/" + name, {**h["data"], "fake_delay": 0, "fake_delay_jitter": 0,
            "fake_responses": {re.compile(k): v for k, v in h["responses"]}})
for _group, _names in _spec["groups"].items():
    globals()[_group] = [_host(n, _spec["hosts"][n]) for n in _names]
'''


def sha1_of_template(path: str, host_class: str) -> str:
    s = load_policy().for_host("x", {"ipvs_host_class": host_class})
    out = get_template(str(TEMPLATES / MANAGED_FILES[path]), {"trim_blocks": True}).render(
        ipvs_host_class=s.host_class, ipvs_sysctls=s.sysctls, ipvs_modules=list(s.modules)
    )
    return hashlib.sha1(out.encode()).hexdigest()


@dataclass
class FakeHost:
    """A host's state as its facts tell it."""

    host_class: str = "k8s_node"
    installed: bool = False  # our set in updates/, depmod'ed
    loaded: str = "none"  # none | stock | patched
    sysctls: dict[str, int] = field(default_factory=dict)
    files: bool = False  # the managed files written and their backups kept
    usage: list[str] = field(default_factory=list)  # IpvsUsage output lines
    swap: list[str] = field(default_factory=list)  # IpvsSwapState output lines

    def responses(self) -> list[tuple[str, Any]]:
        s = load_policy().for_host("x", {"ipvs_host_class": self.host_class})
        loaded = []
        for m in s.modules:
            if self.loaded == "patched":
                loaded.append(f"{m}|{SET_ID}|-|OE|{SET_ID}|-|{SET_ID}|handback")
            elif self.loaded == "stock":
                inst = f"{SET_ID}|-|{SET_ID}|handback" if self.installed else "-|-|-|-"
                loaded.append(f"{m}|-|STOCK{m}|-|{inst}")
        out: list[tuple[str, Any]] = [
            # the deploy's failing step (operations.fail): fails here too (-vv shows its text)
            (r">&2; exit 1$", {"success": False}),
            (r"^uname -r$", KR),
            (r"echo lockdown=", ["lockdown=none", "sig_enforce=N", "secure_boot=0"]),
            (r"echo '## lsmod'", ["## lsmod", *(m for m in s.modules if self.loaded != "none"),
                                  *self.usage]),  # fmt: skip
            (r"sha256sum -- \*\.ko",
             [f"{sha}  {n}" for n, sha in MODULES.items()] if self.installed
             else ["depmod-missing"]),  # fmt: skip
            (r"for d in /sys/module/ip_vs ", loaded_output(loaded)),
            (r"swap.pending \] && s=pending", self.swap or ["state=idle"]),
            (r"/proc/sys/net/ipv4/vs/\*", [f"/proc/sys/net/ipv4/vs/{k}:{v}"
                                           for k, v in self.sysctls.items()]),  # fmt: skip
        ]
        if self.files:
            for path in MANAGED_FILES:
                # the deploy's fact of a managed file (ManagedFile): the backup kept, the
                # file as the class's template renders it
                sha = sha1_of_template(path, self.host_class)
                out.append((rf"^f={re.escape(path)}; b=",
                            ["backup=yes", "exists=yes", f"mode=644 sha1={sha}"]))  # fmt: skip
        return out


def converged(host_class: str = "k8s_node") -> FakeHost:
    s = load_policy().for_host("x", {"ipvs_host_class": host_class})
    return FakeHost(host_class, True, "patched", dict(s.sysctls), True)


def stock_sysctls() -> dict[str, int]:
    """A stock module's values (no knob)."""
    return {"conn_reuse_mode": 1, "conntrack": 0, "expire_nodest_conn": 0,
            "expire_quiescent_template": 0}  # fmt: skip


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

    def will(self, host: str) -> list[str]:
        """The preview lines of one host."""
        pre = f"[@fake/{host}]"
        return [
            ln.split("] ", 1)[1].strip().removeprefix("will ")
            for ln in ANSI.sub("", self.stderr).splitlines()
            if ln.strip().startswith(pre) and "] will " in ln
        ]


@pytest.fixture
def fleet(tmp_path):
    """Writes a fake fleet and an artifact for KR; returns run(hosts, *pyinfra args)."""
    art = tmp_path / "artifacts" / KR
    art.mkdir(parents=True)
    tarball = art / "ipvs-fleet-modules.tar.gz"
    with tarfile.open(tarball, "w:gz"):
        pass
    manifest = {
        "format": 1, "kernel_release": KR, "release": "bookworm", "line": "6.1",
        "tarball": tarball.name,
        "tarball_sha256": hashlib.sha256(tarball.read_bytes()).hexdigest(),
        "modules": MODULES, "modinfo": {"ipvs_fleet": SET_ID, "ipvs_fleet_reuse": "handback"},
        "reuse_design": "handback", "vermagic": KR,
    }  # fmt: skip
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
        spec = {
            "groups": groups or {"fleet": list(hosts)},
            "hosts": {
                n: {"data": {"ipvs_host_class": h.host_class}, "responses": h.responses()}
                for n, h in hosts.items()
            },
        }
        (tmp_path / "fleet.json").write_text(json.dumps(spec))
        e = {**os.environ, "FAKE_FLEET": str(tmp_path / "fleet.json"),
             "IPVS_FLEET_ARTIFACTS": str(tmp_path / "artifacts"), **(env or {})}  # fmt: skip
        r = subprocess.run(
            [str(PYINFRA), *args, str(inv), deploy], cwd=REPO, env=e, text=True,
            capture_output=True, timeout=90, input=stdin,
        )  # fmt: skip
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


def test_dry_run_of_a_fresh_host_lists_every_step(fleet):
    fresh = FakeHost(loaded="stock", sysctls=stock_sysctls())
    r = fleet({"fresh": fresh}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    sysctls = load_policy().for_host("x", {"ipvs_host_class": "k8s_node"}).sysctls
    differ = [k for k, v in sysctls.items() if stock_sysctls().get(k) != v]
    assert "conn_reuse_mode" not in differ  # 1 on the stock module already: no change
    assert set(r.changes()) == {
        "Install the patched IPVS module set",
        *(f"Write {p}" for p in MANAGED_FILES),
        "Activate the patched modules (reload)",
        *(f"Set net.ipv4.vs.{k} live" for k in differ),
    }
    will = r.will("fresh")
    assert will[0].startswith(f"install patch set {SET_ID} for {KR}: {len(MODULES)} modules")
    assert any(w.startswith("reload the IPVS stack with ipvs-swap.sh") for w in will)
    # the knob appears with the patched module: planned, not an error
    assert "set net.ipv4.vs.conn_reuse_old_conntrack = 1 (the key appears once the modules " \
        "above are active)" in will


def test_nothing_loaded_plans_a_load_not_a_reload(fleet):
    r = fleet({"bare": FakeHost()}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    assert "Activate the patched modules (reload)" in r.changes()
    assert "load ip_vs, ip_vs_rr, ip_vs_wrr, ip_vs_sh" in r.will("bare")


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
    assert "verification failed on @fake/drifted: net.ipv4.vs.conn_reuse_old_conntrack: " \
        "expected 1, live 0" in ANSI.sub("", r.stderr)
    assert "Operation error" not in r.stderr


def test_drain_hooks_wrap_the_swap_and_are_previewed(fleet):
    stale = converged()
    stale.loaded = "stock"
    hooks = ["--data", 'ipvs_pre_activate=["drain one", "drain two"]',
             "--data", "ipvs_post_activate=uncordon"]  # fmt: skip
    r = fleet({"n": stale}, "--dry", "--json", *hooks)
    assert r.rc == 0, r.stderr[-3000:]
    [act] = [w for w in r.will("n") if "ipvs-swap.sh" in w]
    assert act.startswith("run 2 pre-activation hook(s); reload the IPVS stack")
    assert act.endswith("; run 1 post-activation hook(s)")
    # Executed: the hooks run in order around the swap (-vv lists each command run).
    r = fleet({"n": stale}, "-y", "--json", "-vv", *hooks)
    out = ANSI.sub("", r.stderr)
    at = [out.find(s) for s in ("sh -c 'drain one'", "sh -c 'drain two'", "ipvs-swap.sh ;",
                                "sh -c uncordon")]  # fmt: skip
    assert -1 not in at and at == sorted(at), at


PENDING = ["state=pending", "stage=cleared", "services=3", "real_servers=8"]
PENDING_TEXT = (
    "a module swap died after cleared with its saved table (3 services, 8 real servers) "
    "not restored: /var/lib/ipvs-fleet/swap.pending"
)


def test_a_swap_that_died_is_finished_first_and_fails_verification_until_then(fleet):
    died = converged()
    died.swap = PENDING
    r = fleet({"died": died, "ok": converged()}, "--dry", "--json")
    assert r.rc == 0, r.stderr[-3000:]
    assert r.changes() == {"Activate the patched modules (reload)": ["@fake/died"]}
    assert r.will("died") == [f"finish the earlier module swap ({PENDING_TEXT})"]
    # Executed against facts that never change, the table stays pending: the host fails.
    r = fleet({"died": died, "ok": converged()}, "-y", "--json", "-vv")
    assert r.rc == 1
    assert r.doc["results"]["failed_hosts"] == ["@fake/died"]
    assert f"verification failed on @fake/died: {PENDING_TEXT}" in ANSI.sub("", r.stderr)


def test_rollback_dry_run_lists_removal_restores_and_activation(fleet):
    r = fleet({"a": converged()}, "--dry", "--json", deploy="deploy/rollback.py")
    assert r.rc == 0, r.stderr[-3000:]
    assert set(r.changes()) == {
        "Remove the patched IPVS module set",
        *(f"Restore the previous {p}" for p in MANAGED_FILES),
        "Activate the stock modules (reload)",
    }
    assert any(w.startswith("restore /etc/sysctl.d/90-ipvs-fleet.conf") for w in r.will("a"))
    # a host already on the stock set: nothing to roll back
    stock = FakeHost(loaded="stock", sysctls=stock_sysctls())
    assert fleet({"s": stock}, "--dry", "--json", deploy="deploy/rollback.py").changes() == {}


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
    r = fleet({"bad": bad, "drifted": drifted, "ok": converged()}, "--dry", "--json",
              env={"IPVS_FLEET_PREFLIGHT": "report"})  # fmt: skip
    plans = plan_outcomes(r.doc, r.stderr, hosts)
    assert "conn_reuse_old_conntrack=1 refused" in plans["@fake/bad"].refused
    assert plans["@fake/bad"].changes == []
    assert plans["@fake/drifted"].ok
    assert plans["@fake/drifted"].changes == ["set net.ipv4.vs.conntrack = 1 (live 0)"]
    assert plans["@fake/ok"].ok and plans["@fake/ok"].changes == []
