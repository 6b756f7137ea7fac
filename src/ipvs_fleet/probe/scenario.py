#!/usr/bin/env python3
"""The reuse scenarios of DOMAIN.md inside one VM (standard library only, Python 3.9+, root).

Copied to a lab VM next to probe.py and run there: `python3 scenario.py run < plan.json`.
Each run builds a fresh topology of network namespaces (fresh names: a deleted netns whose
orphaned sockets still retransmit keeps its devices for a while). A *cell* is a ruleset, an
iptables backend, a client kind and an address family (`cell_layout`, `director_rules`).

ruleset "minimal" (the default; the layout every earlier measurement used):

    client 10.10.1.2 -> director (VIP 10.10.9.1 on lo, IPVS NAT, rr; 10.10.1.1, .2.1, .3.1)
                     -> rs1 10.10.2.2, rs2 10.10.3.2 (default route via the director)

  with one conntrack rule in FORWARD: `-m conntrack --ctstate INVALID -j DROP` (rule "drop")
  or `-j ACCEPT` (rule "accept").

rulesets "kube-proxy", "kube-proxy-masq-all", "calico" (a Kubernetes node in IPVS mode):

    outside client 10.10.1.2 --(uplink)--> node 10.10.1.1, NodePort 10.10.1.1:30080 (udp 30053)
    pod client 10.244.3.2    --(cali3)---> ClusterIP 10.96.0.10:80 (udp 53) on kube-ipvs0
    host client: a socket in the node netns itself (source: the ClusterIP, a local route)
    node -> rs1 10.244.1.2:8080 (cali1, node side 10.244.1.1), rs2 10.244.2.2 (cali2)

  The real servers ("pods") route only the pod CIDR 10.244.0.0/16 via the node, as pods on
  another node would be reached: they can answer an outside or host-network source only after
  the node masqueraded it (to its address on the pod link, in the pod CIDR, as flannel's
  vxlan address is). kube-proxy's rules as pkg/proxy/ipvs/proxier.go writes them (chains, jump
  order, ipsets incl. the `KUBE-6-` names for IPv6, mark 0x4000, MASQUERADE --random-fully);
  rule "drop" adds `-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP` (the iptables
  proxier's rule for nf_conntrack_tcp_be_liberal=0; the IPVS proxier does not write it), rule
  "accept" leaves it out. "calico" adds felix's IPVS-mode chains in raw, mangle, nat and filter
  (mark bits 0xffff0000: accept 0x10000, endpoint marks 0xfff00000): the forward check in
  filter INPUT sets an endpoint mark on NEW packets only, filter OUTPUT applies the pods'
  ingress policy (cali-tw-*, default drop) only to packets carrying that mark.

IPv6 (family 6): the same layouts (minimal: VIP fd10:9::1, client fd10:1::2, real servers
fd10:2::2, fd10:3::2; Kubernetes, kind's defaults: node fd10:1::1, ClusterIP fd00:10:96::a,
pod CIDR fd00:10:244::/56, pods fd00:10:244:N::2).

IPVS sysctls are per netns; the director gets `vs.conntrack=1`, `conn_reuse_mode=1`,
`expire_nodest_conn=1` (Kubernetes rulesets also `expire_quiescent_template=1`, as
kube-proxy sets), ip_forward (IPv6: forwarding), and the knob when the plan sets it (it
exists while the fix module ip_vs_reuse is loaded on top of the stock ip_vs).

Scenarios (each attempt uses its own source port P; the second connect from P is measured):
  A   server answers and aborts with RST; client reconnects from P at once
  B   client vanishes (its RST dropped before it leaves), old real server weight 0, reconnect
  B2  as B but the old real server deleted
  C1  server closes first (FIN), reconnect (control)
  C2  client aborts with RST, reconnect (control)
  U   UDP: a datagram from P answered by X; X deleted from the UDP services (a CoreDNS pod
      going away, kubernetes#81775); a second datagram from P (answered? by whom?), after 1 s
      without answer a third. Stock IPVS drops the second when its conntrack entry is the old
      one; the fix module with the knob at 1 kills that entry first, so it is answered.
With `hold_flush`, B2 and U delete the real server without queueing IPVS's flush of its
connections (`Topology.remove_server_flush_held`), so the measured packet meets the old
connection every time. `old_conn_met` counts the attempts whose old IPVS connection was in the
table right before the measured packet (not read for a racing B2 or U: the read would change
the race).

Per scenario the result also has the delta of rule counters (`rule_counters`: `new` = NEW TCP
connections to the service seen in mangle PREROUTING/OUTPUT, `nat_new` = the same seen by nat
(Kubernetes rulesets), `masquerade`, `invalid_drop` (KUBE-FORWARD's), `calico_policy` (NEW TCP
connections the pods' ingress policy evaluated), `calico_invalid_drop`, `calico_policy_drop`),
which source address the real servers saw (`peer_sources`, `peer_kinds`, `masq_mismatch`),
and the fix module's kills in the director netns (`killed_tcp`, `killed_udp`: deltas of
/proc/net/ip_vs_reuse; None without the module).

Plan (JSON on stdin), every key optional:
  {"rule": "drop", "knob": 1, "scenarios": {"A": 200, "B": 200}, "ordinary": 10000,
   "ftp": false, "conntrack_check": true, "timeout": 5, "deadline": 600,
   "ruleset": "kube-proxy", "iptables": "nft", "client": "outside", "family": 4}
Result: JSON on stdout (see `run_plan`).

`python3 scenario.py modules stock|DIR` loads the stock IPVS modules from the kernel's own tree,
and with DIR the fix module DIR/ip_vs_reuse.ko on top (IPVS stays loaded; `load_modules`), and
prints what is loaded; `restore MODULE...` goes back to the host's own modules.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

try:
    from ipvs_fleet.probe import probe
except ImportError:  # on a guest: probe.py is a sibling file, not part of a package
    import probe  # type: ignore[no-redef]

HERE = os.path.dirname(os.path.abspath(__file__))
# The minimal layout's constants (kept: earlier results and tests name them).
VIP = "10.10.9.1"
PORT = 8080
FTP_PORT = 21
CLIENT_IP = "10.10.1.2"
REAL_SERVERS = {"rs1": "10.10.2.2", "rs2": "10.10.3.2"}
UDP_PORT = 53  # the UDP service (and the real servers' UDP port): DNS-like
VANISH_MARK = 0x1D  # client sockets whose FIN/RST never leave the client
SCENARIOS = ("A", "B", "B2", "C1", "C2", "U")  # U: UDP; source ports by index
RULESETS = ("minimal", "kube-proxy", "kube-proxy-masq-all", "calico")
CLIENTS = ("outside", "pod", "host")
BACKENDS = ("nft", "legacy")
FAMILIES = (4, 6)
RULES = ("drop", "accept")
SYSCTLS = {"conntrack": 1, "conn_reuse_mode": 1, "expire_nodest_conn": 1}
K8S_SYSCTLS = {**SYSCTLS, "expire_quiescent_template": 1}  # what kube-proxy sets (5.9+)
KNOB = "conn_reuse_old_conntrack"
PORT_BASE = 10000  # scenario k uses source ports PORT_BASE + k * PORT_SPAN + i
PORT_SPAN = 2000
UDP_RETRY_S = 1.0  # how long U waits for the second (and third) answer
# How each scenario's first connection from a port ends (probe.connect_once arguments).
FIRST_CONNECT: dict[str, dict[str, Any]] = {
    "A": {"mode": "rst", "close": "wait"},  # server aborts with RST
    "B": {"mode": "hold", "close": "rst", "mark": VANISH_MARK},  # client vanishes
    "B2": {"mode": "hold", "close": "rst", "mark": VANISH_MARK},
    "C1": {"mode": "fin", "close": "wait"},  # server FIN first
    "C2": {"mode": "hold", "close": "rst"},  # client RST
}
CLONE_NEWNET = 0x40000000
# Legacy IPVS sockopt interface (include/uapi/linux/ip_vs.h): one raw socket, no fork per edit.
IP_VS_BASE_CTL = 64 + 1024 + 64
IP_VS_SO_SET_ADDDEST = IP_VS_BASE_CTL + 7
IP_VS_SO_SET_DELDEST = IP_VS_BASE_CTL + 8
IP_VS_SO_SET_EDITDEST = IP_VS_BASE_CTL + 9
IPVS_MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_ftp")
# Kernel log lines that are expected when out-of-tree modules load.
BENIGN_KMSG = re.compile(
    r"taints kernel|module verification failed|IPVS:|loading out-of-tree|veth|"
    r"entered (promiscuous|disabled|forwarding|blocking)|link becomes ready|NETDEV_CHANGE"
)
WARN_KMSG = re.compile(
    r"WARNING:|BUG:|Call Trace|general protection|RIP:|refcount_t|list_(add|del) corruption|"
    r"Oops|KASAN|UBSAN|kernel BUG|stack-protector|soft lockup|hung_task"
)


class Failed(Exception):
    """A setup step failed; the message says which command and why."""


# --- cells: address layout (pure) -----------------------------------------------------------

# Per family: the node's uplink and the outside client, the minimal layout's VIP and real
# servers, and the Kubernetes layout's ClusterIP, pod CIDR and pods (ip, node side), prefix.
ADDRS: dict[int, dict[str, Any]] = {
    4: {"node": "10.10.1.1", "outside": "10.10.1.2", "plen": 24, "vip": VIP,
        "legacy": {"r1": ("10.10.2.2", "10.10.2.1"), "r2": ("10.10.3.2", "10.10.3.1"),
                   "p": ("10.10.4.2", "10.10.4.1")},
        "cluster_ip": "10.96.0.10", "pod_cidr": "10.244.0.0/16",
        "pods": {"r1": ("10.244.1.2", "10.244.1.1"), "r2": ("10.244.2.2", "10.244.2.1"),
                 "p": ("10.244.3.2", "10.244.3.1")},
        "loopback": "127.0.0.0/8", "host_len": 32},
    6: {"node": "fd10:1::1", "outside": "fd10:1::2", "plen": 64, "vip": "fd10:9::1",
        "legacy": {"r1": ("fd10:2::2", "fd10:2::1"), "r2": ("fd10:3::2", "fd10:3::1"),
                   "p": ("fd10:4::2", "fd10:4::1")},
        # kind's IPv6 defaults: pod subnet fd00:10:244::/56 (a /64 per node), services
        # fd00:10:96::/112
        "cluster_ip": "fd00:10:96::a", "pod_cidr": "fd00:10:244::/56",
        "pods": {"r1": ("fd00:10:244:1::2", "fd00:10:244:1::1"),
                 "r2": ("fd00:10:244:2::2", "fd00:10:244:2::1"),
                 "p": ("fd00:10:244:3::2", "fd00:10:244:3::1")},
        "loopback": "::1/128", "host_len": 128},
}
NODE_PORT = 30080
NODE_PORT_UDP = 30053
CLUSTER_PORT = 80
MASQ_MARK = "0x4000"  # kube-proxy's --masquerade-bit 14


@dataclass(frozen=True)
class Service:
    """One IPVS virtual service."""

    proto: str  # tcp | udp
    vip: str
    port: int

    def ipvsadm(self) -> str:
        return f"{'-t' if self.proto == 'tcp' else '-u'} {hostport(self.vip, self.port)}"


@dataclass(frozen=True)
class Link:
    """A veth between the director (node) and a leaf netns (client, pod, real server)."""

    leaf: str  # c (outside client), p (pod client), r1, r2
    dev: str  # director side
    peer_dev: str  # leaf side
    node_ip: str
    leaf_ip: str
    plen: int


@dataclass
class Layout:
    """Addresses, services and roles of one cell (no side effects: unit-testable)."""

    ruleset: str
    client: str
    family: int
    rid: str
    links: dict[str, Link]
    client_ip: str  # the source address the client uses
    target: Service  # the TCP service the client connects to
    udp_target: Service
    services: list[Service]
    real_servers: dict[str, str]  # rs1/rs2 -> address
    rs_port: int
    rs_routes: str  # "default" or the pod CIDR: what the real servers can reach
    vip_dev: str  # lo (minimal) or kube-ipvs0
    vips: list[str]
    pod_cidr: str | None
    masquerade_demanded: bool

    @property
    def k8s(self) -> bool:
        return self.ruleset != "minimal"

    @property
    def client_leaf(self) -> str:
        return {"outside": "c", "pod": "p", "host": "d"}[self.client]

    @property
    def node_addrs(self) -> list[str]:
        """Every address of the director: what a masqueraded source can be."""
        return [ln.node_ip for ln in self.links.values()] + list(self.vips)

    def peer_kind(self, addr: str | None) -> str:
        """client (the client's own address), node (masqueraded), other, or none."""
        if not addr:
            return "none"
        a = norm_ip(addr)
        if a == norm_ip(self.client_ip):
            return "client"
        return "node" if a in {norm_ip(x) for x in self.node_addrs} else "other"

    @property
    def expected_peer(self) -> str:
        return "node" if self.masquerade_demanded else "client"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(client_leaf=self.client_leaf, node_addrs=self.node_addrs,
                 links={k: asdict(v) for k, v in self.links.items()})
        return d


def norm_ip(addr: str) -> str:
    """Canonical text of an address (IPv6 compressed, as the conntrack tool prints it)."""
    try:
        return ipaddress.ip_address(addr).compressed
    except ValueError:
        return addr


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def check_cell(ruleset: str, client: str, family: int, backend: str = "nft",
               rule: str = "drop") -> None:
    """Failed with a clear message for a value outside the known cells."""
    for name, val, known in (("ruleset", ruleset, RULESETS), ("client", client, CLIENTS),
                             ("family", family, FAMILIES), ("iptables", backend, BACKENDS),
                             ("rule", rule, RULES)):
        if val not in known:
            raise Failed(f"{name} must be one of {', '.join(map(str, known))}, not {val!r}")


def cell_layout(ruleset: str, client: str, family: int, rid: str = "0000000") -> Layout:
    """The addresses and services of a cell; `rid` makes device names unique per run."""
    check_cell(ruleset, client, family)
    a = ADDRS[family]
    k8s = ruleset != "minimal"
    plen = a["plen"]
    leaves = a["pods"] if k8s else a["legacy"]
    names = {"p": "cali3", "r1": "cali1", "r2": "cali2"} if k8s else {
        "p": "dp", "r1": "d1", "r2": "d2"}
    peer = {"p": "vp", "r1": "vr1", "r2": "vr2"}
    links = {"c": Link("c", f"dc{rid}", f"vc{rid}", a["node"], a["outside"], plen)}
    for leaf in ("p", "r1", "r2"):
        ip, gw = leaves[leaf]
        links[leaf] = Link(leaf, f"{names[leaf]}{rid}", f"{peer[leaf]}{rid}", gw, ip, plen)
    rs = {"rs1": leaves["r1"][0], "rs2": leaves["r2"][0]}
    if k8s:
        cip = a["cluster_ip"]
        services = [Service("tcp", cip, CLUSTER_PORT), Service("tcp", a["node"], NODE_PORT),
                    Service("udp", cip, UDP_PORT), Service("udp", a["node"], NODE_PORT_UDP)]
        if client == "outside":
            target, udp = services[1], services[3]
        else:
            target, udp = services[0], services[2]
        vips = [cip]
        masq = client != "pod" or ruleset == "kube-proxy-masq-all"
    else:
        services = [Service("tcp", a["vip"], PORT), Service("udp", a["vip"], UDP_PORT)]
        target, udp = services
        vips = [a["vip"]]
        masq = False
    client_ip = {"outside": a["outside"], "pod": leaves["p"][0], "host": target.vip}[client]
    return Layout(ruleset=ruleset, client=client, family=family, rid=rid, links=links,
                  client_ip=client_ip, target=target, udp_target=udp, services=services,
                  real_servers=rs, rs_port=PORT, rs_routes=a["pod_cidr"] if k8s else "default",
                  vip_dev="kube-ipvs0" if k8s else "lo", vips=vips,
                  pod_cidr=a["pod_cidr"] if k8s else None, masquerade_demanded=masq)


def ipvsadm_restore(lay: Layout) -> str:
    """`ipvsadm -R` input: every service rr, both real servers, masquerading, weight 1."""
    out = []
    for svc in lay.services:
        out.append(f"-A {svc.ipvsadm()} -s rr")
        rport = lay.rs_port if svc.proto == "tcp" else UDP_PORT
        out += [f"-a {svc.ipvsadm()} -r {hostport(ip, rport)} -m -w 1"
                for ip in lay.real_servers.values()]
    return "\n".join(out) + "\n"


# --- cells: rules (pure) --------------------------------------------------------------------

BUILTIN = {"raw": ("PREROUTING", "OUTPUT"),
           "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
           "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
           "filter": ("INPUT", "FORWARD", "OUTPUT")}
COUNT_COMMENT = "ipvsp-count-new"  # the probe's own counting rule (no target)
COUNT_NAT_COMMENT = "ipvsp-count-nat"  # the same in nat (Kubernetes rulesets)

# kube-proxy's ipsets (pkg/proxy/ipvs/proxier.go ipsetInfo), in its order.
KUBE_IPSETS = (
    ("KUBE-LOOP-BACK", "hash:ip,port,ip"), ("KUBE-CLUSTER-IP", "hash:ip,port"),
    ("KUBE-EXTERNAL-IP", "hash:ip,port"), ("KUBE-EXTERNAL-IP-LOCAL", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER", "hash:ip,port"), ("KUBE-LOAD-BALANCER-FW", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-LOCAL", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-SOURCE-IP", "hash:ip,port,ip"),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "hash:ip,port,net"),
    ("KUBE-NODE-PORT-TCP", "bitmap:port"), ("KUBE-NODE-PORT-LOCAL-TCP", "bitmap:port"),
    ("KUBE-NODE-PORT-UDP", "bitmap:port"), ("KUBE-NODE-PORT-LOCAL-UDP", "bitmap:port"),
    ("KUBE-NODE-PORT-SCTP-HASH", "hash:ip,port"),
    ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "hash:ip,port"),
    ("KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port"), ("KUBE-IPVS-IPS", "hash:ip"),
)
# felix's mark layout with the default IptablesMarkMask 0xffff0000
CALI_ACCEPT, CALI_PASS, CALI_SCRATCH0 = 0x10000, 0x20000, 0x40000
CALI_ALL = 0xF0000  # accept | pass | scratch0 | scratch1
CALI_EP_MASK = 0xFFF00000
CALI_NON_CALI_EP = 0x100000


def kube_set(name: str, family: int) -> str:
    """kube-proxy's ipset name for the family (IPv6: `KUBE-6-...`, cut to 31 characters)."""
    if family == 6 and name.startswith("KUBE-"):
        name = name.replace("KUBE-", "KUBE-6-", 1)[:31]
    return name


def cali_set(name: str, family: int) -> str:
    return f"cali{family}0{name}"


class Tables:
    """iptables-restore text built table by table (chains declared, rules in order)."""

    def __init__(self) -> None:
        self.chains: dict[str, list[str]] = {t: [] for t in BUILTIN}
        self.rules: dict[str, list[str]] = {t: [] for t in BUILTIN}

    def chain(self, table: str, *names: str) -> None:
        for n in names:
            if n not in self.chains[table]:
                self.chains[table].append(n)

    def add(self, table: str, *rules: str) -> None:
        self.rules[table] += rules

    def render(self) -> str:
        out = []
        for t in BUILTIN:
            if not self.rules[t] and not self.chains[t]:
                continue
            out.append(f"*{t}")
            out += [f":{c} ACCEPT [0:0]" for c in BUILTIN[t]]
            out += [f":{c} - [0:0]" for c in self.chains[t]]
            out += self.rules[t]
            out.append("COMMIT")
        return "\n".join(out) + "\n"


def _hex(v: int) -> str:
    return hex(v)


def ipset_restore(lay: Layout) -> str:
    """`ipset restore` input for the director: kube-proxy's sets (and Calico's), filled."""
    if not lay.k8s:
        return ""
    fam = lay.family
    inet = "inet6" if fam == 6 else "inet"
    out = []
    for name, typ in KUBE_IPSETS:
        opts = ("range 0-65535" if typ == "bitmap:port"
                else f"family {inet} hashsize 1024 maxelem 65536")
        out.append(f"create {kube_set(name, fam)} {typ} {opts}")
    entries = {"KUBE-CLUSTER-IP": [], "KUBE-NODE-PORT-TCP": [str(NODE_PORT)],
               "KUBE-NODE-PORT-UDP": [str(NODE_PORT_UDP)],
               "KUBE-IPVS-IPS": list(lay.vips), "KUBE-LOOP-BACK": []}
    for svc in lay.services:
        if svc.vip in lay.vips:
            entries["KUBE-CLUSTER-IP"].append(f"{svc.vip},{svc.proto}:{svc.port}")
    for ip in lay.real_servers.values():  # hairpin entries of the node's own endpoints
        entries["KUBE-LOOP-BACK"] += [f"{ip},tcp:{lay.rs_port},{ip}",
                                      f"{ip},udp:{UDP_PORT},{ip}"]
    for name, vals in entries.items():
        out += [f"add {kube_set(name, fam)} {v}" for v in vals]
    if lay.ruleset == "calico":
        this_host = [ln.node_ip for ln in lay.links.values()]  # kube-ipvs0 is excluded
        out.append(f"create {cali_set('this-host', fam)} hash:ip family {inet} "
                   "hashsize 1024 maxelem 1048576")
        out += [f"add {cali_set('this-host', fam)} {ip}" for ip in this_host]
        for pools in ("masq-ipam-pools", "all-ipam-pools"):
            out.append(f"create {cali_set(pools, fam)} hash:net family {inet} "
                       "hashsize 1024 maxelem 1048576")
            out.append(f"add {cali_set(pools, fam)} {lay.pod_cidr}")
    return "\n".join(out) + "\n"


def vanish_rules(table: str = "filter", chain: str = "OUTPUT") -> list[str]:
    """Drop FIN/RST of sockets marked VANISH_MARK: the client vanishes without a word."""
    m = _hex(VANISH_MARK)
    return [f"-A {chain} -p tcp -m tcp --tcp-flags RST RST -m mark --mark {m} -j DROP",
            f"-A {chain} -p tcp -m tcp --tcp-flags FIN FIN -m mark --mark {m} -j DROP"]


def client_rules(lay: Layout) -> str:
    """The client netns' rules (outside and pod clients; the host client's are the node's)."""
    t = Tables()
    t.add("filter", *vanish_rules())
    return t.render()


def count_rule(lay: Layout) -> str:
    """A rule without target counting NEW TCP connections to the client's service."""
    return f"{_to_target(lay)} -m conntrack --ctstate NEW -m comment --comment {COUNT_COMMENT}"


def nat_count_rule(lay: Layout) -> str:
    """The same in nat, whose rules see only a connection's first packet (an entry without
    a NAT binding yet): where kube-proxy marks for masquerade. A reconnect that reuses the
    old entry (the 1.x re-track design) is never counted here."""
    return f"{_to_target(lay)} -m comment --comment {COUNT_NAT_COMMENT}"


def _to_target(lay: Layout) -> str:
    chain = "OUTPUT" if lay.client == "host" else "PREROUTING"
    hl = ADDRS[lay.family]["host_len"]
    return f"-A {chain} -d {lay.target.vip}/{hl} -p tcp -m tcp --dport {lay.target.port}"


def director_rules(lay: Layout, rule: str = "drop") -> str:
    """iptables-restore input for the director (node) netns of a cell.

    The probe's own rules come first (counting NEW connections in mangle, and in nat under
    the Kubernetes rulesets; for the host client, the vanishing client's FIN/RST drop in raw
    OUTPUT, before conntrack and IPVS see them); then Calico's jumps (felix keeps its rules
    at the top), then kube-proxy's. The minimal ruleset gets no nat table: its layout stays
    the one earlier results were measured with.
    """
    t = Tables()
    if lay.client == "host":
        t.add("raw", *vanish_rules("raw"))
    t.add("mangle", count_rule(lay))
    if not lay.k8s:
        t.add("filter", "-A FORWARD -m conntrack --ctstate INVALID -j "
              + ("DROP" if rule == "drop" else "ACCEPT"))
        return t.render()
    t.add("nat", nat_count_rule(lay))
    if lay.ruleset == "calico":
        _calico_jumps(t)
    _kube_proxy(t, lay, rule)
    if lay.ruleset == "calico":
        _calico_chains(t, lay)
    return t.render()


def _kube_proxy(t: Tables, lay: Layout, rule: str) -> None:
    """kube-proxy IPVS mode (pkg/proxy/ipvs/proxier.go: createAndLinkKubeChain,
    writeIptablesRules, acceptIPVSTraffic) for the services of `lay`."""
    fam = lay.family
    S = lambda n: kube_set(n, fam)  # noqa: E731
    t.chain("nat", "KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-NODE-PORT", "KUBE-LOAD-BALANCER",
            "KUBE-MARK-MASQ")
    t.chain("filter", "KUBE-FORWARD", "KUBE-NODE-PORT", "KUBE-PROXY-FIREWALL",
            "KUBE-SOURCE-RANGES-FIREWALL", "KUBE-IPVS-FILTER", "KUBE-IPVS-OUT-FILTER")
    # iptablesJumpChain, each prepended in list order (so later ones end up first)
    t.add("nat",
          '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
          '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
          '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" '
          "-j KUBE-POSTROUTING")
    t.add("filter",
          '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
          '-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
          '-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT',
          '-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
          '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
          '-A OUTPUT -m comment --comment "kubernetes ipvs access filter" '
          "-j KUBE-IPVS-OUT-FILTER")
    # writeIptablesRules
    t.add("nat", f"-A KUBE-SERVICES -s {ADDRS[fam]['loopback']} -j RETURN")
    t.add("nat",  # ipsetWithIptablesChain, non-empty sets only
          '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source '
          f'ip for solving hairpin purpose" -m set --match-set {S("KUBE-LOOP-BACK")} '
          "dst,dst,src -j MASQUERADE",
          '-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for '
          f'masquerade purpose" -m set --match-set {S("KUBE-NODE-PORT-TCP")} dst '
          "-j KUBE-MARK-MASQ",
          '-A KUBE-NODE-PORT -p udp -m comment --comment "Kubernetes nodeport UDP port for '
          f'masquerade purpose" -m set --match-set {S("KUBE-NODE-PORT-UDP")} dst '
          "-j KUBE-MARK-MASQ")
    not_local = "" if lay.ruleset == "kube-proxy-masq-all" else f" ! -s {lay.pod_cidr}"
    t.add("nat",
          '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
          f'masquerade purpose" -m set --match-set {S("KUBE-CLUSTER-IP")} dst,dst{not_local} '
          "-j KUBE-MARK-MASQ",
          "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
          "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ")
    t.add("filter", "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    t.add("nat", f"-A KUBE-SERVICES -m set --match-set {S('KUBE-CLUSTER-IP')} dst,dst -j ACCEPT")
    if rule == "drop":  # the iptables proxier's rule when nf_conntrack_tcp_be_liberal=0
        t.add("filter", "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
    t.add("filter",
          '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
          f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
          '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
          "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
          '-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" '
          f"-m set --match-set {S('KUBE-HEALTH-CHECK-NODE-PORT')} dst -j ACCEPT")
    for name, match in (("KUBE-LOAD-BALANCER", "dst,dst"), ("KUBE-CLUSTER-IP", "dst,dst"),
                        ("KUBE-EXTERNAL-IP", "dst,dst"), ("KUBE-EXTERNAL-IP-LOCAL", "dst,dst"),
                        ("KUBE-HEALTH-CHECK-NODE-PORT", "dst")):
        t.add("filter", f"-A KUBE-IPVS-FILTER -m set --match-set {S(name)} {match} -j RETURN")
    t.add("filter", "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW "
          f"-m set --match-set {S('KUBE-IPVS-IPS')} dst -j REJECT")
    t.add("nat",
          f"-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
          f"-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}",
          '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring '
          'SNAT" -j MASQUERADE --random-fully',
          f"-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}")


def _calico_jumps(t: Tables) -> None:
    """felix's jumps into its chains, at the top of the built-in chains."""
    for table, chains in (("raw", ("PREROUTING", "OUTPUT")),
                          ("mangle", ("PREROUTING", "POSTROUTING")),
                          ("nat", ("PREROUTING", "OUTPUT", "POSTROUTING")),
                          ("filter", ("INPUT", "FORWARD", "OUTPUT"))):
        for c in chains:
            t.chain(table, f"cali-{c}")
            t.add(table, f"-A {c} -j cali-{c}")


def _mark(v: int, mask: int) -> str:
    return f"-m mark --mark {_hex(v)}/{_hex(mask)}"


def _set_mark(v: int, mask: int) -> str:
    return f"-j MARK --set-xmark {_hex(v)}/{_hex(mask)}"


def _calico_chains(t: Tables, lay: Layout) -> None:
    """felix (felix/rules/static.go, dispatch.go, endpoints.go) with kubeIPVSSupportEnabled,
    no host endpoints, workloads on cali* interfaces: the pods' ingress policy allows the
    service's target ports, their egress goes through the namespace profile (allow all).

    Left out: rpfilter in raw, failsafe chains, per-rule `cali:<hash>` comments.
    """
    fam = lay.family
    this_host = cali_set("this-host", fam)
    A, EP = CALI_ACCEPT, CALI_EP_MASK
    wl = {leaf: ln.dev for leaf, ln in lay.links.items() if leaf != "c"}
    ep_mark = {leaf: CALI_NON_CALI_EP * (i + 2) for i, leaf in enumerate(sorted(wl))}
    # raw
    t.chain("raw", "cali-from-host-endpoint", "cali-to-host-endpoint")
    t.add("raw",
          f"-A cali-PREROUTING {_set_mark(0, CALI_ALL)}",
          f"-A cali-PREROUTING -i cali+ {_set_mark(CALI_SCRATCH0, CALI_SCRATCH0)}",
          f"-A cali-PREROUTING {_mark(0, CALI_SCRATCH0)} -j cali-from-host-endpoint",
          f"-A cali-PREROUTING {_mark(A, A)} -j ACCEPT",
          f"-A cali-OUTPUT {_set_mark(0, CALI_ALL)}",
          "-A cali-OUTPUT -j cali-to-host-endpoint",
          f"-A cali-OUTPUT {_mark(A, A)} -j ACCEPT")
    # mangle
    t.chain("mangle", "cali-from-host-endpoint", "cali-to-host-endpoint")
    t.add("mangle",
          "-A cali-PREROUTING -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
          f"-A cali-PREROUTING {_mark(A, A)} -j ACCEPT",
          "-A cali-PREROUTING -j cali-from-host-endpoint",
          '-A cali-PREROUTING -m comment --comment "Host endpoint policy accepted packet." '
          f"{_mark(A, A)} -j ACCEPT",
          f"-A cali-POSTROUTING {_mark(A, A)} -j RETURN",
          f"-A cali-POSTROUTING -m mark ! --mark 0x0/{_hex(EP)} -j RETURN",
          f"-A cali-POSTROUTING {_set_mark(0, CALI_ALL)}",
          "-A cali-POSTROUTING -m conntrack --ctstate DNAT -j cali-to-host-endpoint",
          '-A cali-POSTROUTING -m comment --comment "Host endpoint policy accepted packet." '
          f"{_mark(A, A)} -j RETURN")
    # nat
    t.chain("nat", "cali-fip-dnat", "cali-fip-snat", "cali-nat-outgoing")
    t.add("nat",
          "-A cali-PREROUTING -j cali-fip-dnat",
          "-A cali-OUTPUT -j cali-fip-dnat",
          "-A cali-POSTROUTING -j cali-fip-snat",
          "-A cali-POSTROUTING -j cali-nat-outgoing",
          f"-A cali-nat-outgoing -m set --match-set {cali_set('masq-ipam-pools', fam)} src "
          f"-m set ! --match-set {cali_set('all-ipam-pools', fam)} dst "
          "-j MASQUERADE --random-fully")
    # filter
    t.chain("filter", "cali-forward-check", "cali-set-endpoint-mark",
            "cali-forward-endpoint-mark", "cali-from-endpoint-mark", "cali-wl-to-host",
            "cali-from-wl-dispatch", "cali-to-wl-dispatch", "cali-from-host-endpoint",
            "cali-to-host-endpoint", "cali-from-hep-forward", "cali-to-hep-forward",
            "cali-cidr-block", "cali-pro-kns.default", "cali-pi-default.allow-svc")
    t.add("filter",
          f"-A cali-INPUT {_set_mark(0, EP)}",
          "-A cali-INPUT -j cali-forward-check",
          f"-A cali-INPUT -m mark ! --mark 0x0/{_hex(EP)} -j RETURN",
          "-A cali-INPUT -i cali+ -g cali-wl-to-host",
          f"-A cali-INPUT {_mark(A, A)} -j ACCEPT",
          f"-A cali-INPUT {_set_mark(0, CALI_ALL)}",
          "-A cali-INPUT -j cali-from-host-endpoint",
          '-A cali-INPUT -m comment --comment "Host endpoint policy accepted packet." '
          f"{_mark(A, A)} -j ACCEPT",
          # With IPVS both local and forwarded traffic crosses INPUT: a NEW packet to a
          # NodePort of this host or to a service address gets an endpoint mark here, and
          # OUTPUT applies the workload policy to packets carrying one.
          "-A cali-forward-check -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN")
    for proto in ("tcp", "udp"):
        t.add("filter", f"-A cali-forward-check -p {proto} -m comment --comment "
              '"To kubernetes NodePort service" -m multiport --dports 30000:32767 '
              f"-m set --match-set {this_host} dst -g cali-set-endpoint-mark")
    t.add("filter",
          '-A cali-forward-check -m comment --comment "To kubernetes service" '
          f"-m set ! --match-set {this_host} dst -j cali-set-endpoint-mark")
    for leaf, dev in sorted(wl.items()):
        t.chain("filter", f"cali-sm-{dev}", f"cali-fw-{dev}", f"cali-tw-{dev}")
        t.add("filter", f"-A cali-set-endpoint-mark -i {dev} -g cali-sm-{dev}",
              f"-A cali-sm-{dev} {_set_mark(ep_mark[leaf], EP)}")
    t.add("filter",
          '-A cali-set-endpoint-mark -i cali+ -m comment --comment "Unknown endpoint" -j DROP',
          '-A cali-set-endpoint-mark -m comment --comment "Non-Cali endpoint mark" '
          f"{_set_mark(CALI_NON_CALI_EP, EP)}",
          f"-A cali-OUTPUT {_mark(A, A)} -j ACCEPT",
          f"-A cali-OUTPUT -m mark ! --mark 0x0/{_hex(EP)} -g cali-forward-endpoint-mark",
          "-A cali-OUTPUT -o cali+ -j RETURN",
          f"-A cali-OUTPUT {_set_mark(0, CALI_ALL)}",
          "-A cali-OUTPUT -m conntrack ! --ctstate DNAT -j cali-to-host-endpoint",
          '-A cali-OUTPUT -m comment --comment "Host endpoint policy accepted packet." '
          f"{_mark(A, A)} -j ACCEPT",
          "-A cali-forward-endpoint-mark -m mark ! "
          f"--mark {_hex(CALI_NON_CALI_EP)}/{_hex(EP)} -j cali-from-endpoint-mark",
          "-A cali-forward-endpoint-mark -o cali+ -j cali-to-wl-dispatch",
          "-A cali-forward-endpoint-mark -j cali-to-hep-forward",
          f"-A cali-forward-endpoint-mark {_set_mark(0, EP)}",
          '-A cali-forward-endpoint-mark -m comment --comment "Policy explicitly accepted '
          f'packet." {_mark(A, A)} -j ACCEPT',
          f"-A cali-FORWARD {_set_mark(0, CALI_ALL & ~A)}",
          f"-A cali-FORWARD {_mark(0, A)} -j cali-from-hep-forward",
          "-A cali-FORWARD -i cali+ -j cali-from-wl-dispatch",
          "-A cali-FORWARD -o cali+ -j cali-to-wl-dispatch",
          "-A cali-FORWARD -j cali-to-hep-forward",
          "-A cali-FORWARD -j cali-cidr-block",
          "-A cali-wl-to-host -j cali-from-wl-dispatch",
          '-A cali-wl-to-host -m comment --comment "Configured DefaultEndpointToHostAction" '
          "-j ACCEPT")
    for leaf, dev in sorted(wl.items()):
        t.add("filter", f"-A cali-from-endpoint-mark {_mark(ep_mark[leaf], EP)} "
              f"-g cali-fw-{dev}",
              f"-A cali-from-wl-dispatch -i {dev} -g cali-fw-{dev}",
              f"-A cali-to-wl-dispatch -o {dev} -g cali-tw-{dev}")
    for chain in ("cali-from-endpoint-mark", "cali-from-wl-dispatch", "cali-to-wl-dispatch"):
        t.add("filter", f'-A {chain} -m comment --comment "Unknown interface" -j DROP')
    for leaf, dev in sorted(wl.items()):
        conntrack = [f"-A {{}}-{dev} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                     f"-A {{}}-{dev} -m conntrack --ctstate INVALID -j DROP",
                     f"-A {{}}-{dev} {_set_mark(0, A)}"]
        t.add("filter", *(r.format("cali-fw") for r in conntrack),
              f"-A cali-fw-{dev} -j cali-pro-kns.default",
              f'-A cali-fw-{dev} -m comment --comment "Return if profile accepted" '
              f"{_mark(A, A)} -j RETURN",
              f'-A cali-fw-{dev} -m comment --comment "Drop if no profiles matched" -j DROP')
        t.add("filter", *(r.format("cali-tw") for r in conntrack))
        if leaf == "p":  # the client pod: no policy selects it, its profile allows
            t.add("filter", f"-A cali-tw-{dev} -j cali-pro-kns.default",
                  f'-A cali-tw-{dev} -m comment --comment "Return if profile accepted" '
                  f"{_mark(A, A)} -j RETURN",
                  f'-A cali-tw-{dev} -m comment --comment "Drop if no profiles matched" '
                  "-j DROP")
            continue
        t.add("filter",
              f'-A cali-tw-{dev} -m comment --comment "Start of policies" '
              f"{_set_mark(0, CALI_PASS)}",
              f"-A cali-tw-{dev} {_mark(0, CALI_PASS)} -j cali-pi-default.allow-svc",
              f'-A cali-tw-{dev} -m comment --comment "Return if policy accepted" '
              f"{_mark(A, A)} -j RETURN",
              f'-A cali-tw-{dev} -m comment --comment "Drop if no policies passed packet" '
              "-j DROP")
    t.add("filter",
          f"-A cali-pro-kns.default {_set_mark(A, A)}",
          f"-A cali-pro-kns.default {_mark(A, A)} -j RETURN",
          f"-A cali-pi-default.allow-svc -p tcp -m multiport --dports {lay.rs_port} "
          f"{_set_mark(A, A)}",
          f"-A cali-pi-default.allow-svc -p udp -m multiport --dports {UDP_PORT} "
          f"{_set_mark(A, A)}",
          f"-A cali-pi-default.allow-svc {_mark(A, A)} -j RETURN",
          # StaticFilterForwardAppendRules: at the end of FORWARD, after kube-proxy's jumps
          '-A FORWARD -m comment --comment "Policy explicitly accepted packet." '
          f"{_mark(A, A)} -j ACCEPT",
          f"-A FORWARD {_set_mark(A, A)}")


# --- rule counters (pure) -------------------------------------------------------------------

# name -> [(table, chain or "prefix*", substrings of the saved rule)], summed
CounterSpecs = dict[str, list[tuple[str, str, tuple[str, ...]]]]


def counter_specs(lay: Layout) -> CounterSpecs:
    """Which rules' packet counters a scenario reports, for this cell."""
    chain = "OUTPUT" if lay.client == "host" else "PREROUTING"
    specs: CounterSpecs = {"new": [("mangle", chain, (COUNT_COMMENT,))]}
    if not lay.k8s:
        specs["invalid_drop"] = [("filter", "FORWARD", ("INVALID", "-j DROP"))]
        return specs
    specs["invalid_drop"] = [("filter", "KUBE-FORWARD", ("INVALID", "-j DROP"))]
    specs["nat_new"] = [("nat", chain, (COUNT_NAT_COMMENT,))]
    specs["masquerade"] = [("nat", "KUBE-POSTROUTING", ("random-fully",))]
    if lay.ruleset == "calico":
        specs["calico_policy"] = [("filter", "cali-pi-default.allow-svc", ("-p tcp",))]
        specs["calico_invalid_drop"] = [("filter", "cali-*", ("INVALID", "-j DROP"))]
        specs["calico_policy_drop"] = [("filter", "cali-*", ("Drop if no", "-j DROP")),
                                       ("filter", "cali-*", ("Unknown", "-j DROP"))]
    return specs


_COUNTED = re.compile(r"^\[(\d+):(\d+)\] -A (\S+) (.*)$")


def parse_counters(save_text: str, specs: CounterSpecs) -> dict[str, int]:
    """Packet counts of the rules `specs` names, from `iptables-save -c` output."""
    out = dict.fromkeys(specs, 0)
    table = ""
    for line in save_text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        m = _COUNTED.match(line.strip())
        if not m:
            continue
        pkts, chain, rest = int(m.group(1)), m.group(3), m.group(4)
        for name, entries in specs.items():
            for tab, ch, subs in entries:
                hit_chain = chain.startswith(ch[:-1]) if ch.endswith("*") else chain == ch
                if tab == table and hit_chain and all(s in rest for s in subs):
                    out[name] += pkts
    return out


def peer_summary(lay: Layout, attempts: list[probe.Attempt]) -> dict[str, Any]:
    """Which source address the real servers saw in answered attempts, per address and kind."""
    sources: dict[str, int] = {}
    kinds: dict[str, int] = {}
    mismatch = 0
    for a in attempts:
        if a.error is not None:
            continue
        key = a.peer or "?"
        sources[key] = sources.get(key, 0) + 1
        kind = lay.peer_kind(a.peer)
        kinds[kind] = kinds.get(kind, 0) + 1
        mismatch += kind != lay.expected_peer
    return {"peer_sources": sources, "peer_kinds": kinds, "masq_mismatch": mismatch}


# --- shell and network namespaces -----------------------------------------------------------


def sh(cmd: str, check: bool = True, timeout: float = 60, input: str | None = None) -> str:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout,
                       input=input)
    if check and r.returncode != 0:
        raise Failed(f"`{cmd}` exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return r.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    """Move this (single-threaded) process into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(path)
        yield
    finally:
        if _libc.setns(back, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(back)


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def read_text(path: str) -> str:
    """A file's stripped content, "" if it cannot be read (a sysctl the kernel lacks)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def run_in_netns(name: str, argv: list[str], timeout: float = 30,
                 input: str | None = None) -> str:
    """Run argv in netns `name` (setns in the child: one fork, no `ip netns exec`)."""
    path = netns_path(name)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input,
                       preexec_fn=lambda: setns(path))
    if r.returncode != 0:
        raise Failed(f"`{' '.join(argv)}` in {name} exited {r.returncode}: "
                     f"{r.stderr.strip()[-800:]}")
    return r.stdout


def netstat_synretrans() -> int | None:
    # /proc/thread-self follows setns; /proc/net may be resolved for the process's first netns.
    return probe.syn_retrans("/proc/thread-self/net/netstat")


# --- IPVS control ---------------------------------------------------------------------------


class IpvsNetlink:
    """IPVS generic netlink (include/uapi/linux/ip_vs.h), what ipvsadm speaks, without a fork:
    dest add / edit / delete for services of either family."""

    GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 16, 3, 1, 2
    CMD = {"add": 5, "edit": 6, "delete": 7}  # IPVS_CMD_NEW_DEST, SET_DEST, DEL_DEST
    ATTR_SERVICE, ATTR_DEST = 1, 2  # IPVS_CMD_ATTR_*
    NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 1, 4, 2

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC
        self.sock.bind((0, 0))
        self.seq = 0
        reply = self._request(self.GENL_ID_CTRL, self.CTRL_CMD_GETFAMILY,
                              self._attr(self.CTRL_ATTR_FAMILY_NAME, b"IPVS\0"))
        attrs = self._parse_attrs(reply[4:])  # after the genlmsghdr
        if (self.CTRL_ATTR_FAMILY_ID not in attrs
                or attrs.get(self.CTRL_ATTR_FAMILY_NAME, b"").rstrip(b"\0") != b"IPVS"):
            raise Failed("no IPVS generic netlink family (ip_vs not loaded?)")
        self.family_id = struct.unpack("=H", attrs[self.CTRL_ATTR_FAMILY_ID][:2])[0]

    @staticmethod
    def _attr(typ: int, payload: bytes) -> bytes:
        n = 4 + len(payload)
        return struct.pack("=HH", n, typ) + payload + b"\0" * ((4 - n % 4) % 4)

    @staticmethod
    def _parse_attrs(data: bytes) -> dict[int, bytes]:
        out, i = {}, 0
        while i + 4 <= len(data):
            n, typ = struct.unpack_from("=HH", data, i)
            if n < 4:
                break
            out[typ & 0x3FFF] = data[i + 4:i + n]
            i += (n + 3) & ~3
        return out

    def _request(self, typ: int, cmd: int, payload: bytes, version: int = 1) -> bytes:
        self.seq += 1
        body = struct.pack("=BBH", cmd, version, 0) + payload
        msg = struct.pack("=IHHII", 16 + len(body), typ, self.NLM_F_REQUEST | self.NLM_F_ACK,
                          self.seq, 0) + body
        self.sock.send(msg)
        answer = b""
        while True:
            data = self.sock.recv(65536)
            i = 0
            while i + 16 <= len(data):
                n, mtype, _, seq, _ = struct.unpack_from("=IHHII", data, i)
                if seq == self.seq:
                    if mtype == self.NLMSG_ERROR:
                        err = struct.unpack_from("=i", data, i + 16)[0]
                        if err:
                            raise OSError(-err, os.strerror(-err))
                        return answer
                    answer = data[i + 16:i + n]  # genlmsghdr + attributes
                i += (n + 3) & ~3

    @staticmethod
    def _addr(ip: str) -> tuple[int, bytes]:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        raw = socket.inet_pton(fam, ip)
        return fam, raw + b"\0" * (16 - len(raw))  # union nf_inet_addr

    def dest(self, op: str, svc: Service, ip: str, port: int, weight: int = 0) -> None:
        fam, vaddr = self._addr(svc.vip)
        proto = socket.IPPROTO_TCP if svc.proto == "tcp" else socket.IPPROTO_UDP
        service = (self._attr(1, struct.pack("=H", fam))  # IPVS_SVC_ATTR_AF
                   + self._attr(2, struct.pack("=H", proto))  # PROTOCOL
                   + self._attr(3, vaddr)  # ADDR
                   + self._attr(4, struct.pack("!H", svc.port)))  # PORT (network order)
        dfam, daddr = self._addr(ip)
        dest = (self._attr(1, daddr)  # IPVS_DEST_ATTR_ADDR
                + self._attr(2, struct.pack("!H", port)))  # PORT
        if op != "delete":  # full entry: masquerading, weight, no thresholds
            dest += (self._attr(3, struct.pack("=I", 0)) + self._attr(4, struct.pack("=I", weight))
                     + self._attr(5, struct.pack("=I", 0)) + self._attr(6, struct.pack("=I", 0))
                     + self._attr(11, struct.pack("=H", dfam)))  # ADDR_FAMILY
        self._request(self.family_id, self.CMD[op],
                      self._attr(self.ATTR_SERVICE | 0x8000, service)  # NLA_F_NESTED
                      + self._attr(self.ATTR_DEST | 0x8000, dest))

    def close(self) -> None:
        self.sock.close()


class IpvsControl:
    """Edit real servers of the director's services without forking ipvsadm per change.

    how: sockopt (default; IPv4: the legacy sockopt interface, IPv6: generic netlink, as
    the sockopt structs hold IPv4 addresses only), netlink (both families), ipvsadm (a fork
    per edit, tens of ms under TCG: later than the kernel's work that flushes a deleted
    destination's connections, see `settle`).
    """

    def __init__(self, netns: str, family: int = 4, how: str = "sockopt") -> None:
        if how not in ("sockopt", "netlink", "ipvsadm"):
            raise Failed(f"ipvs_edits must be sockopt, netlink or ipvsadm, not {how!r}")
        self.netns, self.family, self.how = netns, family, how
        self.sock: socket.socket | None = None
        self.nl: IpvsNetlink | None = None
        with in_netns(netns_path(netns)):  # a socket stays in the netns it was made in
            if how == "sockopt" and family == 4:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            elif how != "ipvsadm":
                self.nl = IpvsNetlink()

    def _dest(self, cmd: int, svc: Service, ip: str, port: int, weight: int) -> None:
        op = {IP_VS_SO_SET_EDITDEST: "edit", IP_VS_SO_SET_DELDEST: "delete",
              IP_VS_SO_SET_ADDDEST: "add"}[cmd]
        if self.nl is not None:
            self.nl.dest(op, svc, ip, port, weight)
            return
        if self.sock is None:
            flag = {"edit": "-e", "delete": "-d", "add": "-a"}[op]
            argv = ["ipvsadm", flag, *svc.ipvsadm().split(), "-r", hostport(ip, port)]
            if op != "delete":
                argv += ["-m", "-w", str(weight)]
            run_in_netns(self.netns, argv)
            return
        proto = socket.IPPROTO_TCP if svc.proto == "tcp" else socket.IPPROTO_UDP
        # struct ip_vs_service_user: protocol, addr, port, fwmark, sched_name, flags,
        # timeout, netmask (44 bytes on Linux, natural alignment)
        service = struct.pack("=H2x4s2sxxI16sIII", proto, socket.inet_aton(svc.vip),
                              struct.pack("!H", svc.port), 0, b"", 0, 0, 0xFFFFFFFF)
        # struct ip_vs_dest_user: addr, port, conn_flags (0 = masquerading), weight, thresholds
        dest = struct.pack("=4s2sxxIiII", socket.inet_aton(ip), struct.pack("!H", port), 0,
                           weight, 0, 0)
        self.sock.setsockopt(socket.IPPROTO_IP, cmd, service + dest)

    def set_weight(self, svc: Service, ip: str, port: int, weight: int) -> None:
        self._dest(IP_VS_SO_SET_EDITDEST, svc, ip, port, weight)

    def delete(self, svc: Service, ip: str, port: int) -> None:
        self._dest(IP_VS_SO_SET_DELDEST, svc, ip, port, 0)

    def add(self, svc: Service, ip: str, port: int, weight: int = 1) -> None:
        self._dest(IP_VS_SO_SET_ADDDEST, svc, ip, port, weight)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.nl is not None:
            self.nl.close()


def ipvs_conns_from_port(text: str, port: int, proto: str = "tcp") -> int:
    """Rows of /proc/net/ip_vs_conn of `proto` whose client port (FPrt, 4 hex digits) is
    `port`."""
    rows = [line.split() for line in text.splitlines()[1:]]
    return sum(1 for r in rows
               if len(r) > 2 and r[0] == proto.upper() and int(r[2], 16) == port)


# --- conntrack ------------------------------------------------------------------------------


def parse_conntrack(text: str) -> list[dict[str, Any]]:
    """`conntrack -L` (or /proc/net/nf_conntrack) lines as dicts with orig/reply tuples.

    Addresses come out canonical (IPv6 compressed), whichever source printed them.

    >>> parse_conntrack("tcp 6 119 TIME_WAIT src=10.10.1.2 dst=10.10.9.1 sport=10000 "
    ...     "dport=8080 src=10.10.3.2 dst=10.10.1.2 sport=8080 dport=10000 [ASSURED] use=1")
    [{'proto': 'tcp', 'state': 'TIME_WAIT', 'orig': {...}, 'reply': {...}, ...}]
    """
    out = []
    for line in text.splitlines():
        words = line.split()
        if "tcp" not in words:
            continue
        tuples: list[dict[str, str]] = [{}, {}]
        side = 0
        state = None
        for w in words:
            k, eq, v = w.partition("=")
            if eq and k in ("src", "dst", "sport", "dport"):
                if k in tuples[side]:
                    side = 1
                tuples[side][k] = norm_ip(v) if k in ("src", "dst") else v
            elif w.isupper() and w.replace("_", "").isalpha() and state is None:
                state = w
        if tuples[0] and tuples[1]:
            out.append({"proto": "tcp", "state": state, "orig": tuples[0], "reply": tuples[1],
                        "flags": [w.strip("[]") for w in words if w.startswith("[")]})
    return out


def conntrack_entries(netns: str, family: int = 4) -> list[dict[str, Any]]:
    fam = ["-f", "ipv6"] if family == 6 else []
    r = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", *fam, "-p", "tcp"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return parse_conntrack(r.stdout)
    with in_netns(netns_path(netns)), open("/proc/thread-self/net/nf_conntrack") as f:
        return parse_conntrack(f.read())


def conntrack_view(entries: list[dict[str, Any]], client_ip: str, sport: int,
                   new_server_ip: str) -> dict[str, Any]:
    """The entries of one client connection and whether conntrack is consistent after reuse.

    An entry belongs to the connection when its original tuple starts at the client's address
    and port (the reply tuple's destination is the node's address once masqueraded).
    Consistent: exactly one entry, its reply side from the real server that now answers.
    """
    cip = norm_ip(client_ip)
    mine = [e for e in entries
            if e["orig"].get("src") == cip and e["orig"].get("sport") == str(sport)]
    ok = len(mine) == 1 and mine[0]["reply"].get("src") == norm_ip(new_server_ip)
    return {"sport": sport, "new_server_ip": new_server_ip, "entries": mine, "consistent": ok}


# --- kernel log -----------------------------------------------------------------------------


def kmsg_lines() -> list[str]:
    return sh("dmesg", check=False).splitlines()


def kernel_warnings(lines: list[str]) -> list[str]:
    return [ln for ln in lines if WARN_KMSG.search(ln)]


# --- modules --------------------------------------------------------------------------------

FIX_MODULE = "ip_vs_reuse"  # the fix, loaded on top of the kernel's own ip_vs
REUSE_PROC = "ip_vs_reuse"  # /proc/net/ip_vs_reuse, per netns (the fix module's counters)
KILLED = ("killed_tcp", "killed_udp")


def loaded_ipvs_modules() -> list[str]:
    with open("/proc/modules") as f:
        return [ln.split()[0] for ln in f if re.fullmatch(r"ip_vs(_\w+)?|xt_ipvs", ln.split()[0])]


def loaded_taints() -> dict[str, str]:
    """Loaded IPVS modules -> their taint flags ("" for the kernel's own build)."""
    return {m: read_text(f"/sys/module/{m}/taint") for m in loaded_ipvs_modules()}


def foreign_ipvs(taints: dict[str, str]) -> list[str]:
    """Loaded IPVS modules other than the fix module that are out of tree (O taint): a
    patched set (the test-only `upstream` variant, a 2.x host), which only unloading the
    whole stack replaces."""
    return sorted(m for m, t in taints.items() if m != FIX_MODULE and "O" in t)


@dataclass(frozen=True)
class RestoreSteps:
    """How to get from the loaded IPVS modules back to the host's own (`restore_steps`)."""

    unload_all: bool  # unload the whole stack first (a loaded build is not the host's)
    remove: list[str]  # rmmod these (dependents first), IPVS staying loaded
    load: list[str]  # then modprobe these, in order


def restore_steps(taints: dict[str, str], trees: dict[str, str | None], wanted: list[str],
                  fix_installed: bool) -> RestoreSteps:
    """The steps back to `wanted` loaded, each module the build modprobe picks.

    + taints: loaded IPVS module -> taint flags (`loaded_taints`)
    + trees: module -> where modprobe finds it: "kernel" (the kernel's own tree), "other"
      (updates/, extra/: out of tree), None (nowhere)
    + fix_installed: the loaded ip_vs_reuse is the installed file (same srcversion)
    A loaded IPVS module whose taint does not fit where modprobe finds it (a patched set the
    probe loaded, or stock modules on a host whose own set is patched) is replaced only by
    unloading the whole stack; the fix module alone is swapped live.
    """
    order = sorted(wanted, key=lambda m: m != "ip_vs")  # ip_vs first: the others need it

    def own(m: str) -> bool:
        return ("O" in taints[m]) == (trees.get(m) == "other")

    if any(m in taints and m != FIX_MODULE and not own(m) for m in wanted):
        return RestoreSteps(True, [], order)
    remove = [m for m in taints if m not in wanted]
    if FIX_MODULE in taints and FIX_MODULE in wanted and not fix_installed:
        remove.append(FIX_MODULE)
    if "ip_vs" in remove:  # nothing of IPVS was loaded before
        return RestoreSteps(True, [], order)
    return RestoreSteps(False, sorted(remove),
                        [m for m in order if m not in taints or m in remove])


def record_holds(record: dict[str, Any] | None, loaded: list[str],
                 fix_srcversion: str | None) -> bool:
    """Whether LOADED_RECORD still describes what is loaded (nothing reloaded since)."""
    if not record or "ip_vs" not in loaded:
        return False
    if record.get("module") == FIX_MODULE:
        return FIX_MODULE in loaded and record.get("srcversion") == fix_srcversion
    if record.get("module") is None:  # stock
        return FIX_MODULE not in loaded
    return True  # a patched set: its ip_vs is loaded


def parse_reuse_counters(text: str) -> dict[str, int] | None:
    """/proc/net/ip_vs_reuse (`enabled 1`, `killed_tcp 3`, `killed_udp 0`) as a dict; None
    for no text (the file is absent: the fix module is not loaded)."""
    out = {}
    for line in text.splitlines():
        key, _, val = line.strip().partition(" ")
        if key and val.strip().isdigit():
            out[key] = int(val)
    return out or None


def killed_delta(before: dict[str, int] | None,
                 after: dict[str, int] | None) -> dict[str, int | None]:
    """killed_tcp / killed_udp between two readings of /proc/net/ip_vs_reuse; None where a
    reading is missing (stock modules)."""
    return {k: after[k] - before[k] if before and after and k in before and k in after
            else None for k in KILLED}


NETNS_PREFIX = "ipvsp"


def cleanup_stale() -> list[str]:
    """Remove topologies an interrupted run left behind (their IPVS services pin the modules).

    Everything a run configures lives in its netns (devices, IPVS services, ipsets, iptables
    state of both backends), so deleting the netns removes it all.
    """
    gone = []
    for name in sh("ip netns list", check=False).split():
        if not name.startswith(NETNS_PREFIX):
            continue
        pids = sh(f"ip netns pids {name}", check=False).split()
        if pids:
            sh(f"kill -9 {' '.join(pids)}", check=False)
        sh(f"ip netns exec {name} ipvsadm -C", check=False)
        sh(f"ip netns del {name}", check=False)
        gone.append(name)
    return gone


def rmmod_all(mods: list[str]) -> None:
    """rmmod `mods` (ip_vs last: the others depend on it), retried while a deleted netns
    still holds them (netns teardown, and its IPVS flush, is asynchronous)."""
    for _ in range(10):
        left = [m for m in loaded_ipvs_modules() if m in mods]
        if not left:
            return
        for m in sorted(left, key=lambda m: m == "ip_vs"):
            sh(f"rmmod {m}", check=False)
        time.sleep(0.3)
    left = [m for m in loaded_ipvs_modules() if m in mods]
    if left:
        raise Failed(f"cannot unload {', '.join(left)} (IPVS services still use them?)")


def unload_ipvs() -> None:
    """Unload every IPVS module; fails if an IPVS service holds them."""
    cleanup_stale()
    rmmod_all(loaded_ipvs_modules())


def unload_fix() -> None:
    """rmmod ip_vs_reuse if loaded: IPVS, its tables and its connections stay."""
    rmmod_all([FIX_MODULE])


def stock_module_path(name: str) -> str:
    rel = os.uname().release
    hits = glob.glob(f"/lib/modules/{rel}/kernel/net/netfilter/ipvs/{name}.ko*")
    if not hits:
        raise Failed(f"no stock {name} in /lib/modules/{rel}/kernel")
    return hits[0]


def installed_tree(name: str) -> str | None:
    """Where modprobe finds `name`: "kernel" (the kernel's own tree), "other", or None."""
    path = sh(f"modinfo -n {name}", check=False).strip()
    if not path:
        return None
    own = f"/lib/modules/{os.uname().release}/kernel/"
    return "kernel" if path.startswith(own) or path == "(builtin)" else "other"


def modinfo(target: str, field: str) -> str | None:
    """One modinfo field of a module file or name; None if absent."""
    return sh(f"modinfo -F {field} {target}", check=False).strip() or None


def insmod(path: str) -> None:
    """insmod `path`, its dependencies outside IPVS (conntrack, nf_nat, ...) modprobed first."""
    if not os.path.exists(path):
        raise Failed(f"{path} missing")
    for dep in filter(None, sh(f"modinfo -F depends {path}").strip().split(",")):
        if not dep.startswith("ip_vs"):
            sh(f"modprobe {dep}")
    sh(f"insmod {path}")


LOADED_RECORD = "/run/ipvs-probe-modules.json"


def load_modules(source: str) -> dict[str, Any]:
    """Load the stock IPVS modules (`stock`), or on top of them the fix module of a folder.

    + stock: ip_vs, ip_vs_rr, ip_vs_ftp from the kernel's own tree; ip_vs_reuse not loaded
    + DIR holding ip_vs_reuse.ko: the same stock modules, then DIR/ip_vs_reuse.ko (a build
      loaded before is removed first)
    + DIR holding an ip_vs.ko set instead (the test-only `upstream` variant, patched IPVS):
      the whole stack unloaded and the set loaded in its place
    Switching between stock and the fix is rmmod / insmod of ip_vs_reuse alone: IPVS, its
    tables and its connections stay. Only a loaded IPVS module that is not the kernel's own
    build makes the whole stack go first. Loads by path (insmod), so what is installed under
    /lib/modules is not touched; what was loaded is recorded in LOADED_RECORD.
    """
    fix = None if source == "stock" else os.path.join(source, FIX_MODULE + ".ko")
    if fix is not None and not os.path.exists(fix):
        return load_patched_set(source)
    if foreign_ipvs(loaded_taints()):
        unload_ipvs()
    else:
        unload_fix()
    files = []
    for name in IPVS_MODULES:
        path = stock_module_path(name)
        if name not in loaded_ipvs_modules():
            insmod(path)
        files.append(path)
    record: dict[str, Any] = {"source": source, "module": None, "files": files,
                              "set_id": None, "reuse_design": None, "srcversion": None}
    if fix is not None:
        insmod(fix)
        record.update(module=FIX_MODULE, files=[*files, fix], set_id=modinfo(fix, "ipvs_fleet"),
                      reuse_design=modinfo(fix, "ipvs_fleet_reuse"),
                      srcversion=modinfo(fix, "srcversion"))
    return _recorded(record)


def load_patched_set(source: str) -> dict[str, Any]:
    """A patched ip_vs set from a folder in place of the whole IPVS stack (the `upstream`
    variant's kselftest)."""
    if not os.path.exists(os.path.join(source, "ip_vs.ko")):
        raise Failed(f"{source} holds neither {FIX_MODULE}.ko (the fix module) nor an "
                     "ip_vs.ko set")
    unload_ipvs()
    files = [os.path.join(source, name + ".ko") for name in IPVS_MODULES]
    for path in files:
        insmod(path)
    return _recorded({"source": source, "module": "ip_vs", "files": files,
                      "set_id": modinfo(files[0], "ipvs_fleet"),
                      "reuse_design": modinfo(files[0], "ipvs_fleet_reuse"),
                      "srcversion": modinfo(files[0], "srcversion")})


def _recorded(record: dict[str, Any]) -> dict[str, Any]:
    with open(LOADED_RECORD, "w") as f:
        json.dump(record, f)
    return module_status()


def restore_modules(modules: list[str]) -> dict[str, Any]:
    """Back to the host's own state: exactly `modules` loaded, each the build modprobe picks
    (`restore_steps`: IPVS stays loaded unless a loaded build is not the host's own), then
    sysctl.d re-applied."""
    taints = loaded_taints()
    trees = {m: installed_tree(m) for m in {*taints, *modules}}
    loaded_src = read_text(f"/sys/module/{FIX_MODULE}/srcversion")
    fix_installed = bool(loaded_src) and loaded_src == modinfo(FIX_MODULE, "srcversion")
    steps = restore_steps(taints, trees, modules, fix_installed)
    if steps.unload_all:
        unload_ipvs()
    else:
        rmmod_all(steps.remove)
    with contextlib.suppress(OSError):
        os.unlink(LOADED_RECORD)
    for m in steps.load:
        sh(f"modprobe {m}")
    sh("sysctl -q --system", check=False)
    return module_status()


def fix_module_status(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The loaded ip_vs_reuse: version (the set id), srcversion, taint, and the modinfo of
    the file it was loaded from (the probe's, else the installed one if it is that build)."""
    sysfs = f"/sys/module/{FIX_MODULE}"
    if not os.path.isdir(sysfs):
        return None
    srcversion = read_text(f"{sysfs}/srcversion") or None
    if record and record.get("module") == FIX_MODULE:
        source = record["files"][-1]
    elif srcversion and modinfo(FIX_MODULE, "srcversion") == srcversion:
        source = FIX_MODULE  # modinfo resolves the name to the installed file
    else:
        source = None
    return {"version": read_text(f"{sysfs}/version") or None, "srcversion": srcversion,
            "taint": read_text(f"{sysfs}/taint"), "file": source and modinfo(source, "filename"),
            "set_id": source and modinfo(source, "ipvs_fleet"),
            "reuse_design": source and modinfo(source, "ipvs_fleet_reuse")}


def module_status() -> dict[str, Any]:
    """What is loaded: the IPVS modules, ip_vs's taint ("" when stock), the fix module
    (`fix_module_status`), knob_present (ip_vs_reuse loaded: the knob exists in every
    netns), and the probe's LOADED_RECORD while it still holds."""
    loaded = loaded_ipvs_modules()
    try:
        with open(LOADED_RECORD) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = None
    if not record_holds(record, loaded, read_text(f"/sys/module/{FIX_MODULE}/srcversion")
                        or None):
        record = None
    return {
        "kernel_release": os.uname().release,
        "loaded": loaded,
        "ip_vs_taint": read_text("/sys/module/ip_vs/taint") if "ip_vs" in loaded else None,
        "fix_module": fix_module_status(record),
        "knob_present": FIX_MODULE in loaded,
        "loaded_by_probe": record,
    }


# --- topology -------------------------------------------------------------------------------


@dataclass
class Cell:
    """What a plan asks for besides the scenarios."""

    ruleset: str = "minimal"
    backend: str = "nft"
    client: str = "outside"
    family: int = 4
    rule: str = "drop"

    @classmethod
    def from_plan(cls, plan: dict[str, Any]) -> Cell:
        c = cls(ruleset=plan.get("ruleset", "minimal"), backend=plan.get("iptables", "nft"),
                client=plan.get("client", "outside"), family=int(plan.get("family", 4)),
                rule=plan.get("rule", "drop"))
        check_cell(c.ruleset, c.client, c.family, c.backend, c.rule)
        return c


class Forked:
    """A child forked from this process, with the part of Popen's interface `down` uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rc: int | None = None

    def poll(self) -> int | None:
        if self.rc is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
        return self.rc

    def _signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return rc


def serve_forked(netns: str, bind: str, port: int, identity: str, hold: float,
                 wait: float = 30.0) -> Forked:
    """A real server (probe.serve, TCP `port` and UDP_PORT) in a child forked into `netns`.

    A fork, not `python3 probe.py serve`: a new interpreter and its imports cost about 1 s
    of CPU under QEMU TCG, twice per topology. The child writes to a pipe of its own, so
    it never holds this process's output (an SSH channel) open.
    """
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(r)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(w, 1)
            os.dup2(w, 2)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            setns(netns_path(netns))
            probe.serve(bind, port, identity, hold, UDP_PORT)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
            with contextlib.suppress(OSError):
                os.write(2, f"real server {identity}: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    child, seen = Forked(pid), b""
    try:
        end = time.monotonic() + wait
        while time.monotonic() < end and b"\n" not in seen:
            ready, _, _ = select.select([r], [], [], 0.5)
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                seen += chunk
    finally:
        os.close(r)
    if not seen.startswith(b"listening"):
        child.kill()
        raise Failed(f"real server {identity} in {netns} did not start (rc {child.poll()}): "
                     f"{seen.decode(errors='replace').strip()[-400:]}")
    return child


class Topology:
    """Client(s), director (node) and two real servers in fresh network namespaces."""

    def __init__(self, cell: Cell | str, knob: int | None, hold: float = 10.0,
                 ipvs_edits: str = "sockopt") -> None:
        if isinstance(cell, str):  # the old signature: the minimal ruleset's rule
            cell = Cell(rule=cell)
        check_cell(cell.ruleset, cell.client, cell.family, cell.backend, cell.rule)
        self.rid = f"{os.getpid() % 1000:03d}{int(time.time() * 10) % 10000:04d}"
        self.cell, self.knob, self.hold = cell, knob, hold
        self.ipvs_edits = ipvs_edits
        self.rule = cell.rule
        self.lay = cell_layout(cell.ruleset, cell.client, cell.family, self.rid)
        self.ns = {k: f"{NETNS_PREFIX}{self.rid}{k}" for k in ("c", "p", "d", "r1", "r2")}
        self.procs: list[Forked | subprocess.Popen[str]] = []
        self.ipvs: IpvsControl | None = None
        self.sysctls: dict[str, int] = {}
        self.rules_text = director_rules(self.lay, cell.rule)
        self.ipset_text = ipset_restore(self.lay)
        self.specs = counter_specs(self.lay)
        six = "6" if cell.family == 6 else ""
        self.restore_cmd = f"ip{six}tables-{cell.backend}-restore"
        self.save_cmd = f"ip{six}tables-{cell.backend}-save"

    @property
    def client_ns(self) -> str:
        return self.ns[self.lay.client_leaf]

    def up(self) -> None:
        lay, n = self.lay, self.ns
        tools = ["ipvsadm", self.restore_cmd, self.save_cmd] + (["ipset"] if lay.k8s else [])
        for tool in tools:
            if shutil.which(tool) is None:
                raise Failed(f"`{tool}` is missing in the guest (lab image without it?)")
        six = "-6 " if lay.family == 6 else ""
        nodad = " nodad" if lay.family == 6 else ""
        # `ip -batch`: one process for the namespaces and veth pairs, then one per namespace
        # (a process start costs ~70 ms of CPU under QEMU TCG; one `ip` per line made ~35).
        # The director's side first: a leaf's route then goes via a peer that is up.
        top = [f"netns add {v}" for v in n.values()]
        per_ns: dict[str, list[str]] = {v: ["link set lo up"] for v in n.values()}
        leaves: list[str] = []
        for ln in lay.links.values():
            leaf_ns = n[ln.leaf]
            top.append(f"link add {ln.peer_dev} netns {leaf_ns} type veth "
                       f"peer name {ln.dev} netns {n['d']}")
            per_ns[n["d"]] += [f"addr add {ln.node_ip}/{ln.plen} dev {ln.dev}{nodad}",
                               f"link set {ln.dev} up"]
            via = "default" if ln.leaf in ("c", "p") else lay.rs_routes
            per_ns[leaf_ns] += [f"addr add {ln.leaf_ip}/{ln.plen} dev {ln.peer_dev}{nodad}",
                                f"link set {ln.peer_dev} up",
                                f"route add {via} via {ln.node_ip}"]
            leaves.append(leaf_ns)
        hl = ADDRS[lay.family]["host_len"]
        if lay.vip_dev != "lo":  # kube-ipvs0: a dummy device, left down as kube-proxy does
            per_ns[n["d"]].append(f"link add {lay.vip_dev} type dummy")
        per_ns[n["d"]] += [f"addr add {v}/{hl} dev {lay.vip_dev}{nodad}" for v in lay.vips]
        sh("ip -batch -", input="\n".join(top) + "\n")
        for ns in [n["d"], *(v for v in n.values() if v != n["d"])]:
            sh(f"ip {six}-n {ns} -batch -", input="\n".join(per_ns[ns]) + "\n")
        sysctls = dict(K8S_SYSCTLS if lay.k8s else SYSCTLS)
        if self.knob is not None:
            if not os.path.exists(f"/proc/sys/net/ipv4/vs/{KNOB}"):
                raise Failed(f"knob={self.knob} asked, but {KNOB} is missing "
                             f"({FIX_MODULE}, the fix module, not loaded?)")
            sysctls[KNOB] = self.knob
        sets = {"/proc/sys/net/ipv4/ip_forward": 1}
        if lay.family == 6:
            sets["/proc/sys/net/ipv6/conf/all/forwarding"] = 1
        sets.update({f"/proc/sys/net/ipv4/vs/{k}": v for k, v in sysctls.items()})
        # the director's sysctls from this thread, moved into its netns (no process)
        with in_netns(netns_path(n["d"])):
            for path, v in sets.items():
                with open(path, "w") as f:
                    f.write(f"{v}\n")
        if self.ipset_text:
            run_in_netns(n["d"], ["ipset", "restore"], input=self.ipset_text)
        run_in_netns(n["d"], [self.restore_cmd, "-w"], input=self.rules_text)
        for leaf in ("c", "p"):
            run_in_netns(n[leaf], [self.restore_cmd, "-w"], input=client_rules(lay))
        run_in_netns(n["d"], ["ipvsadm", "-R"], input=ipvsadm_restore(lay))
        with in_netns(netns_path(n["d"])):
            self.sysctls = {k: int(read_text(f"/proc/sys/net/ipv4/vs/{k}")) for k in sysctls}
            liberal = read_text("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
        if liberal.isdigit():
            self.sysctls["nf_conntrack_tcp_be_liberal"] = int(liberal)
        bind = "::" if lay.family == 6 else "0.0.0.0"
        for i, name in enumerate(lay.real_servers, 1):
            self.procs.append(serve_forked(n[f"r{i}"], bind, lay.rs_port, name, self.hold))
        self.ipvs = IpvsControl(n["d"], lay.family, self.ipvs_edits)

    def exec(self, leaf: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[leaf]]

    def spawn(self, argv: list[str], ready: str | None, wait: float = 30.0) -> None:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        if ready is None:
            return
        assert p.stdout is not None
        end = time.monotonic() + wait
        while time.monotonic() < end:
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                line = p.stdout.readline()
                if ready in line:
                    return
                if not line:
                    break
        raise Failed(f"{' '.join(argv)} did not start (rc {p.poll()})")

    # real-server edits, on every service of the protocol (as kube-proxy does for an endpoint)
    def _each(self, proto: str) -> list[Service]:
        return [s for s in self.lay.services if s.proto == proto]

    def _rport(self, proto: str) -> int:
        return self.lay.rs_port if proto == "tcp" else UDP_PORT

    def set_weight(self, server: str, weight: int, proto: str = "tcp") -> None:
        assert self.ipvs is not None
        for svc in self._each(proto):
            self.ipvs.set_weight(svc, self.lay.real_servers[server], self._rport(proto), weight)

    def remove_server(self, server: str, proto: str = "tcp") -> None:
        assert self.ipvs is not None
        for svc in self._each(proto):
            self.ipvs.delete(svc, self.lay.real_servers[server], self._rport(proto))

    def add_server(self, server: str, proto: str = "tcp") -> None:
        assert self.ipvs is not None
        for svc in self._each(proto):
            self.ipvs.add(svc, self.lay.real_servers[server], self._rport(proto), 1)

    def remove_server_flush_held(self, server: str, proto: str = "tcp") -> None:
        """Delete a real server without queueing IPVS's flush of its connections.

        The kernel (5.9+, 04231e52d355) queues that flush only when `expire_nodest_conn` is 1
        at the deletion; a packet's own check reads it on arrival. So: 0 around the deletion,
        then the director's value back: the old connection stays until a packet meets it,
        as any packet does that arrives before the flush has run.
        """
        value = self.sysctls["expire_nodest_conn"]
        self.set_vs_sysctl("expire_nodest_conn", 0)
        try:
            self.remove_server(server, proto)
        finally:
            self.set_vs_sysctl("expire_nodest_conn", value)

    def set_vs_sysctl(self, key: str, value: int) -> None:
        """net.ipv4.vs.<key> of the director netns (no fork: setns in this thread)."""
        with in_netns(netns_path(self.ns["d"])), open(f"/proc/sys/net/ipv4/vs/{key}", "w") as f:
            f.write(f"{value}\n")

    def ipvs_conns_from_port(self, port: int, proto: str = "tcp") -> int:
        """How many connections of `proto` in the director's IPVS table come from source port
        `port` (thread-self: /proc/net is the thread group leader's netns)."""
        with in_netns(netns_path(self.ns["d"])), open("/proc/thread-self/net/ip_vs_conn") as f:
            return ipvs_conns_from_port(f.read(), port, proto)

    def reuse_counters(self) -> dict[str, int] | None:
        """The fix module's counters in the director netns (where IPVS runs); None without
        the module."""
        with in_netns(netns_path(self.ns["d"])):
            return parse_reuse_counters(read_text(f"/proc/thread-self/net/{REUSE_PROC}"))

    def counters(self) -> dict[str, int]:
        """Packet counts of the watched rules (counter_specs) in the director netns."""
        text = sh(f"ip netns exec {self.ns['d']} {self.save_cmd} -c")
        return parse_counters(text, self.specs)

    def describe(self) -> dict[str, Any]:
        return {**asdict(self.cell), "layout": self.lay.to_dict(),
                "masquerade_demanded": self.lay.masquerade_demanded,
                "target": hostport(self.lay.target.vip, self.lay.target.port),
                "udp_target": hostport(self.lay.udp_target.vip, self.lay.udp_target.port),
                "client_ip": self.lay.client_ip, "iptables_restore": self.rules_text,
                "ipset_restore": self.ipset_text}

    def down(self) -> None:
        if self.ipvs:
            self.ipvs.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        sh("ip -force -batch -", check=False,
           input="".join(f"netns del {v}\n" for v in self.ns.values()))


# --- scenarios ------------------------------------------------------------------------------


def run_scenario(topo: Topology, name: str, count: int, timeout: float,
                 deadline: float, settle: float = 0.0,
                 hold_flush: bool = False) -> dict[str, Any]:
    """`count` attempts of one scenario; the measured connect is the same-port reconnect.

    + settle: seconds between the real-server edit of B/B2 and the reconnect (0: at once,
      as earlier results were measured; on 5.9+ a deleted destination's connections are
      flushed by work queued at the deletion, so B2's drop needs the reconnect to race it)
    + hold_flush: B2 deletes the server without queueing that flush
      (`Topology.remove_server_flush_held`), so the reconnect meets the old connection
      every time instead of racing the flush
    `old_conn_met` counts the attempts whose old connection was still in the IPVS table
    right before the reconnect: the reconnects the fix module can act on (None for a racing
    B2, where reading the table first would change the race).
    """
    lay = topo.lay
    dst, dport = lay.target.vip, lay.target.port
    base = PORT_BASE + SCENARIOS.index(name) * PORT_SPAN
    if count > PORT_SPAN:
        raise Failed(f"at most {PORT_SPAN} attempts per scenario")
    first_kw = FIRST_CONNECT[name]
    report = probe.Report(hostport(dst, dport))
    report.retrans_before = netstat_synretrans()
    end = time.monotonic() + deadline
    setup_errors = moved = stale = old_met = 0
    held = hold_flush and name == "B2"
    track_old = held or name != "B2"
    for i in range(count):
        if time.monotonic() > end:
            report.extra["stopped"] = f"deadline of {deadline} s reached"
            break
        src = (lay.client_ip, base + i)
        first = probe.connect_once(dst, dport, src=src, timeout=timeout, index=i, peer=True,
                                   **first_kw)
        if first.error or first.server not in lay.real_servers:
            setup_errors += 1
            continue
        if name == "B":
            topo.set_weight(first.server, 0)
        elif held:
            topo.remove_server_flush_held(first.server)
        elif name == "B2":
            topo.remove_server(first.server)
        if settle and name in ("B", "B2"):
            time.sleep(settle)
        if track_old:
            old_met += topo.ipvs_conns_from_port(src[1]) > 0
        a = probe.connect_once(dst, dport, src=src, timeout=timeout, index=i, peer=True)
        if name == "B":
            topo.set_weight(first.server, 1)
        elif name == "B2":
            topo.add_server(first.server)
        report.add(a)
        if a.error is None:
            moved += a.server != first.server
            # B/B2: the old server is out of service; an answer from it is not a live one
            stale += name in ("B", "B2") and a.server == first.server
            stale += a.server not in lay.real_servers
    res = report.result()
    res["syn_retrans_delta"] = _delta(report.retrans_before, netstat_synretrans())
    res.update(scenario=name, setup_errors=setup_errors, moved=moved,
               answered_by_live=res["ok"] - stale, stale_answers=stale, settle_s=settle,
               flush_held=held, old_conn_met=old_met if track_old else None)
    res.update(peer_summary(lay, report.attempts))
    return res


def _udp_ask(s: socket.socket, dst: tuple[str, int], req: str,
             wait: float) -> tuple[str | None, dict[str, str]]:
    """Send `req`, wait up to `wait` s for the answer to it (answers to others are skipped).

    A datagram that netfilter drops on a local sender's own path (the host client: IPVS at
    LOCAL_OUT) fails with EPERM at once; the wait is kept, as a remote sender's would be.
    """
    end = time.monotonic() + wait
    try:
        s.sendto(f"{req} peer\n".encode(), dst)
    except OSError as e:
        time.sleep(max(0.0, end - time.monotonic()))
        return None, {"error": f"send: {probe._errname(e)}"}
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return None, {}
        s.settimeout(left)
        try:
            data = s.recv(probe.MAX_LINE)
        except OSError as e:  # socket.timeout is no TimeoutError before 3.10
            if isinstance(e, socket.timeout):
                return None, {}
            return None, {"error": probe._errname(e)}  # ICMP unreachable, reported late
        server, kv = probe.parse_identity(data.decode(errors="replace"))
        if kv.get("req") == req:
            return server, kv


def run_udp(topo: Topology, count: int, timeout: float, deadline: float,
            settle: float = 0.0, hold_flush: bool = False) -> dict[str, Any]:
    """Scenario U: the answering real server X is deleted between two datagrams from one port.

    Measured: the time from the second datagram to the first answer (second, or the third
    sent after UDP_RETRY_S without one); `slow` counts attempts that needed the third.
    + hold_flush: X deleted without queueing IPVS's flush of its connections, as B2 does:
      the second datagram meets the old connection every time (`old_conn_met`), where stock
      IPVS drops it (its conntrack entry is the old one) and the fix module (knob 1) kills
      that entry first
    """
    lay = topo.lay
    svc = lay.udp_target
    dst = (svc.vip, svc.port)
    base = PORT_BASE + SCENARIOS.index("U") * PORT_SPAN
    if count > PORT_SPAN:
        raise Failed(f"at most {PORT_SPAN} attempts per scenario")
    report = probe.Report(f"udp {hostport(svc.vip, svc.port)}")
    end = time.monotonic() + deadline
    setup_errors = old_met = 0
    details: list[dict[str, Any]] = []
    for i in range(count):
        if time.monotonic() > end:
            report.extra["stopped"] = f"deadline of {deadline} s reached"
            break
        s = socket.socket(probe.family_of(svc.vip), socket.SOCK_DGRAM)
        try:
            s.bind((lay.client_ip, base + i))
            first, _ = _udp_ask(s, dst, "q1", timeout)
            if first not in lay.real_servers:
                setup_errors += 1
                continue
            if hold_flush:
                topo.remove_server_flush_held(first, "udp")
            else:
                topo.remove_server(first, "udp")
            try:
                time.sleep(settle)
                if hold_flush:  # racing the flush, a read first would change the race
                    old_met += topo.ipvs_conns_from_port(base + i, "udp") > 0
                t0 = time.monotonic()
                second, kv2 = _udp_ask(s, dst, "q2", UDP_RETRY_S)
                third, kv3 = (None, {}) if second else _udp_ask(s, dst, "q3", UDP_RETRY_S)
                t1 = time.monotonic()
            finally:
                topo.add_server(first, "udp")
        finally:
            s.close()
        server = second or third
        kv = kv2 if second else kv3
        ms = round((t1 - t0) * 1000.0, 3)
        pport = kv.get("pport", "")
        report.add(probe.Attempt(i, base + i, ms, ms, server,
                                 None if server else "no answer", peer=kv.get("peer"),
                                 peer_port=int(pport) if pport.isdigit() else None))
        details.append({"first": first, "second": second, "third": third,
                        "second_error": kv2.get("error"), "third_error": kv3.get("error")})
    res = report.result()
    res["slow"] = sum(1 for d in details if d["second"] is None)
    res.update(scenario="U", setup_errors=setup_errors, udp=details, settle_s=settle,
               flush_held=hold_flush, old_conn_met=old_met if hold_flush else None,
               second_answered=sum(1 for d in details if d["second"]),
               third_answered=sum(1 for d in details if d["third"]),
               answered_by_deleted=sum(1 for d in details
                                       if d["first"] in (d["second"], d["third"])))
    res["answered_by_live"] = res["ok"] - res["answered_by_deleted"]
    res["moved"] = res["answered_by_live"]
    res.update(peer_summary(lay, report.attempts))
    return res


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def conntrack_after_reuse(topo: Topology, name: str, timeout: float) -> dict[str, Any]:
    """One reuse of scenario `name` (A or B) on a fresh port, then the director's conntrack."""
    lay = topo.lay
    dst, dport = lay.target.vip, lay.target.port
    port = PORT_BASE + len(SCENARIOS) * PORT_SPAN + (0 if name == "A" else 1)
    src = (lay.client_ip, port)
    first = probe.connect_once(dst, dport, src=src, timeout=timeout, **FIRST_CONNECT[name])
    if first.error or first.server not in lay.real_servers:
        return {"scenario": name, "error": f"first connect: {first.error or first.server}"}
    if name == "B":
        topo.set_weight(first.server, 0)
    # hold: the reconnect stays open while conntrack is read, as a live connection would
    s = socket.socket(probe.family_of(dst), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(src)
    s.settimeout(timeout)
    t0 = time.monotonic()
    try:
        s.connect((dst, dport))
        ms = (time.monotonic() - t0) * 1000
        s.sendall(b"hold peer\n")
        server, kv = probe.parse_identity(probe._read_line(s))
        view = conntrack_view(conntrack_entries(topo.ns["d"], lay.family), lay.client_ip, port,
                              lay.real_servers.get(server, "?"))
        view.update(scenario=name, old_server=first.server, new_server=server,
                    connect_ms=round(ms, 3), peer=kv.get("peer"),
                    peer_kind=lay.peer_kind(kv.get("peer")))
        return view
    except OSError as e:
        view = conntrack_view(conntrack_entries(topo.ns["d"], lay.family), lay.client_ip, port,
                              "?")
        view.update(scenario=name, old_server=first.server, error=f"reconnect: {e}")
        return view
    finally:
        s.close()
        if name == "B":
            topo.set_weight(first.server, 1)


def ftp_transfer(topo: Topology, size: int = 256 * 1024, timeout: float = 20) -> dict[str, Any]:
    """Passive FTP download through an IPVS FTP service (ip_vs_ftp) to vsftpd on rs1."""

    # Root writes here: a fresh directory of its own (mkdtemp: unpredictable, 0700, never an
    # existing path or a symlink planted in /tmp), removed after the transfer.
    work = tempfile.mkdtemp(prefix="ipvsp-ftp-")
    try:
        return _ftp_transfer(topo, work, size, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ftp_transfer(topo: Topology, work: str, size: int, timeout: float) -> dict[str, Any]:
    import ftplib  # here only: it imports ssl, ~0.3 s at every probe start under TCG

    root = os.path.join(work, "pub")
    os.mkdir(root, mode=0o755)
    os.chmod(work, 0o711)  # vsftpd's anonymous session (user ftp) reads pub/
    os.makedirs("/var/run/vsftpd/empty", exist_ok=True)
    data = os.urandom(size)
    with open(os.path.join(root, "probe.bin"), "wb") as f:
        f.write(data)
    conf = os.path.join(work, "vsftpd.conf")
    with open(conf, "w") as f:
        f.write("\n".join([
            "listen=YES", "listen_ipv6=NO", "background=NO", "anonymous_enable=YES",
            "local_enable=NO", "write_enable=NO", f"anon_root={root}", "pasv_enable=YES",
            "pasv_min_port=30000", "pasv_max_port=30100", "seccomp_sandbox=NO",
            "secure_chroot_dir=/var/run/vsftpd/empty", "xferlog_enable=NO",
            "connect_from_port_20=NO", "",
        ]))
    d = f"ip netns exec {topo.ns['d']}"
    vip = topo.lay.target.vip
    rs1 = topo.lay.real_servers["rs1"]
    sh(f"{d} ipvsadm -A -t {vip}:{FTP_PORT} -s rr && "
       f"{d} ipvsadm -a -t {vip}:{FTP_PORT} -r {rs1}:{FTP_PORT} -m -w 1")
    topo.spawn([*topo.exec("r1"), "vsftpd", conf], None)
    out: dict[str, Any] = {"size": size}
    t0 = time.monotonic()
    try:
        for _ in range(50):  # vsftpd has no readiness line: poll its port
            try:
                ftp = ftplib.FTP(timeout=timeout)
                ftp.connect(vip, FTP_PORT)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise OSError("vsftpd not reachable through the VIP")
        # Use the address of the 227 reply: it must have been rewritten to the VIP.
        setattr(ftp, "trust_server_pasv_ipv4_address", True)  # noqa: B010 (3.9.3+ only)
        ftp.login()
        pasv = ftp.sendcmd("PASV")
        chunks: list[bytes] = []
        ftp.retrbinary("RETR probe.bin", chunks.append)
        ftp.quit()
        got = b"".join(chunks)
        out.update(pasv_reply=pasv, received=len(got),
                   ok=hashlib.sha256(got).digest() == hashlib.sha256(data).digest())
    except (OSError, ftplib.Error, EOFError) as e:
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
    out["elapsed_s"] = round(time.monotonic() - t0, 3)
    return out


def _counter_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a.get(k, 0) for k in b}


def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Build the topology, run what the plan asks, tear down; the result as a dict.

    Keys: plan, modules, run_id, stale_removed, sysctls, cell (ruleset, backend, client,
    family, rule, layout, masquerade_demanded, target, client_ip, the rules applied),
    setup_s, scenarios {name: probe.Report result + scenario keys, rule_counters, new_conns,
    peer_sources, peer_kinds, masq_mismatch, killed_tcp, killed_udp}, conntrack, ordinary
    (with killed_tcp, killed_udp), ftp, reuse_counters (/proc/net/ip_vs_reuse of the director
    at the end, None without the fix module), kmsg_new, kernel_warnings, elapsed_s.
    Plan key `ipvs_edits` (diagnostics): how real servers are edited (IpvsControl: sockopt,
    netlink, ipvsadm).
    """
    t_start = time.monotonic()
    cell = Cell.from_plan(plan)
    if plan.get("ftp") and (cell.ruleset, cell.family) != ("minimal", 4):
        raise Failed("ftp needs the minimal ruleset over IPv4")
    for name in plan.get("scenarios", {}):
        if name not in SCENARIOS:
            raise Failed(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
    stale = cleanup_stale()
    kmsg_before = kmsg_lines()
    timeout = float(plan.get("timeout", 5))
    deadline = float(plan.get("deadline", 600))
    settle = float(plan.get("settle", 0.0))
    hold_flush = bool(plan.get("hold_flush", False))
    topo = Topology(cell, plan.get("knob"), float(plan.get("hold", 10)),
                    plan.get("ipvs_edits", "sockopt"))
    out: dict[str, Any] = {"plan": plan, "modules": module_status(), "run_id": topo.rid,
                           "stale_removed": stale}
    end = time.monotonic() + deadline
    try:
        topo.up()
        out["sysctls"] = topo.sysctls
        out["cell"] = topo.describe()
        out["setup_s"] = round(time.monotonic() - t_start, 3)
        lay = topo.lay
        with in_netns(netns_path(topo.client_ns)):
            out["scenarios"] = {}
            for name, count in plan.get("scenarios", {}).items():
                left = max(1.0, end - time.monotonic())
                before = topo.counters()
                killed_before = topo.reuse_counters()
                if name == "U":
                    res = run_udp(topo, int(count), timeout, left, settle, hold_flush)
                else:
                    res = run_scenario(topo, name, int(count), timeout, left, settle,
                                       hold_flush)
                res.update(killed_delta(killed_before, topo.reuse_counters()))
                res["rule_counters"] = _counter_delta(before, topo.counters())
                res["new_conns"] = res["rule_counters"].get("new")
                out["scenarios"][name] = res
            if plan.get("conntrack_check"):
                out["conntrack"] = {n: conntrack_after_reuse(topo, n, timeout) for n in "AB"}
            if plan.get("ordinary"):
                left = max(1.0, end - time.monotonic())
                before_rt = netstat_synretrans()
                killed_before = topo.reuse_counters()
                samples: list[float] = []
                res = probe.run_probe(lay.target.vip, lay.target.port, int(plan["ordinary"]),
                                      reuse=False, timeout=timeout, deadline=left,
                                      with_attempts=False,
                                      on_attempt=lambda a: samples.append(a.total_ms))
                res["syn_retrans_delta"] = _delta(before_rt, netstat_synretrans())
                res.update(killed_delta(killed_before, topo.reuse_counters()))
                res["samples_ms"] = [round(x, 2) for x in samples]  # compact, for plots
                out["ordinary"] = res
            if plan.get("ftp"):
                out["ftp"] = ftp_transfer(topo)
        out["reuse_counters"] = topo.reuse_counters()
    finally:
        topo.down()
    new = kmsg_lines()[len(kmsg_before):]
    out["kmsg_new"] = [ln for ln in new if not BENIGN_KMSG.search(ln)][-50:]
    out["kernel_warnings"] = kernel_warnings(new)
    out["elapsed_s"] = round(time.monotonic() - t_start, 3)
    return out


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "run":
        plan = json.load(sys.stdin)
        try:
            result = run_plan(plan)
        except Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        print(json.dumps(result))
        return 0
    if len(argv) == 2 and argv[0] == "modules":
        try:
            print(json.dumps(load_modules(argv[1])))
        except Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        return 0
    if len(argv) >= 1 and argv[0] == "restore":
        try:
            print(json.dumps(restore_modules(argv[1:])))
        except Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        return 0
    if argv == ["status"]:
        print(json.dumps(module_status()))
        return 0
    if len(argv) >= 2 and argv[0] == "rules":  # print a cell's rules (no side effects)
        cell = Cell.from_plan(json.loads(argv[1]))
        lay = cell_layout(cell.ruleset, cell.client, cell.family)
        print(ipset_restore(lay) + director_rules(lay, cell.rule) + ipvsadm_restore(lay))
        return 0
    print("usage: scenario.py run < plan.json | modules stock|DIR | restore [MODULE...] | "
          "status | rules PLAN_JSON", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
