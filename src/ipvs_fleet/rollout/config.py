"""Rollout policy (waves, thresholds, soak, rollback) and the wave plan it gives an inventory.

The policy is data (the collection role's `policy/rollout.yml`):

    waves: [canary, 1, "10%", "50%", "100%"]
    max_fail_percent: 0
    soak_seconds: 0
    rollback_failed_wave: true

A wave entry is a group name (all its hosts not already planned), an integer (that many hosts)
or "N%" (N percent of the hosts left outside the group waves, rounded down, at least 1), the last
entry repeating until every host is planned, as Ansible's `serial`. An entry may also be a
mapping `{hosts: <entry>, max_fail_percent: N, soak_seconds: S}`. Hosts are taken in inventory
order, never at random, so the same inventory always gives the same waves.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError, load_yaml_file
from ipvs_fleet.resources import ROLLOUT, policy_file

DEPLOY_FILE = "deploy.py"
ROLLBACK_FILE = "deploy/rollback.py"
PERCENT_RE = re.compile(r"^(\d{1,3})%$")
GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
TOP_KEYS = {
    "waves", "max_fail_percent", "soak_seconds", "rollback_failed_wave", "deploy", "rollback",
    "rollback_data", "gate", "host_command_timeout_seconds",
}  # fmt: skip
GATE_KEYS = {"checks", "check_args", "timeout_seconds", "latency_hosts", "held_connections"}
MAX_HELD = 1000  # one client process holds them all, each talking every 0.5 s


@dataclass(frozen=True)
class WaveSpec:
    """One entry of the wave list: a group, a host count or a percentage of the rest."""

    kind: str  # group | count | percent
    value: str | int
    max_fail_percent: float | None = None
    soak_seconds: float | None = None

    def __str__(self) -> str:
        return f"{self.value}%" if self.kind == "percent" else str(self.value)


@dataclass(frozen=True)
class Wave:
    """The hosts of one wave, with the thresholds that apply to it."""

    index: int
    spec: str
    hosts: tuple[str, ...]
    max_fail_percent: float
    soak_seconds: float

    @property
    def name(self) -> str:
        return f"wave {self.index} ({self.spec})"

    def passes(self, failed: int) -> bool:
        """Whether `failed` failed hosts stay within this wave's max-fail percentage."""
        return failed * 100 <= self.max_fail_percent * len(self.hosts)


@dataclass(frozen=True)
class GateConfig:
    checks: bool = True  # run the checks (ipvs_fleet.compliance); False: pyinfra verification
    check_args: tuple[str, ...] = ()  # extra pytest args for the checks (e.g. -k expressions)
    timeout_seconds: float = 900
    # Hosts per wave whose latency probe runs (the first N of the wave); None: every host.
    latency_hosts: int | None = None
    # Connections held through a private IPVS service on each host of a wave during its
    # deploy (ipvs_fleet.rollout.held); any broken one fails the host. 0: off.
    held_connections: int = 0


@dataclass(frozen=True)
class RolloutConfig:
    waves: tuple[WaveSpec, ...]
    max_fail_percent: float = 0
    soak_seconds: float = 0
    rollback_failed_wave: bool = True
    deploy: str = DEPLOY_FILE
    rollback: str = ROLLBACK_FILE
    rollback_data: dict[str, str] = field(default_factory=dict)
    gate: GateConfig = GateConfig()
    # Each command of the deploy or rollback on a host (pyinfra's `_timeout`): a host that
    # stays silent longer is failed (timeout), never holding its wave.
    host_command_timeout_seconds: float = 900
    source: str = "<defaults>"


