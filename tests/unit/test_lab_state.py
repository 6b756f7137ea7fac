"""What a lab writes for its users, from a recorded state: ssh_config, known_hosts, the
pyinfra groups, testinfra host specs, the seed disk. (Booting is in tests/lab/test_lab.py.)"""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

from ipvs_fleet.lab import Lab, LabHost, hosts_for_testinfra
from ipvs_fleet.lab.image import seed_tar
from ipvs_fleet.lab.inventory import LAB_P99_MS, lab_class_data, pyinfra_groups
from ipvs_fleet.lab.lab import _State
from ipvs_fleet.resources import policy_file


@pytest.fixture
def recorded(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path / "lab", log=lambda _m: None)
    hosts = {
        "k8s-canary": LabHost(
            "k8s-canary",
            "bookworm",
            "6.1.0-56-cloud-amd64",
            "6.1.192-2",
            "k8s_node",
            ["k8s_nodes", "canary"],
            40022,
        ),
        "ftp-director": LabHost(
            "ftp-director",
            "bullseye",
            "5.10.0-46-cloud-amd64",
            "5.10.262-1",
            "ftp",
            ["ftp_hosts"],
            40023,
        ),
    }
    st = _State(hosts, "lab/fleet.yml", ["k8s_nodes", "ftp_hosts", "connmark_hosts", "canary"])
    lab._ensure_keys(list(hosts))
    lab._save(st)
    lab._write_ssh_files(st)
    return lab


def test_ssh_config_checks_host_keys_and_shares_a_connection(recorded: Lab) -> None:
    out = subprocess.run(
        ["ssh", "-G", "-F", str(recorded.ssh_config), "k8s-canary"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    opts = dict(line.split(" ", 1) for line in out.splitlines())
    assert opts["hostname"] == "127.0.0.1"
    assert opts["port"] == "40022"
    assert opts["user"] == "root"
    assert opts["stricthostkeychecking"] == "true"
    assert opts["userknownhostsfile"] == str(recorded.known_hosts)
    assert opts["controlmaster"] == "auto"
    assert opts["identityfile"] == str(recorded.client_key)


def test_known_hosts_pins_each_vms_own_host_key(recorded: Lab) -> None:
    lines = recorded.known_hosts.read_text().splitlines()
    assert len(lines) == 2
    for name, port in [("ftp-director", 40023), ("k8s-canary", 40022)]:
        pub = recorded.host_key(name).with_suffix(".pub").read_text().split()[1]
        assert f"[127.0.0.1]:{port} ssh-ed25519 {pub}" in lines


def test_pyinfra_groups_carry_class_and_ssh_data(recorded: Lab) -> None:
    groups = pyinfra_groups(recorded)
    assert {g: [n for n, _ in hs] for g, hs in groups.items()} == {
        "k8s_nodes": ["k8s-canary"],
        "ftp_hosts": ["ftp-director"],
        "connmark_hosts": [],
        "canary": ["k8s-canary"],
    }
    data = dict(groups["ftp_hosts"])["ftp-director"]
    assert data["ipvs_host_class"] == "ftp"
    assert data["ipvs_kernel_release"] == "5.10.0-46-cloud-amd64"
    assert (data["ssh_hostname"], data["ssh_port"]) == ("127.0.0.1", 40023)
    assert data["ssh_user"] == "root"
    assert data["ssh_strict_host_key_checking"] == "yes"
    assert data["ssh_known_hosts_file"] == str(recorded.known_hosts)


def test_the_lab_raises_a_p99_budget_and_adds_none(
    recorded: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k8s_node's 100 ms goes up to LAB_P99_MS; ftp budgets no p99 and gets none (a lab
    value there would fail its 1 s connects); a class above LAB_P99_MS keeps its own."""
    groups = pyinfra_groups(recorded)
    canary = dict(groups["k8s_nodes"])["k8s-canary"]
    assert canary["ipvs_latency_budget"] == {"p99_ms": LAB_P99_MS}
    assert "ipvs_latency_budget" not in dict(groups["ftp_hosts"])["ftp-director"]
    policy = yaml.safe_load(policy_file().read_text())
    policy["host_classes"]["k8s_node"]["latency_budget"]["p99_ms"] = LAB_P99_MS + 1
    (tmp_path / "policy.yml").write_text(yaml.safe_dump(policy))
    monkeypatch.setenv("IPVS_FLEET_POLICY", str(tmp_path / "policy.yml"))
    assert lab_class_data()["k8s_node"] == {}


def test_hosts_for_testinfra(recorded: Lab) -> None:
    hosts, cfg = hosts_for_testinfra(recorded.dir)
    assert sorted(hosts) == ["ssh://ftp-director", "ssh://k8s-canary"]
    assert cfg == recorded.ssh_config


def test_status_of_a_vm_that_is_not_running_is_died(recorded: Lab) -> None:
    assert {(s.name, s.state) for s in recorded.status()} == {
        ("k8s-canary", "died"),
        ("ftp-director", "died"),
    }


def test_seed_disk_is_a_tar_of_the_keys(recorded: Lab, tmp_path: Path) -> None:
    seed = tmp_path / "seed.tar"
    seed_tar(seed, "ssh-ed25519 AAAA test\n", recorded.host_key("k8s-canary"))
    assert seed.stat().st_size % 4096 == 0
    with tarfile.open(seed) as tar:
        members = {m.name: (m.mode, m.uid) for m in tar.getmembers()}
        assert tar.extractfile("root/.ssh/authorized_keys").read() == b"ssh-ed25519 AAAA test\n"  # type: ignore[union-attr]
    assert members == {
        "root/.ssh": (0o700, 0),
        "root/.ssh/authorized_keys": (0o600, 0),
        "etc/ssh/ssh_host_ed25519_key": (0o600, 0),
        "etc/ssh/ssh_host_ed25519_key.pub": (0o644, 0),
    }
