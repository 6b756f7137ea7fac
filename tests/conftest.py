"""Shared fixtures. Each capability keeps its fixtures in tests/fixtures/<name>.py."""

from __future__ import annotations

import pytest

pytest_plugins = [
    "tests.fixtures.lab",
    "tests.fixtures.artifacts",
    "tests.fixtures.deploy",
    "tests.fixtures.checks",
    "tests.fixtures.pins",
    "tests.fixtures.collection",
]

# The lab tests share one booted lab per session; they run in the order a user's work goes
# (boot, modules, reuse behaviour, deploy, checks, the Ansible path, rollouts), so each
# starts from the state the previous one leaves and the fresh deploy sees a fresh lab.
# The checks come right after the deploy (both leave the lab converged): mostly one host
# at a time, they leave a core to the `side_lab` tests `make test` runs beside them.
LAB_ORDER = [
    "test_lab.py",
    "test_modules.py",
    "test_reuse.py",
    "test_kernel_selftest.py",
    "test_upstream_selftest.py",
    "test_deploy.py",
    "test_activation_faults.py",
    "test_checks.py",
    "test_preview.py",
    "test_lockdown.py",
    "test_ci_examples.py",
    "test_ansible.py",
    "test_sudo.py",
    "test_rollout_lab.py",
    "test_rollout_sim.py",
    "test_dkms.py",
]

# Fixtures that converge the session lab's hosts (pyinfra or Ansible runs against them):
# a test using one changes those hosts, so it is `destructive` whether or not it says so.
CONVERGING_FIXTURES = {"deployer", "deployed"}

# Per-test timeout of the unit tier (pyproject's `timeout` is sized for the lab tests).
UNIT_TIMEOUT = 120


@pytest.hookimpl(tryfirst=True)  # before `-m` selects: the markers added here count
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        lab = item.get_closest_marker("lab") is not None
        if lab and fixtures & CONVERGING_FIXTURES:
            item.add_marker(pytest.mark.destructive)
        if not lab and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT))

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        if "/tests/lab/" not in str(item.path):
            # unit tests first: they fail fast; then the module builds (cached by `make test`)
            return -1 if item.get_closest_marker("build") else -2
        return LAB_ORDER.index(name) if name in LAB_ORDER else len(LAB_ORDER)

    items.sort(key=rank)  # stable: keeps the order within a file


@pytest.fixture(autouse=True)
def _hermetic_unit_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests without the `lab` marker (the unit tier, `make unit`) reach no Debian archive
    and make no mmdebstrap root: they run without network (`unshare -n`) in seconds. A test
    that does either fails here by name; mark it `build` (and `lab`) or use the
    `fake_archive` / `pins_lock` fixtures."""
    if request.node.get_closest_marker("lab"):
        return
    from ipvs_fleet import debian, rootfs
    from ipvs_fleet.build import builder
    from ipvs_fleet.lab import image

    def no_archive(url: str) -> bytes:
        raise AssertionError(f"a unit test fetched {url}: mark it `build`, or use fake_archive")

    def no_root(release: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"a unit test made a {release} root: mark it `build`")

    monkeypatch.setattr(debian, "_fetch", no_archive)
    for mod in (rootfs, builder, image):
        monkeypatch.setattr(mod, "make_root", no_root)