def parse_wave(entry: Any, where: str) -> WaveSpec:
    """One wave entry (scalar or mapping) or ConfigError naming where and why."""
    mfp = soak = None
    if isinstance(entry, dict):
        extra = set(entry) - {"hosts", "max_fail_percent", "soak_seconds"}
        if extra or "hosts" not in entry:
            raise ConfigError(
                f"{where}: a wave mapping needs `hosts` and may have max_fail_percent, "
                f"soak_seconds (got {', '.join(sorted(map(str, entry)))})"
            )
        mfp = _percent(entry.get("max_fail_percent"), f"{where}.max_fail_percent")
        soak = _seconds(entry.get("soak_seconds"), f"{where}.soak_seconds")
        entry = entry["hosts"]
    if isinstance(entry, str) and entry.strip().isdigit():
        entry = int(entry.strip())
    if isinstance(entry, bool):
        raise ConfigError(f"{where}: {entry!r} is not a wave (group, count or 'N%')")
    if isinstance(entry, int):
        if entry < 1:
            raise ConfigError(f"{where}: a host count must be at least 1, got {entry}")
        return WaveSpec("count", entry, mfp, soak)
    if isinstance(entry, str):
        s = entry.strip()
        m = PERCENT_RE.match(s)
        if m:
            pct = int(m.group(1))
            if not 1 <= pct <= 100:
                raise ConfigError(f"{where}: {s!r}: a percentage must be 1%..100%")
            return WaveSpec("percent", pct, mfp, soak)
        if "%" in s or not GROUP_RE.match(s):
            raise ConfigError(
                f"{where}: {s!r} is not a wave: use a group name, a host count or 'N%'"
            )
        return WaveSpec("group", s, mfp, soak)
    raise ConfigError(f"{where}: {entry!r} is not a wave (group, count or 'N%')")


def parse_waves(text: str | Sequence[Any], where: str = "--waves") -> tuple[WaveSpec, ...]:
    """A wave list from the CLI ("canary,1,10%,100%") or from YAML (a list)."""
    items: Sequence[Any] = (
        [p for p in (x.strip() for x in text.split(",")) if p] if isinstance(text, str) else text
    )
    if not items:
        raise ConfigError(f"{where}: no waves given")
    return tuple(parse_wave(e, f"{where}[{i}]") for i, e in enumerate(items))


