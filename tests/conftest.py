"""Shared fixtures. Each capability keeps its fixtures in tests/fixtures/<name>.py."""

pytest_plugins = [
    "tests.fixtures.lab",
    "tests.fixtures.artifacts",
    "tests.fixtures.deploy",
]
