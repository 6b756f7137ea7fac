"""The fleet checks' pytest plugin: waivers, a result per host/check, a line per host, verdict.

`checks/conftest.py` loads it, so plain `pytest checks/ --inventory INV --waivers W` and
`ipvs-fleet check INV --waivers W` (a wrapper around pytest.main) reach the same verdict:

- a failing check covered by a valid waiver becomes xfailed, the reason being the waiver's
  expiry, justification and entry (pytest's summary shows it; JUnit writes it as
  `<skipped type="pytest.xfail" message=...>`); after the expiry it fails, saying so;
- a waiver naming a check that does not exist is a usage error at collection, before any
  host is contacted (connections open in the first check's setup);
- pytest's exit status is the fleet verdict: 0 compliant, 1 not compliant, 2 could not check
  (a check that raised anything but a failed expectation: unreachable host, a bug);
- each host's line (`k8s-canary: 9 passed, 1 waived`) is printed as soon as its last check
  is done; the JUnit testcases carry host, host_class, groups, check, drift and fix properties.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from typing import Any

import pytest
from _pytest._code.code import ExceptionRepr

from ipvs_fleet.compliance.expect import (
    CHECK_PROP,
    CLASS_PROP,
    EXPECT_KEY,
    GROUPS_PROP,
    HOST_PROP,
    check_name,
)
from ipvs_fleet.compliance.model import (
    ERROR,
    FAILED,
    PASSED,
    SKIPPED,
    WAIVED,
    CheckResult,
    Drift,
    exit_code,
)
from ipvs_fleet.compliance.remote import COMMAND_TIMEOUT, positive_seconds
from ipvs_fleet.compliance.waivers import Waiver, check_names, load_waivers, waiver_for
from ipvs_fleet.errors import ConfigError

PLUGIN_NAME = "ipvs-fleet-results"
RESULTS = pytest.StashKey["FleetResults"]()
# Exit statuses pytest sets itself that are not a verdict about the fleet.
_PYTEST_OWN = (
    pytest.ExitCode.INTERRUPTED,
    pytest.ExitCode.INTERNAL_ERROR,
    pytest.ExitCode.USAGE_ERROR,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ipvs-fleet")
    group.addoption(
        "--waivers",
        metavar="FILE",
        help="waivers YAML file: a failing check it covers is reported as xfailed (waived) with "
        "its justification and expiry; after the expiry it fails again",
    )
    group.addoption(
        "--command-timeout",
        metavar="SECONDS",
        type=positive_seconds,
        default=COMMAND_TIMEOUT,
        help="bound of each remote command (the latency probe included); a host whose command "
        f"gets no answer in time is 'could not check' (default {COMMAND_TIMEOUT:g}; "
        "checks/conftest.py hands it to the check session)",
    )


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--waivers")
    try:
        waivers = load_waivers(path) if path else []
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from e
    results = FleetResults(waivers, str(config.getoption("--inventory") or ""))
    config.stash[RESULTS] = results
    config.pluginmanager.register(results, PLUGIN_NAME)


class FleetResults:
    """Waivers applied to reports as pytest makes them; a CheckResult per host/check."""

    def __init__(self, waivers: list[Waiver], inventory: str, today: dt.date | None = None):
        self.waivers = waivers
        self.inventory = inventory
        self.today = today or dt.date.today()
        self.results: dict[str, CheckResult] = {}
        self.used: set[Waiver] = set()
        self.t0 = time.monotonic()
        self.wall = 0.0
        self._pending: Counter[str] = Counter()
        self._kind: dict[str, str] = {}
        self._waiver: dict[str, dict[str, Any]] = {}
        self._note: dict[str, str] = {}
        self._expect: dict[str, dict[str, Any]] = {}
        self._terminal: Any = None  # pytest's terminal reporter, absent under -p no:terminal

    @property
    def unused(self) -> list[Waiver]:
        """Waivers that matched no failure (stale, worth removing)."""
        return [w for w in self.waivers if w not in self.used]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        # tryfirst: before -k / --deselect narrow the items, so every check name is known.
        # Every test function in the checks folder is a check (conftest.py's own hook, which
        # adds the host properties, may run after this one).
        known = {check_name(i) for i in items}
        if self.waivers and known:
            try:
                check_names(self.waivers, known)
            except ConfigError as e:
                raise pytest.UsageError(str(e)) from e

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            host = dict(item.user_properties).get(HOST_PROP)
            if host is not None:
                self._pending[str(host)] += 1

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        props = dict(item.user_properties)
        if HOST_PROP not in props:
            return
        if EXPECT_KEY in item.stash:
            self._expect[report.nodeid] = item.stash[EXPECT_KEY]
        if call.excinfo is None or not report.failed:
            return
        # A failed expectation (assert, pytest.fail) is non-compliance; anything else (lost
        # connection, a bug in a check) means the host could not be checked.
        failure = call.when == "call" and call.excinfo.errisinstance(
            (AssertionError, pytest.fail.Exception)
        )
        self._kind.setdefault(report.nodeid, FAILED if failure else ERROR)
        if not failure:
            if call.when == "call":
                # pytest's summary and JUnit call any exception in a test's body a failure and
                # one in its setup an error: a check that could not run (connection lost in
                # the middle of it) is reported as the setup error it amounts to.
                report.when = "setup"
            return
        host, check = str(props[HOST_PROP]), str(props[CHECK_PROP])
        found = waiver_for(self.waivers, host, check, _groups(props.get(GROUPS_PROP)), self.today)
        if found is not None and not found[1]:
            w = found[0]
            self.used.add(w)
            self._waiver[report.nodeid] = w.to_dict()
            report.outcome = "skipped"
            report.wasxfail = f"waived until {w.expires.isoformat()}: {w.justification} ({w.where})"
            return
        if found is not None:
            w = found[0]
            self.used.add(w)
            self._waiver[report.nodeid] = {**w.to_dict(), "expired": True}
            note = f"waiver expired on {w.expires.isoformat()}: {w.where}"
            self._note[report.nodeid] = note
            # In the failure's own text: pytest's output and the JUnit <failure> both say it.
            if isinstance(report.longrepr, ExceptionRepr):
                report.longrepr.addsection("ipvs-fleet waiver", note)
            else:
                report.longrepr = f"{report.longrepr}\n{note}"
        from ipvs_fleet.compliance.render import fix_for

        # On the item: pytest's JUnit writes the properties of the teardown report.
        item.user_properties.append(("fix", fix_for(check, self.inventory, host)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props: dict[str, Any] = dict(report.user_properties)
        if HOST_PROP not in props:
            return
        nid = report.nodeid
        r = self.results.get(nid)
        if r is None:
            r = self.results[nid] = CheckResult(
                host=str(props[HOST_PROP]),
                check=str(props[CHECK_PROP]),
                status=PASSED,
                host_class=str(props.get(CLASS_PROP, "unknown")),
                groups=_groups(props.get(GROUPS_PROP)),
            )
        r.duration += report.duration
        if report.skipped and nid in self._waiver and hasattr(report, "wasxfail"):
            r.status, r.message, r.waiver = WAIVED, message(report), self._waiver[nid]
        elif report.skipped:
            r.status, r.message = SKIPPED, message(report)
        elif report.failed and r.status != ERROR:
            r.status = self._kind.get(nid, ERROR)
            r.message = message(report)
            if nid in self._note and self._note[nid] not in r.message:
                r.message += "\n" + self._note[nid]
            if nid in self._waiver:
                r.waiver = self._waiver[nid]
        if report.when == "teardown":
            exp = self._expect.get(nid, {})
            r.drift = [Drift(**d) for d in exp.get("drift", [])]
            r.details.update(exp.get("details", {}))
            self._host_done(r.host)

    def _host_done(self, host: str) -> None:
        self._pending[host] -= 1
        if self._pending[host] != 0:
            return
        mine = [r for r in self.results.values() if r.host == host]
        counts = Counter(r.status for r in mine)
        order = (PASSED, FAILED, WAIVED, ERROR, SKIPPED)
        line = f"{host}: " + ", ".join(f"{counts[s]} {s}" for s in order if counts[s])
        tr = self._terminal
        if tr is not None:
            tr.write_line(line)
        else:
            print(line, flush=True)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self._terminal = session.config.pluginmanager.get_plugin("terminalreporter")
        self.t0 = time.monotonic()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.wall = time.monotonic() - self.t0
        if session.exitstatus not in _PYTEST_OWN:
            session.exitstatus = exit_code(list(self.results.values()))


def _groups(value: Any) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(g) for g in value)
    return tuple(g for g in str(value or "").split(",") if g)


def message(report: pytest.TestReport | pytest.CollectReport) -> str:
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