def _percent(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ConfigError(f"{where}: must be a number 0..100, got {value!r}")
    return float(value)


def _seconds(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: must be a number of seconds >= 0, got {value!r}")
    return float(value)


def load_config(path: Path | str | None = None) -> RolloutConfig:
    """Read and validate the rollout policy; every error names the file and the field."""
    p = Path(path) if path else policy_file(ROLLOUT)
    doc = load_yaml_file(p, "rollout policy")
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: must be a mapping with `waves`")
    extra = set(doc) - TOP_KEYS
    if extra:
        raise ConfigError(
            f"{p}: unknown field(s) {', '.join(sorted(map(str, extra)))} "
            f"(known: {', '.join(sorted(TOP_KEYS))})"
        )
    if not isinstance(doc.get("waves"), list):
        raise ConfigError(f"{p}: waves: must be a list, e.g. [canary, 1, '10%', '100%']")
    rb = doc.get("rollback_failed_wave", True)
    if not isinstance(rb, bool):
        raise ConfigError(f"{p}: rollback_failed_wave: must be true or false")
    rbdata = doc.get("rollback_data") or {}
    if not isinstance(rbdata, dict):
        raise ConfigError(f"{p}: rollback_data: must be a mapping of host data key to value")
    gate_doc = doc.get("gate") or {}
    if not isinstance(gate_doc, dict) or set(gate_doc) - GATE_KEYS:
        unknown = sorted(map(str, set(gate_doc) - GATE_KEYS)) if isinstance(gate_doc, dict) else []
        raise ConfigError(f"{p}: gate: a mapping with keys {', '.join(sorted(GATE_KEYS))}"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))  # fmt: skip
    check_args = gate_doc.get("check_args") or []
    if not isinstance(check_args, list) or not all(isinstance(a, str) for a in check_args):
        raise ConfigError(f"{p}: gate.check_args: must be a list of strings")
    lat = gate_doc.get("latency_hosts", "all")
    if lat != "all" and (isinstance(lat, bool) or not isinstance(lat, int) or lat < 0):
        raise ConfigError(f"{p}: gate.latency_hosts: must be 'all' or a host count >= 0")
    held = gate_doc.get("held_connections", 0)
    if isinstance(held, bool) or not isinstance(held, int) or not 0 <= held <= MAX_HELD:
        raise ConfigError(f"{p}: gate.held_connections: must be a number of connections "
                          f"0..{MAX_HELD} (0: off), got {held!r}")  # fmt: skip
    gate = GateConfig(
        checks=bool(gate_doc.get("checks", True)),
        check_args=tuple(check_args),
        timeout_seconds=_seconds(gate_doc.get("timeout_seconds"), f"{p}: gate.timeout_seconds")
        or 900.0,
        latency_hosts=None if lat == "all" else int(lat),
        held_connections=held,
    )
    for key in ("deploy", "rollback"):
        if key in doc and not isinstance(doc[key], str):
            raise ConfigError(f"{p}: {key}: must be a deploy file path")
    return RolloutConfig(
        waves=parse_waves(doc["waves"], f"{p}: waves"),
        max_fail_percent=_percent(doc.get("max_fail_percent", 0), f"{p}: max_fail_percent")
        or 0.0,
        soak_seconds=_seconds(doc.get("soak_seconds", 0), f"{p}: soak_seconds") or 0.0,
        rollback_failed_wave=rb,
        deploy=doc.get("deploy", DEPLOY_FILE),
        rollback=doc.get("rollback", ROLLBACK_FILE),
        rollback_data={str(k): str(v) for k, v in rbdata.items()},
        gate=gate,
        host_command_timeout_seconds=_seconds(
            doc.get("host_command_timeout_seconds"), f"{p}: host_command_timeout_seconds"
        )
        or 900.0,
        source=str(p),
    )


def plan_waves(
    hosts: Sequence[tuple[str, Sequence[str]]],
    specs: Sequence[WaveSpec],
    *,
    max_fail_percent: float = 0,
    soak_seconds: float = 0,
    known_groups: Collection[str] = (),
) -> list[Wave]:
    """Split inventory hosts [(name, groups)] into waves, deterministically, in inventory order.

    Group entries take their group's hosts first (in wave-list order); counts and percentages
    then cut the remaining hosts, percentages of the number left after the group waves. The
    last entry repeats until every host is in a wave. Raises ConfigError for a group the
    inventory does not have; a group of `known_groups` (the whole inventory's, when `hosts`
    is a --limit of it) with none of `hosts` gives no wave.
    """
    names = [h for h, _ in hosts]
    if len(set(names)) != len(names):
        raise ConfigError("inventory: duplicate host names")
    groups: dict[str, list[str]] = {}
    for name, gs in hosts:
        for g in gs:
            groups.setdefault(g, []).append(name)
    taken: set[str] = set()
    group_hosts: dict[int, list[str]] = {}
    for i, s in enumerate(specs):
        if s.kind != "group":
            continue
        if s.value not in groups and s.value not in names and s.value not in known_groups:
            known = ", ".join(sorted(set(groups) | set(known_groups))) or "none"
            raise ConfigError(f"wave {s.value!r}: no such group in the inventory (groups: {known})")
        v = str(s.value)
        members = groups.get(v, [v] if v in names else [])
        group_hosts[i] = [h for h in members if h not in taken]
        taken.update(group_hosts[i])
    rest = [h for h in names if h not in taken]
    pool = len(rest)

    def size(s: WaveSpec) -> int:
        if s.kind == "count":
            return int(s.value)
        return max(1, pool * int(s.value) // 100)

    waves: list[Wave] = []

    def add(s: WaveSpec, members: list[str]) -> None:
        if not members:
            return
        mfp = s.max_fail_percent if s.max_fail_percent is not None else max_fail_percent
        soak = s.soak_seconds if s.soak_seconds is not None else soak_seconds
        waves.append(Wave(len(waves) + 1, str(s), tuple(members), mfp, soak))

    last: WaveSpec | None = None
    for i, s in enumerate(specs):
        if s.kind == "group":
            add(s, group_hosts[i])
            continue
        last = s
        n = size(s)
        add(s, rest[:n])
        rest = rest[n:]
    if rest:
        if last is None:
            unplanned = ", ".join(rest[:5]) + (" ..." if len(rest) > 5 else "")
            raise ConfigError(
                f"waves {', '.join(map(str, specs))} leave {len(rest)} host(s) out ({unplanned}); "
                "end the list with a count or a percentage, e.g. '100%'"
            )
        while rest:
            n = size(last)
            add(last, rest[:n])
            rest = rest[n:]
    return waves
