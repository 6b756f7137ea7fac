"""The scenario harness's cells, pure parts: layouts, the rules per ruleset/family/backend,
rule counters, peer classification, conntrack matching, the IPVS netlink encoding."""

from __future__ import annotations

import ipaddress
import itertools
import re
import struct

import pytest

from ipvs_fleet.probe import cells, kernel, probe, rules, scenario
from ipvs_fleet.probe.harness import Plan

CELLS = list(itertools.product(cells.RULESETS, cells.CLIENTS, cells.FAMILIES))
K8S = [c for c in CELLS if c[0] != "minimal"]
TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "MARK", "MASQUERADE"}


def _rules(ruleset: str, client: str, family: int, rule: str = "drop") -> str:
    return rules.director_rules(cells.cell_layout(ruleset, client, family, "1234567"), rule)


def _lines(text: str, table: str) -> list[str]:
    """The -A lines of one table of an iptables-restore text."""
    m = re.search(rf"^\*{table}\n(.*?)^COMMIT$", text, re.S | re.M)
    return [ln for ln in (m.group(1).splitlines() if m else []) if ln.startswith("-A ")]


def _chains(text: str, table: str) -> list[str]:
    m = re.search(rf"^\*{table}\n(.*?)^COMMIT$", text, re.S | re.M)
    return [
        ln[1:].split()[0] for ln in (m.group(1).splitlines() if m else []) if ln.startswith(":")
    ]


# --- layouts --------------------------------------------------------------------------------


def test_minimal_layout_is_the_one_earlier_results_used() -> None:
    lay = cells.cell_layout("minimal", "outside", 4)
    assert (lay.target.vip, lay.target.port) == (cells.VIP, cells.PORT) == ("10.10.9.1", 8080)
    assert lay.client_ip == cells.CLIENT_IP
    assert lay.real_servers == cells.REAL_SERVERS
    assert lay.rs_routes == "default" and lay.vip_dev == "lo"
    assert not lay.masquerade_demanded


@pytest.mark.parametrize("family", cells.FAMILIES)
def test_k8s_addresses_fit_the_pod_cidr(family: int) -> None:
    for client in cells.CLIENTS:
        lay = cells.cell_layout("kube-proxy", client, family)
        cidr = ipaddress.ip_network(lay.pod_cidr or "")
        for ip in lay.real_servers.values():
            assert ipaddress.ip_address(ip) in cidr
        for leaf in ("p", "r1", "r2"):  # pods and the node's side of their links
            assert ipaddress.ip_address(lay.links[leaf].leaf_ip) in cidr
            assert ipaddress.ip_address(lay.links[leaf].node_ip) in cidr
            net = ipaddress.ip_network(
                f"{lay.links[leaf].node_ip}/{lay.links[leaf].plen}", strict=False
            )
            assert ipaddress.ip_address(lay.links[leaf].leaf_ip) in net
        # what kube-proxy's `! -s <pod cidr>` decides: only the pod client is inside
        inside = ipaddress.ip_address(lay.client_ip) in cidr
        assert inside == (client == "pod")
        assert ipaddress.ip_address(lay.target.vip).version == family


@pytest.mark.parametrize(("ruleset", "client", "family"), CELLS)
def test_layout_targets_and_masquerade_agree_with_the_plan(
    ruleset: str, client: str, family: int
) -> None:
    lay = cells.cell_layout(ruleset, client, family)
    assert (
        lay.masquerade_demanded
        == Plan(ruleset=ruleset, client=client, family=family).masquerade_demanded
    )
    assert lay.expected_peer == ("node" if lay.masquerade_demanded else "client")
    if ruleset == "minimal":
        return
    if client == "outside":
        assert (lay.target.port, lay.udp_target.port) == (cells.NODE_PORT, cells.NODE_PORT_UDP)
        assert lay.target.vip == lay.links["c"].node_ip
    else:
        assert (lay.target.port, lay.udp_target.port) == (80, 53)
        assert lay.target.vip == lay.vips[0]
    if client == "host":  # the source of a local route: the ClusterIP itself
        assert lay.client_ip == lay.target.vip
    assert {(s.proto, s.port) for s in lay.services} == {
        ("tcp", 80),
        ("tcp", 30080),
        ("udp", 53),
        ("udp", 30053),
    }


