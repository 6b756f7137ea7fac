"""Run the checks in `checks/` in-process with pytest: the results plugin's verdict and results.

`ipvs-fleet check` and the rollout gate call this; the same run is
`pytest <checks> --inventory INV [--limit L] [--policy P] [EXTRA...]` (checks/conftest.py
loads ipvs_fleet.compliance.plugin), so its exit status and statuses are pytest's own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ipvs_fleet.compliance.model import COULD_NOT_CHECK, CheckResult
from ipvs_fleet.compliance.plugin import RESULTS, FleetResults
from ipvs_fleet.compliance.waivers import Waiver
from ipvs_fleet.errors import FleetError
from ipvs_fleet.resources import checks_dir


@dataclass
class CheckRun:
    """One pytest run of the checks: its exit status (the verdict) and what the plugin saw."""

    exit_code: int
    results: list[CheckResult]
    wall: float
    unused: list[Waiver] = field(default_factory=list)


class _Grab:
    """pytest plugin: keeps the results plugin of the run once it is finished."""

    results: FleetResults | None = None
    collect_errors: list[str]

    def __init__(self) -> None:
        self.collect_errors = []

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            from ipvs_fleet.compliance.plugin import message

            self.collect_errors.append(f"{report.nodeid}: {message(report)}")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.results = session.config.stash.get(RESULTS, None)


def pytest_args(
    inventory: str | Path,
    limit: list[str] | None = None,
    policy: str | Path | None = None,
    extra_args: list[str] | None = None,
    command_timeout: float | None = None,
) -> list[str]:
    """The pytest command line (without `pytest`) of a check run (`command_timeout`: the
    plugin's default when None)."""
    d = checks_dir()
    if not (d / "conftest.py").is_file():
        raise FleetError(f"checks not found in {d} (set IPVS_FLEET_CHECKS)")
    args = [str(d), "-c", str(d / "pytest.ini"), "--rootdir", str(d), "-p", "no:terminal"]
    args += ["--inventory", str(inventory)]
    for lim in limit or []:
        args += ["--limit", lim]
    if policy:
        args += ["--policy", str(policy)]
    if command_timeout is not None:
        args += ["--command-timeout", f"{command_timeout:g}"]
    return args + (extra_args or [])


def run_checks(
    inventory: str | Path,
    limit: list[str] | None = None,
    policy: str | Path | None = None,
    extra_args: list[str] | None = None,
    command_timeout: float | None = None,
) -> CheckRun:
    """Run every check against the inventory's hosts, each remote command bounded by
    `command_timeout` seconds (None: the default, remote.COMMAND_TIMEOUT).

    Raises FleetError when pytest could not even start (bad options, collection errors);
    pytest has printed its usage error on stderr by then.
    """
    args = pytest_args(inventory, limit, policy, extra_args, command_timeout)
    grab = _Grab()
    rc = pytest.main(args, plugins=[grab])
    if grab.collect_errors:
        raise FleetError("checks could not be collected:\n" + "\n".join(grab.collect_errors))
    res = grab.results
    if rc == pytest.ExitCode.USAGE_ERROR:
        raise FleetError("checks did not run (the error above)")
    if rc in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR) or res is None:
        raise FleetError(
            f"checks did not run (pytest exit {int(rc)}); try: pytest {' '.join(args)}"
        )
    results = list(res.results.values())
    code = int(rc) if results else COULD_NOT_CHECK
    return CheckRun(code, results, res.wall, res.unused)
