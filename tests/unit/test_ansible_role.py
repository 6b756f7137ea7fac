"""The ipvs_fleet.fleet collection's role: its filters on recorded probe output, its
playbooks' syntax, and the preflight refusing on the controller itself (connection local,
nothing changed)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.fixtures.loaded import loaded_output

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = Path(sys.executable).with_name("ansible-playbook")
KR = "6.1.0-56-cloud-amd64"


def load_filters() -> ModuleType:
    path = REPO / "ansible_collections/ipvs_fleet/fleet/plugins/filter/ipvs_fleet.py"
    spec = importlib.util.spec_from_file_location("ipvs_fleet_filters", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


F = load_filters()


def make_artifact(root: Path, kr: str = KR, reuse: str = "handback") -> dict[str, str]:
    """A module artifact as `ipvs-fleet build` lays it out (fake .ko contents)."""
    d = root / kr
    d.mkdir(parents=True)
    mods = {}
    for name in ("ip_vs.ko", "ip_vs_rr.ko"):
        (d / name).write_bytes(name.encode())
        mods[name] = hashlib.sha256(name.encode()).hexdigest()
    tar = d / f"ipvs-fleet-modules-{kr}.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for name in mods:
            t.add(d / name, arcname=name)
    manifest = {
        "format": 1, "kernel_release": kr, "release": "bookworm", "tarball": tar.name,
        "tarball_sha256": hashlib.sha256(tar.read_bytes()).hexdigest(), "modules": mods,
        "modinfo": {"ipvs_fleet": "1.0+test"}, "reuse_design": reuse, "vermagic": kr,
    }  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    return mods


def preflight_output(kr: str = KR, rules: str = "", lockdown: str = "none") -> str:
    return "\n".join(
        [
            F.MARK + "kernel", kr,
            F.MARK + "lockdown", f"lockdown={lockdown}", "sig_enforce=N", "secure_boot=0",
            F.MARK + "usage", "## lsmod", "ip_vs", "## ipvsadm", "## iptables", rules, "## nft",
        ]
    )  # fmt: skip


def test_plan_is_the_pyinfra_preflight(tmp_path):
    mods = make_artifact(tmp_path)
    plan = F.plan(preflight_output(), "n1", {"ipvs_host_class": "k8s_node"}, str(tmp_path))
    assert plan["kernel_release"] == KR and plan["patchset"] == "1.0+test"
    assert plan["module_sums"] == mods
    assert plan["sysctls"]["conn_reuse_old_conntrack"] == 1
    assert plan["modules"] == ["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh"]
    assert plan["updates_dir"] == f"/lib/modules/{KR}/updates/ipvs-fleet"
    over = F.plan(
        preflight_output(), "n1",
        {"ipvs_host_class": "k8s_node", "ipvs_sysctls": {"conn_reuse_mode": 0},
         "ipvs_fleet_artifacts_dir": "ignored: the role's own setting"},
        str(tmp_path),
    )  # fmt: skip
    assert over["sysctls"]["conn_reuse_mode"] == 0


@pytest.mark.parametrize(
    ("data", "probe", "message"),
    [
        ({"ipvs_host_class": "web"}, {}, "host n1: unknown host class 'web'"),
        ({"ipvs_host_class": "k8s_node", "ipvs_sysctl": {}}, {}, "unknown host data ipvs_sysctl"),
        ({"ipvs_host_class": "k8s_node", "ipvs_sysctls": {"conntrack": 7}}, {},
         "conntrack=7 is out of range 0..1"),
        ({"ipvs_host_class": "k8s_node"}, {"kr": "9.9.9"}, "no module artifact for kernel 9.9.9"),
        ({"ipvs_host_class": "k8s_node"}, {"lockdown": "integrity"},
         "kernel lockdown is integrity"),
        ({"ipvs_host_class": "k8s_node"}, {"rules": "-A INPUT -m connmark --mark 1 -j ACCEPT"},
         "conn_reuse_old_conntrack=1 refused: host uses connmark"),
    ],
)  # fmt: skip
def test_plan_refuses_naming_host_and_reason(tmp_path, data, probe, message):
    make_artifact(tmp_path)
    with pytest.raises(F.AnsibleFilterError, match="preflight refused") as e:
        F.plan(preflight_output(**probe), "n1", data, str(tmp_path))
    assert message in str(e.value)


def test_plan_refuses_knob_under_kube_proxy_nat_rules_on_a_retrack_build(tmp_path):
    make_artifact(tmp_path, reuse="consistent")
    rules = "*nat\n-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\nCOMMIT"
    with pytest.raises(F.AnsibleFilterError, match="nat-table rule: -A KUBE-MARK-MASQ"):
        F.plan(preflight_output(rules=rules), "n1", {"ipvs_host_class": "k8s_node"}, str(tmp_path))


def state_output(installed: dict[str, str], loaded: list[str], sysctls: dict[str, int]) -> str:
    return "\n".join(
        [F.MARK + "installed", *(f"{sha}  {n}" for n, sha in installed.items())]
        + [F.MARK + "loaded", *loaded_output(loaded)]
        + [F.MARK + "sysctls", *(f"/proc/sys/net/ipv4/vs/{k}:{v}" for k, v in sysctls.items())]
        + [F.MARK + "backups", "/etc/sysctl.d/90-ipvs-fleet.conf=absent",
           "/etc/modules-load.d/ipvs-fleet.conf=file", "/etc/modprobe.d/ipvs-fleet.conf=none"]
        + [F.MARK + "failed", "no"]
    )  # fmt: skip


def a_plan(tmp_path: Path) -> dict[str, Any]:
    make_artifact(tmp_path)
    return dict(F.plan(preflight_output(), "n1", {"ipvs_host_class": "k8s_node"}, str(tmp_path)))


def test_state_of_a_stock_host_asks_for_everything(tmp_path):
    plan = a_plan(tmp_path)
    st = F.state(state_output({}, ["ip_vs|-|-|-|-|-|-|-"], {"conn_reuse_mode": 1}), plan)
    assert st["install"] and st["stale"] == ["ip_vs"] and st["missing"] == plan["modules"]
    assert st["sysctl_absent"] == ["conn_reuse_old_conntrack", "conntrack", "expire_nodest_conn",
                                   "expire_quiescent_template"]  # fmt: skip
    assert st["backups"]["/etc/modprobe.d/ipvs-fleet.conf"] == "none"
    assert "ip_vs: the loaded build is not patch set 1.0+test" in st["problems"]


def test_state_of_a_converged_host_asks_for_nothing(tmp_path):
    plan = a_plan(tmp_path)
    loaded = [f"{m}|1.0+test|-|OE|1.0+test|-|1.0+test|handback" for m in plan["modules"]]
    st = F.state(state_output(plan["module_sums"], loaded, plan["sysctls"]), plan)
    assert not st["install"] and not st["stale"] and not st["missing"]
    assert st["sysctl_changes"] == {} and st["sysctl_absent"] == [] and st["problems"] == []
    drifted = dict(plan["sysctls"], conn_reuse_old_conntrack=0)
    st = F.state(state_output(plan["module_sums"], loaded, drifted), plan)
    assert st["sysctl_changes"] == {"conn_reuse_old_conntrack": 1}
    old = [f"{m}|0.9|-|OE|1.0+test|-|1.0+test|handback" for m in plan["modules"]]
    assert F.state(state_output(plan["module_sums"], old, plan["sysctls"]), plan)["stale"]
    assert st["swap"] == "idle"
    # A swap that died with its table saved: the role finishes it first, and until then the
    # host fails verification, naming what is pending.
    died = state_output(plan["module_sums"], loaded, plan["sysctls"]) + "\n".join(
        ["", F.MARK + "swap", "state=pending", "stage=unloaded", "services=3", "real_servers=8"]
    )
    st = F.state(died, plan)
    assert st["swap"] == "pending" and not st["stale"]
    assert st["problems"] == [
        "a module swap died after unloaded with its saved table (3 services, 8 real servers) "
        "not restored: /var/lib/ipvs-fleet/swap.pending"
    ]


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
        [str(PLAYBOOK), "-i", "localhost,", "--syntax-check", "ipvs_fleet.fleet.site",
         "ipvs_fleet.fleet.rollback"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def run_site(tmp_path: Path, hosts: dict[str, dict[str, Any]], artifacts: Path) -> tuple[int, str]:
    """The site playbook (by FQCN, the checkout's collection through ansible.cfg) against
    hosts that are this machine (connection local, as root: no become)."""
    inv = tmp_path / "inv.yml"
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
    }
    inv.write_text(json.dumps({"all": {"hosts": {h: dict(local, **v) for h, v in hosts.items()}}}))
    r = subprocess.run(
        [str(PLAYBOOK), "-i", str(inv), "ipvs_fleet.fleet.site",
         "-e", f"ipvs_fleet_artifacts_dir={artifacts}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
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
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert gen.returncode == 0, gen.stdout
    spec = importlib.util.spec_from_file_location("gen_ansible", REPO / "docs" / "gen_ansible.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from ipvs_fleet.policy import HOST_KEYS

    assert set(mod.HOST_DATA) == HOST_KEYS  # the host data table names every policy key


def test_lock_preamble_is_the_pyinfra_one():
    """One host-lock text for both engines: the filter returns what `locked()` builds."""
    from ipvs_fleet.deploy.operations import lock_preamble, locked

    tasks = (("install", 30), ("configure", 5), ("remove", 5), ("restore", 5))
    for what, wait in ((f"{w} (ansible)", n) for w, n in tasks):
        text = F.locked(what, wait)
        assert text == lock_preamble(what, wait).get_raw_value()
        assert locked(what, wait, "true").get_raw_value() == f"{text} && true"
        assert f"flock -w {wait} 9" in text and f"ipvs-fleet {what}, pid $$" in text
    r = subprocess.run(["sh", "-n", "-c", F.locked("install (ansible)", "30") + "\ntrue"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_every_task_that_changes_the_ipvs_state_takes_the_lock_through_the_filter():
    """Install, configure (files and live sysctls) and rollback take the host lock, as the
    pyinfra operations do; the preamble is written nowhere in the role but the filter."""
    tasks = REPO / "ansible_collections/ipvs_fleet/fleet/roles/ipvs_fleet/tasks"
    users = {p.name for p in tasks.glob("*.yml") if "ipvs_fleet_locked(" in p.read_text()}
    assert users == {"install.yml", "configure.yml", "sysctls.yml", "rollback.yml"}
    assert not [p.name for p in tasks.glob("*.yml") if "flock" in p.read_text()]
    configure = (tasks / "configure.yml").read_text()
    # the managed files are uploaded beside the state, never written in place
    assert "dest: \"{{ __ipvs_fleet_staged_path }}\"" in configure
    assert "item.path | ipvs_fleet.fleet.ipvs_fleet_staging_path(__ipvs_fleet_token)" in configure
    assert "dest: \"{{ item.path }}\"" not in configure


def test_pending_names_each_change_of_a_drifted_host(tmp_path):
    plan = a_plan(tmp_path)
    loaded = [f"{m}|1.0+test|-|OE|1.0+test|-|1.0+test|handback" for m in plan["modules"]]
    st = F.state(state_output(plan["module_sums"], loaded, plan["sysctls"]), plan)
    assert F.pending(st, plan) == []
    drifted = dict(plan["sysctls"], conn_reuse_old_conntrack=0)
    st = F.state(state_output(plan["module_sums"], loaded, drifted), plan)
    assert F.pending(st, plan) == ["set net.ipv4.vs.conn_reuse_old_conntrack=1 (live: 0)"]
    stock = F.state(state_output({}, ["ip_vs|-|-|-|-|-|-|-"], {"conn_reuse_mode": 1}), plan)
    lines = F.pending(stock, plan)
    assert lines[0] == f"install patch set 1.0+test for {KR} in {plan['updates_dir']}"
    assert "activate (reload) the installed build of ip_vs" in lines
    assert "set net.ipv4.vs.conntrack=1 (absent until activated)" in lines
    # the rollback of a converged host: the set goes, the files come back
    back = dict(plan, patchset="", sysctls={})
    st = F.state(state_output(plan["module_sums"], loaded, plan["sysctls"]), back)
    assert F.pending(st, back) == [
        f"remove the patched modules from {plan['updates_dir']}",
        "remove /etc/sysctl.d/90-ipvs-fleet.conf",
        "restore /etc/modules-load.d/ipvs-fleet.conf",
        "activate (reload) the installed build of " + ", ".join(sorted(plan["modules"])),
        "load " + ", ".join(plan["modules"]),
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
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "needs the ipvs-fleet Python package" in r.stdout
    assert "pip install ipvs-fleet" in r.stdout
