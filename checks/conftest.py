"""pytest-testinfra checks of IPVS hosts, run against a pyinfra inventory.

    pytest checks/ --inventory inventory/lab.py [--limit GROUP_OR_HOST[,...]] [--waivers FILE]

Every check is parametrized by host (test id `test_<check>[<host>]`); each host gets one
SSH connection, reused by all its checks, and its facts are read once, for all hosts at
the same time (see ipvs_fleet.compliance.session). The results plugin
(ipvs_fleet.compliance.plugin) applies the waivers, prints a line per host as it completes
and makes pytest's exit status the verdict (0 compliant, 1 not compliant, 2 could not check).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import testinfra.host

from ipvs_fleet.compliance import latency
from ipvs_fleet.compliance.expect import (
    CHECK_PROP,
    CLASS_PROP,
    GROUPS_PROP,
    HOST_PROP,
    Expect,
    check_name,
)
from ipvs_fleet.compliance.facts import HostFacts
from ipvs_fleet.compliance.session import CheckSession, Target, open_session
from ipvs_fleet.errors import ConfigError

SESSION = pytest.StashKey[CheckSession]()
pytest_plugins = ["ipvs_fleet.compliance.plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("ipvs-fleet")
    g.addoption("--inventory", help="pyinfra inventory file (e.g. inventory/lab.py)")
    g.addoption("--limit", action="append", help="hosts or groups to check (comma-separated)")
    g.addoption("--policy", help="host-class policy file (default: the role's host_classes.yml)")


def pytest_configure(config: pytest.Config) -> None:
    inv = config.getoption("--inventory")
    if not inv:
        raise pytest.UsageError("the fleet checks need --inventory inventory/<env>.py")
    try:
        config.stash[SESSION] = open_session(
            inv,
            config.getoption("--limit"),
            config.getoption("--policy"),
            config.getoption("--command-timeout"),
        )
    except ConfigError as e:
        raise pytest.UsageError(str(e)) from e


def pytest_unconfigure(config: pytest.Config) -> None:
    if SESSION in config.stash:
        config.stash[SESSION].close()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "target" in metafunc.fixturenames:
        session = metafunc.config.stash[SESSION]
        # Session scope groups the tests by host, so checks of one host run together.
        metafunc.parametrize("target", session.targets, ids=session.names, scope="session")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or "target" not in callspec.params:
            continue
        t: Target = callspec.params["target"]
        # JUnit properties of each testcase (and what the results plugin reads).
        item.user_properties += [
            (HOST_PROP, t.host.name),
            (CLASS_PROP, t.settings.host_class),
            (GROUPS_PROP, ",".join(t.host.groups)),
            (CHECK_PROP, check_name(item)),
        ]


@pytest.fixture(scope="session")
def fleet(request: pytest.FixtureRequest) -> CheckSession:
    session = request.config.stash[SESSION]
    session.start()
    # Start the latency probes of all selected hosts now, so they run side by side.
    for item in request.session.items:
        cs = getattr(item, "callspec", None)
        if getattr(item, "originalname", "") == "test_latency_budget" and cs is not None:
            t: Target = cs.params["target"]
            latency.measure_async(session, t)
    return session


@pytest.fixture
def host(fleet: CheckSession, target: Target) -> testinfra.host.Host:
    """The testinfra Host of this target (its one SSH connection)."""
    return fleet.connection(target.host.name)


@pytest.fixture
def facts(fleet: CheckSession, target: Target) -> HostFacts:
    return fleet.facts(target.host.name)


@pytest.fixture
def expect(request: pytest.FixtureRequest) -> Iterator[Expect]:
    yield Expect(request.node)
