"""keepalived.conf parsing (ipvs_fleet.keepalived.config): the pair lab's own file, includes
read through a reader, keepalived's defaults, and what it does not model reported, never
raised."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from ipvs_fleet.compliance.keepalived import parse_section
from ipvs_fleet.keepalived.config import parse

DATA = Path(__file__).parent / "data" / "keepalived"
ip = ipaddress.ip_address


def lab_conf() -> str:
    """The keepalived.conf lab/pair/director.sh wrote on a lab VM (ka-1, lvs-a's part)."""
    kf = parse_section((DATA / "ka1-master.txt").read_text().splitlines())
    assert kf is not None
    return kf.text


def test_the_pair_labs_conf() -> None:
    cfg = parse(lab_conf(), "/etc/keepalived/keepalived.conf")
    assert cfg.unsupported == []
    [vi] = cfg.instances
    assert (vi.name, vi.interface, vi.virtual_router_id, vi.priority, vi.state) == (
        "VI_1",
        "eth1",
        51,
        150,
        "BACKUP",
    )
    assert vi.vips == (ip("10.0.9.100"), ip("10.0.10.1"))
    [vs] = cfg.virtual_servers
    assert vs.key == ("TCP", ip("10.0.9.100"), 80)
    assert (vs.lb_algo, vs.lb_kind, vs.persistence_timeout) == ("rr", "NAT", None)
    assert [(str(r.address), r.port, r.weight, r.lb_kind) for r in vs.real_servers] == [
        ("10.0.10.21", 8080, 1, "NAT"),
        ("10.0.10.22", 8080, 1, "NAT"),
    ]
    sd = cfg.sync_daemon
    assert sd is not None and (sd.interface, sd.instance, sd.syncid) == ("eth1", "VI_1", 51)
    assert cfg.sync_id() == 51
    assert vs.where == "/etc/keepalived/keepalived.conf:25"


MAIN = """\
! Configuration File for keepalived
global_defs
{
    router_id lb1   # the director
    lvs_sync_daemon bond0 VI_WEB maxlen 1400
}
include conf.d/*.conf
include /etc/keepalived/missing/*.conf
"""
VRRP = """\
vrrp_instance VI_WEB {
    state MASTER
    interface bond0
    virtual_router_id 77
    priority 200
    virtual_ipaddress { 192.0.2.10/24 dev bond0 label bond0:web }
    virtual_ipaddress_excluded {
        2001:db8::10/64
    }
    notify "/usr/local/bin/notify.sh #1 !x"
}
"""
SERVICES = """\
virtual_server 2001:db8::10 443 {
    lvs_sched wrr
    lvs_method DR
    persistence_timeout 600
    protocol TCP
    sorry_server 2001:db8::99 443
    real_server 2001:db8::21 443 {
        weight 3
        inhibit_on_failure
    }
    real_server 2001:db8::22 {
        weight 2
        lvs_method TUN
    }
}
virtual_server 192.0.2.10 53 {
    protocol UDP
    persistence_timeout
    real_server 198.51.100.1 53 {
        weight 1
    }
}
"""


def test_includes_are_read_relative_to_the_including_file_with_defaults_applied() -> None:
    files = {
        "/etc/keepalived/conf.d/*.conf": [
            ("/etc/keepalived/conf.d/10-vrrp.conf", VRRP),
            ("/etc/keepalived/conf.d/20-services.conf", SERVICES),
        ],
    }
    asked: list[str] = []

    def reader(pattern: str) -> list[tuple[str, str]]:
        asked.append(pattern)
        return files.get(pattern, [])

    cfg = parse(MAIN, "/etc/keepalived/keepalived.conf", reader)
    assert asked == ["/etc/keepalived/conf.d/*.conf", "/etc/keepalived/missing/*.conf"]
    assert cfg.files == [
        "/etc/keepalived/keepalived.conf",
        "/etc/keepalived/conf.d/10-vrrp.conf",
        "/etc/keepalived/conf.d/20-services.conf",
    ]
    # `{ ... }` on one line, `{` on the next line
    assert cfg.unsupported == []
    [vi] = cfg.instances
    assert vi.vips == (ip("192.0.2.10"), ip("2001:db8::10"))
    assert vi.state == "MASTER"
    v6, dns = cfg.virtual_servers
    assert v6.key == ("TCP", ip("2001:db8::10"), 443)
    assert (v6.lb_algo, v6.lb_kind, v6.persistence_timeout) == ("wrr", "DR", 600)
    r1, r2 = v6.real_servers
    assert (r1.port, r1.weight, r1.inhibit_on_failure, r1.lb_kind) == (443, 3, True, "DR")
    # no port: the virtual server's; its own lvs_method
    assert (r2.port, r2.weight, r2.lb_kind) == (443, 2, "TUN")
    assert v6.sorry_server is not None and v6.sorry_server.address == ip("2001:db8::99")
    # keepalived's defaults: lb_algo wlc, lb_kind NAT, persistence_timeout without value 360
    assert (dns.key[0], dns.lb_algo, dns.lb_kind, dns.persistence_timeout) == (
        "UDP",
        "wlc",
        "NAT",
        360,
    )
    # no `id`: keepalived syncs with the instance's virtual_router_id
    assert cfg.sync_daemon is not None and cfg.sync_daemon.syncid is None
    assert cfg.sync_id() == 77


def test_what_it_does_not_model_is_reported_with_its_line() -> None:
    text = """\
virtual_server_group web {
    192.0.2.10 80
}
virtual_server fwmark 5 {
    lb_algo rr
}
virtual_server group web {
    real_server 10.0.0.1 80 {
    }
}
@lb1 global_defs {
}
virtual_server 192.0.2.11 http {
}
virtual_server 192.0.2.12 80 {
    lb_kind FULLNAT
}
vrrp_instance VI_X {
    interface eth0
}
global_defs {
    lvs_sync_daemon eth0 VI_NONE id x
}
"""
    cfg = parse(text, "/k.conf")
    assert cfg.virtual_servers == [] and cfg.instances == []
    assert cfg.unsupported == [
        "/k.conf:11: `@lb1...` (conditional or defined config)",
        "/k.conf:1: virtual_server_group",
        "/k.conf:4: virtual_server fwmark (fwmark/group services)",
        "/k.conf:7: virtual_server group (fwmark/group services)",
        "/k.conf:13: `virtual_server 192.0.2.11 http`: not a number",
        "/k.conf:16: `lb_kind FULLNAT`: lb_kind is NAT, DR or TUN",
        "/k.conf:18: vrrp_instance VI_X: no virtual_router_id",
        "/k.conf:22: lvs_sync_daemon id: not a number",
    ]


def test_unbalanced_braces_and_unread_includes_are_reported() -> None:
    cfg = parse("vrrp_instance VI_1 {\n  interface eth0\n}\n}\ninclude /x/*.conf\nfoo {\n", "/k")
    assert cfg.unsupported == [
        "/k:4: `}` closes no block",
        "/k:5: include /x/*.conf (not read)",
        "/k:6: block not closed",
        "/k:1: vrrp_instance VI_1: no virtual_router_id",
    ]


def test_an_include_that_includes_itself_stops() -> None:
    def reader(pattern: str) -> list[tuple[str, str]]:
        return [("/etc/keepalived/loop.conf", "include loop.conf\n")]

    cfg = parse("include loop.conf\n", "/etc/keepalived/keepalived.conf", reader)
    assert cfg.unsupported == ["/etc/keepalived/loop.conf:1: include loop.conf (not read)"]
    assert len(cfg.files) == 9
