"""The rules a cell applies (pure, standard library only): kube-proxy's IPVS-mode rules and
ipsets, Calico felix's chains, the minimal layout's one conntrack rule, the probe's own
counting rules, and how their counters and the real servers' peers are read back.
"""

from __future__ import annotations

import re
from typing import Any

try:
    from ipvs_fleet.probe import cells, probe
except ImportError:  # on a guest: sibling files, not a package
    import cells  # type: ignore[no-redef]
    import probe  # type: ignore[no-redef]


# --- cells: rules (pure) --------------------------------------------------------------------

BUILTIN = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
}
COUNT_COMMENT = "ipvsp-count-new"  # the probe's own counting rule (no target)
COUNT_NAT_COMMENT = "ipvsp-count-nat"  # the same in nat (Kubernetes rulesets)

# kube-proxy's ipsets (pkg/proxy/ipvs/proxier.go ipsetInfo), in its order.
KUBE_IPSETS = (
    ("KUBE-LOOP-BACK", "hash:ip,port,ip"),
    ("KUBE-CLUSTER-IP", "hash:ip,port"),
    ("KUBE-EXTERNAL-IP", "hash:ip,port"),
    ("KUBE-EXTERNAL-IP-LOCAL", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-FW", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-LOCAL", "hash:ip,port"),
    ("KUBE-LOAD-BALANCER-SOURCE-IP", "hash:ip,port,ip"),
    ("KUBE-LOAD-BALANCER-SOURCE-CIDR", "hash:ip,port,net"),
    ("KUBE-NODE-PORT-TCP", "bitmap:port"),
    ("KUBE-NODE-PORT-LOCAL-TCP", "bitmap:port"),
    ("KUBE-NODE-PORT-UDP", "bitmap:port"),
    ("KUBE-NODE-PORT-LOCAL-UDP", "bitmap:port"),
    ("KUBE-NODE-PORT-SCTP-HASH", "hash:ip,port"),
    ("KUBE-NODE-PORT-LOCAL-SCTP-HASH", "hash:ip,port"),
    ("KUBE-HEALTH-CHECK-NODE-PORT", "bitmap:port"),
    ("KUBE-IPVS-IPS", "hash:ip"),
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


def ipset_restore(lay: cells.Layout) -> str:
    """`ipset restore` input for the director: kube-proxy's sets (and Calico's), filled."""
    if not lay.k8s:
        return ""
    fam = lay.family
    inet = "inet6" if fam == 6 else "inet"
    out = []
    for name, typ in KUBE_IPSETS:
        opts = (
            "range 0-65535"
            if typ == "bitmap:port"
            else f"family {inet} hashsize 1024 maxelem 65536"
        )
        out.append(f"create {kube_set(name, fam)} {typ} {opts}")
    entries = {
        "KUBE-CLUSTER-IP": [],
        "KUBE-NODE-PORT-TCP": [str(cells.NODE_PORT)],
        "KUBE-NODE-PORT-UDP": [str(cells.NODE_PORT_UDP)],
        "KUBE-IPVS-IPS": list(lay.vips),
        "KUBE-LOOP-BACK": [],
    }
    for svc in lay.services:
        if svc.vip in lay.vips:
            entries["KUBE-CLUSTER-IP"].append(f"{svc.vip},{svc.proto}:{svc.port}")
    for ip in lay.real_servers.values():  # hairpin entries of the node's own endpoints
        entries["KUBE-LOOP-BACK"] += [
            f"{ip},tcp:{lay.rs_port},{ip}",
            f"{ip},udp:{cells.UDP_PORT},{ip}",
        ]
    for name, vals in entries.items():
        out += [f"add {kube_set(name, fam)} {v}" for v in vals]
    if lay.ruleset == "calico":
        this_host = [ln.node_ip for ln in lay.links.values()]  # kube-ipvs0 is excluded
        out.append(
            f"create {cali_set('this-host', fam)} hash:ip family {inet} "
            "hashsize 1024 maxelem 1048576"
        )
        out += [f"add {cali_set('this-host', fam)} {ip}" for ip in this_host]
        for pools in ("masq-ipam-pools", "all-ipam-pools"):
            out.append(
                f"create {cali_set(pools, fam)} hash:net family {inet} "
                "hashsize 1024 maxelem 1048576"
            )
            out.append(f"add {cali_set(pools, fam)} {lay.pod_cidr}")
    return "\n".join(out) + "\n"


def vanish_rules(table: str = "filter", chain: str = "OUTPUT") -> list[str]:
    """Drop FIN/RST of sockets marked VANISH_MARK: the client vanishes without a word."""
    m = _hex(cells.VANISH_MARK)
    return [
        f"-A {chain} -p tcp -m tcp --tcp-flags RST RST -m mark --mark {m} -j DROP",
        f"-A {chain} -p tcp -m tcp --tcp-flags FIN FIN -m mark --mark {m} -j DROP",
    ]


def client_rules(lay: cells.Layout) -> str:
    """The client netns' rules (outside and pod clients; the host client's are the node's)."""
    t = Tables()
    t.add("filter", *vanish_rules())
    return t.render()


def count_rule(lay: cells.Layout) -> str:
    """A rule without target counting NEW TCP connections to the client's service."""
    return f"{_to_target(lay)} -m conntrack --ctstate NEW -m comment --comment {COUNT_COMMENT}"


def nat_count_rule(lay: cells.Layout) -> str:
    """The same in nat, whose rules see only a connection's first packet (an entry without
    a NAT binding yet): where kube-proxy marks for masquerade. A reconnect that reuses the
    old entry (the 1.x re-track design) is never counted here."""
    return f"{_to_target(lay)} -m comment --comment {COUNT_NAT_COMMENT}"


def _to_target(lay: cells.Layout) -> str:
    chain = "OUTPUT" if lay.client == "host" else "PREROUTING"
    hl = cells.ADDRS[lay.family]["host_len"]
    return f"-A {chain} -d {lay.target.vip}/{hl} -p tcp -m tcp --dport {lay.target.port}"


def director_rules(lay: cells.Layout, rule: str = "drop") -> str:
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
        t.add(
            "filter",
            "-A FORWARD -m conntrack --ctstate INVALID -j "
            + ("DROP" if rule == "drop" else "ACCEPT"),
        )
        return t.render()
    t.add("nat", nat_count_rule(lay))
    if lay.ruleset == "calico":
        _calico_jumps(t)
    _kube_proxy(t, lay, rule)
    if lay.ruleset == "calico":
        _calico_chains(t, lay)
    return t.render()


def _kube_proxy(t: Tables, lay: cells.Layout, rule: str) -> None:
    """kube-proxy IPVS mode (pkg/proxy/ipvs/proxier.go: createAndLinkKubeChain,
    writeIptablesRules, acceptIPVSTraffic) for the services of `lay`."""
    fam = lay.family
    S = lambda n: kube_set(n, fam)  # noqa: E731
    t.chain(
        "nat",
        "KUBE-SERVICES",
        "KUBE-POSTROUTING",
        "KUBE-NODE-PORT",
        "KUBE-LOAD-BALANCER",
        "KUBE-MARK-MASQ",
    )
    t.chain(
        "filter",
        "KUBE-FORWARD",
        "KUBE-NODE-PORT",
        "KUBE-PROXY-FIREWALL",
        "KUBE-SOURCE-RANGES-FIREWALL",
        "KUBE-IPVS-FILTER",
        "KUBE-IPVS-OUT-FILTER",
    )
    # iptablesJumpChain, each prepended in list order (so later ones end up first)
    t.add(
        "nat",
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
    )
    t.add(
        "filter",
        '-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
        '-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
        '-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT',
        '-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        '-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER',
    )
    # writeIptablesRules
    t.add("nat", f"-A KUBE-SERVICES -s {cells.ADDRS[fam]['loopback']} -j RETURN")
    t.add(
        "nat",  # ipsetWithIptablesChain, non-empty sets only
        '-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source '
        f'ip for solving hairpin purpose" -m set --match-set {S("KUBE-LOOP-BACK")} '
        "dst,dst,src -j MASQUERADE",
        '-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for '
        f'masquerade purpose" -m set --match-set {S("KUBE-NODE-PORT-TCP")} dst '
        "-j KUBE-MARK-MASQ",
        '-A KUBE-NODE-PORT -p udp -m comment --comment "Kubernetes nodeport UDP port for '
        f'masquerade purpose" -m set --match-set {S("KUBE-NODE-PORT-UDP")} dst '
        "-j KUBE-MARK-MASQ",
    )
    not_local = "" if lay.ruleset == "kube-proxy-masq-all" else f" ! -s {lay.pod_cidr}"
    t.add(
        "nat",
        '-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for '
        f'masquerade purpose" -m set --match-set {S("KUBE-CLUSTER-IP")} dst,dst{not_local} '
        "-j KUBE-MARK-MASQ",
        "-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT",
        "-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ",
    )
    t.add("filter", "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP")
    t.add("nat", f"-A KUBE-SERVICES -m set --match-set {S('KUBE-CLUSTER-IP')} dst,dst -j ACCEPT")
    if rule == "drop":  # the iptables proxier's rule when nf_conntrack_tcp_be_liberal=0
        t.add("filter", "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP")
    t.add(
        "filter",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {cells.MASQ_MARK}/{cells.MASQ_MARK} -j ACCEPT",
        '-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        '-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" '
        f"-m set --match-set {S('KUBE-HEALTH-CHECK-NODE-PORT')} dst -j ACCEPT",
    )
    for name, match in (
        ("KUBE-LOAD-BALANCER", "dst,dst"),
        ("KUBE-CLUSTER-IP", "dst,dst"),
        ("KUBE-EXTERNAL-IP", "dst,dst"),
        ("KUBE-EXTERNAL-IP-LOCAL", "dst,dst"),
        ("KUBE-HEALTH-CHECK-NODE-PORT", "dst"),
    ):
        t.add("filter", f"-A KUBE-IPVS-FILTER -m set --match-set {S(name)} {match} -j RETURN")
    t.add(
        "filter",
        "-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW "
        f"-m set --match-set {S('KUBE-IPVS-IPS')} dst -j REJECT",
    )
    t.add(
        "nat",
        f"-A KUBE-POSTROUTING -m mark ! --mark {cells.MASQ_MARK}/{cells.MASQ_MARK} -j RETURN",
        f"-A KUBE-POSTROUTING -j MARK --xor-mark {cells.MASQ_MARK}",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring '
        'SNAT" -j MASQUERADE --random-fully',
        f"-A KUBE-MARK-MASQ -j MARK --or-mark {cells.MASQ_MARK}",
    )


def _calico_jumps(t: Tables) -> None:
    """felix's jumps into its chains, at the top of the built-in chains."""
    for table, chains in (
        ("raw", ("PREROUTING", "OUTPUT")),
        ("mangle", ("PREROUTING", "POSTROUTING")),
        ("nat", ("PREROUTING", "OUTPUT", "POSTROUTING")),
        ("filter", ("INPUT", "FORWARD", "OUTPUT")),
    ):
        for c in chains:
            t.chain(table, f"cali-{c}")
            t.add(table, f"-A {c} -j cali-{c}")


def _mark(v: int, mask: int) -> str:
    return f"-m mark --mark {_hex(v)}/{_hex(mask)}"


def _set_mark(v: int, mask: int) -> str:
    return f"-j MARK --set-xmark {_hex(v)}/{_hex(mask)}"


def _calico_chains(t: Tables, lay: cells.Layout) -> None:
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
    t.add(
        "raw",
        f"-A cali-PREROUTING {_set_mark(0, CALI_ALL)}",
        f"-A cali-PREROUTING -i cali+ {_set_mark(CALI_SCRATCH0, CALI_SCRATCH0)}",
        f"-A cali-PREROUTING {_mark(0, CALI_SCRATCH0)} -j cali-from-host-endpoint",
        f"-A cali-PREROUTING {_mark(A, A)} -j ACCEPT",
        f"-A cali-OUTPUT {_set_mark(0, CALI_ALL)}",
        "-A cali-OUTPUT -j cali-to-host-endpoint",
        f"-A cali-OUTPUT {_mark(A, A)} -j ACCEPT",
    )
    # mangle
    t.chain("mangle", "cali-from-host-endpoint", "cali-to-host-endpoint")
    t.add(
        "mangle",
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
        f"{_mark(A, A)} -j RETURN",
    )
    # nat
    t.chain("nat", "cali-fip-dnat", "cali-fip-snat", "cali-nat-outgoing")
    t.add(
        "nat",
        "-A cali-PREROUTING -j cali-fip-dnat",
        "-A cali-OUTPUT -j cali-fip-dnat",
        "-A cali-POSTROUTING -j cali-fip-snat",
        "-A cali-POSTROUTING -j cali-nat-outgoing",
        f"-A cali-nat-outgoing -m set --match-set {cali_set('masq-ipam-pools', fam)} src "
        f"-m set ! --match-set {cali_set('all-ipam-pools', fam)} dst "
        "-j MASQUERADE --random-fully",
    )
    # filter
    t.chain(
        "filter",
        "cali-forward-check",
        "cali-set-endpoint-mark",
        "cali-forward-endpoint-mark",
        "cali-from-endpoint-mark",
        "cali-wl-to-host",
        "cali-from-wl-dispatch",
        "cali-to-wl-dispatch",
        "cali-from-host-endpoint",
        "cali-to-host-endpoint",
        "cali-from-hep-forward",
        "cali-to-hep-forward",
        "cali-cidr-block",
        "cali-pro-kns.default",
        "cali-pi-default.allow-svc",
    )
    t.add(
        "filter",
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
        "-A cali-forward-check -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
    )
    for proto in ("tcp", "udp"):
        t.add(
            "filter",
            f"-A cali-forward-check -p {proto} -m comment --comment "
            '"To kubernetes NodePort service" -m multiport --dports 30000:32767 '
            f"-m set --match-set {this_host} dst -g cali-set-endpoint-mark",
        )
    t.add(
        "filter",
        '-A cali-forward-check -m comment --comment "To kubernetes service" '
        f"-m set ! --match-set {this_host} dst -j cali-set-endpoint-mark",
    )
    for leaf, dev in sorted(wl.items()):
        t.chain("filter", f"cali-sm-{dev}", f"cali-fw-{dev}", f"cali-tw-{dev}")
        t.add(
            "filter",
            f"-A cali-set-endpoint-mark -i {dev} -g cali-sm-{dev}",
            f"-A cali-sm-{dev} {_set_mark(ep_mark[leaf], EP)}",
        )
    t.add(
        "filter",
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
        "-j ACCEPT",
    )
    for leaf, dev in sorted(wl.items()):
        t.add(
            "filter",
            f"-A cali-from-endpoint-mark {_mark(ep_mark[leaf], EP)} -g cali-fw-{dev}",
            f"-A cali-from-wl-dispatch -i {dev} -g cali-fw-{dev}",
            f"-A cali-to-wl-dispatch -o {dev} -g cali-tw-{dev}",
        )
    for chain in ("cali-from-endpoint-mark", "cali-from-wl-dispatch", "cali-to-wl-dispatch"):
        t.add("filter", f'-A {chain} -m comment --comment "Unknown interface" -j DROP')
    for leaf, dev in sorted(wl.items()):
        conntrack = [
            f"-A {{}}-{dev} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
            f"-A {{}}-{dev} -m conntrack --ctstate INVALID -j DROP",
            f"-A {{}}-{dev} {_set_mark(0, A)}",
        ]
        t.add(
            "filter",
            *(r.format("cali-fw") for r in conntrack),
            f"-A cali-fw-{dev} -j cali-pro-kns.default",
            f'-A cali-fw-{dev} -m comment --comment "Return if profile accepted" '
            f"{_mark(A, A)} -j RETURN",
            f'-A cali-fw-{dev} -m comment --comment "Drop if no profiles matched" -j DROP',
        )
        t.add("filter", *(r.format("cali-tw") for r in conntrack))
        if leaf == "p":  # the client pod: no policy selects it, its profile allows
            t.add(
                "filter",
                f"-A cali-tw-{dev} -j cali-pro-kns.default",
                f'-A cali-tw-{dev} -m comment --comment "Return if profile accepted" '
                f"{_mark(A, A)} -j RETURN",
                f'-A cali-tw-{dev} -m comment --comment "Drop if no profiles matched" -j DROP',
            )
            continue
        t.add(
            "filter",
            f'-A cali-tw-{dev} -m comment --comment "Start of policies" {_set_mark(0, CALI_PASS)}',
            f"-A cali-tw-{dev} {_mark(0, CALI_PASS)} -j cali-pi-default.allow-svc",
            f'-A cali-tw-{dev} -m comment --comment "Return if policy accepted" '
            f"{_mark(A, A)} -j RETURN",
            f'-A cali-tw-{dev} -m comment --comment "Drop if no policies passed packet" -j DROP',
        )
    t.add(
        "filter",
        f"-A cali-pro-kns.default {_set_mark(A, A)}",
        f"-A cali-pro-kns.default {_mark(A, A)} -j RETURN",
        f"-A cali-pi-default.allow-svc -p tcp -m multiport --dports {lay.rs_port} "
        f"{_set_mark(A, A)}",
        f"-A cali-pi-default.allow-svc -p udp -m multiport --dports {cells.UDP_PORT} "
        f"{_set_mark(A, A)}",
        f"-A cali-pi-default.allow-svc {_mark(A, A)} -j RETURN",
        # StaticFilterForwardAppendRules: at the end of FORWARD, after kube-proxy's jumps
        '-A FORWARD -m comment --comment "Policy explicitly accepted packet." '
        f"{_mark(A, A)} -j ACCEPT",
        f"-A FORWARD {_set_mark(A, A)}",
    )


# --- rule counters (pure) -------------------------------------------------------------------

# name -> [(table, chain or "prefix*", substrings of the saved rule)], summed
CounterSpecs = dict[str, list[tuple[str, str, tuple[str, ...]]]]


def counter_specs(lay: cells.Layout) -> CounterSpecs:
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
        specs["calico_policy_drop"] = [
            ("filter", "cali-*", ("Drop if no", "-j DROP")),
            ("filter", "cali-*", ("Unknown", "-j DROP")),
        ]
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


def peer_summary(lay: cells.Layout, attempts: list[probe.Attempt]) -> dict[str, Any]:
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
