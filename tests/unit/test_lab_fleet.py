"""The lab fleet file: the default fleet, and bad input named by file and field, nothing started."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.lab import Lab, load_fleet
from ipvs_fleet.lab.fleet import DEFAULT_FLEET, host_class_names
from ipvs_fleet.lab.image import LAB_PACKAGES

GOOD = """\
hosts:
  k8s-canary:
    release: bookworm
    host_class: k8s_node
    groups: [canary]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "fleet.yml"
    p.write_text(text)
    return p


def test_default_fleet_has_one_vm_per_kernel_line() -> None:
    fleet = load_fleet(DEFAULT_FLEET)
    assert {n: (h.release, h.host_class) for n, h in fleet.hosts.items()} == {
        "k8s-canary": ("bookworm", "k8s_node"),
        "k8s-node-1": ("trixie", "k8s_node"),
        "ftp-director": ("bullseye", "ftp"),
    }
    assert fleet.hosts["k8s-canary"].groups == ("k8s_nodes", "canary")
    assert fleet.hosts["ftp-director"].groups == ("ftp_hosts",)
    assert fleet.all_groups() == ["k8s_nodes", "ftp_hosts", "connmark_hosts", "canary"]


def test_fleet_classes_are_the_policy_classes() -> None:
    assert {"k8s_node", "ftp", "connmark"} <= host_class_names()


def test_kernel_args_are_kept_in_order(tmp_path: Path) -> None:
    text = GOOD + "    kernel_args: [lockdown=integrity, quiet]\n"
    assert load_fleet(write(tmp_path, text)).hosts["k8s-canary"].kernel_args == (
        "lockdown=integrity",
        "quiet",
    )


def test_the_7_2_fleet_boots_sid_with_the_selftest_tools() -> None:
    """lab/fleet-7.2.yml: one sid host whose image carries nftables besides the lab's own
    packages (socat among them: the upstream kselftest's tools), apart from lab/fleet.yml
    (whose releases stay the three stable ones)."""
    repo = Path(__file__).parents[2]
    fleet = load_fleet(repo / "lab/fleet-7.2.yml")
    assert fleet.releases() == ["sid"]
    (host,) = fleet.hosts.values()
    assert (host.host_class, host.packages) == ("k8s_node", ("nftables",))
    assert {"socat", "netcat-openbsd"} <= set(LAB_PACKAGES)
    assert load_fleet(repo / "lab/fleet.yml").releases() == ["bullseye", "bookworm", "trixie"]


