"""Builder roots: one mmdebstrap chroot per pinned kernel, holding its headers and source.

A controller builds for bullseye, bookworm and trixie alike because each kernel is compiled
inside a root of its own Debian release, with that release's compiler and exactly the
pinned `linux-headers` and `linux-source` versions.
"""

from __future__ import annotations

import os
from pathlib import Path

from ipvs_fleet.debian import CACHE, KernelPin
from ipvs_fleet.rootfs import make_root, root_key

# dkms is included so the DKMS source tree can be test-built in the same root.
TOOLS = ["gcc", "make", "bc", "xz-utils", "patch", "kmod", "libelf-dev", "dkms"]


def builder_dir() -> Path:
    return Path(os.environ.get("IPVS_FLEET_BUILDER_DIR", CACHE / "builders"))


def builder_packages(pin: KernelPin) -> list[str]:
    """Packages of the builder root for one pinned kernel (no image: headers suffice)."""
    return [
        *TOOLS,
        f"{pin.headers_package}={pin.version}",
        f"{pin.source_package}={pin.version}",
    ]


def builder_root(pin: KernelPin, log: Path | None = None) -> Path:
    """The builder root for `pin`, made on first use and cached by its inputs."""
    pkgs = builder_packages(pin)
    dest = builder_dir() / root_key(pin.release, pkgs, extra="builder")
    # dkms would try to build for the (absent) running kernel when installed; skip that.
    return make_root(pin.release, pkgs, dest, log=log)