def test_device_names_fit_ifnamsiz() -> None:
    lay = cells.cell_layout("calico", "pod", 6, "9999999")
    for ln in lay.links.values():
        assert len(ln.dev) <= 15 and len(ln.peer_dev) <= 15


def test_peer_kind() -> None:
    lay = cells.cell_layout("kube-proxy", "outside", 6)
    assert lay.peer_kind("fd10:1::2") == "client"
    assert lay.peer_kind("fd00:10:244:1::1") == "node"
    assert lay.peer_kind("fd00:10:244:0001:0000:0000:0000:0001") == "node"  # any spelling
    assert lay.peer_kind("fd99::1") == "other"
    assert lay.peer_kind(None) == "none"


def test_peer_summary_counts_mismatches() -> None:
    lay = cells.cell_layout("kube-proxy", "outside", 4)
    att = [
        probe.Attempt(0, 1, 1.0, 1.0, "rs1", peer="10.244.1.1"),
        probe.Attempt(1, 2, 1.0, 1.0, "rs2", peer="10.10.1.2"),  # skipped the masquerade
        probe.Attempt(2, 3, 5000.0, 5000.0, None, "connect: timeout"),
    ]
    out = rules.peer_summary(lay, att)
    assert out == {
        "peer_sources": {"10.244.1.1": 1, "10.10.1.2": 1},
        "peer_kinds": {"node": 1, "client": 1},
        "masq_mismatch": 1,
    }


def test_ipvsadm_restore() -> None:
    text = cells.ipvsadm_restore(cells.cell_layout("kube-proxy", "pod", 6))
    assert "-A -t [fd00:10:96::a]:80 -s rr" in text
    assert "-a -t [fd10:1::1]:30080 -r [fd00:10:244:2::2]:8080 -m -w 1" in text
    assert "-a -u [fd00:10:96::a]:53 -r [fd00:10:244:1::2]:53 -m -w 1" in text
    assert cells.ipvsadm_restore(cells.cell_layout("minimal", "outside", 4)) == (
        "-A -t 10.10.9.1:8080 -s rr\n-a -t 10.10.9.1:8080 -r 10.10.2.2:8080 -m -w 1\n"
        "-a -t 10.10.9.1:8080 -r 10.10.3.2:8080 -m -w 1\n-A -u 10.10.9.1:53 -s rr\n"
        "-a -u 10.10.9.1:53 -r 10.10.2.2:53 -m -w 1\n-a -u 10.10.9.1:53 -r 10.10.3.2:53 -m -w 1\n"
    )


def test_check_cell_names_the_field() -> None:
    with pytest.raises(cells.Failed, match="ruleset must be one of"):
        cells.cell_layout("cilium", "outside", 4)
    with pytest.raises(cells.Failed, match="iptables must be one of nft, legacy"):
        cells.Cell.from_plan({"iptables": "ebtables"})
    assert cells.Cell.from_plan({}) == cells.Cell()


# --- rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["drop", "accept"])
def test_minimal_rules(rule: str) -> None:
    text = _rules("minimal", "outside", 4, rule)
    verdict = "DROP" if rule == "drop" else "ACCEPT"
    assert _lines(text, "filter") == [f"-A FORWARD -m conntrack --ctstate INVALID -j {verdict}"]
    assert _lines(text, "mangle") == [
        "-A PREROUTING -d 10.10.9.1/32 -p tcp -m tcp --dport 8080 -m conntrack --ctstate NEW "
        "-m comment --comment ipvsp-count-new"
    ]
    assert _lines(text, "nat") == [] and _lines(text, "raw") == []


KUBE_PROXY_NAT = [
    '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
    '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    "-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN",
    '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for '
    'solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE',
    '-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade '
    'purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ',
    '-A KUBE-NODE-PORT -p udp -m comment --comment "Kubernetes nodeport UDP port for masquerade '
    'purpose" -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ',
    '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade '
    'purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ',
    "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
    "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
    "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT",
    "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
    "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
    '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" '
    "-j MASQUERADE --random-fully",
    "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
]
KUBE_PROXY_FILTER = [
    '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
    '-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
    '-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT',
    '-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
    '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
    '-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER',
    "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP",
    "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
    "-m mark --mark 0x4000/0x4000 -j ACCEPT",
    '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
    "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    '-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" '
    "-m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT",
    "-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN",
    "-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN",
    "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN",
    "-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN",
    "-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN",
    "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT",
]


