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

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator

from ipvs_fleet.errors import ConfigError, load_yaml_file
from ipvs_fleet.resources import ROLLOUT, policy_file
from ipvs_fleet.validation import StrictModel, shown, validated

DEPLOY_FILE = "deploy.py"
ROLLBACK_FILE = "deploy/rollback.py"
PERCENT_RE = re.compile(r"^(\d{1,3})%$")
GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
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


def wave_spec(entry: Any) -> WaveSpec:
    """One wave entry (scalar or mapping), or ValueError saying why (a model's validator)."""
    mfp = soak = None
    if isinstance(entry, dict):
        extra = set(entry) - {"hosts", "max_fail_percent", "soak_seconds"}
        if extra or "hosts" not in entry:
            raise ValueError(
                "a wave mapping needs `hosts` and may have max_fail_percent, "
                f"soak_seconds (got {', '.join(sorted(map(str, entry)))})"
            )
        mfp = _percent(entry.get("max_fail_percent"), "max_fail_percent: ")
        soak = _seconds(entry.get("soak_seconds"), "soak_seconds: ")
        entry = entry["hosts"]
    if isinstance(entry, str) and entry.strip().isdigit():
        entry = int(entry.strip())
    if isinstance(entry, bool):
        raise ValueError(f"{entry!r} is not a wave (group, count or 'N%')")
    if isinstance(entry, int):
        if entry < 1:
            raise ValueError(f"a host count must be at least 1, got {entry}")
        return WaveSpec("count", entry, mfp, soak)
    if isinstance(entry, str):
        s = entry.strip()
        m = PERCENT_RE.match(s)
        if m:
            pct = int(m.group(1))
            if not 1 <= pct <= 100:
                raise ValueError(f"{s!r}: a percentage must be 1%..100%")
            return WaveSpec("percent", pct, mfp, soak)
        if "%" in s or not GROUP_RE.match(s):
            raise ValueError(f"{shown(s)} is not a wave: use a group name, a host count or 'N%'")
        return WaveSpec("group", s, mfp, soak)
    raise ValueError(f"{shown(entry)} is not a wave (group, count or 'N%')")


def parse_wave(entry: Any, where: str) -> WaveSpec:
    """One wave entry (scalar or mapping) or ConfigError naming where and why."""
    try:
        return wave_spec(entry)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_waves(text: str | Sequence[Any], where: str = "--waves") -> tuple[WaveSpec, ...]:
    """A wave list from the CLI ("canary,1,10%,100%") or from YAML (a list)."""
    items: Sequence[Any] = (
        [p for p in (x.strip() for x in text.split(",")) if p] if isinstance(text, str) else text
    )
    if not items:
        raise ConfigError(f"{where}: no waves given")
    return tuple(parse_wave(e, f"{where}[{i}]") for i, e in enumerate(items))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _percent(value: Any, key: str = "") -> float | None:
    if value is None:
        return None
    if not _number(value) or not 0 <= value <= 100:
        raise ValueError(f"{key}must be a number 0..100, got {shown(value)}")
    return float(value)


def _seconds(value: Any, key: str = "") -> float | None:
    if value is None:
        return None
    if not _number(value) or value < 0:
        raise ValueError(f"{key}must be a number of seconds >= 0, got {shown(value)}")
    return float(value)


def _timeout(value: Any) -> float | None:
    if value is not None and (not _number(value) or value <= 0):
        raise ValueError(f"must be a number of seconds > 0, got {shown(value)}")
    return None if value is None else float(value)


def _latency_hosts(value: Any) -> int | None:
    if value == "all":
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"must be 'all' or a host count >= 0, got {shown(value)}")
    return value


