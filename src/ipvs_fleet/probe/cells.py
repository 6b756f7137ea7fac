"""The scenario harness's cell model (pure, standard library only): what a plan asks for
(`Cell`), the address layout of each ruleset, family and client (`cell_layout`), the
constants the scenarios share. Part of the guest files (see scenario.py).
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass
from typing import Any

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


class Failed(Exception):
    """A setup step failed; the message says which command and why."""


# --- cells: address layout (pure) -----------------------------------------------------------

# Per family: the node's uplink and the outside client, the minimal layout's VIP and real
# servers, and the Kubernetes layout's ClusterIP, pod CIDR and pods (ip, node side), prefix.
ADDRS: dict[int, dict[str, Any]] = {
    4: {
        "node": "10.10.1.1",
        "outside": "10.10.1.2",
        "plen": 24,
        "vip": VIP,
        "legacy": {
            "r1": ("10.10.2.2", "10.10.2.1"),
            "r2": ("10.10.3.2", "10.10.3.1"),
            "p": ("10.10.4.2", "10.10.4.1"),
        },
        "cluster_ip": "10.96.0.10",
        "pod_cidr": "10.244.0.0/16",
        "pods": {
            "r1": ("10.244.1.2", "10.244.1.1"),
            "r2": ("10.244.2.2", "10.244.2.1"),
            "p": ("10.244.3.2", "10.244.3.1"),
        },
        "loopback": "127.0.0.0/8",
        "host_len": 32,
    },
    6: {
        "node": "fd10:1::1",
        "outside": "fd10:1::2",
        "plen": 64,
        "vip": "fd10:9::1",
        "legacy": {
            "r1": ("fd10:2::2", "fd10:2::1"),
            "r2": ("fd10:3::2", "fd10:3::1"),
            "p": ("fd10:4::2", "fd10:4::1"),
        },
        # kind's IPv6 defaults: pod subnet fd00:10:244::/56 (a /64 per node), services
        # fd00:10:96::/112
        "cluster_ip": "fd00:10:96::a",
        "pod_cidr": "fd00:10:244::/56",
        "pods": {
            "r1": ("fd00:10:244:1::2", "fd00:10:244:1::1"),
            "r2": ("fd00:10:244:2::2", "fd00:10:244:2::1"),
            "p": ("fd00:10:244:3::2", "fd00:10:244:3::1"),
        },
        "loopback": "::1/128",
        "host_len": 128,
    },
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
        d.update(
            client_leaf=self.client_leaf,
            node_addrs=self.node_addrs,
            links={k: asdict(v) for k, v in self.links.items()},
        )
        return d


def norm_ip(addr: str) -> str:
    """Canonical text of an address (IPv6 compressed, as the conntrack tool prints it)."""
    try:
        return ipaddress.ip_address(addr).compressed
    except ValueError:
        return addr


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def check_cell(
    ruleset: str, client: str, family: int, backend: str = "nft", rule: str = "drop"
) -> None:
    """Failed with a clear message for a value outside the known cells."""
    for name, val, known in (
        ("ruleset", ruleset, RULESETS),
        ("client", client, CLIENTS),
        ("family", family, FAMILIES),
        ("iptables", backend, BACKENDS),
        ("rule", rule, RULES),
    ):
        if val not in known:
            raise Failed(f"{name} must be one of {', '.join(map(str, known))}, not {val!r}")


def cell_layout(ruleset: str, client: str, family: int, rid: str = "0000000") -> Layout:
    """The addresses and services of a cell; `rid` makes device names unique per run."""
    check_cell(ruleset, client, family)
    a = ADDRS[family]
    k8s = ruleset != "minimal"
    plen = a["plen"]
    leaves = a["pods"] if k8s else a["legacy"]
    names = (
        {"p": "cali3", "r1": "cali1", "r2": "cali2"} if k8s else {"p": "dp", "r1": "d1", "r2": "d2"}
    )
    peer = {"p": "vp", "r1": "vr1", "r2": "vr2"}
    links = {"c": Link("c", f"dc{rid}", f"vc{rid}", a["node"], a["outside"], plen)}
    for leaf in ("p", "r1", "r2"):
        ip, gw = leaves[leaf]
        links[leaf] = Link(leaf, f"{names[leaf]}{rid}", f"{peer[leaf]}{rid}", gw, ip, plen)
    rs = {"rs1": leaves["r1"][0], "rs2": leaves["r2"][0]}
    if k8s:
        cip = a["cluster_ip"]
        services = [
            Service("tcp", cip, CLUSTER_PORT),
            Service("tcp", a["node"], NODE_PORT),
            Service("udp", cip, UDP_PORT),
            Service("udp", a["node"], NODE_PORT_UDP),
        ]
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
    return Layout(
        ruleset=ruleset,
        client=client,
        family=family,
        rid=rid,
        links=links,
        client_ip=client_ip,
        target=target,
        udp_target=udp,
        services=services,
        real_servers=rs,
        rs_port=PORT,
        rs_routes=a["pod_cidr"] if k8s else "default",
        vip_dev="kube-ipvs0" if k8s else "lo",
        vips=vips,
        pod_cidr=a["pod_cidr"] if k8s else None,
        masquerade_demanded=masq,
    )


def ipvsadm_restore(lay: Layout) -> str:
    """`ipvsadm -R` input: every service rr, both real servers, masquerading, weight 1."""
    out = []
    for svc in lay.services:
        out.append(f"-A {svc.ipvsadm()} -s rr")
        rport = lay.rs_port if svc.proto == "tcp" else UDP_PORT
        out += [
            f"-a {svc.ipvsadm()} -r {hostport(ip, rport)} -m -w 1"
            for ip in lay.real_servers.values()
        ]
    return "\n".join(out) + "\n"


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
        c = cls(
            ruleset=plan.get("ruleset", "minimal"),
            backend=plan.get("iptables", "nft"),
            client=plan.get("client", "outside"),
            family=int(plan.get("family", 4)),
            rule=plan.get("rule", "drop"),
        )
        check_cell(c.ruleset, c.client, c.family, c.backend, c.rule)
        return c
