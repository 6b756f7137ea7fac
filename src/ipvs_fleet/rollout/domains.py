"""Failure domains at run time: before a wave takes a member of a domain (a keepalived pair),
read the VRRP state of all its members; refuse the wave on a split brain or a domain without
master, and take the domain's backup before its master.

The planner (config.plan_waves) already put at most one member of a domain in each wave; the
order within the domain is decided here, right before the wave, because the master may have
changed since the rollout started (a failover mid-rollout). Both engines decide with these
functions: the rollout's Rollout, the collection's filters (plugins/filter/ipvs_fleet_pair.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ipvs_fleet.rollout.config import Wave
from ipvs_fleet.rollout.vrrp import ALL, NONE, PART, VrrpState

ReadStates = Callable[[Sequence[str]], Mapping[str, VrrpState]]


def domain_problems(domain: str, states: Mapping[str, VrrpState]) -> list[str]:
    """Why a wave of `domain` must not start, from its members' states ([]: it may)."""
    out = [f"failure domain {domain}: {h}: {s.error}" for h, s in states.items() if s.error]
    if out:
        return out
    instances = sorted({i for s in states.values() for i in s.held})
    for inst in instances:
        holders = [h for h, s in states.items() if s.held.get(inst, NONE) == ALL]
        partial = [h for h, s in states.items() if s.held.get(inst) == PART]
        if partial:
            out.append(
                f"failure domain {domain}: {', '.join(partial)} hold(s) part of VRRP instance "
                f"{inst}'s VIPs (a transition under way, or a broken keepalived.conf)"
            )
        elif len(holders) > 1:
            out.append(
                f"failure domain {domain}: split brain: {', '.join(holders)} all hold VRRP "
                f"instance {inst}'s VIPs (both look master)"
            )
        elif not holders:
            out.append(
                f"failure domain {domain}: no member holds VRRP instance {inst}'s VIPs "
                f"({', '.join(states)}: all backup): its service is down"
            )
    return out


def vrrp_order(hosts: Sequence[str], states: Mapping[str, VrrpState]) -> list[str]:
    """`hosts` with the backups (holding no instance) first, else in their order."""
    return sorted(hosts, key=lambda h: states[h].master)


@dataclass
class DomainOrder:
    """The failure domains of a rollout ({host: domain}) and how to read VRRP states."""

    members: Mapping[str, str]
    read: ReadStates
    # A VRRP transition (a failover, the drain hook of the wave before) leaves the VIPs on
    # neither director, or on both, for a few advert intervals (3.6 s measured on the pair
    # lab): a domain that is not settled is read again, once a second, for up to this long
    # before its wave is refused.
    settle_seconds: float = 15.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def _settled(
        self, domain: str, everyone: Sequence[str]
    ) -> tuple[dict[str, VrrpState], list[str], float]:
        """The members' states once the domain is settled or settle_seconds have passed:
        (states, problems, seconds waited)."""
        t0 = self.clock()
        while True:
            states = dict(self.read(everyone))
            states = {h: states.get(h, VrrpState({}, "not read")) for h in everyone}
            bad = domain_problems(domain, states)
            waited = self.clock() - t0
            if not bad or waited >= self.settle_seconds:
                return states, bad, waited
            self.sleep(1.0)

    def arrange(
        self, waves: list[Wave], index: int, done: Callable[[str], bool]
    ) -> tuple[list[Wave], list[dict[str, Any]], list[str]]:
        """Waves with wave `index` (0-based) taking each domain's backup first: (waves,
        journal records of the reads, problems that refuse the wave)."""
        wave = waves[index]
        domains = sorted({self.members[h] for h in wave.hosts if h in self.members and not done(h)})
        records: list[dict[str, Any]] = []
        problems: list[str] = []
        for d in domains:
            everyone = [h for w in waves for h in w.hosts if self.members.get(h) == d]
            states, bad, waited = self._settled(d, everyone)
            rec: dict[str, Any] = {
                "wave": wave.index,
                "domain": d,
                "roles": {h: s.role for h, s in states.items()},
            }
            if waited:
                rec["waited_s"] = round(waited, 1)
            records.append(rec)
            if bad:
                problems += bad
                rec["refused"] = bad
                continue
            # the pending members from this wave on, in plan order; the first goes now
            pending = [h for w in waves[index:] for h in w.hosts if h in everyone and not done(h)]
            first = vrrp_order(pending, states)[0]
            here = next(h for h in wave.hosts if h in pending)
            rec["takes"] = [first]
            if first != here:
                waves = swap(waves, here, first)
                rec["instead_of"] = here
        return waves, records, problems


def swap(waves: list[Wave], a: str, b: str) -> list[Wave]:
    """The waves with hosts a and b trading places."""

    def one(h: str) -> str:
        return b if h == a else a if h == b else h

    return [replace(w, hosts=tuple(one(h) for h in w.hosts)) for w in waves]