NAT_COUNT = (
    "-A PREROUTING -d 10.10.1.1/32 -p tcp -m tcp --dport 30080 -m comment --comment ipvsp-count-nat"
)


def test_kube_proxy_rules_as_proxier_writes_them() -> None:
    text = _rules("kube-proxy", "outside", 4)
    # the probe's nat counting rule first (no target: it only counts), then kube-proxy's
    assert _lines(text, "nat") == [NAT_COUNT, *KUBE_PROXY_NAT]
    assert _lines(text, "filter") == KUBE_PROXY_FILTER
    assert _chains(text, "nat")[4:] == [
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        "KUBE-MARK-MASQ",
    ]
    # the probe's counting rule: NodePort on the node's address, in mangle PREROUTING
    assert _lines(text, "mangle") == [
        "-A PREROUTING -d 10.10.1.1/32 -p tcp -m tcp --dport 30080 -m conntrack --ctstate NEW "
        "-m comment --comment ipvsp-count-new"
    ]
    assert _lines(text, "raw") == []


def test_kube_proxy_variants() -> None:
    masq_all = _lines(_rules("kube-proxy-masq-all", "pod", 4), "nat")
    assert (
        '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
        'masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ'
        in masq_all
    )
    assert not any("! -s" in ln for ln in masq_all)
    accept = _lines(_rules("kube-proxy", "outside", 4, "accept"), "filter")
    assert accept == [ln for ln in KUBE_PROXY_FILTER if "INVALID" not in ln]


def test_kube_proxy_ipv6_names() -> None:
    text = _rules("kube-proxy", "outside", 6)
    nat = _lines(text, "nat")
    assert "-A KUBE-SERVICES -s ::1/128 -j RETURN" in nat
    assert any("--match-set KUBE-6-CLUSTER-IP dst,dst ! -s fd00:10:244::/56" in ln for ln in nat)
    sets = re.findall(r"--match-set (\S+)", text)
    assert sets and all(s.startswith("KUBE-6-") for s in sets)
    assert "-d fd10:1::1/128 -p tcp -m tcp --dport 30080" in text
    assert rules.kube_set("KUBE-NODE-PORT-LOCAL-SCTP-HASH", 6) == (
        "KUBE-6-NODE-PORT-LOCAL-SCTP-HAS"
    )  # kube-proxy cuts at 31 characters
    assert rules.kube_set("KUBE-CLUSTER-IP", 4) == "KUBE-CLUSTER-IP"


def test_host_client_rules() -> None:
    text = _rules("kube-proxy", "host", 4)
    # counted in mangle and nat OUTPUT; the vanishing client's FIN/RST dropped before
    # conntrack
    assert _lines(text, "mangle") == [
        "-A OUTPUT -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m conntrack --ctstate NEW "
        "-m comment --comment ipvsp-count-new"
    ]
    assert _lines(text, "nat")[0] == (
        "-A OUTPUT -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment ipvsp-count-nat"
    )
    assert _lines(text, "raw") == [
        "-A OUTPUT -p tcp -m tcp --tcp-flags RST RST -m mark --mark 0x1d -j DROP",
        "-A OUTPUT -p tcp -m tcp --tcp-flags FIN FIN -m mark --mark 0x1d -j DROP",
    ]
    calico = _lines(_rules("calico", "host", 4), "raw")
    assert calico[:3] == _lines(text, "raw") + ["-A PREROUTING -j cali-PREROUTING"]


