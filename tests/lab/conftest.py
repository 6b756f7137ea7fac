"""The lab tier's session start: the test-only module variants its tests use build in the
background from the first lab test on (tests/fixtures/artifacts.py, `variant_builds`)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from ipvs_fleet.build.artifact import Artifact


@pytest.fixture(scope="session", autouse=True)
def _variants_build_in_background(variant_builds: dict[str, Future[Artifact]]) -> None:
    """Starts them: the first test that uses one (test_modules, 2 min into the tier) finds it
    built instead of compiling it in its setup (38 s in a fresh-clone run of 0eb365d)."""
