"""Built module artifacts: `<artifacts>/<kernel_release>/` with a tarball and `manifest.json`.

The deploy reads them through `load_artifact`; nothing else knows the layout.

>>> a = load_artifact(Path("artifacts"), "6.1.0-56-cloud-amd64")
>>> a.verify(); a.tarball, a.tarball_sha256, a.set_id, a.reuse_design
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import FleetError

MANIFEST = "manifest.json"
FORMAT = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_dir(artifacts_dir: Path, kernel_release: str, variant: str | None = None) -> Path:
    """Where the artifact of a kernel release (and optional test variant) lives."""
    if variant:
        return artifacts_dir / "variants" / variant / kernel_release
    return artifacts_dir / kernel_release


@dataclass(frozen=True)
class Artifact:
    """One build for one kernel release: the fix module `ip_vs_reuse.ko` (a test-only
    `upstream` variant: a patched `ip_vs*.ko` set).

    The tarball holds the stripped `*.ko` files at its top level; install them into
    `/lib/modules/<kernel_release>/updates/ipvs-fleet/` and run `depmod`.
    """

    path: Path  # the artifact directory
    manifest: dict[str, Any]

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])

    @property
    def release(self) -> str:
        return str(self.manifest["release"])

    @property
    def tarball(self) -> Path:
        return self.path / str(self.manifest["tarball"])

    @property
    def tarball_sha256(self) -> str:
        return str(self.manifest["tarball_sha256"])

    @property
    def modules(self) -> dict[str, str]:
        """Module file name -> sha256 (`{"ip_vs_reuse.ko": ...}` for the shipped build)."""
        return {k: str(v) for k, v in self.manifest["modules"].items()}

    @property
    def set_id(self) -> str:
        """What `modinfo -F ipvs_fleet <module>` prints for every module of this build (the
        fix module's MODULE_VERSION too: `/sys/module/ip_vs_reuse/version` once loaded)."""
        return str(self.manifest["modinfo"]["ipvs_fleet"])

    @property
    def reuse_design(self) -> str:
        """What knob=1 does in this build (`prekill`; see kernel/reuse_designs.yml)."""
        return str(self.manifest["reuse_design"])

    @property
    def vermagic(self) -> str:
        return str(self.manifest["vermagic"])

    def verify(self) -> None:
        """Raise FleetError unless the tarball matches the manifest's sha256."""
        if not self.tarball.is_file():
            raise FleetError(f"artifact {self.path}: tarball {self.tarball.name} is missing")
        got = sha256_file(self.tarball)
        if got != self.tarball_sha256:
            raise FleetError(
                f"artifact {self.path}: {self.tarball.name} sha256 {got} does not match "
                f"the manifest ({self.tarball_sha256})"
            )


def artifacts_id(artifacts_dir: Path) -> str:
    """A short id of every artifact in the folder (kernel, set id, tarball sha256): what a
    rollout journals its verified hosts with, so that a resume after a rebuild deploys them
    again; "" for a folder without artifacts."""
    items = []
    for m in sorted(Path(artifacts_dir).glob(f"*/{MANIFEST}")):
        try:
            doc = json.loads(m.read_text())
        except (OSError, ValueError):
            continue
        set_id = (doc.get("modinfo") or {}).get("ipvs_fleet")
        items.append(f"{doc.get('kernel_release')}={set_id}:{doc.get('tarball_sha256')}")
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:12] if items else ""


def read_artifact(path: Path) -> Artifact:
    """The artifact in directory `path` (FleetError if it has no readable manifest)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise FleetError(f"artifact {path}: cannot read {MANIFEST}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise FleetError(f"artifact {path}: manifest format {manifest.get('format')!r}")
    return Artifact(path, manifest)


def load_artifact(artifacts_dir: Path, kernel_release: str, variant: str | None = None) -> Artifact:
    """The artifact built for `kernel_release` under `artifacts_dir`, checked.

    + artifacts_dir: the `--out` folder of `ipvs-fleet build`
    + kernel_release: `uname -r` of the target host
    + variant: a test-only build variant (e.g. `baddefault`), None for the shipped build
    """
    path = artifact_dir(Path(artifacts_dir), kernel_release, variant)
    if not (path / MANIFEST).is_file():
        raise FleetError(
            f"no module artifact for kernel {kernel_release} in {artifacts_dir} "
            f"(run: ipvs-fleet build --kernel-release {kernel_release} --out {artifacts_dir})"
        )
    art = read_artifact(path)
    if art.kernel_release != kernel_release:
        raise FleetError(
            f"artifact {path} is for kernel {art.kernel_release}, not {kernel_release}"
        )
    art.verify()
    return art
