"""Run the reuse scenarios in a lab VM from the controller, and read their results.

The guest side is the standard-library files `ipvs_fleet.probe.GUEST_FILES` copied to
`/root/ipvs-probe/` (entry point scenario.py); everything crosses SSH as text: JSON plans
in, JSON results out.

>>> g = Guest(Lab(), "k8s-canary")
>>> g.load_modules(load_artifact(Path("artifacts"), g.kernel_release))   # or None for stock
>>> r = g.run_plan(Plan(rule="drop", knob=1, scenarios={"A": 200, "B": 200}))
>>> summarize(r)["A"]
{'count': 200, 'slow': 0, 'errors': 0, 'p50': 4.1, 'p99': 9.8, 'killed_tcp': 200, ...}

Loading the artifact puts its fix module (ip_vs_reuse.ko) on top of the kernel's own IPVS
modules; loading stock removes it again. Neither unloads IPVS (modules.load_modules).
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipvs_fleet.errors import FleetError
from ipvs_fleet.probe import GUEST_FILES, cells
from ipvs_fleet.probe.cells import BACKENDS, CLIENTS, FAMILIES, RULESETS

if TYPE_CHECKING:
    from ipvs_fleet.lab.lab import Lab

GUEST_DIR = "/root/ipvs-probe"
HERE = Path(__file__).resolve().parent
ALL_SCENARIOS = cells.SCENARIOS  # U: the UDP scenario, only when a plan names it
SCENARIOS = tuple(s for s in ALL_SCENARIOS if s != "U")  # TCP ones (bench/ iterates these)
# Scenarios where the stock kernel drops the reconnect's first SYN (DOMAIN.md).
DROP_SCENARIOS = ("A", "B", "B2")


@dataclass
class Plan:
    """One run in the guest: a fresh topology, the scenarios, then teardown.

    + rule: drop or accept: what happens to conntrack-INVALID packets. ruleset minimal: the
      one FORWARD rule `-m conntrack --ctstate INVALID -j DROP|ACCEPT`; Kubernetes rulesets:
      drop adds `-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP` (what kube-proxy's
      iptables proxier writes when nf_conntrack_tcp_be_liberal is 0), accept leaves it out
    + knob: net.ipv4.vs.conn_reuse_old_conntrack in the director netns; None leaves it unset
    + scenarios: {name: attempts}, names from ALL_SCENARIOS (U: the UDP scenario)
    + ordinary: that many ordinary short connections (ephemeral ports), 0 for none
    + ftp: a passive FTP transfer through an ip_vs_ftp virtual service (minimal, IPv4 only)
    + conntrack_check: one reuse each of A and B, then the director's conntrack entries
    + ruleset: minimal (one FORWARD rule, VIP on lo), kube-proxy (kube-proxy IPVS mode as
      it writes its rules: ipsets, kube-ipvs0, mark-based masquerade), kube-proxy-masq-all
      (the same with --masquerade-all), calico (kube-proxy plus felix's IPVS-mode chains)
    + iptables: nft or legacy: which iptables binaries write the director's rules
    + client: outside (a client netns to the NodePort on the node's address), pod (a pod
      netns on the node to the ClusterIP), host (a socket in the node netns itself to the
      ClusterIP: IPVS's LOCAL_OUT path); under the minimal ruleset all three use the VIP
    + family: 4 or 6
    + settle: seconds between B/B2/U's real-server edit and the measured packet (0: at once).
      On 5.9+ kernels with expire_nodest_conn=1 deleting a real server queues work that
      flushes its connections (and their conntrack entries) within milliseconds: B2 and U
      see the stock drop only while racing it (settle 0); kube-proxy deletes endpoints long
      before a client's next packet, which `settle` of a few tenths of a second models
    + ipvs_sysctls: more net.ipv4.vs sysctls of the director netns, {name: int} (e.g.
      conn_lfactor, whose growth points race a reuse on 7.2: bench/resize_race.py)
    + hold_flush: B2 and U delete the server with `expire_nodest_conn` 0 around the
      deletion, so no flush is queued and the measured packet meets the old connection every
      time (racing it, the outcome depends on the host's load under TCG and the kernel's
      flush, see tests/lab/test_reuse.py); the result counts `old_conn_met` per attempt
    """

    rule: str = "drop"
    knob: int | None = None
    scenarios: dict[str, int] = field(default_factory=dict)
    ordinary: int = 0
    ftp: bool = False
    conntrack_check: bool = False
    timeout: float = 5.0
    deadline: float = 600.0
    ruleset: str = "minimal"
    iptables: str = "nft"
    client: str = "outside"
    family: int = 4
    settle: float = 0.0
    hold_flush: bool = False
    ipvs_sysctls: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in ("drop", "accept"):
            raise FleetError(f"rule must be drop or accept, not {self.rule!r}")
        if self.knob not in (None, 0, 1):
            raise FleetError(f"knob must be 0 or 1, not {self.knob!r}")
        bad = [s for s in self.scenarios if s not in ALL_SCENARIOS]
        if bad:
            raise FleetError(f"unknown scenario {bad[0]!r} (known: {', '.join(ALL_SCENARIOS)})")
        for name, val, known in (
            ("ruleset", self.ruleset, RULESETS),
            ("iptables", self.iptables, BACKENDS),
            ("client", self.client, CLIENTS),
            ("family", self.family, FAMILIES),
        ):
            if val not in known:
                raise FleetError(f"{name} must be one of {', '.join(map(str, known))}, not {val!r}")
        if self.ftp and (self.ruleset, self.family, self.client) != ("minimal", 4, "outside"):
            raise FleetError(
                "ftp runs only with ruleset minimal, family 4, client outside "
                f"(not {self.ruleset}, {self.family}, {self.client})"
            )
        for k, v in self.ipvs_sysctls.items():
            if not re.fullmatch(r"[a-z][a-z_]{0,39}", k) or k == "conn_reuse_old_conntrack":
                raise FleetError(
                    f"ipvs_sysctls: {k!r} is not an IPVS sysctl name here "
                    "(the knob has its own setting, --knob)"
                )
            if not isinstance(v, int) or isinstance(v, bool):
                raise FleetError(f"ipvs_sysctls: {k} must be an integer, not {v!r}")
        if not 0 <= self.settle <= 30:
            raise FleetError(f"settle must be 0..30 seconds, not {self.settle!r}")
        neg = [s for s, n in self.scenarios.items() if not isinstance(n, int) or n < 0]
        if neg:
            raise FleetError(
                f"scenario {neg[0]}: attempts must be a count >= 0, not {self.scenarios[neg[0]]!r}"
            )

    @property
    def masquerade_demanded(self) -> bool:
        """Whether the ruleset masquerades this client's connections (the real server then
        sees the node's address): outside->NodePort and host->ClusterIP under kube-proxy,
        every client under --masquerade-all, never under the minimal ruleset."""
        if self.ruleset == "minimal":
            return False
        return self.client != "pod" or self.ruleset == "kube-proxy-masq-all"

    def estimate_s(self, slow: bool) -> float:
        """A generous upper bound of the run's duration (for SSH timeouts).

        + slow: reconnects may wait for the SYN retransmission (stock modules, knob 0)
        """
        per = 1.2 if slow else 0.1
        tcp = sum(n for s, n in self.scenarios.items() if s != "U")
        udp = self.scenarios.get("U", 0)
        edits = self.scenarios.get("B", 0) + self.scenarios.get("B2", 0) + udp
        setup = 60 if self.ruleset == "minimal" else 90  # ipsets, 4 tables, 2 backends
        per_scenario = 5 * len(self.scenarios)  # rule counters read before and after
        return (
            setup
            + per_scenario
            + tcp * per
            + udp * (2 * 1.0 + 0.5)
            + edits * self.settle
            + self.ordinary * 0.02
            + (30 if self.ftp else 0)
            + (2 * (self.timeout + 5) if self.conntrack_check else 0)
        )


class Guest:
    """One lab VM prepared to run the scenario harness."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.lab, self.host = lab, host
        self._pushed = False
        self._unpacked: set[str] = set()  # artifact folders already in GUEST_DIR
        self.kernel_release = self.sh("uname -r").strip()

    def sh(self, cmd: str, timeout: float = 120, input: str | None = None) -> str:
        return self.lab.run(self.host, cmd, check=True, timeout=timeout, input=input).stdout

    def push(self) -> None:
        """Copy the guest files (idempotent per Guest)."""
        if self._pushed:
            return
        for name in GUEST_FILES:
            self.sh(
                f"mkdir -p {GUEST_DIR} && cat > {GUEST_DIR}/{name}", input=(HERE / name).read_text()
            )
        self._pushed = True

    def _json(self, cmd: str, timeout: float, input: str | None = None) -> dict[str, Any]:
        self.push()
        r = self.lab.run(
            self.host, f"cd {GUEST_DIR} && python3 {cmd}", check=False, timeout=timeout, input=input
        )
        try:
            out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise FleetError(
                f"{self.host}: `{cmd}` exited {r.rc} without a JSON result: "
                f"{(r.stderr or r.stdout).strip()[-1500:]}"
            ) from e
        if "error" in out:
            raise FleetError(f"{self.host}: {cmd}: {out['error']}")
        return out

    def status(self) -> dict[str, Any]:
        return self._json("scenario.py status", 60)

    def load_modules(self, artifact: Any | None, knob: bool = True) -> dict[str, Any]:
        """The stock IPVS modules (artifact None), or the artifact's fix module on top of them.

        Switching is rmmod / insmod of ip_vs_reuse: IPVS stays loaded. Nothing is installed
        under /lib/modules: the module is insmod-ed from a copy in GUEST_DIR, so the host's
        boot-time state is left alone.
        + artifact: an `ipvs_fleet.build.artifact.Artifact` for this kernel release (the
          test-only `upstream` variant, a patched ip_vs set, replaces the whole stack)
        + knob: the artifact is the fix module: it must be loaded afterwards, with the
          artifact's set id (False for the `upstream` variant, whose switch is bit 3 of
          conn_reuse_mode)
        """
        if artifact is None:
            return self._json("scenario.py modules stock", 120)
        if artifact.kernel_release != self.kernel_release:
            raise FleetError(
                f"{self.host} runs {self.kernel_release}, the artifact is for "
                f"{artifact.kernel_release}"
            )
        d = f"{GUEST_DIR}/ko-{artifact.tarball_sha256[:16]}"
        if d not in self._unpacked:  # alternating rounds load the same artifact again
            data = base64.b64encode(Path(artifact.tarball).read_bytes()).decode()
            self._untar(d, data)
            self._unpacked.add(d)
        st = self._json(f"scenario.py modules {shlex.quote(d)}", 120)
        if knob:
            check_fix_loaded(self.host, st, artifact.set_id)
        return st

    def restore(self, status: dict[str, Any]) -> dict[str, Any]:
        """Back to what `status()` showed before: those modules, each the build modprobe
        picks (IPVS stays loaded unless a loaded build is not the host's), sysctl.d
        re-applied."""
        mods = [m for m in status.get("loaded", []) if m != "ip_vs"]
        if status.get("loaded"):
            mods.insert(0, "ip_vs")
        return self._json("scenario.py restore " + " ".join(mods), 120)

    def _untar(self, d: str, data: str) -> str:
        # The tarball's compression is whatever the build chose: let tar detect it.
        return self.sh(
            f"rm -rf {d} && mkdir -p {d} && base64 -d > {d}.tar && "
            f"tar -xf {d}.tar -C {d} --no-same-owner && rm {d}.tar && "
            f"find {d} -name '*.ko' -exec mv -n {{}} {d}/ \\;",
            input=data,
            timeout=300,
        )

    def run_plan(self, plan: Plan) -> dict[str, Any]:
        st = self.status()
        slow = not st.get("knob_present") or plan.knob != 1
        timeout = plan.estimate_s(slow) + 120
        plan.deadline = min(plan.deadline, timeout - 60)
        out = self._json("scenario.py run", timeout, input=json.dumps(asdict(plan)))
        out["host"] = self.host
        return out


def check_fix_loaded(host: str, status: dict[str, Any], set_id: str) -> None:
    """FleetError unless `status` (scenario.module_status) shows the fix module the probe
    loaded, of set `set_id`."""
    rec = status.get("loaded_by_probe") or {}
    if not status.get("knob_present") or rec.get("module") != "ip_vs_reuse":
        raise FleetError(
            f"{host}: the fix module ip_vs_reuse is not loaded after loading it "
            f"(loaded: {', '.join(status.get('loaded', [])) or 'nothing'})"
        )
    if rec.get("set_id") != set_id:
        raise FleetError(
            f"{host}: ip_vs_reuse loaded is of set {rec.get('set_id')}, the artifact's is {set_id}"
        )


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per scenario (and `ordinary`): count, slow, errors, p50/p99 of the measured connect.

    Also, where the run has them: killed_tcp / killed_udp (stale conntrack entries the fix
    module killed; None without it), old_conn_met (attempts whose old IPVS connection was
    there to meet), new_conns (NEW connections to the service counted in the director's
    mangle table: 2 per attempt when the reconnect crossed the hooks as NEW), nat_new (the
    same counted in nat, Kubernetes rulesets), rule_counters, peer_sources {address the real
    server saw: count}, masq (whether the cell's ruleset masquerades this client),
    masq_mismatch (answers whose source address does not fit that), and for U the datagrams
    answered.
    """
    rows: dict[str, dict[str, Any]] = {}
    items = dict(result.get("scenarios", {}))
    if "ordinary" in result:
        items["ordinary"] = result["ordinary"]
    masq = result.get("cell", {}).get("masquerade_demanded")
    for name, r in items.items():
        rows[name] = {
            "count": r["count"],
            "slow": r["slow"],
            "errors": r["errors"],
            "setup_errors": r.get("setup_errors", 0),
            "p50": r["latency_ms"]["p50"],
            "p99": r["latency_ms"]["p99"],
            "max": r["latency_ms"]["max"],
            "live": r.get("answered_by_live", r["ok"]),
            "moved": r.get("moved"),
            "syn_retrans": r.get("syn_retrans_delta"),
        }
        if "killed_tcp" in r:
            rows[name].update(killed_tcp=r["killed_tcp"], killed_udp=r.get("killed_udp"))
        if r.get("old_conn_met") is not None:
            rows[name]["old_conn_met"] = r["old_conn_met"]
        if "peer_sources" in r:
            rows[name].update(
                new_conns=r.get("new_conns"),
                nat_new=(r.get("rule_counters") or {}).get("nat_new"),
                rule_counters=r.get("rule_counters"),
                peer_sources=r["peer_sources"],
                masq=masq,
                masq_mismatch=r.get("masq_mismatch"),
            )
        if name == "U":
            rows[name].update(
                second_answered=r.get("second_answered"),
                third_answered=r.get("third_answered"),
                answered_by_deleted=r.get("answered_by_deleted"),
            )
    return rows


def cell_label(result: dict[str, Any]) -> str:
    """`kube-proxy/nft outside v4 INVALID-drop` from a run result (minimal runs: the rule)."""
    c = result.get("cell") or {}
    rule = f"INVALID-{result.get('plan', {}).get('rule', 'drop')}"
    if not c:
        return rule
    return f"{c['ruleset']}/{c['backend']} {c['client']} v{c['family']} {rule}"


def modules_label(result: dict[str, Any]) -> str:
    """`stock`, `ip_vs_reuse knob=1`, ... from a run result."""
    m = result.get("modules", {})
    if not m.get("knob_present"):
        return "stock"
    knob = result.get("sysctls", {}).get("conn_reuse_old_conntrack")
    return f"ip_vs_reuse knob={knob}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
