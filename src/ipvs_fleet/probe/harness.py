"""Run the reuse scenarios in a lab VM from the controller, and read their results.

The guest side is two standard-library files (probe.py, scenario.py) copied to
`/root/ipvs-probe/`; everything crosses SSH as text: JSON plans in, JSON results out.

>>> g = Guest(Lab(), "k8s-canary")
>>> g.load_modules(load_artifact(Path("artifacts"), g.kernel_release))   # or None for stock
>>> r = g.run_plan(Plan(rule="drop", knob=1, scenarios={"A": 200, "B": 200}))
>>> summarize(r)["A"]
{'count': 200, 'slow': 0, 'errors': 0, 'p50': 4.1, 'p99': 9.8, ...}
"""

from __future__ import annotations

import base64
import json
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipvs_fleet.errors import FleetError

if TYPE_CHECKING:
    from ipvs_fleet.lab.lab import Lab

GUEST_DIR = "/root/ipvs-probe"
HERE = Path(__file__).resolve().parent
GUEST_FILES = ("probe.py", "scenario.py")
SCENARIOS = ("A", "B", "B2", "C1", "C2")
# Scenarios where the stock kernel drops the reconnect's first SYN (DOMAIN.md).
DROP_SCENARIOS = ("A", "B", "B2")


@dataclass
class Plan:
    """One run in the guest: a fresh topology, the scenarios, then teardown.

    + rule: drop (kube-proxy style INVALID drop in FORWARD) or accept
    + knob: net.ipv4.vs.conn_reuse_old_conntrack in the director netns; None leaves it unset
    + scenarios: {name: attempts}, names from SCENARIOS
    + ordinary: that many ordinary short connections (ephemeral ports), 0 for none
    + ftp: a passive FTP transfer through an ip_vs_ftp virtual service
    + conntrack_check: one reuse each of A and B, then the director's conntrack entries
    """

    rule: str = "drop"
    knob: int | None = None
    scenarios: dict[str, int] = field(default_factory=dict)
    ordinary: int = 0
    ftp: bool = False
    conntrack_check: bool = False
    timeout: float = 5.0
    deadline: float = 600.0

    def __post_init__(self) -> None:
        if self.rule not in ("drop", "accept"):
            raise FleetError(f"rule must be drop or accept, not {self.rule!r}")
        if self.knob not in (None, 0, 1):
            raise FleetError(f"knob must be 0 or 1, not {self.knob!r}")
        bad = [s for s in self.scenarios if s not in SCENARIOS]
        if bad:
            raise FleetError(f"unknown scenario {bad[0]!r} (known: {', '.join(SCENARIOS)})")

    def estimate_s(self, slow: bool) -> float:
        """A generous upper bound of the run's duration (for SSH timeouts)."""
        per = 1.2 if slow else 0.1
        n = sum(self.scenarios.values())
        return 60 + n * per + self.ordinary * 0.02 + (30 if self.ftp else 0)


class Guest:
    """One lab VM prepared to run the scenario harness."""

    def __init__(self, lab: Lab, host: str) -> None:
        self.lab, self.host = lab, host
        self._pushed = False
        self.kernel_release = self.sh("uname -r").strip()

    def sh(self, cmd: str, timeout: float = 120, input: str | None = None) -> str:
        return self.lab.run(self.host, cmd, check=True, timeout=timeout, input=input).stdout

    def push(self) -> None:
        """Copy the guest files (idempotent per Guest)."""
        if self._pushed:
            return
        for name in GUEST_FILES:
            self.sh(f"mkdir -p {GUEST_DIR} && cat > {GUEST_DIR}/{name}",
                    input=(HERE / name).read_text())
        self._pushed = True

    def _json(self, cmd: str, timeout: float, input: str | None = None) -> dict[str, Any]:
        self.push()
        r = self.lab.run(self.host, f"cd {GUEST_DIR} && python3 {cmd}", check=False,
                         timeout=timeout, input=input)
        try:
            out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError) as e:
            raise FleetError(f"{self.host}: `{cmd}` exited {r.rc} without a JSON result: "
                             f"{(r.stderr or r.stdout).strip()[-1500:]}") from e
        if "error" in out:
            raise FleetError(f"{self.host}: {cmd}: {out['error']}")
        return out

    def status(self) -> dict[str, Any]:
        return self._json("scenario.py status", 60)

    def load_modules(self, artifact: Any | None) -> dict[str, Any]:
        """Load the stock IPVS modules (artifact None) or the artifact's set, from files.

        Nothing is installed under /lib/modules: the modules are insmod-ed from a copy in
        GUEST_DIR, so the host's boot-time state is left alone.
        + artifact: an `ipvs_fleet.build.artifact.Artifact` for this kernel release
        """
        if artifact is None:
            return self._json("scenario.py modules stock", 120)
        if artifact.kernel_release != self.kernel_release:
            raise FleetError(f"{self.host} runs {self.kernel_release}, the artifact is for "
                             f"{artifact.kernel_release}")
        d = f"{GUEST_DIR}/ko-{artifact.tarball_sha256[:16]}"
        data = base64.b64encode(Path(artifact.tarball).read_bytes()).decode()
        self._untar(d, data)
        st = self._json(f"scenario.py modules {shlex.quote(d)}", 120)
        if not st.get("knob_present"):
            raise FleetError(f"{self.host}: patched modules loaded but the knob is missing")
        return st

    def restore(self, status: dict[str, Any]) -> dict[str, Any]:
        """Reload what `status()` showed before (by modprobe), sysctl.d re-applied."""
        mods = [m for m in status.get("loaded", []) if m != "ip_vs"]
        if status.get("loaded"):
            mods.insert(0, "ip_vs")
        return self._json("scenario.py restore " + " ".join(mods), 120)

    def _untar(self, d: str, data: str) -> str:
        # The tarball's compression is whatever the build chose: let tar detect it.
        return self.sh(f"rm -rf {d} && mkdir -p {d} && base64 -d > {d}.tar && "
                       f"tar -xf {d}.tar -C {d} --no-same-owner && rm {d}.tar && "
                       f"find {d} -name '*.ko' -exec mv -n {{}} {d}/ \\;",
                       input=data, timeout=300)

    def run_plan(self, plan: Plan) -> dict[str, Any]:
        st = self.status()
        slow = not st.get("knob_present") or plan.knob != 1
        timeout = plan.estimate_s(slow) + 120
        plan.deadline = min(plan.deadline, timeout - 60)
        out = self._json("scenario.py run", timeout, input=json.dumps(asdict(plan)))
        out["host"] = self.host
        return out


def summarize(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per scenario (and `ordinary`): count, slow, errors, p50/p99 of the measured connect."""
    rows: dict[str, dict[str, Any]] = {}
    items = dict(result.get("scenarios", {}))
    if "ordinary" in result:
        items["ordinary"] = result["ordinary"]
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
    return rows


def modules_label(result: dict[str, Any]) -> str:
    """`stock`, `patched knob=1`, ... from a run result."""
    m = result.get("modules", {})
    if not m.get("knob_present"):
        return "stock"
    knob = result.get("sysctls", {}).get("conn_reuse_old_conntrack")
    return f"patched knob={knob}"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
