"""Builder roots: one mmdebstrap chroot per pinned kernel, holding its headers.

A controller builds for bullseye, bookworm, trixie and sid alike because the fix module is
compiled inside a root of each kernel's own Debian release, with that release's compiler and
exactly the pinned `linux-headers`. A root with `linux-source` too (source=True) serves the
test-only `upstream` variant and the kernel's selftests, which need the kernel's own source.
"""

from __future__ import annotations

import os
from pathlib import Path

from ipvs_fleet.debian import CACHE, KernelPin
from ipvs_fleet.rootfs import make_root, root_key

# dkms is included so the DKMS source tree can be test-built in the same root; patch and
# xz-utils serve the source root (the upstream series applied to linux-source).
TOOLS = ["gcc", "make", "bc", "xz-utils", "patch", "kmod", "libelf-dev", "dkms"]


def builder_dir() -> Path:
    return Path(os.environ.get("IPVS_FLEET_BUILDER_DIR", CACHE / "builders"))


def builder_packages(pin: KernelPin, source: bool = False) -> list[str]:
    """Packages of the builder root for one pinned kernel (no image: headers suffice; with
    `source`, the kernel's linux-source too)."""
    pkgs = [*TOOLS, f"{pin.headers_package}={pin.version}"]
    return [*pkgs, f"{pin.source_package}={pin.version}"] if source else pkgs


def builder_root(pin: KernelPin, log: Path | None = None, source: bool = False) -> Path:
    """The builder root for `pin` (with its linux-source if `source`), made on first use and
    cached by its inputs."""
    pkgs = builder_packages(pin, source)
    dest = builder_dir() / root_key(pin.release, pkgs, extra="builder")
    # dkms would try to build for the (absent) running kernel when installed; skip that.
    return make_root(pin.release, pkgs, dest, log=log)