def test_calico_rules_shape() -> None:
    text = _rules("calico", "outside", 4)
    filt = _lines(text, "filter")
    # felix's jumps first, then kube-proxy's, then felix's FORWARD append rules
    assert [ln for ln in filt if ln.split()[1] == "INPUT"][0] == "-A INPUT -j cali-INPUT"
    fwd = [ln for ln in filt if ln.split()[1] == "FORWARD"]
    assert fwd[0] == "-A FORWARD -j cali-FORWARD" and "KUBE-FORWARD" in fwd[2]
    assert fwd[-1] == "-A FORWARD -j MARK --set-xmark 0x10000/0x10000"
    # the NEW-only side effect: the forward check returns early for RELATED,ESTABLISHED, so
    # only NEW packets get an endpoint mark; OUTPUT applies the pod policy by that mark
    assert filt.index(
        "-A cali-forward-check -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN"
    ) < min(i for i, ln in enumerate(filt) if ln.startswith("-A cali-forward-check -p tcp"))
    assert "-A cali-OUTPUT -m mark ! --mark 0x0/0xfff00000 -g cali-forward-endpoint-mark" in filt
    tw = [ln for ln in filt if ln.startswith("-A cali-tw-cali11234567")]
    assert tw[0].endswith("--ctstate RELATED,ESTABLISHED -j ACCEPT")
    assert tw[1].endswith("--ctstate INVALID -j DROP")
    assert tw[-1] == (
        '-A cali-tw-cali11234567 -m comment --comment "Drop if no policies passed packet" -j DROP'
    )
    assert (
        "-A cali-pi-default.allow-svc -p tcp -m multiport --dports 8080 "
        "-j MARK --set-xmark 0x10000/0x10000" in filt
    )
    assert _lines(text, "raw")[2] == "-A cali-PREROUTING -j MARK --set-xmark 0x0/0xf0000"
    mangle = _lines(text, "mangle")
    assert mangle[0].endswith("ipvsp-count-new")  # the counter sees what Calico accepts
    nat = _lines(text, "nat")
    assert nat[:2] == [NAT_COUNT, "-A PREROUTING -j cali-PREROUTING"]
    assert mangle[1] == "-A PREROUTING -j cali-PREROUTING"
    assert "-A cali-PREROUTING -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT" in mangle
    assert "cali60this-host" in _rules("calico", "outside", 6)


@pytest.mark.parametrize(("ruleset", "client", "family"), CELLS)
@pytest.mark.parametrize("rule", ["drop", "accept"])
def test_rules_are_consistent(ruleset: str, client: str, family: int, rule: str) -> None:
    """Every chain used is declared, every jump target exists, names fit iptables' limit,
    every set matched is created by the cell's ipset text, the family's addresses only."""
    lay = cells.cell_layout(ruleset, client, family, "1234567")
    text = rules.director_rules(lay, rule)
    sets = rules.ipset_restore(lay)
    created = set(re.findall(r"^create (\S+)", sets, re.M))
    for table in rules.BUILTIN:
        declared = set(_chains(text, table))
        assert set(rules.BUILTIN[table]) <= declared or not _lines(text, table)
        for name in declared:
            assert len(name) < 29, name  # "must be under 29 chars"
        for ln in _lines(text, table):
            assert ln.split()[1] in declared, ln
            for target in re.findall(r" -[jg] (\S+)", ln):
                assert target in TARGETS or target in declared, ln
            for s in re.findall(r"--match-set (\S+)", ln):
                assert s in created, ln
            for addr in re.findall(r" (?:-s|-d) (\S+)", ln):
                assert ipaddress.ip_network(addr).version == family, ln
    for name in created:
        assert len(name) <= 31


@pytest.mark.parametrize(("ruleset", "client", "family"), K8S)
def test_ipsets_hold_the_services(ruleset: str, client: str, family: int) -> None:
    lay = cells.cell_layout(ruleset, client, family)
    text = rules.ipset_restore(lay)
    p = "KUBE-6-" if family == 6 else "KUBE-"
    inet = "inet6" if family == 6 else "inet"
    cip = lay.vips[0]
    assert f"create {p}CLUSTER-IP hash:ip,port family {inet} hashsize 1024 maxelem 65536" in text
    assert f"create {p}NODE-PORT-TCP bitmap:port range 0-65535" in text
    for entry in (
        f"{p}CLUSTER-IP {cip},tcp:80",
        f"{p}CLUSTER-IP {cip},udp:53",
        f"{p}NODE-PORT-TCP 30080",
        f"{p}NODE-PORT-UDP 30053",
        f"{p}IPVS-IPS {cip}",
    ):
        assert f"add {entry}\n" in text
    rs1 = lay.real_servers["rs1"]
    assert f"add {p}LOOP-BACK {rs1},tcp:8080,{rs1}\n" in text
    assert len(re.findall(r"^create KUBE-", text, re.M)) == len(rules.KUBE_IPSETS)
    assert ("cali" in text) == (ruleset == "calico")
    assert rules.ipset_restore(cells.cell_layout("minimal", client, family)) == ""


