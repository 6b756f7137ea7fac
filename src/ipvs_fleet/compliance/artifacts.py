"""The fix module build each kernel release should run, from the build's artifact manifests."""

from __future__ import annotations

import functools
from pathlib import Path

from ipvs_fleet.build.artifact import MANIFEST, artifact_dir, read_artifact
from ipvs_fleet.deploy.plan import ARTIFACTS
from ipvs_fleet.errors import FleetError


def manifest_path(kernel_release: str, artifacts_dir: Path = ARTIFACTS) -> Path:
    return artifact_dir(artifacts_dir, kernel_release) / MANIFEST


@functools.cache
def patchset(kernel_release: str, artifacts_dir: Path = ARTIFACTS) -> str | None:
    """The `ipvs_fleet` modinfo value of the artifact for this kernel, None if there is none
    on this controller (a CI runner may check a fleet without holding the build)."""
    if not manifest_path(kernel_release, artifacts_dir).is_file():
        return None
    try:
        return read_artifact(artifact_dir(artifacts_dir, kernel_release)).set_id
    except (FleetError, KeyError):
        return None
