"""Debian package registry look-ups: which exact kernel a Debian release ships.

The lab images and the module builds must agree on one kernel package version per
release (ABI numbers drift with security updates), so both resolve it here, from the
signed indexes of the release, its -updates and its -security suites.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ipvs_fleet.errors import ConfigError, FleetError

MIRROR = os.environ.get("IPVS_FLEET_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("IPVS_FLEET_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
CACHE = Path(os.environ.get("IPVS_FLEET_CACHE", Path.home() / ".cache" / "ipvs-fleet"))

# The releases whose kernels are in the registry, and their kernel line.
RELEASES: dict[str, str] = {"bullseye": "5.10", "bookworm": "6.1", "trixie": "6.12"}
FLAVOUR = "cloud-amd64"


@dataclass(frozen=True)
class KernelPin:
    """One Debian kernel, pinned: what the lab image boots and what the build compiles for.

    >>> KernelPin("bookworm", "6.1", "6.1.0-56-cloud-amd64", "6.1.192-2")
    """

    release: str  # Debian release (codename)
    line: str  # kernel line, e.g. "6.1"
    kernel_release: str  # `uname -r`, e.g. "6.1.0-56-cloud-amd64"
    version: str  # Debian package version of image, headers and linux-source

    @property
    def image_package(self) -> str:
        return f"linux-image-{self.kernel_release}"

    @property
    def headers_package(self) -> str:
        return f"linux-headers-{self.kernel_release}"

    @property
    def source_package(self) -> str:
        return f"linux-source-{self.line}"

    def apt_pins(self) -> list[str]:
        """`name=version` for the image, its headers and the matching kernel source."""
        return [
            f"{p}={self.version}"
            for p in (self.image_package, self.headers_package, self.source_package)
        ]

    @property
    def key(self) -> str:
        """A cache key that changes whenever the pinned kernel changes."""
        return f"{self.release}-{self.kernel_release}-{self.version}"


def suites(release: str) -> list[tuple[str, str]]:
    """(mirror, suite) pairs searched for a release's kernel."""
    return [
        (MIRROR, release),
        (MIRROR, f"{release}-updates"),
        (SECURITY_MIRROR, f"{release}-security"),
    ]


def check_release(release: str, where: str = "release") -> str:
    if release not in RELEASES:
        known = ", ".join(sorted(RELEASES))
        raise ConfigError(f"{where}: unknown Debian release {release!r} (known: {known})")
    return release


def _fetch(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data: bytes = r.read()
            return data
    except OSError as e:
        raise FleetError(f"cannot fetch {url}: {e}") from e


def _verified_release(mirror: str, suite: str) -> str:
    """The suite's InRelease text, after gpgv checked its signature (None if absent)."""
    text = _fetch(f"{mirror}/dists/{suite}/InRelease")
    with tempfile.NamedTemporaryFile(suffix=".InRelease") as f:
        f.write(text)
        f.flush()
        r = subprocess.run(
            ["gpgv", "--keyring", str(KEYRING), f.name], capture_output=True, text=True
        )
    if r.returncode != 0:
        raise FleetError(f"{mirror}/dists/{suite}/InRelease: bad signature: {r.stderr.strip()}")
    return text.decode()


def _packages(mirror: str, suite: str, arch: str) -> str:
    """The verified, decompressed Packages index of one suite (cached by its hash)."""
    release = _verified_release(mirror, suite)
    name = f"main/binary-{arch}/Packages.xz"
    m = re.search(rf"^ ([0-9a-f]{{64}})\s+\d+\s+{re.escape(name)}$", release, re.M)
    if not m:
        return ""
    digest = m.group(1)
    cached = CACHE / "indexes" / f"{digest}.txt"
    if cached.exists():
        return cached.read_text()
    # by-hash names are immutable, so a mirror mid-update cannot pair a new index with
    # an old InRelease (seen on debian-security).
    folder = name.rsplit("/", 1)[0]
    raw = _fetch(f"{mirror}/dists/{suite}/{folder}/by-hash/SHA256/{digest}")
    if hashlib.sha256(raw).hexdigest() != digest:
        raise FleetError(f"{mirror}/dists/{suite}/{name}: sha256 does not match InRelease")
    text = lzma.decompress(raw).decode(errors="replace")
    cached.parent.mkdir(parents=True, exist_ok=True)
    # A private temporary name: builds and lab images resolve kernels at the same time.
    with tempfile.NamedTemporaryFile("w", dir=cached.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, cached)
    return text


def _stanzas(index: str, wanted: re.Pattern[str]) -> list[dict[str, str]]:
    out = []
    for block in index.split("\n\n"):
        if not block.startswith("Package: "):
            continue
        name = block[9 : block.index("\n")] if "\n" in block else block[9:]
        if not wanted.fullmatch(name):
            continue
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, _, v = line.partition(":")
                fields[k] = v.strip()
        out.append(fields)
    return out


def _version_key(v: str) -> list[int | str]:
    # Good enough for Debian kernel versions (6.1.192-2, 6.12.48-1, 5.10.244-1).
    return [int(p) if p.isdigit() else p for p in re.split(r"[.+~-]", v)]


def resolve_kernel(release: str) -> KernelPin:
    """The newest cloud kernel of a Debian release whose headers and linux-source exist."""
    check_release(release)
    line = RELEASES[release]
    image_re = re.compile(rf"linux-image-{re.escape(line)}\.\d+[-+][^ ]*-{FLAVOUR}")
    found: dict[str, set[str]] = {}
    sources: set[str] = set()
    headers: set[tuple[str, str]] = set()
    for mirror, suite in suites(release):
        amd64 = _packages(mirror, suite, "amd64")
        for st in _stanzas(amd64, image_re):
            if st["Package"].endswith("-unsigned"):
                continue
            found.setdefault(st["Version"], set()).add(st["Package"][len("linux-image-") :])
        for st in _stanzas(amd64, re.compile(rf"linux-headers-{re.escape(line)}\.\d+.*-{FLAVOUR}")):
            headers.add((st["Package"][len("linux-headers-") :], st["Version"]))
        # Debian lists Architecture: all packages (linux-source) in the amd64 index too.
        for st in _stanzas(amd64, re.compile(rf"linux-source-{re.escape(line)}")):
            sources.add(st["Version"])
    for version in sorted(found, key=_version_key, reverse=True):
        if version not in sources:
            continue
        for kr in sorted(found[version]):
            if (kr, version) in headers:
                return KernelPin(release, line, kr, version)
    raise FleetError(
        f"{release}: no {FLAVOUR} kernel with matching headers and linux-source-{line} "
        f"in {', '.join(s for _, s in suites(release))}"
    )


def pin_from_release(kernel_release: str, version: str) -> KernelPin:
    """A pin for a known kernel release (`uname -r`) and package version."""
    m = re.match(r"(\d+\.\d+)\.", kernel_release)
    if not m:
        raise ConfigError(f"kernel release {kernel_release!r} is not of the form X.Y.Z-...")
    line = m.group(1)
    for rel, ln in RELEASES.items():
        if ln == line:
            return KernelPin(rel, line, kernel_release, version)
    raise ConfigError(
        f"kernel release {kernel_release!r}: line {line} is not supported "
        f"(supported: {', '.join(RELEASES.values())})"
    )
