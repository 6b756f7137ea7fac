"""Shared fixtures. Each capability keeps its fixtures in tests/fixtures/<name>.py."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.lab",
    "tests.fixtures.artifacts",
    "tests.fixtures.deploy",
]

# The lab tests share one booted lab per session; they run in the order a user's work goes
# (boot, modules, reuse behaviour, deploy, checks, the Ansible path, rollouts), so each
# starts from the state the previous one leaves and the fresh deploy sees a fresh lab.
LAB_ORDER = [
    "test_lab.py",
    "test_modules.py",
    "test_reuse.py",
    "test_deploy.py",
    "test_lockdown.py",
    "test_checks.py",
    "test_ansible.py",
    "test_rollout_lab.py",
    "test_rollout_sim.py",
    "test_dkms.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if "/tests/lab/" not in str(item.path):
            return -1  # unit tests first: they fail fast
        return LAB_ORDER.index(name) if name in LAB_ORDER else len(LAB_ORDER)

    items.sort(key=rank)  # stable: keeps the order within a file