def test_client_rules_drop_the_vanishing_clients_fin_and_rst() -> None:
    text = rules.client_rules(cells.cell_layout("kube-proxy", "pod", 6))
    assert _lines(text, "filter") == [
        "-A OUTPUT -p tcp -m tcp --tcp-flags RST RST -m mark --mark 0x1d -j DROP",
        "-A OUTPUT -p tcp -m tcp --tcp-flags FIN FIN -m mark --mark 0x1d -j DROP",
    ]


def test_rules_command_prints_a_cell(capsys: pytest.CaptureFixture[str]) -> None:
    assert scenario.main(["rules", '{"ruleset": "kube-proxy-masq-all", "family": 6}']) == 0
    out = capsys.readouterr().out
    assert "create KUBE-6-CLUSTER-IP" in out and "*nat" in out and "-A -t [fd10:1::1]:30080" in out


# --- counters -------------------------------------------------------------------------------

SAVE = """\
# Generated by iptables-nft-save v1.8.9
*mangle
:PREROUTING ACCEPT [120:9000]
[7:420] -A PREROUTING -d 10.10.1.1/32 -p tcp -m tcp --dport 30080 -m conntrack --ctstate NEW \
-m comment --comment ipvsp-count-new
[90:5000] -A PREROUTING -j cali-PREROUTING
COMMIT
*nat
[11:660] -A PREROUTING -d 10.10.1.1/32 -p tcp -m tcp --dport 30080 \
-m comment --comment ipvsp-count-nat
[3:180] -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" \
-j MASQUERADE --random-fully
[5:300] -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
COMMIT
*filter
[2:120] -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
[1:60] -A cali-tw-cali10000001 -m conntrack --ctstate INVALID -j DROP
[4:240] -A cali-tw-cali10000001 -m comment --comment "Drop if no policies passed packet" -j DROP
[6:360] -A cali-from-wl-dispatch -m comment --comment "Unknown interface" -j DROP
[8:480] -A cali-pi-default.allow-svc -p tcp -m multiport --dports 8080 \
-j MARK --set-xmark 0x10000/0x10000
[9:540] -A cali-pi-default.allow-svc -p udp -m multiport --dports 53 \
-j MARK --set-xmark 0x10000/0x10000
COMMIT
"""


def test_parse_counters() -> None:
    specs = rules.counter_specs(cells.cell_layout("calico", "outside", 4))
    assert rules.parse_counters(SAVE, specs) == {
        "new": 7,
        "nat_new": 11,
        "invalid_drop": 2,
        "masquerade": 3,
        "calico_policy": 8,
        "calico_invalid_drop": 1,
        "calico_policy_drop": 10,
    }
    host = rules.counter_specs(cells.cell_layout("minimal", "host", 4))
    assert host["new"] == [("mangle", "OUTPUT", ("ipvsp-count-new",))]
    assert rules.parse_counters(SAVE, host) == {"new": 0, "invalid_drop": 0}


# --- conntrack with masquerade and IPv6 -----------------------------------------------------

CT_MASQ = """\
tcp      6 431999 ESTABLISHED src=10.10.1.2 dst=10.10.1.1 sport=12001 dport=30080 \
src=10.244.2.2 dst=10.244.2.1 sport=8080 dport=61234 [ASSURED] mark=0 use=1
tcp      6 10 CLOSE src=10.10.1.2 dst=10.10.1.1 sport=12002 dport=30080 \
src=10.244.1.2 dst=10.244.1.1 sport=8080 dport=50001 mark=0 use=1
ipv6     10 tcp      6 431999 ESTABLISHED src=fd10:0001:0000:0000:0000:0000:0000:0002 \
dst=fd10:0001:0000:0000:0000:0000:0000:0001 sport=12003 dport=30080 \
src=fd00:0010:0244:0002:0000:0000:0000:0002 dst=fd00:0010:0244:0002:0000:0000:0000:0001 \
sport=8080 dport=40000 [ASSURED] mark=0 zone=0 use=2
"""


