"""The live readers (ipvsadm -Sn, ipvsadm -Ln --daemon, ip -o addr, keepalived's journal) on
output captured from a lab director, and keepalived's configuration compared with them."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

import pytest

from ipvs_fleet.compliance.keepalived import (
    KeepalivedFacts,
    director,
    parse_section,
    remote_reader,
)
from ipvs_fleet.keepalived.compare import compare_table, sync_daemon, vrrp_roles
from ipvs_fleet.keepalived.config import parse
from ipvs_fleet.keepalived.live import (
    LiveReal,
    LiveSyncDaemon,
    parse_addresses,
    parse_daemons,
    parse_table,
    parse_vrrp_states,
)

DATA = Path(__file__).parent / "data" / "keepalived"
ip = ipaddress.ip_address


def captured(name: str) -> KeepalivedFacts:
    """The keepalived facts section read from the lab VM ka-1 (tests/unit/data/keepalived)."""
    kf = parse_section((DATA / f"{name}.txt").read_text().splitlines())
    assert kf is not None
    return kf


def failures(findings: list) -> list[str]:
    return [f.text for f in findings if f.failure]


def notes(findings: list) -> list[str]:
    return [f.text for f in findings if not f.failure]


def test_the_section_of_a_running_master() -> None:
    kf = captured("ka1-master")
    assert (kf.conf, kf.pid, kf.config_test_rc, kf.ipvs_loaded) == (
        "/etc/keepalived/keepalived.conf",
        342,
        0,
        True,
    )
    assert parse_vrrp_states(kf.journal) == {"VI_1": "MASTER"}
    assert parse_daemons(kf.daemon) == [LiveSyncDaemon("master", "eth1", 51)]
    addrs = parse_addresses(kf.addr)
    assert addrs[ip("10.0.9.100")] == "eth1" and addrs[ip("fe80::5054:ff:fe82:54dc")] == "eth1"


def test_a_host_without_keepalived_has_no_section() -> None:
    lines = ["@@ka pid none", "@@ka conf /etc/keepalived/keepalived.conf", "@@ka absent"]
    assert parse_section(lines) is None
    assert parse_section([]) is None


def test_ipvsadm_save_output() -> None:
    table = parse_table(
        "-A -t 10.0.9.100:80 -s rr\n"
        "-a -t 10.0.9.100:80 -r 10.0.10.21:8080 -m -w 1\n"
        "-a -t 10.0.9.100:80 -r 10.0.10.22:8080 -m -w 0\n"
        "-A -u [2001:db8::10]:53 -s wrr -p 600\n"
        "-a -u [2001:db8::10]:53 -r [2001:db8::21]:53 -g -w 3\n"
        "-A -f 5 -s sh -b flag-1,flag-2\n"
        "-a -f 5 -r 10.0.0.1:0 -i -w 1 -x 100 -y 50\n"
    )
    web = table[("TCP", ip("10.0.9.100"), 80)]
    assert (web.scheduler, web.persistence_timeout) == ("rr", None)
    assert web.reals[(ip("10.0.10.22"), 8080)] == LiveReal("NAT", 0)
    dns = table[("UDP", ip("2001:db8::10"), 53)]
    assert (dns.scheduler, dns.persistence_timeout) == ("wrr", 600)
    assert dns.reals == {(ip("2001:db8::21"), 53): LiveReal("DR", 3)}
    assert table[("FWM", 5, 0)].reals == {(ip("10.0.0.1"), 0): LiveReal("TUN", 1)}


def test_an_unreadable_table_line_is_named() -> None:
    with pytest.raises(ValueError, match=r"line 2: '-X -t 1.2.3.4:80'"):
        parse_table("-A -t 1.2.3.4:80 -s rr\n-X -t 1.2.3.4:80\n")


def test_the_lab_master_matches_its_config_its_real_servers_down() -> None:
    kf = captured("ka1-master")
    cfg = parse(kf.text)
    found = compare_table(cfg, parse_table(kf.table))
    assert failures(found) == []
    # keepalived removed both (no `lan` host serves them on ka-1's lab): a note each
    assert notes(found) == [
        "TCP 10.0.9.100:80: real server 10.0.10.21:8080 not in the table (its health check fails?)",
        "TCP 10.0.9.100:80: real server 10.0.10.22:8080 not in the table (its health check fails?)",
    ]
    roles, vf = vrrp_roles(cfg, parse_vrrp_states(kf.journal), parse_addresses(kf.addr))
    assert (roles, vf) == ({"VI_1": "MASTER"}, [])
    assert sync_daemon(cfg, roles, parse_daemons(kf.daemon)) == []


def test_services_and_real_servers_keepalived_did_not_configure_fail() -> None:
    kf = captured("ka1-extra")  # `ipvsadm -A -t 10.0.9.200:443` and `-a ... -r 10.0.10.99:8080`
    found = compare_table(parse(kf.text), parse_table(kf.table))
    assert failures(found) == [
        "TCP 10.0.9.100:80: real server 10.0.10.99:8080 in the table, not configured",
        "TCP 10.0.9.200:443 in the IPVS table, not in keepalived's configuration",
    ]


def test_a_fault_instance_and_its_backup_sync_daemon() -> None:
    kf = captured("ka1-fault-drain")  # echo -254 > /etc/keepalived/drain (track_file)
    cfg = parse(kf.text)
    roles, found = vrrp_roles(cfg, parse_vrrp_states(kf.journal), parse_addresses(kf.addr))
    assert roles == {"VI_1": "FAULT"}
    assert failures(found) == ["VRRP VI_1: FAULT, not MASTER or BACKUP"]
    # keepalived 2.2.7 left the master daemon for the backup one on leaving MASTER
    assert parse_daemons(kf.daemon) == [LiveSyncDaemon("backup", "eth1", 51)]
    assert failures(sync_daemon(cfg, roles, parse_daemons(kf.daemon))) == [
        "sync daemon: VRRP VI_1 is FAULT: no role to sync"
    ]


def test_another_sync_id_fails() -> None:
    kf = captured("ka1-syncid52")  # the master daemon started again with --syncid 52
    cfg = parse(kf.text)
    roles, _ = vrrp_roles(cfg, parse_vrrp_states(kf.journal), parse_addresses(kf.addr))
    assert failures(sync_daemon(cfg, roles, parse_daemons(kf.daemon))) == [
        "sync daemon: master syncid 52, configured id 51"
    ]


def test_a_stopped_keepalived_leaves_no_table() -> None:
    kf = captured("ka1-stopped")  # systemctl stop keepalived
    assert kf.pid is None
    d = director(kf, None)
    assert not d.running and d.table == {} and d.daemons == [] and d.own_states == {}
    assert failures(compare_table(d.config, d.table)) == [
        "TCP 10.0.9.100:80 (/etc/keepalived/keepalived.conf:25) not in the IPVS table"
    ]


CFG = parse(
    "vrrp_instance VI_1 {\n interface eth1\n virtual_router_id 51\n"
    " virtual_ipaddress {\n  10.0.9.100/24\n  10.0.10.1/24\n }\n}\n"
    "global_defs {\n lvs_sync_daemon eth1 VI_1\n}\n"
    "virtual_server 10.0.9.100 80 {\n lb_algo rr\n"
    " real_server 10.0.10.21 8080 {\n  weight 2\n  inhibit_on_failure\n }\n"
    " real_server 10.0.10.22 8080 {\n }\n}\n",
    "/k",
)


NO_VIP = "MASTER without its VIPs 10.0.10.1"
HALF = "state unknown, holds 10.0.9.100 but not 10.0.10.1"


@pytest.mark.parametrize(
    ("own", "held", "role", "failed"),
    [
        ({"VI_1": "BACKUP"}, [], "BACKUP", []),
        ({"VI_1": "MASTER"}, ["10.0.9.100"], "MASTER", [f"VRRP VI_1: {NO_VIP}"]),
        ({"VI_1": "BACKUP"}, ["10.0.10.1"], "BACKUP", ["VRRP VI_1: BACKUP holding VIPs 10.0.10.1"]),
        ({}, ["10.0.9.100", "10.0.10.1"], "MASTER", []),
        ({}, [], "BACKUP", []),
        ({}, ["10.0.9.100"], None, [f"VRRP VI_1: {HALF}"]),
    ],
)  # fmt: skip
def test_vrrp_roles(
    own: dict[str, str], held: list[str], role: str | None, failed: list[str]
) -> None:
    roles, found = vrrp_roles(CFG, own, {ip(a): "eth1" for a in held})
    assert roles.get("VI_1") == role
    assert failures(found) == failed
    if not own and role:
        assert notes(found) == [f"VRRP VI_1: keepalived's state not logged; by its VIPs {role}"]


def test_the_sync_daemon_follows_the_role_and_defaults_to_the_router_id() -> None:
    backup = [LiveSyncDaemon("backup", "eth1", 51)]
    assert sync_daemon(CFG, {"VI_1": "BACKUP"}, backup) == []
    assert failures(sync_daemon(CFG, {"VI_1": "MASTER"}, backup)) == [
        "sync daemon: no master daemon on the VRRP MASTER (running: backup (syncid 51))"
    ]
    on_eth0 = [LiveSyncDaemon("backup", "eth0", 51)]
    assert failures(sync_daemon(CFG, {"VI_1": "BACKUP"}, on_eth0)) == [
        "sync daemon: backup on eth0, configured eth1"
    ]


def test_weights_forwarding_and_scheduler() -> None:
    table = parse_table(
        "-A -t 10.0.9.100:80 -s wlc -p 30\n"
        "-a -t 10.0.9.100:80 -r 10.0.10.21:8080 -m -w 0\n"
        "-a -t 10.0.9.100:80 -r 10.0.10.22:8080 -g -w 5\n"
    )
    found = compare_table(CFG, table)
    assert failures(found) == [
        "TCP 10.0.9.100:80: scheduler wlc, configured lb_algo rr",
        "TCP 10.0.9.100:80: persistence 30, configured persistence_timeout none",
        "TCP 10.0.9.100:80: real server 10.0.10.22:8080: forwarding DR, configured lb_kind NAT",
        "TCP 10.0.9.100:80: real server 10.0.10.22:8080: weight 5, configured weight 1",
    ]
    assert notes(found) == [
        "TCP 10.0.9.100:80: real server 10.0.10.21:8080 at weight 0 "
        "(inhibit_on_failure: its health check fails?)"
    ]


def test_unsupported_config_is_a_failure_of_the_table_check() -> None:
    cfg = parse("virtual_server fwmark 5 {\n lb_algo rr\n}\n", "/k")
    found = compare_table(cfg, parse_table("-A -f 5 -s rr\n"))
    assert failures(found) == [
        "not supported by the check: /k:1: virtual_server fwmark (fwmark/group services)"
    ]


def test_the_remote_reader_globs_in_a_real_shell_and_never_evaluates(tmp_path: Path) -> None:
    d = tmp_path / "conf.d"
    d.mkdir()
    (d / "b.conf").write_text("virtual_server 10.0.0.2 80 {\n}\n")
    (d / "a.conf").write_text("virtual_server 10.0.0.1 80 {\n}\n")
    (d / "skip.txt").write_text("x\n")

    def run(cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["sh", "-c", cmd], capture_output=True, text=True, check=True, timeout=30
        )

    read = remote_reader(run)
    assert read(f"{d}/*.conf") == [
        (f"{d}/a.conf", "virtual_server 10.0.0.1 80 {\n}\n\n"),
        (f"{d}/b.conf", "virtual_server 10.0.0.2 80 {\n}\n\n"),
    ]
    assert read(f"{d}/none-*.conf") == []
    marker = tmp_path / "evaluated"
    assert read(f"$(touch {marker})") == [] and not marker.exists()


@pytest.mark.parametrize(
    ("name", "role", "daemon"),
    [("pair-lvs-a-backup", "BACKUP", "backup"), ("pair-lvs-b-master", "MASTER", "master")],
)
def test_the_pair_lab_directors(name: str, role: str, daemon: str) -> None:
    """Read from the pair lab (lvs-a drained by its track file: lvs-b MASTER): keepalived
    2.2.7 runs the backup sync daemon on the VRRP backup, the master one on the master."""
    d = director(captured(name), None)
    roles, found = vrrp_roles(d.config, d.own_states, d.addresses)
    assert (roles, found) == ({"VI_1": role}, [])
    assert d.daemons == [LiveSyncDaemon(daemon, "eth1", 51)]
    assert sync_daemon(d.config, roles, d.daemons) == []
    table = compare_table(d.config, d.table)
    assert failures(table) == []
    assert notes(table) == [
        "TCP 10.0.9.100:81: real server 10.0.10.22:8081 not in the table (its health check fails?)"
    ]
