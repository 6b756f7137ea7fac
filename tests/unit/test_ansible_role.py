"""The ipvs_fleet.fleet collection's role: its filters on recorded probe output, its
activation tasks against pyinfra's modules_active, its playbooks' syntax, and the preflight
refusing on the controller itself (connection local, nothing changed)."""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import jinja2
import pytest
import yaml
from pyinfra.api import StringCommand
from pyinfra.context import ctx_host

from ipvs_fleet.deploy import commands
from ipvs_fleet.deploy import operations as ops
from ipvs_fleet.deploy.facts import IpvsLoadedModules
from ipvs_fleet.policy import ACTIVATIONS, load_policy
from tests.fixtures.loaded import loaded_output

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
KR = "6.1.0-56-cloud-amd64"
SET = "3.0+test"
TASKS = REPO / "roles/ipvs_fleet/tasks"


def load_filters() -> ModuleType:
    path = REPO / "ansible_collections/ipvs_fleet/fleet/plugins/filter/ipvs_fleet.py"
    spec = importlib.util.spec_from_file_location("ipvs_fleet_filters", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


F = load_filters()


def make_artifact(root: Path, kr: str = KR, reuse: str = "prekill") -> dict[str, str]:
    """A module artifact as `ipvs-fleet build` lays it out (fake .ko contents)."""
    d = root / kr
    d.mkdir(parents=True)
    mods = {}
    for name in ("ip_vs_reuse.ko",):
        (d / name).write_bytes(name.encode())
        mods[name] = hashlib.sha256(name.encode()).hexdigest()
    tar = d / f"ipvs-fleet-modules-{kr}.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for name in mods:
            t.add(d / name, arcname=name)
    manifest = {
        "format": 1,
        "kernel_release": kr,
        "release": "bookworm",
        "tarball": tar.name,
        "tarball_sha256": hashlib.sha256(tar.read_bytes()).hexdigest(),
        "modules": mods,
        "modinfo": {"ipvs_fleet": SET},
        "reuse_design": reuse,
        "vermagic": kr,
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return mods


def preflight_output(kr: str = KR, rules: str = "", lockdown: str = "none") -> str:
    return "\n".join(
        [
            F.MARK + "kernel",
            kr,
            F.MARK + "lockdown",
            f"lockdown={lockdown}",
            "sig_enforce=N",
            "secure_boot=0",
            F.MARK + "usage",
            "## lsmod",
            "ip_vs",
            "## ipvsadm",
            "## iptables",
            rules,
            "## nft",
        ]
    )


def test_plan_is_the_pyinfra_preflight(tmp_path):
    mods = make_artifact(tmp_path)
    plan = F.plan(preflight_output(), "n1", {"ipvs_host_class": "k8s_node"}, str(tmp_path))
    assert plan["kernel_release"] == KR and plan["patchset"] == SET
    assert plan["module_sums"] == mods and plan["fix_module"] == "ip_vs_reuse"
    assert plan["sysctls"]["conn_reuse_old_conntrack"] == 1
    assert plan["modules"] == ["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_reuse"]
    assert plan["updates_dir"] == f"/lib/modules/{KR}/updates/ipvs-fleet"
    over = F.plan(
        preflight_output(),
        "n1",
        {
            "ipvs_host_class": "k8s_node",
            "ipvs_sysctls": {"conn_reuse_mode": 0},
            "ipvs_fleet_artifacts_dir": "ignored: the role's own setting",
        },
        str(tmp_path),
    )
    assert over["sysctls"]["conn_reuse_mode"] == 0


@pytest.mark.parametrize(
    ("data", "probe", "message"),
    [
        ({"ipvs_host_class": "web"}, {}, "host n1: unknown host class 'web'"),
        ({"ipvs_host_class": "k8s_node", "ipvs_sysctl": {}}, {}, "unknown host data ipvs_sysctl"),
        (
            {"ipvs_host_class": "k8s_node", "ipvs_sysctls": {"conntrack": 7}},
            {},
            "conntrack=7 is out of range 0..1",
        ),
        ({"ipvs_host_class": "k8s_node"}, {"kr": "9.9.9"}, "no module artifact for kernel 9.9.9"),
        (
            {"ipvs_host_class": "k8s_node"},
            {"lockdown": "integrity"},
            "kernel lockdown is integrity",
        ),
        (
            {"ipvs_host_class": "k8s_node"},
            {"rules": "-A INPUT -m connmark --mark 1 -j ACCEPT"},
            "conn_reuse_old_conntrack=1 refused: host uses connmark",
        ),
    ],
)
def test_plan_refuses_naming_host_and_reason(tmp_path, data, probe, message):
    make_artifact(tmp_path)
    with pytest.raises(F.AnsibleFilterError, match="preflight refused") as e:
        F.plan(preflight_output(**probe), "n1", data, str(tmp_path))
    assert message in str(e.value)


def test_plan_refuses_knob_under_kube_proxy_nat_rules_on_a_module_without_a_design(tmp_path):
    make_artifact(tmp_path, reuse="none")  # the test-only `nodesign` build
    rules = "*nat\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\nCOMMIT"
    with pytest.raises(F.AnsibleFilterError, match="nat-table rule: -A KUBE-MARK-MASQ"):
        F.plan(preflight_output(rules=rules), "n1", {"ipvs_host_class": "k8s_node"}, str(tmp_path))


def state_output(
    installed: dict[str, str],
    loaded: list[str],
    sysctls: dict[str, int],
    dkms: tuple[str, ...] = (),
) -> str:
    return "\n".join(
        [F.MARK + "installed", *(f"{sha}  {n}" for n, sha in installed.items())]
        + [F.MARK + "loaded", *loaded_output(loaded)]
        + [F.MARK + "sysctls", *(f"/proc/sys/net/ipv4/vs/{k}:{v}" for k, v in sysctls.items())]
        + [
            F.MARK + "backups",
            "/etc/sysctl.d/90-ipvs-fleet.conf=absent",
            "/etc/modules-load.d/ipvs-fleet.conf=file",
            "/etc/modprobe.d/ipvs-fleet.conf=none",
        ]
        + [F.MARK + "files", *(f"{p}=:" for p in ops.MANAGED_FILES)]
        + [F.MARK + "on_disk", "yes" if installed else "no", F.MARK + "dkms", *dkms]
    )


def a_plan(tmp_path: Path, **data: Any) -> dict[str, Any]:
    make_artifact(tmp_path)
    return dict(
        F.plan(preflight_output(), "n1", {"ipvs_host_class": "k8s_node", **data}, str(tmp_path))
    )


def rollback_plan(**data: Any) -> dict[str, Any]:
    return dict(F.rollback_plan(preflight_output(), "n1", {"ipvs_host_class": "k8s_node", **data}))


STOCK = "|-|-|-|-|-|-|-"  # a loaded module of the distro's own build (no taint, no file of ours)
CLASS_STOCK = [f"{m}{STOCK}" for m in ("ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh")]
FIX = f"ip_vs_reuse|{SET}|-|OE|{SET}|-|{SET}|prekill"  # the installed build, loaded
OLD_FIX = f"ip_vs_reuse|2.9+old|-|OE|{SET}|-|{SET}|prekill"  # loaded from an older build
PATCHED_IP_VS = "ip_vs|2.0+old|-|OE|-|-|-|-"  # a 2.x patched ip_vs, its file gone


def test_state_of_a_stock_host_asks_for_everything(tmp_path):
    plan = a_plan(tmp_path)
    st = F.state(state_output({}, [f"ip_vs{STOCK}"], {"conn_reuse_mode": 1}), plan)
    assert st["install"] and not st["stale"] and st["foreign"] == [] and st["change"]
    assert st["missing"] == st["loads"] == ["ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_reuse"]
    assert st["refusal"] == "" and st["want"] == f"ip_vs_reuse {SET}"
    assert st["sysctl_absent"] == [
        "conn_reuse_old_conntrack",
        "conntrack",
        "expire_nodest_conn",
        "expire_quiescent_template",
    ]
    assert st["backups"]["/etc/modprobe.d/ipvs-fleet.conf"] == "none"
    assert "ip_vs_reuse is not loaded" in st["problems"]


def test_state_of_a_converged_host_asks_for_nothing(tmp_path):
    plan = a_plan(tmp_path)
    loaded = [*CLASS_STOCK, FIX]
    st = F.state(state_output(plan["module_sums"], loaded, plan["sysctls"]), plan)
    assert not st["install"] and not st["stale"] and not st["missing"] and not st["change"]
    assert st["sysctl_changes"] == {} and st["sysctl_absent"] == [] and st["problems"] == []
    drifted = dict(plan["sysctls"], conn_reuse_old_conntrack=0)
    st = F.state(state_output(plan["module_sums"], loaded, drifted), plan)
    assert st["sysctl_changes"] == {"conn_reuse_old_conntrack": 1}


def test_state_reloads_only_a_fix_module_of_another_build(tmp_path):
    plan = a_plan(tmp_path)
    st = F.state(state_output(plan["module_sums"], [*CLASS_STOCK, OLD_FIX], plan["sysctls"]), plan)
    assert st["stale"] and st["change"] and st["fix_version"] == "2.9+old"
    assert st["missing"] == [] and st["loads"] == ["ip_vs_reuse"] and st["foreign"] == []
    assert st["problems"] == [
        f"ip_vs_reuse: the loaded build is not patch set {SET} (version 2.9+old)"
    ]


@pytest.mark.parametrize("strategy", ACTIVATIONS)
def test_state_of_a_foreign_ipvs_module_refuses_reload_only(tmp_path, strategy):
    """A patched ip_vs of ipvs-fleet 2.x cannot be replaced live: `reload` refuses with
    modules_active's text, `reboot` reboots, `next-boot` waits; verification names it."""
    plan = a_plan(tmp_path, ipvs_activation=strategy)
    loaded = [PATCHED_IP_VS, *CLASS_STOCK[1:], FIX]
    st = F.state(state_output(plan["module_sums"], loaded, plan["sysctls"]), plan)
    assert st["foreign"] == ["ip_vs"] and st["change"] and not st["stale"]
    assert bool(st["refusal"]) == (strategy == "reload")
    assert st["problems"] == [
        "ip_vs: the loaded build is not the distro's own (taint OE); a reboot loads the stock one"
    ]


def test_rollback_state_sets_the_knob_to_0_and_unloads_only_the_fix_module():
    plan = rollback_plan()
    converged = load_policy().for_host("n1", {"ipvs_host_class": "k8s_node"}).sysctls
    installed = {"ip_vs_reuse.ko": "a" * 64}
    st = F.state(state_output(installed, [*CLASS_STOCK, FIX], dict(converged), (SET,)), plan)
    assert not st["install"] and st["on_disk"] and st["dkms"] == [SET]
    assert st["sysctl_changes"] == {"conn_reuse_old_conntrack": 0} and st["sysctl_absent"] == []
    # the fix module goes; no other module is unloaded, none is loaded again
    assert st["stale"] and st["change"] and st["missing"] == [] and st["loads"] == []
    assert st["want"] == "no ip_vs_reuse"
    assert st["problems"] == [
        "ip_vs_reuse is still loaded",
        "net.ipv4.vs.conn_reuse_old_conntrack still exists",
    ]
    # a host without the knob: nothing to set; a stock class module not loaded is loaded
    st = F.state(state_output({}, CLASS_STOCK[:2], {"conn_reuse_mode": 1}), plan)
    assert st["sysctl_changes"] == {} and not st["change"]
    assert st["loads"] == ["ip_vs_wrr", "ip_vs_sh"] and st["problems"] == []


def test_probe_scripts_run_in_sh():
    for script in (F.probe_command("preflight"), F.probe_command("state", KR)):
        r = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    r = subprocess.run(
        ["sh", "-c", F.probe_command("preflight")], capture_output=True, text=True, timeout=60
    )
    assert set(F.split_probe(r.stdout)) == {"kernel", "lockdown", "usage"}


def test_playbooks_parse():
    r = subprocess.run(
        [
            str(PLAYBOOK),
            "-i",
            "localhost,",
            "--syntax-check",
            "ipvs_fleet.fleet.site",
            "ipvs_fleet.fleet.rollback",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def run_site(
    tmp_path: Path, hosts: dict[str, dict[str, Any]], artifacts: Path, *extra: str
) -> tuple[int, str]:
    """The site playbook (by FQCN, the checkout's collection through ansible.cfg) against
    hosts that are this machine (connection local, as root: no become); `extra`: more
    ansible-playbook arguments."""
    inv = tmp_path / "inv.yml"
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
    }
    inv.write_text(json.dumps({"all": {"hosts": {h: dict(local, **v) for h, v in hosts.items()}}}))
    r = subprocess.run(
        [
            str(PLAYBOOK),
            "-i",
            str(inv),
            "ipvs_fleet.fleet.site",
            "-e",
            f"ipvs_fleet_artifacts_dir={artifacts}",
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return r.returncode, r.stdout + r.stderr


def test_preflight_refusal_stops_every_host_before_any_change(tmp_path):
    rc, out = run_site(
        tmp_path,
        {"good": {"ipvs_host_class": "k8s_node"}, "bad": {"ipvs_host_class": "web"}},
        tmp_path,
    )
    assert rc != 0
    assert "host bad: unknown host class 'web'" in out
    # The rollout play never started: no host read its IPVS state, let alone changed.
    assert "Roll out in waves" not in out and "Read the host's IPVS state" not in out


def test_preflight_names_a_missing_artifact(tmp_path):
    rc, out = run_site(tmp_path, {"solo": {"ipvs_host_class": "k8s_node"}}, tmp_path)
    assert rc != 0
    assert "host solo (kernel " in out and "no module artifact for kernel" in out
    assert "Roll out in waves" not in out


def test_docs_variables_are_generated_from_the_defaults():
    gen = subprocess.run(
        [sys.executable, str(REPO / "docs" / "gen_ansible.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert gen.returncode == 0, gen.stdout
    spec = importlib.util.spec_from_file_location("gen_ansible", REPO / "docs" / "gen_ansible.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from ipvs_fleet.policy import HOST_KEYS

    assert set(mod.HOST_DATA) == HOST_KEYS  # the host data table names every policy key


def test_the_lock_preamble_parses_in_sh():
    r = subprocess.run(
        ["sh", "-n", "-c", commands.locked("install", 30, "true")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr


def test_every_task_that_changes_a_host_runs_a_command_of_the_one_module():
    """The role writes no host-changing shell of its own: each command task runs, in sh, the
    text of one ipvs_fleet.deploy.commands function (the pyinfra operations yield the same)
    or a read-only probe, through the filters, and nothing else."""
    texts = {p.name: p.read_text() for p in TASKS.glob("*.yml")}
    shell = ("ansible.builtin.shell", "ansible.builtin.script", "ansible.builtin.raw")
    assert not [n for n, t in texts.items() if any(m in t for m in shell)]
    used = set()
    for name, text in texts.items():
        for task in yaml.safe_load(text):
            for t in [task, *task.get("block", [])]:
                if "ansible.builtin.command" not in t:
                    continue
                argv = t["ansible.builtin.command"]["argv"]
                assert argv[:2] == ["sh", "-c"] and len(argv) == 3, (name, t["name"])
                # nothing but one filter expression
                assert re.fullmatch(r"\{\{.*\}\}", argv[2].strip(), re.S), (name, t["name"])
                m = re.match(r"\{\{\s*'(\w+)' \| ipvs_fleet\.fleet\.ipvs_fleet_(\w+)", argv[2])
                assert m and m.group(2) in ("command", "probe_command"), (name, t["name"])
                if m.group(2) == "command":
                    assert m.group(1) in commands.COMMANDS
                    used.add(m.group(1))
    assert used == {
        "install",
        "upload_dir",
        "write_file",
        "restore_file",
        "remove_modules",
        "load_modules",
        "hook",
        "set_sysctl",
    }


def test_state_decides_each_managed_file_as_config_file_does(tmp_path):
    """Write a file unless it is mode 644 with the class's rendering; keep its previous
    state once, unless a backup or an absent note is there already."""
    plan = a_plan(tmp_path)
    sha = {
        p: hashlib.sha256(
            ops.rendered(p, plan["host_class"], plan["sysctls"], plan["modules"]).encode()
        ).hexdigest()
        for p in ops.MANAGED_FILES
    }
    sysctl_d, modules_d, modprobe_d = ops.MANAGED_FILES
    probe = state_output({}, [], {}).replace(
        F.MARK + "files\n" + "\n".join(f"{p}=:" for p in ops.MANAGED_FILES),
        F.MARK
        + "files\n"
        + "\n".join(
            [f"{sysctl_d}=:", f"{modules_d}=644:{sha[modules_d]}", f"{modprobe_d}=600:{'0' * 64}"]
        ),
    )
    managed = {f["path"]: f for f in F.state(probe, plan)["managed"]}
    assert [managed[p]["sha256"] for p in ops.MANAGED_FILES] == list(sha.values())
    # the backups of state_output: sysctl.d absent, modules-load.d file, modprobe.d none
    got = {p: (f["exists"], f["write"], f["keep"]) for p, f in managed.items()}
    assert got == {
        sysctl_d: (False, True, False),
        modules_d: (True, False, False),
        modprobe_d: (True, True, True),
    }


def test_pending_of_a_rollback_follows_its_order():
    plan = rollback_plan()
    converged = load_policy().for_host("n1", {"ipvs_host_class": "k8s_node"}).sysctls
    st = F.state(
        state_output({"ip_vs_reuse.ko": "a" * 64}, [*CLASS_STOCK, FIX], dict(converged), (SET,)),
        plan,
    )
    assert F.pending(st, plan) == [
        "set net.ipv4.vs.conn_reuse_old_conntrack = 0 (live 1)",
        f"remove the ipvs-fleet module set for {KR} (ip_vs_reuse.ko in {plan['updates_dir']}; "
        f"DKMS ipvs-fleet {SET}), depmod",
        "remove /etc/sysctl.d/90-ipvs-fleet.conf (the deploy created it)",
        "restore /etc/modules-load.d/ipvs-fleet.conf from the copy kept by the first deploy",
        f"unload ip_vs_reuse {SET} (IPVS stays loaded, its tables untouched)",
    ]


# ---- The activation: activate.yml as Ansible would run it, against modules_active


class PyinfraHost:
    """What modules_active reads of pyinfra's host: its loaded modules, in a preview."""

    name, print_prefix = "n1", "[n1] "

    def __init__(self, loaded: dict[str, Any]) -> None:
        self.loaded, self.noops = loaded, list[str]()
        self.state = SimpleNamespace(is_executing=False)

    def get_fact(self, fact: type, **kwargs: Any) -> Any:
        assert fact is IpvsLoadedModules
        return self.loaded

    def noop(self, text: str) -> None:
        self.noops.append(text)


def pyinfra_activation(monkeypatch, loaded: dict[str, Any], plan: dict[str, Any]):
    """modules_active's commands for a host, as (kind, detail) steps."""
    data = {
        "ipvs_host_class": "k8s_node",
        "ipvs_activation": plan["activation"],
        "ipvs_pre_activate": plan["pre_activate"],
        "ipvs_post_activate": plan["post_activate"],
    }
    settings = load_policy().for_host("n1", data)
    monkeypatch.setattr(ops, "will", lambda what: None)  # its words: tests/unit/test_says.py
    steps = []
    with ctx_host.use(PyinfraHost(loaded)):
        for cmd in ops.modules_active._inner(settings=settings, patchset=plan["patchset"]):
            if not isinstance(cmd, StringCommand):
                continue  # the reboot's own callbacks
            raw = cmd.get_raw_value()
            if raw.startswith("timeout "):
                steps.append(("hook", shlex.split(raw)[4]))
            elif raw.startswith("printf "):
                steps.append(("fail", raw))
            elif "reboot" in raw:
                steps.append(("reboot", ""))
            else:
                preamble = commands.lock_preamble("activate", plan["lock_wait"])
                assert raw.startswith(preamble + " && ")
                steps.append(("live", raw.removeprefix(preamble + " && ")))
    return steps


def ansible_env() -> jinja2.Environment:
    """Jinja as Ansible templates task arguments (trim_blocks), with the role's filters; the
    host lock stubbed, so that the scripts can run here."""
    env = jinja2.Environment(trim_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["quote"] = shlex.quote
    env.filters["ipvs_fleet.fleet.ipvs_fleet_command"] = F.command
    return env


def ansible_activation(st: dict[str, Any], plan: dict[str, Any]):
    """The tasks of activate.yml that run (their `when`, their loops) as (kind, detail)."""
    env = ansible_env()
    ctx = {"__ipvs_fleet_state": st, "ipvs_fleet_plan": plan, "ansible_check_mode": False}
    steps = []
    for task in yaml.safe_load((TASKS / "activate.yml").read_text()):
        if "ansible.builtin.include_tasks" in task:
            continue  # the state read again
        when = task.get("when", [])
        if not all(
            env.compile_expression(c)(**ctx) for c in ([when] if isinstance(when, str) else when)
        ):
            continue
        if "ansible.builtin.fail" in task:
            steps.append(
                (
                    "fail",
                    ops.fail(
                        env.from_string(task["ansible.builtin.fail"]["msg"]).render(ctx)
                    ).get_raw_value(),
                )
            )
            break  # the host failed
        elif "ansible.builtin.command" in task and "loop" in task:
            loop = task["loop"].strip().removeprefix("{{").removesuffix("}}")
            script = env.from_string(task["ansible.builtin.command"]["argv"][2])
            for n, item in enumerate(env.compile_expression(loop)(**ctx) or []):
                raw = script.render(ctx, item=item, __n=n)
                steps.append(("hook", shlex.split(raw)[4]))
        elif "ansible.builtin.reboot" in task:
            steps.append(("reboot", ""))
        elif "ansible.builtin.command" in task:
            raw = env.from_string(task["ansible.builtin.command"]["argv"][2]).render(ctx)
            preamble = commands.lock_preamble("activate", plan["lock_wait"])
            assert raw.startswith(preamble + " && ")
            steps.append(("live", raw.removeprefix(preamble + " && ")))
    return steps


def run_with_stubs(tmp_path: Path, script: str) -> list[str]:
    """Run an activation script with rmmod and modprobe stubbed: the calls, in order."""
    stubs, log = tmp_path / "bin", tmp_path / "calls"
    stubs.mkdir(exist_ok=True)
    log.write_text("")
    for tool in ("rmmod", "modprobe"):
        (stubs / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
        (stubs / tool).chmod(0o755)
    r = subprocess.run(
        ["sh", "-c", script],
        env={"PATH": f"{stubs}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return log.read_text().splitlines()


LOADED_CASES = {
    "nothing loaded": [],
    "stock ip_vs only": [f"ip_vs{STOCK}"],
    "converged": [*CLASS_STOCK, FIX],
    "converged, ip_vs_wrr not loaded": [*CLASS_STOCK[:2], CLASS_STOCK[3], FIX],
    "fix of another build": [*CLASS_STOCK, OLD_FIX],
    "2.x patched ip_vs": [PATCHED_IP_VS, *CLASS_STOCK[1:], FIX],
    "2.x patched ip_vs, no fix module": [PATCHED_IP_VS, *CLASS_STOCK[1:3]],
}


@pytest.mark.parametrize("case", LOADED_CASES)
def test_activation_tasks_do_what_modules_active_does(tmp_path, monkeypatch, case):
    """For every loaded state, strategy, hooks and both directions (rollout, rollback):
    activate.yml runs the steps modules_active yields (a failure with its text, the hooks,
    the reboot, the live modprobe/rmmod under the host lock, with the same calls). Only
    ip_vs_reuse is ever unloaded."""
    base = rollback_plan()
    for patchset, strategy, hooks in itertools.product((SET, ""), ACTIVATIONS, ((), ("drain",))):
        plan = dict(
            base,
            patchset=patchset,
            activation=strategy,
            pre_activate=list(hooks),
            post_activate=[h.replace("drain", "uncordon") for h in hooks],
        )
        where = f"{case}, patchset {patchset!r}, {strategy}, hooks {hooks}"
        out = state_output({"ip_vs_reuse.ko": "a" * 64}, LOADED_CASES[case], {})
        st = F.state(out, plan)
        loaded = IpvsLoadedModules().process(F.split_probe(out)["loaded"])
        want = pyinfra_activation(monkeypatch, loaded, plan)
        got = ansible_activation(st, plan)
        assert [k for k, _ in got] == [k for k, _ in want], where
        for (kind, a), (_, p) in zip(got, want, strict=True):
            if kind == "live":
                calls = run_with_stubs(tmp_path, a)
                assert calls == run_with_stubs(tmp_path, p), where
                assert [c for c in calls if c.startswith("rmmod")] in ([], ["rmmod ip_vs_reuse"])
            else:
                assert a == p, where


def test_no_task_unloads_ipvs():
    """Only the fix module is ever unloaded (activate.yml's rmmod of it); no task runs
    `modprobe -r`, and nothing of the module swap is left in the collection."""
    collection = REPO / "ansible_collections/ipvs_fleet/fleet"
    # what runs: the role's tasks, handlers and host scripts, the playbooks, the filters, the
    # commands they run
    texts = {
        p: p.read_text()
        for top in (collection, REPO / "roles")
        for p in top.rglob("*")
        if p.is_file()
        and p.suffix in (".yml", ".sh", ".py")
        and "templates" not in p.parts
        and "changelogs" not in p.parts
    }
    texts[Path(commands.__file__)] = Path(commands.__file__).read_text()
    assert [p.name for p, t in texts.items() if "rmmod" in t] == ["commands.py"]
    assert "ipvs_fleet_plan.fix_module if __ipvs_fleet_state.stale" in texts[TASKS / "activate.yml"]
    assert not [
        p
        for p, t in texts.items()
        if "modprobe -r" in t
        or "ipvs-swap" in t
        or "swap.pending" in t
        or "failed-set" in t
        or "failed_set" in t
    ]


def test_filters_without_the_package_name_the_missing_dependency(tmp_path):
    """The collection's filters need the ipvs-fleet package (declared): without it the
    plugin still loads, and each filter fails naming what to install."""
    blocker = tmp_path / "ipvs_fleet"  # an empty package shadowing the real one
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('no ipvs_fleet here')\n")
    plugin = REPO / "ansible_collections/ipvs_fleet/fleet/plugins/filter/ipvs_fleet.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('f', {str(plugin)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "f = m.FilterModule().filters()['ipvs_fleet_plan']\n"
        "try:\n    f('', 'h', {}, '/x')\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "needs the ipvs-fleet Python package" in r.stdout
    assert "pip install ipvs-fleet" in r.stdout


def test_argument_specs_are_the_policy_schemas():
    """meta/argument_specs.yml is generated from the policy schema and the role's defaults:
    it names every host data key and role setting, and each sysctl with its range."""
    from ipvs_fleet import ansible_argspec

    path = TASKS.parent / "meta" / "argument_specs.yml"
    assert path.read_text() == ansible_argspec.render(), (
        "stale: python -m ipvs_fleet.ansible_argspec > roles/ipvs_fleet/meta/argument_specs.yml"
    )
    specs = yaml.safe_load(path.read_text())["argument_specs"]
    from ipvs_fleet.policy import HOST_KEYS

    defaults = yaml.safe_load((TASKS.parent / "defaults" / "main.yml").read_text())
    assert set(specs["main"]["options"]) == HOST_KEYS | set(defaults)
    sysctls = specs["main"]["options"]["ipvs_sysctls"]["options"]
    assert {k: v["choices"] for k, v in sysctls.items()} == {
        k: list(range(r["min"], r["max"] + 1)) for k, r in load_policy().schema.items()
    }


def test_the_state_is_read_again_by_a_task_after_each_change_not_by_a_handler():
    """Nothing on a host restarts (the reboot runs between the drain hooks, a task): the
    state is read again by a task right after the changes of a phase, when one changed,
    not by a handler flushed as a refresh."""
    role = TASKS.parent
    assert not (role / "handlers").exists()
    texts = {p.name: p.read_text() for p in TASKS.glob("*.yml")}
    assert not [n for n, t in texts.items() if "notify:" in t or "flush_handlers" in t]
    rereads = {}
    for name, text in texts.items():
        for task in yaml.safe_load(text):
            inc = task.get("ansible.builtin.include_tasks")
            if inc:
                assert inc["file"] == "read_state.yml" and inc["apply"]["tags"] == ["always"]
                rereads[name] = task["when"]
    assert set(rereads) == {"install.yml", "activate.yml", "sysctls.yml", "rollback.yml"}
    # a phase skipped by its tag registered nothing: not changed
    assert all(" | default({}) is changed" in w for w in rereads.values()), rereads


# The rollout play's serial: the rollout policy's waves, or ipvs_fleet_serial, checked.


def test_waves_default_to_the_rollout_policy_with_the_canary_group_counted():
    from ipvs_fleet.rollout.config import load_config

    policy = [str(w) for w in load_config().waves]
    assert policy[0] == "canary"  # the shipped policy starts with the canary group
    got = F.waves("", 2)
    assert got[0] == 2 and [str(w) for w in got[1:]] == policy[1:]
    assert F.waves(None, 0) == got[1:]  # no canary host: the group wave is left out
    assert F.waves([1, "50%", "100%"], 1) == [1, "50%", "100%"]
    assert F.waves("3", 1) == [3]  # -e ipvs_fleet_serial=3 arrives as text


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "ipvs_fleet_serial[0]: a host count must be at least 1, got 0"),
        ("0", "ipvs_fleet_serial[0]: a host count must be at least 1, got 0"),
        ([1, "0%"], "ipvs_fleet_serial[1]: '0%': a percentage must be 1%..100%"),
        ([1, "all"], "ipvs_fleet_serial[1]: group 'all': the site playbook takes only"),
        ([{"hosts": 1, "soak_seconds": 60}], "ipvs_fleet_serial[0]: per-wave max_fail_percent"),
        (["canary"], "ipvs_fleet_serial: no wave but the canary group, and it has no hosts"),
    ],
)
def test_waves_refuse_what_would_skip_the_canary_or_cannot_be_done(value, message):
    with pytest.raises(F.FleetError, match=re.escape(message)):
        F.waves(value, 0)


def test_a_serial_of_0_stops_the_site_playbook_before_any_host(tmp_path):
    """Ansible takes `serial: 0` as every host at once: the preflight refuses it first."""
    host = {"solo": {"ipvs_host_class": "k8s_node"}}
    rc, out = run_site(tmp_path, host, tmp_path, "-e", "ipvs_fleet_serial=0")
    assert rc != 0, out
    assert "ipvs_fleet_serial[0]: a host count must be at least 1, got 0" in out, out[-3000:]
    # stopped at its first task: no host probed, none changed
    assert "Check policy, artifact, lockdown" not in out and "Roll out in waves" not in out