def test_a_class_without_group_mapping_gets_class_hosts(tmp_path: Path) -> None:
    fleet = load_fleet(write(tmp_path, GOOD.replace("k8s_node", "connmark")), {"connmark"})
    assert fleet.hosts["k8s-canary"].groups == ("connmark_hosts", "canary")


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (GOOD.replace("bookworm", "buster"), "hosts.k8s-canary.release", "unknown Debian release"),
        (GOOD.replace("    release: bookworm\n", ""), "hosts.k8s-canary.release", "missing"),
        (GOOD.replace("k8s_node", "k8s-node"), "hosts.k8s-canary.host_class", "unknown host class"),
        (GOOD + "    cpus: 2\n", "hosts.k8s-canary.cpus", "unknown field"),
        (GOOD.replace("[canary]", "canary"), "hosts.k8s-canary.groups", "list of group names"),
        (GOOD + "    memory_mb: lots\n", "hosts.k8s-canary.memory_mb", "integer"),
        (GOOD + '    kernel_args: ["a; reboot"]\n', "hosts.k8s-canary.kernel_args", "list of"),
        (GOOD + "    kernel_args: lockdown=integrity\n", "hosts.k8s-canary.kernel_args", "list"),
        (GOOD + '    packages: ["socat; reboot"]\n', "hosts.k8s-canary.packages", "package"),
        (GOOD + "    packages: socat\n", "hosts.k8s-canary.packages", "list"),
        (GOOD.replace("k8s-canary:", "K8s_Canary:"), "hosts.K8s_Canary", "host name"),
        (
            GOOD.replace("release: bookworm", "release: [bookworm]"),
            "hosts.k8s-canary.release",
            "must be a string",
        ),
        ("hosts: {}\n", "hosts", "missing, empty"),
        ("hosts:\n  a: bookworm\n", "hosts.a", "must be a mapping"),
        (GOOD + "vms: 3\n", "vms", "unknown field"),
        ("class_groups: {nosuch: x}\n" + GOOD, "class_groups.nosuch", "unknown host class"),
        ("- k8s-canary\n", "(top level)", "must be a mapping"),
        ("hosts: [\n", "", "not valid YAML"),
    ],
)
def test_bad_fleet_file_names_file_and_field(
    tmp_path: Path, text: str, field: str, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_fleet(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {field}"), msg
    assert words in msg


def test_missing_fleet_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yml: cannot read fleet file"):
        load_fleet(tmp_path / "nope.yml")


def test_bad_fleet_file_starts_nothing(tmp_path: Path) -> None:
    labdir = tmp_path / "lab"
    fleet = write(tmp_path, GOOD.replace("bookworm", "jessie"))
    with pytest.raises(ConfigError, match="hosts.k8s-canary.release"):
        Lab(labdir, fleet_file=fleet).up()
    # Validation comes before keys, images, VMs and state: the lab dir was not even made.
    assert not labdir.exists()


def test_unknown_host_name_starts_nothing(tmp_path: Path) -> None:
    labdir = tmp_path / "lab"
    with pytest.raises(ConfigError, match="no host named k8s-nope"):
        Lab(labdir, fleet_file=write(tmp_path, GOOD)).up(["k8s-nope"])
    assert not labdir.exists()


def test_the_pair_fleet_has_two_directors_on_a_segment_and_a_lab_only_host() -> None:
    """lab/fleet-pair.yml: lvs-a and lvs-b (lvs_director, keepalived in their image, eth1 on
    the lab's segment, provisioned by lab/pair/director.sh) and `lan`, in no group."""
    repo = Path(__file__).parents[2]
    fleet = load_fleet(repo / "lab/fleet-pair.yml")
    a, b, lan = fleet.hosts["lvs-a"], fleet.hosts["lvs-b"], fleet.hosts["lan"]
    assert (a.host_class, a.packages, a.lan_address) == (
        "lvs_director",
        ("keepalived",),
        "10.0.9.11/24",
    )
    assert a.provision == b.provision == repo / "lab/pair/director.sh"
    assert (lan.lab_only, lan.groups, lan.host_class) == (True, (), "")
    assert "lan" not in {h for g in fleet.all_groups() for h in g}


@pytest.mark.parametrize(
    "extra, field, message",
    [
        ("    lan_address: 10.0.9.11\n", "lan_address", "IPv4 address/prefix"),
        ("    lan_address: fd00::1/64\n", "lan_address", "IPv4 address/prefix"),
        ("    lan_address: 10.0.9.300/24\n", "lan_address", "IPv4 address/prefix"),
        ("    provision: nowhere.sh\n", "provision", "no script"),
        ("    lab_only: true\n", "host_class", "a lab_only host is in no inventory"),
        ("    lab_only: yes please\n", "lab_only", "must be true or false"),
    ],
)
def test_bad_pair_fields_are_named(tmp_path: Path, extra: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_fleet(write(tmp_path, GOOD + extra))
    assert f"hosts.k8s-canary.{field}: " in str(e.value) and message in str(e.value)
    assert str(tmp_path / "fleet.yml") in str(e.value)


def test_a_lab_only_host_needs_no_class_and_joins_no_group(tmp_path: Path) -> None:
    text = GOOD + "  lan:\n    release: bookworm\n    lab_only: true\n"
    fleet = load_fleet(write(tmp_path, text))
    assert fleet.hosts["lan"].groups == () and fleet.hosts["lan"].host_class == ""
    assert fleet.all_groups() == ["k8s_node_hosts", "canary"]


def test_each_lab_dir_has_a_segment_of_its_own_and_each_vm_its_own_mac(tmp_path: Path) -> None:
    from ipvs_fleet.lab import vm

    one, two = vm.lan_segment(tmp_path / "a"), vm.lan_segment(tmp_path / "b")
    assert one != two and one.startswith("230.0.9.1:")
    nic_a, nic_b = vm.lan_nic("lvs-a", one), vm.lan_nic("lvs-b", one)
    assert nic_a[1] == f"socket,id=lan0,mcast={one},localaddr=127.0.0.1"
    assert nic_a[3] != nic_b[3] and nic_a[3].startswith("virtio-net-pci,netdev=lan0,mac=52:54:00:")