def test_conntrack_view_matches_the_original_tuple_after_masquerade() -> None:
    entries = kernel.parse_conntrack(CT_MASQ)
    v = kernel.conntrack_view(entries, "10.10.1.2", 12001, "10.244.2.2")
    assert v["consistent"] and len(v["entries"]) == 1
    assert not kernel.conntrack_view(entries, "10.10.1.2", 12002, "10.244.2.2")["consistent"]
    # /proc/net/nf_conntrack spells IPv6 in full; the view compares canonical addresses
    v6 = kernel.conntrack_view(entries, "fd10:1::2", 12003, "fd00:10:244:2::2")
    assert v6["consistent"] and v6["entries"][0]["reply"]["dst"] == "fd00:10:244:2::1"


# --- IPVS generic netlink encoding ----------------------------------------------------------


def test_netlink_attributes_round_trip() -> None:
    nl = kernel.IpvsNetlink.__new__(kernel.IpvsNetlink)
    a = nl._attr(2, b"IPVS\0") + nl._attr(1, struct.pack("=H", 0x1D))
    assert len(a) % 4 == 0
    assert nl._parse_attrs(a) == {2: b"IPVS\0", 1: struct.pack("=H", 0x1D)}
    fam, raw = nl._addr("10.96.0.10")
    assert len(raw) == 16 and raw[:4] == bytes([10, 96, 0, 10]) and raw[4:] == bytes(12)


def test_netlink_dest_messages() -> None:
    sent: list[tuple[int, int, bytes]] = []
    nl = kernel.IpvsNetlink.__new__(kernel.IpvsNetlink)
    nl.family_id = 0x22

    def request(typ: int, cmd: int, payload: bytes, version: int = 1) -> bytes:
        sent.append((typ, cmd, payload))
        return b""

    nl._request = request  # type: ignore[method-assign]
    svc = cells.Service("udp", "fd00:10:96::a", 53)
    nl.dest("edit", svc, "fd00:10:244:1::2", 53, 0)
    nl.dest("delete", svc, "fd00:10:244:1::2", 53)
    (typ, cmd, payload), (_, dcmd, dpayload) = sent
    assert (typ, cmd, dcmd) == (0x22, 6, 7)  # IPVS_CMD_SET_DEST, IPVS_CMD_DEL_DEST
    top = nl._parse_attrs(payload)
    service = nl._parse_attrs(top[1])
    dest = nl._parse_attrs(top[2])
    assert struct.unpack("=H", service[1])[0] == 10  # AF_INET6
    assert struct.unpack("=H", service[2])[0] == 17  # UDP
    assert struct.unpack("!H", service[4])[0] == 53
    assert struct.unpack("=I", dest[4])[0] == 0  # weight 0
    assert set(dest) == {1, 2, 3, 4, 5, 6, 11}
    assert set(nl._parse_attrs(nl._parse_attrs(dpayload)[2])) == {1, 2}  # delete: addr, port


@pytest.mark.parametrize(("ruleset", "client", "family"), CELLS)
def test_nat_counts_the_client_connections_in_kubernetes_cells_only(
    ruleset: str, client: str, family: int
) -> None:
    """nat sees a connection's first packet only: its counter is what says the reconnect
    crossed kube-proxy's nat rules as NEW. The minimal cell keeps no nat table."""
    lay = cells.cell_layout(ruleset, client, family, "1234567")
    nat = _lines(rules.director_rules(lay), "nat")
    counting = [ln for ln in nat if "ipvsp-count-nat" in ln]
    specs = rules.counter_specs(lay)
    if ruleset == "minimal":
        assert nat == [] and "nat_new" not in specs
        return
    chain = "OUTPUT" if client == "host" else "PREROUTING"
    assert counting == [nat[0]] and nat[0].startswith(f"-A {chain} -d {lay.target.vip}/")
    assert " -j " not in nat[0]
    assert specs["nat_new"] == [("nat", chain, ("ipvsp-count-nat",))]
