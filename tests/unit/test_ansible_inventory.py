"""Ansible inventories: the lab's, generated from its state.json, and read back for pyinfra."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ipvs_fleet.ansible_inventory import pyinfra_groups, ssh_options, write_lab_inventory
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.lab.lab import Lab


def fake_lab(tmp_path: Path) -> Lab:
    """A Lab whose state.json names two hosts (nothing is booted)."""
    host = {
        "release": "bookworm",
        "kernel_release": "6.1.0-56-cloud-amd64",
        "kernel_version": "6.1.192-2",
        "memory_mb": 1024,
    }
    state = {
        "hosts": {
            "k8s-canary": dict(
                host,
                name="k8s-canary",
                host_class="k8s_node",
                groups=["k8s_nodes", "canary"],
                port=40001,
            ),
            "ftp-director": dict(
                host, name="ftp-director", host_class="ftp", groups=["ftp_hosts"], port=40002
            ),
        }
    }
    (tmp_path / "state.json").write_text(json.dumps(state))
    return Lab(tmp_path)


def test_lab_inventory_round_trips_to_pyinfra(tmp_path):
    lab = fake_lab(tmp_path)
    inv = write_lab_inventory(lab, tmp_path / "lab.ansible.yml")
    groups = pyinfra_groups(inv)
    assert [h for h, _ in groups["k8s_nodes"]] == ["k8s-canary"]
    assert [h for h, _ in groups["canary"]] == ["k8s-canary"]
    assert [h for h, _ in groups["ftp_hosts"]] == ["ftp-director"]
    data = dict(groups["all"])
    assert data["k8s-canary"] == {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": 40001,
        "ssh_user": "root",
        "ssh_key": str(lab.client_key),
        "ssh_known_hosts_file": str(lab.known_hosts),
        "ssh_strict_host_key_checking": "yes",
        "ipvs_host_class": "k8s_node",
        "ipvs_latency_budget": {"p99_ms": 800},
    }
    assert data["ftp-director"]["ipvs_host_class"] == "ftp"


def test_group_vars_and_children_reach_pyinfra(tmp_path):
    inv = tmp_path / "prod.yml"
    inv.write_text(
        "all:\n"
        "  children:\n"
        "    k8s_cluster:\n"
        "      vars: {ipvs_host_class: k8s_node, ipvs_sysctls: {conn_reuse_mode: 0}}\n"
        "      children:\n"
        "        workers: {hosts: {w1: {ansible_host: 10.0.0.1, ansible_port: '2222'}}}\n"
        "        canary: {hosts: {w0: {ansible_host: 10.0.0.9}}}\n"
    )
    groups = pyinfra_groups(inv)
    assert sorted(h for h, _ in groups["k8s_cluster"]) == ["w0", "w1"]
    data = dict(groups["all"])
    assert data["w1"] == {
        "ssh_hostname": "10.0.0.1",
        "ssh_port": 2222,
        "ipvs_host_class": "k8s_node",
        "ipvs_sysctls": {"conn_reuse_mode": 0},
    }


def test_pyinfra_inventory_file_reads_the_ansible_one(tmp_path, monkeypatch):
    from pyinfra.api import Config, Inventory, State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory_from_files

    inv = write_lab_inventory(fake_lab(tmp_path), tmp_path / "lab.ansible.yml")
    monkeypatch.setenv("IPVS_FLEET_ANSIBLE_INVENTORY", str(inv))
    path = Path(__file__).resolve().parents[2] / "inventory" / "from_ansible.py"
    with ctx_state.use(State(Inventory(([], {})), Config())):
        pinv = make_inventory_from_files(str(path), cwd=str(tmp_path))
    hosts = {h.name: h for h in pinv}
    assert set(hosts) == {"k8s-canary", "ftp-director"}
    assert "canary" in hosts["k8s-canary"].groups
    assert hosts["k8s-canary"].data.ipvs_host_class == "k8s_node"
    assert hosts["ftp-director"].data.ssh_port == 40002


def test_missing_or_broken_inventory_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        pyinfra_groups(tmp_path / "nope.yml")
    empty = tmp_path / "empty.yml"
    empty.write_text("all: {}\n")
    with pytest.raises(ConfigError, match="no hosts"):
        pyinfra_groups(empty)


def test_ssh_options_keeps_what_pyinfra_understands():
    got = ssh_options("-o UserKnownHostsFile='/a b/kh' -oStrictHostKeyChecking=no -o Port=3 -C")
    assert got == {"ssh_known_hosts_file": "/a b/kh", "ssh_strict_host_key_checking": "no"}


def test_printed_groups_mask_the_mapped_passwords(tmp_path, capsys):
    """`python -m ipvs_fleet.ansible_inventory pyinfra INV` is for a look: no password in it,
    while the pyinfra path still gets the real values."""
    from ipvs_fleet.ansible_inventory import _cli

    inv = tmp_path / "prod.yml"
    inv.write_text(
        "all:\n"
        "  vars: {ansible_user: fleet, ansible_password: ssh-Pw-1, ansible_become: true,\n"
        "         ansible_become_password: sudo-Pw-2}\n"
        "  hosts: {w1: {ansible_host: 10.0.0.1}}\n"
    )
    assert _cli(["pyinfra", str(inv)]) == 0
    out = capsys.readouterr().out
    assert "ssh-Pw-1" not in out and "sudo-Pw-2" not in out, out
    data = dict(json.loads(out)["all"])["w1"]
    assert data["ssh_password"] == "***" and data["_sudo_password"] == "***"
    assert data["ssh_user"] == "fleet"
    real = dict(pyinfra_groups(inv)["all"])["w1"]
    assert (real["ssh_password"], real["_sudo_password"]) == ("ssh-Pw-1", "sudo-Pw-2")


def test_a_broken_inventory_error_does_not_echo_its_passwords(tmp_path):
    """A file no plugin parses is an error naming it (not an empty inventory), and the
    source line ansible-inventory quotes (seen: the password's own line) is masked."""
    broken = tmp_path / "hosts.yml"
    broken.write_text(
        "all:\n  hosts:\n    web1:\n      ansible_host: 10.0.0.1\n"
        "      ansible_become_password: Hunter2-secret: x\n"
    )
    with pytest.raises(ConfigError, match="ansible-inventory failed") as e:
        pyinfra_groups(broken)
    assert "Hunter2-secret" not in str(e.value)
    assert "ansible_become_password: ***" in str(e.value)
