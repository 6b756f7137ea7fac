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

This file is the guest's command line; the work is in its siblings, each standard library
only (`ipvs_fleet.probe.GUEST_FILES` lists them; every copier ships that list): cells.py (the
cell model and layouts), rules.py (kube-proxy's, Calico's and the minimal rules, their
counters), kernel.py (netns, IPVS sockopt/netlink, conntrack, kmsg), modules.py (module
loading), topology.py (namespaces, veths, sysctls, IPVS services, servers), scenarios.py (the
scenarios and `run_plan`), probe.py (connect and serve).
"""

from __future__ import annotations

import json
import sys

try:
    from ipvs_fleet.probe import cells, modules, rules, scenarios
except ImportError:  # on a guest: sibling files, not a package
    import cells  # type: ignore[no-redef]
    import modules  # type: ignore[no-redef]
    import rules  # type: ignore[no-redef]
    import scenarios  # type: ignore[no-redef]


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "run":
        plan = json.load(sys.stdin)
        try:
            result = scenarios.run_plan(plan)
        except cells.Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        print(json.dumps(result))
        return 0
    if len(argv) == 2 and argv[0] == "modules":
        try:
            print(json.dumps(modules.load_modules(argv[1])))
        except cells.Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        return 0
    if len(argv) >= 1 and argv[0] == "restore":
        try:
            print(json.dumps(modules.restore_modules(argv[1:])))
        except cells.Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        return 0
    if argv == ["status"]:
        print(json.dumps(modules.module_status()))
        return 0
    if len(argv) >= 2 and argv[0] == "rules":  # print a cell's rules (no side effects)
        cell = cells.Cell.from_plan(json.loads(argv[1]))
        lay = cells.cell_layout(cell.ruleset, cell.client, cell.family)
        print(
            rules.ipset_restore(lay)
            + rules.director_rules(lay, cell.rule)
            + cells.ipvsadm_restore(lay)
        )
        return 0
    print(
        "usage: scenario.py run < plan.json | modules stock|DIR | restore [MODULE...] | "
        "status | rules PLAN_JSON",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
