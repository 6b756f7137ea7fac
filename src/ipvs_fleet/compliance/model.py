"""Check results, the fleet verdict and the exit codes of `ipvs-fleet check`."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

# Exit codes, documented in `ipvs-fleet check --help`.
COMPLIANT = 0
NOT_COMPLIANT = 1
COULD_NOT_CHECK = 2

PASSED, FAILED, ERROR, WAIVED, SKIPPED = "passed", "failed", "error", "waived", "skipped"


@dataclass(frozen=True)
class Drift:
    """One value that differs from what the host's class wants."""

    key: str
    expected: str
    actual: str

    def __str__(self) -> str:
        return f"{self.key}: expected {self.expected}, actual {self.actual}"


@dataclass
class CheckResult:
    """The outcome of one check on one host.

    `status` is passed, failed (the host is not compliant), error (the check could not run,
    e.g. host unreachable), waived (failed, but a valid waiver covers it) or skipped.
    """

    host: str
    check: str
    status: str
    host_class: str = "unknown"
    groups: tuple[str, ...] = ()
    message: str = ""
    drift: list[Drift] = field(default_factory=list)
    duration: float = 0.0
    waiver: dict[str, Any] | None = None
    # What a check measured beyond pass/fail (e.g. the latency probe's JSON).
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["groups"] = list(self.groups)
        return d


@dataclass
class HostSummary:
    """All checks of one host, and its verdict."""

    host: str
    host_class: str
    results: list[CheckResult]

    @property
    def status(self) -> str:
        statuses = {r.status for r in self.results}
        for s in (ERROR, FAILED, WAIVED):
            if s in statuses:
                return s
        return PASSED


def by_host(results: list[CheckResult]) -> list[HostSummary]:
    """Results grouped per host, hosts in first-seen order."""
    hosts: dict[str, list[CheckResult]] = defaultdict(list)
    for r in results:
        hosts[r.host].append(r)
    return [HostSummary(h, rs[0].host_class, rs) for h, rs in hosts.items()]


def by_class(results: list[CheckResult]) -> dict[str, list[HostSummary]]:
    """Host summaries grouped per host class, classes sorted."""
    out: dict[str, list[HostSummary]] = defaultdict(list)
    for hs in by_host(results):
        out[hs.host_class].append(hs)
    return dict(sorted(out.items()))


def exit_code(results: list[CheckResult]) -> int:
    """2 if anything could not be checked (or nothing ran), else 1 if any check failed, else 0.

    "Could not check" wins over "not compliant": a fleet with an unreachable host has an
    unknown state, and a CI job must not read a partial run as the whole answer.
    """
    statuses = {r.status for r in results}
    if not results or ERROR in statuses:
        return COULD_NOT_CHECK
    if FAILED in statuses:
        return NOT_COMPLIANT
    return COMPLIANT


def verdict(code: int) -> str:
    return {
        COMPLIANT: "compliant",
        NOT_COMPLIANT: "NOT compliant",
        COULD_NOT_CHECK: "could not check",
    }[code]
