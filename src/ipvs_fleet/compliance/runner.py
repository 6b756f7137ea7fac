"""Run the checks in `checks/` in-process with pytest and collect one result per host/check."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet.compliance.expect import (
    CHECK_PROP,
    CLASS_PROP,
    DETAILS_PROP,
    DRIFT_PROP,
    GROUPS_PROP,
    HOST_PROP,
)
from ipvs_fleet.compliance.model import ERROR, FAILED, PASSED, SKIPPED, CheckResult, Drift
from ipvs_fleet.errors import FleetError
from ipvs_fleet.resources import checks_dir


class Collector:
    """pytest plugin: turns each check's reports into a CheckResult."""

    def __init__(self) -> None:
        self.results: dict[str, CheckResult] = {}
        self.usage_error: str | None = None
        self.collect_errors: list[str] = []
        self._exc: dict[str, bool] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        outcome = yield
        report = outcome.get_result()
        if call.excinfo is not None and report.failed:
            # A failed assertion or pytest.fail() is non-compliance; anything else (lost
            # connection, a bug in a check) means the host could not be checked.
            compliant_failure = call.when == "call" and call.excinfo.errisinstance(
                (AssertionError, pytest.fail.Exception)
            )
            self._exc[report.nodeid] = compliant_failure

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props: dict[str, Any] = dict(report.user_properties)
        if HOST_PROP not in props:
            return
        r = self.results.get(report.nodeid)
        if r is None:
            r = self.results[report.nodeid] = CheckResult(
                host=str(props[HOST_PROP]),
                check=str(props[CHECK_PROP]),
                status=PASSED,
                host_class=str(props.get(CLASS_PROP, "unknown")),
                groups=tuple(props.get(GROUPS_PROP, ())),
            )
        r.duration += report.duration
        if report.skipped:
            r.status = SKIPPED
            r.message = _message(report)
        elif report.failed:
            failure = self._exc.get(report.nodeid, False)
            if r.status != ERROR:
                r.status = FAILED if failure else ERROR
                r.message = _message(report)
        for key, value in props.items():
            if key == DRIFT_PROP:
                r.drift = [Drift(**d) for d in value]
            elif key == DETAILS_PROP:
                r.details.update(dict(value))

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.collect_errors.append(f"{report.nodeid}: {_message(report)}")


def _message(report: pytest.TestReport | pytest.CollectReport) -> str:
    """One readable message: the check's own text, else the exception line (no traceback)."""
    lr = report.longrepr
    if lr is None:
        return ""
    if isinstance(lr, tuple):  # skip: (file, line, reason)
        return str(lr[2]).removeprefix("Skipped: ")
    if isinstance(lr, str):  # pytest.fail(..., pytrace=False): the check's own message
        return lr.strip().removeprefix("Failed: ")
    crash = getattr(lr, "reprcrash", None)
    if crash is None:
        return str(lr).strip()
    # "pkg.module.HostUnreachable: reason" -> "HostUnreachable: reason"
    head, sep, rest = str(crash.message).partition(": ")
    head = head.rsplit(".", 1)[-1]
    if head == "Failed" and sep:  # pytest.fail(): the check's own message
        return rest.strip()
    return f"{head}{sep}{rest}".strip()


def run_checks(
    inventory: str | Path,
    limit: list[str] | None = None,
    policy: str | Path | None = None,
    extra_args: list[str] | None = None,
) -> tuple[list[CheckResult], float]:
    """Run every check against the inventory's hosts: (results in run order, wall seconds).

    Raises FleetError when pytest could not even start (bad options, collection errors).
    """
    d = checks_dir()
    if not (d / "conftest.py").is_file():
        raise FleetError(f"checks not found in {d} (set IPVS_FLEET_CHECKS)")
    args = [str(d), "-c", str(d / "pytest.ini"), "--rootdir", str(d), "-p", "no:terminal"]
    args += ["--inventory", str(inventory)]
    for lim in limit or []:
        args += ["--limit", lim]
    if policy:
        args += ["--policy", str(policy)]
    args += extra_args or []
    collector = Collector()
    t0 = time.monotonic()
    rc = pytest.main(args, plugins=[collector])
    wall = time.monotonic() - t0
    if collector.collect_errors:
        raise FleetError("checks could not be collected:\n" + "\n".join(collector.collect_errors))
    if rc in (pytest.ExitCode.USAGE_ERROR, pytest.ExitCode.INTERNAL_ERROR) or (
        not collector.results and rc != pytest.ExitCode.OK
    ):
        raise FleetError(
            f"checks did not run (pytest exit {int(rc)}); try: pytest {' '.join(args)}"
        )
    return list(collector.results.values()), wall