def _held(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_HELD:
        raise ValueError(
            f"must be a number of connections 0..{MAX_HELD} (0: off), got {shown(value)}"
        )
    return value


def _waves(value: Any) -> tuple[WaveSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(
            f"must be a non-empty list, e.g. [canary, 1, '10%', '100%'], got {shown(value)}"
        )
    return tuple(value)


Percent = Annotated[float | None, BeforeValidator(_percent)]
Soak = Annotated[float | None, BeforeValidator(_seconds)]
Timeout = Annotated[float | None, BeforeValidator(_timeout)]
Wave_ = Annotated[WaveSpec, BeforeValidator(wave_spec)]


def _scalar_text(value: Any) -> str:
    """A host data value for pyinfra's --data: text, a number or a boolean, as text."""
    if not isinstance(value, str | int | float | bool):
        raise ValueError(f"must be a text, a number or true/false, got {shown(value)}")
    return str(value)


Scalar = Annotated[str, BeforeValidator(_scalar_text)]


class GateFile(StrictModel):
    """`gate:` of rollout.yml."""

    checks: bool = True
    check_args: list[str] | None = None
    timeout_seconds: Timeout = None
    latency_hosts: Annotated[int | None, BeforeValidator(_latency_hosts)] = None
    held_connections: Annotated[int, BeforeValidator(_held)] = 0


class RolloutFile(StrictModel):
    """rollout.yml."""

    waves: Annotated[tuple[Wave_, ...], BeforeValidator(_waves)]
    max_fail_percent: Percent = None
    soak_seconds: Soak = None
    rollback_failed_wave: bool = True
    deploy: str = DEPLOY_FILE
    rollback: str = ROLLBACK_FILE
    rollback_data: dict[str, Scalar] | None = None
    gate: GateFile | None = None
    host_command_timeout_seconds: Timeout = None


def load_config(path: Path | str | None = None) -> RolloutConfig:
    """Read and validate the rollout policy; every error names the file and the field."""
    p = Path(path) if path else policy_file(ROLLOUT)
    doc = load_yaml_file(p, "rollout policy")
    f = validated(RolloutFile, doc, str(p))
    g = f.gate or GateFile()
    gate = GateConfig(
        checks=g.checks,
        check_args=tuple(g.check_args or ()),
        timeout_seconds=g.timeout_seconds or GateConfig.timeout_seconds,
        latency_hosts=g.latency_hosts,
        held_connections=g.held_connections,
    )
    return RolloutConfig(
        waves=f.waves,
        max_fail_percent=f.max_fail_percent or 0.0,
        soak_seconds=f.soak_seconds or 0.0,
        rollback_failed_wave=f.rollback_failed_wave,
        deploy=f.deploy,
        rollback=f.rollback,
        rollback_data=dict(f.rollback_data or {}),
        gate=gate,
        host_command_timeout_seconds=f.host_command_timeout_seconds
        or RolloutConfig.host_command_timeout_seconds,
        source=str(p),
    )


def plan_waves(
    hosts: Sequence[tuple[str, Sequence[str]]],
    specs: Sequence[WaveSpec],
    *,
    max_fail_percent: float = 0,
    soak_seconds: float = 0,
    known_groups: Collection[str] = (),
    domains: Mapping[str, str] | None = None,
) -> list[Wave]:
    """Split inventory hosts [(name, groups)] into waves, deterministically, in inventory order.

    Group entries take their group's hosts first (in wave-list order); counts and percentages
    then cut the remaining hosts, percentages of the number left after the group waves. The
    last entry repeats until every host is in a wave. Raises ConfigError for a group the
    inventory does not have; a group of `known_groups` (the whole inventory's, when `hosts`
    is a --limit of it) with none of `hosts` gives no wave.

    `domains` ({host: failure domain}): no wave holds two hosts of one domain. A group wave
    that would is refused (ConfigError naming the wave and the hosts: the operator asked for
    them together); a count or percentage wave defers the second member to the next wave
    and takes the next host instead (its size is a cap, as Ansible's `serial`).
    """
    domain_of = dict(domains or {})
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
        _refuse_shared_domain(i, s, group_hosts, domain_of, specs)
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

    def cut(n: int) -> list[str]:
        """The first n hosts of `rest` with at most one per failure domain; the others stay."""
        nonlocal rest
        took: list[str] = []
        seen: set[str] = set()
        for h in rest:
            if len(took) == n:
                break
            d = domain_of.get(h)
            if d is not None and d in seen:
                continue  # deferred to a later wave
            took.append(h)
            if d is not None:
                seen.add(d)
        rest = [h for h in rest if h not in took]
        return took

    last: WaveSpec | None = None
    for i, s in enumerate(specs):
        if s.kind == "group":
            add(s, group_hosts[i])
            continue
        last = s
        add(s, cut(size(s)))
    if rest:
        if last is None:
            unplanned = ", ".join(rest[:5]) + (" ..." if len(rest) > 5 else "")
            raise ConfigError(
                f"waves {', '.join(map(str, specs))} leave {len(rest)} host(s) out ({unplanned}); "
                "end the list with a count or a percentage, e.g. '100%'"
            )
        while rest:
            add(last, cut(size(last)))
    return waves


def _refuse_shared_domain(
    i: int,
    spec: WaveSpec,
    group_hosts: Mapping[int, Sequence[str]],
    domain_of: Mapping[str, str],
    specs: Sequence[WaveSpec],
) -> None:
    """ConfigError when group wave `i` holds two hosts of one failure domain."""
    by_domain: dict[str, list[str]] = {}
    for h in group_hosts[i]:
        if h in domain_of:
            by_domain.setdefault(domain_of[h], []).append(h)
    for d, members in by_domain.items():
        if len(members) > 1:
            # its number in the plan: the group waves before it that take a host, plus one
            n = 1 + sum(1 for j in range(i) if specs[j].kind != "group" or group_hosts[j])
            raise ConfigError(
                f"wave {n} ({spec}) would take {', '.join(members)} of failure domain {d} "
                "(ipvs_failure_domain) together: the rollout never changes two hosts of one "
                "failure domain at once; refused before any host is touched. Plan them apart: "
                "one member per group wave, or a count or percentage wave (it defers the "
                "second member to the next wave)"
            )
