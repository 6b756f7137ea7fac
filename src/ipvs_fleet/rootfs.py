"""Debian root filesystems made with mmdebstrap: lab VM images and builder roots.

A root is cached in a folder named by a key that covers everything it is made from
(release, pinned kernel, package list), so a changed input makes a new root and an
unchanged one is reused. A root is published by rename only when complete.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ipvs_fleet.debian import RELEASE_INFO, check_release, suites
from ipvs_fleet.errors import FleetError


def sources(release: str) -> list[str]:
    """The apt source lines for a release: main of each suite releases.yml lists for it
    (the release, -updates and -security by default)."""
    return [f"deb {mirror} {suite} main" for mirror, suite in suites(release)]


def aptopt(option: str) -> str:
    """`Name=value` as an mmdebstrap --aptopt in apt.conf syntax (`Name "value"`): apt reads a
    bare `Name=value;` as a list item of a key of that name, i.e. ignores it."""
    name, _, value = option.partition("=")
    return f'--aptopt={name} "{value}"'


def apt_options(release: str) -> list[str]:
    """mmdebstrap options for the release's extra apt options (kept in the root's apt.conf.d)."""
    return [aptopt(o) for o in RELEASE_INFO[check_release(release)].apt_options]


def root_key(release: str, packages: Sequence[str], extra: str = "") -> str:
    """A short digest naming a root made from exactly these inputs."""
    h = hashlib.sha256("\n".join([release, *sorted(packages), extra]).encode()).hexdigest()
    return f"{release}-{h[:16]}"


def make_root(
    release: str,
    packages: Sequence[str],
    dest: Path,
    *,
    variant: str = "apt",
    hooks: Sequence[str] = (),
    log: Path | None = None,
) -> Path:
    """Make a Debian root at `dest` (a directory) unless it already exists complete.

    + release: Debian codename (a key of kernel/releases.yml)
    + packages: packages to include; `name=version` pins an exact version
    + dest: the directory; built as `dest.partial` and renamed when done
    + variant: mmdebstrap variant
    + hooks: extra mmdebstrap options (e.g. `--customize-hook=...`)
    + log: file for mmdebstrap's output (else inherited stderr)
    """
    check_release(release)
    if (dest / ".complete").exists():
        return dest
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        "mmdebstrap",
        f"--variant={variant}",
        "--mode=root",
        "--format=directory",
        "--skip=check/empty",
        aptopt("Acquire::Retries=3"),
        *apt_options(release),
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        f"--include={','.join(packages)}",
        *hooks,
        release,
        str(partial),
        *sources(release),
    ]
    out = log.open("ab") if log else None
    try:
        r = subprocess.run(cmd, stdout=out or sys.stderr, stderr=subprocess.STDOUT)
    finally:
        if out:
            out.close()
    if r.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        where = f" (log: {log})" if log else ""
        raise FleetError(f"mmdebstrap {release} failed with exit {r.returncode}{where}")
    (partial / ".complete").write_text(" ".join(packages) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest
