"""How a check states a failure: each differing value as expected vs actual.

The values travel to the report on the test item: as JUnit properties (`drift`, one
`key: expected E, actual A` each) in its user_properties, and whole (drift and details such
as the latency probe's figures) in its stash, which the results plugin reads. So
`pytest checks/` alone and `ipvs-fleet check` show the same thing.
"""

from __future__ import annotations

from typing import Any

import pytest

from ipvs_fleet.compliance.model import Drift


def check_name(item: pytest.Item) -> str:
    """The check an item runs: its test function's name without `test_`."""
    return str(getattr(item, "originalname", item.name)).removeprefix("test_")


# user_properties of every check item (checks/conftest.py): JUnit <property> names.
HOST_PROP = "host"
CLASS_PROP = "host_class"
GROUPS_PROP = "groups"
CHECK_PROP = "check"
DRIFT_PROP = "drift"
# What a check found, whole: {"drift": [{key, expected, actual}], "details": {...}}.
EXPECT_KEY = pytest.StashKey[dict[str, Any]]()


class Expect:
    """Collects differences for one check, then fails once listing all of them.

    >>> expect.equal("net.ipv4.vs.conn_reuse_mode", 1, actual)
    >>> expect.done("sysctls differ from class k8s_node")
    """

    def __init__(self, node: pytest.Item) -> None:
        self.node = node
        self.drift: list[Drift] = []
        self.problems: list[str] = []
        self._found = node.stash.setdefault(EXPECT_KEY, {"drift": [], "details": {}})

    def equal(self, key: str, expected: Any, actual: Any) -> bool:
        if str(expected) == str(actual):
            return True
        self.differ(key, expected, actual)
        return False

    def differ(self, key: str, expected: Any, actual: Any) -> None:
        self.drift.append(Drift(key, str(expected), str(actual)))

    def problem(self, text: str) -> None:
        """A failure that is not a value mismatch."""
        self.problems.append(text)

    def details(self, **kw: Any) -> None:
        self._found["details"].update(kw)

    def done(self, headline: str) -> None:
        if not self.drift and not self.problems:
            return
        self._found["drift"] = [d.__dict__ for d in self.drift]
        self.node.user_properties += [(DRIFT_PROP, str(d)) for d in self.drift]
        lines = [headline, *[f"  {p}" for p in self.problems], *[f"  {d}" for d in self.drift]]
        pytest.fail("\n".join(lines), pytrace=False)
