"""Parsing of the one-command fact gathering, and inventory loading/selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_fleet.compliance import facts
from ipvs_fleet.compliance.inventory import load_inventory, select_hosts
from ipvs_fleet.errors import ConfigError
from tests.fixtures.loaded import loaded_output

OUTPUT = """\
@@@ kernel
6.1.0-56-cloud-amd64
12288
@@@ loaded
{loaded}
@@@ sysctls
/proc/sys/net/ipv4/vs/conn_reuse_mode:1
/proc/sys/net/ipv4/vs/conn_reuse_old_conntrack:1
/proc/sys/net/ipv4/vs/conntrack:1
/proc/sys/net/ipv4/vs/sync_threshold:3	50
@@@ usage
## lsmod
ip_vs
## ipvsadm
## iptables
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
## nft
@@@ persisted
/usr/lib/sysctl.d/50-default.conf:net.ipv4.vs.conntrack = 0
/etc/sysctl.d/90-ipvs-fleet.conf:net.ipv4.vs.conn_reuse_mode = 1
/etc/sysctl.d/90-ipvs-fleet.conf:net.ipv4.vs.conntrack = 1
/etc/sysctl.d/99-kube.conf:net/ipv4/vs/conn_reuse_mode=0
## modules-load
# Managed by ipvs-fleet
ip_vs
ip_vs_rr
@@@ netns
default conn_reuse_old_conntrack=1
default conntrack=0
alias conntrack expire_nodest_conn
#done
@@@ kube_proxy
running
""".replace(
    "{loaded}",
    "\n".join(
        loaded_output(
            [
                "ip_vs|-|-|-|-|-|-|-",  # the distro's own: no file of ours
                "ip_vs_rr|-|-|-|-|-|-|-",
                "ip_vs_reuse|3.0+abc|-|OE|3.0+abc|-|3.0+abc|prekill",
            ]
        )
    ),
)


def test_parse_all_sections() -> None:
    f = facts.parse(OUTPUT)
    assert f.kernel_release == "6.1.0-56-cloud-amd64"
    assert f.tainted == 12288 and f.taint_flags() == "OE"
    assert not f.loaded["ip_vs"]["patched"] and f.loaded["ip_vs"]["taint"] == ""
    fix = f.loaded["ip_vs_reuse"]
    assert fix["patched"] and fix["patchset"] == "3.0+abc" and fix["reuse"] == "prekill"
    assert f.sysctls["conn_reuse_old_conntrack"] == 1
    assert f.usage["invalid_drop"] is True
    assert f.fleet_file_present and f.fleet_file == {"conn_reuse_mode": "1", "conntrack": "1"}
    # 99-kube.conf sorts after 90-ipvs-fleet.conf: its value wins at boot
    assert f.persisted["conn_reuse_mode"] == ("0", "/etc/sysctl.d/99-kube.conf")
    assert f.persisted["conntrack"] == ("1", "/etc/sysctl.d/90-ipvs-fleet.conf")
    assert f.modules_load == ["ip_vs", "ip_vs_rr"]
    assert f.netns.complete and f.netns.defaults["conntrack"] == "0"
    assert f.netns.problems == ["writing conntrack also changed expire_nodest_conn"]
    assert f.kube_proxy is True


def test_etc_shadows_usr_lib_with_the_same_name() -> None:
    eff, _, present = facts.parse_persisted(
        [
            "/usr/lib/sysctl.d/90-ipvs-fleet.conf:net.ipv4.vs.conntrack = 0",
            "/etc/sysctl.d/90-ipvs-fleet.conf:net.ipv4.vs.conntrack = 1",
        ]
    )
    assert eff["conntrack"] == ("1", "/etc/sysctl.d/90-ipvs-fleet.conf") and present


def test_absent_files_and_no_ipvs() -> None:
    out = OUTPUT.split("@@@ persisted")[0] + (
        "@@@ persisted\n## modules-load\n#absent\n@@@ netns\n#no-ipvs\n@@@ kube_proxy\nabsent\n"
    )
    f = facts.parse(out)
    assert not f.fleet_file_present and f.modules_load is None
    assert not f.netns.ipvs and f.kube_proxy is False


def test_garbage_is_an_error() -> None:
    with pytest.raises(ValueError, match="unexpected kernel section"):
        facts.parse("bash: modinfo: command not found\n")


def test_gather_command_is_one_shell_line_with_every_section() -> None:
    cmd = facts.gather_command(["conntrack", "conn_reuse_old_conntrack"])
    for name in ("kernel", "loaded", "sysctls", "usage", "persisted", "netns", "kube_proxy"):
        assert f"echo '@@@ {name}'" in cmd
    assert "swap" not in cmd  # activation never swaps the IPVS stack: nothing to read
    assert "unshare -n bash -c" in cmd


INVENTORY = """\
_ssh = {"ssh_hostname": "127.0.0.1", "ssh_user": "root"}
k8s_nodes = [
    ("k8s-1", {**_ssh, "ssh_port": 2201, "ipvs_host_class": "k8s_node"}),
    ("k8s-2", {**_ssh, "ssh_port": 2202, "ipvs_host_class": "k8s_node"}),
]
ftp_hosts = [("ftp-1", {**_ssh, "ssh_port": 2203, "ipvs_host_class": "ftp"})]
canary = ["k8s-1"]
"""


def test_inventory_hosts_groups_and_limit(tmp_path: Path) -> None:
    inv = tmp_path / "prod.py"
    inv.write_text(INVENTORY)
    hosts = load_inventory(inv)
    assert [h.name for h in hosts] == ["k8s-1", "k8s-2", "ftp-1"]
    assert set(hosts[0].groups) >= {"k8s_nodes", "canary", "prod"}
    assert hosts[2].host_class == "ftp" and hosts[2].data["ssh_port"] == 2203
    assert [h.name for h in select_hosts(hosts, "canary,ftp_hosts")] == ["k8s-1", "ftp-1"]
    assert [h.name for h in select_hosts(hosts, ["k8s-*"])] == ["k8s-1", "k8s-2"]
    with pytest.raises(ConfigError, match="--limit nope: matches no host or group"):
        select_hosts(hosts, "nope")


def test_bad_inventories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inventory file not found"):
        load_inventory(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("hosts = [\n")
    with pytest.raises(ConfigError, match="bad.py: cannot load inventory: SyntaxError"):
        load_inventory(bad)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="inventory has no hosts"):
        load_inventory(empty)
