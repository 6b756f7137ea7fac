"""How a check states a failure: each differing value as expected vs actual.

The values travel to the report through the test's user_properties, so `pytest checks/`
alone and `ipvs-fleet check` show the same thing.
"""

from __future__ import annotations

from typing import Any

import pytest

from ipvs_fleet.compliance.model import Drift

DRIFT_PROP = "ipvs_drift"
DETAILS_PROP = "ipvs_details"
HOST_PROP = "ipvs_host"
CLASS_PROP = "ipvs_host_class"
GROUPS_PROP = "ipvs_groups"
CHECK_PROP = "ipvs_check"


class Expect:
    """Collects differences for one check, then fails once listing all of them.

    >>> expect.equal("net.ipv4.vs.conn_reuse_mode", 1, actual)
    >>> expect.done("sysctls differ from class k8s_node")
    """

    def __init__(self, node: pytest.Item) -> None:
        self.node = node
        self.drift: list[Drift] = []
        self.problems: list[str] = []

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
        self.node.user_properties.append((DETAILS_PROP, kw))

    def done(self, headline: str) -> None:
        if not self.drift and not self.problems:
            return
        self.node.user_properties.append((DRIFT_PROP, [d.__dict__ for d in self.drift]))
        lines = [headline, *[f"  {p}" for p in self.problems], *[f"  {d}" for d in self.drift]]
        pytest.fail("\n".join(lines), pytrace=False)
