"""Debian package registry look-ups and the kernel pins lock.

The lab images and the module builds must agree on one kernel package version per
release (ABI numbers drift with security updates). That version is locked in
`kernel_pins.lock.json` next to this module (package data), written by
`ipvs-fleet pins update` from the newest kernel in the signed indexes of the release, its
-updates and its -security suites (`resolve_kernel`). Builds and lab images take the locked
pin (`pinned_kernel`); reading the lock (`locked_pins`) needs no network.

Debian's archive keeps only the current kernel of a suite, so a locked version disappears
after the next upload. `pinned_kernel` then uses the newest kernel of the release and warns
once, naming both (the patches apply by kernel line, so a newer upload of the line builds);
with `IPVS_FLEET_STRICT_PINS=1` (`--strict-pins`) a vanished pin is an error instead.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from ipvs_fleet.errors import ConfigError, FleetError

MIRROR = os.environ.get("IPVS_FLEET_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get(
    "IPVS_FLEET_SECURITY_MIRROR", "http://deb.debian.org/debian-security"
)
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
CACHE = Path(os.environ.get("IPVS_FLEET_CACHE", Path.home() / ".cache" / "ipvs-fleet"))

# The releases whose kernels are in the registry (kernel/releases.yml): release -> its
# kernel line, the suites searched for its kernel, extra apt options for its roots.
RELEASES_FILE = Path(__file__).parent / "kernel" / "releases.yml"
SUITE_KINDS = ("release", "updates", "security")
FLAVOUR = "cloud-amd64"


@dataclass(frozen=True)
class Release:
    """One supported Debian release, as kernel/releases.yml describes it."""

    name: str
    line: str
    suites: tuple[str, ...] = SUITE_KINDS  # kinds from SUITE_KINDS
    apt_options: tuple[str, ...] = ()
    lab_packages: tuple[str, ...] = ()  # what its lab images need beyond LAB_PACKAGES


def load_releases(path: Path = RELEASES_FILE) -> dict[str, Release]:
    """Codename -> Release, in file order (ConfigError naming the file if malformed)."""
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the supported releases: {e}") from e
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{path}: expected a mapping of Debian codename to {{line: ...}}")
    out = {}
    for name, spec in doc.items():
        where = f"{path}: {name}"
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: must be a mapping with `line`")
        line = spec.get("line")
        # a string: YAML reads an unquoted 5.10 as the float 5.1
        if not isinstance(line, str) or not re.fullmatch(r"\d+\.\d+", line):
            raise ConfigError(f'{where}: needs `line: "X.Y"` (a kernel line, quoted)')
        unknown = set(spec) - {"line", "suites", "apt_options", "lab_packages"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        kinds = spec.get("suites", list(SUITE_KINDS))
        if not isinstance(kinds, list) or not kinds or set(kinds) - set(SUITE_KINDS):
            raise ConfigError(f"{where}.suites: a non-empty list of {', '.join(SUITE_KINDS)}")
        opts = spec.get("apt_options", [])
        if not isinstance(opts, list) or not all(isinstance(o, str) and "=" in o for o in opts):
            raise ConfigError(f"{where}.apt_options: a list of `Name=value` strings")
        lab = spec.get("lab_packages", [])
        if not isinstance(lab, list) or not all(isinstance(p, str) and p for p in lab):
            raise ConfigError(f"{where}.lab_packages: a list of Debian package names")
        out[str(name)] = Release(str(name), line, tuple(kinds), tuple(opts), tuple(lab))
    lines = [r.line for r in out.values()]
    if len(set(lines)) != len(lines):
        raise ConfigError(f"{path}: two releases share a kernel line: {lines}")
    return out


RELEASE_INFO: dict[str, Release] = load_releases()
# Release -> kernel line (the form most callers need).
RELEASES: dict[str, str] = {name: r.line for name, r in RELEASE_INFO.items()}

# The lock file of the kernel pins (package data); $IPVS_FLEET_PINS_LOCK names another one.
PINS_LOCK = Path(__file__).with_name("kernel_pins.lock.json")
PINS_LOCK_ENV = "IPVS_FLEET_PINS_LOCK"
STRICT_PINS_ENV = "IPVS_FLEET_STRICT_PINS"


class ArchiveUnreachable(FleetError):
    """The Debian archive (an InRelease or index) could not be fetched."""


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
    """(mirror, suite) pairs searched for a release's kernel (its `suites` in releases.yml)."""
    every = {
        "release": (MIRROR, release),
        "updates": (MIRROR, f"{release}-updates"),
        "security": (SECURITY_MIRROR, f"{release}-security"),
    }
    return [every[k] for k in RELEASE_INFO[check_release(release)].suites]


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
        raise ArchiveUnreachable(f"cannot fetch {url}: {e}") from e


def _verified_release(mirror: str, suite: str) -> str:
    """The suite's InRelease text, after gpgv checked its signature (None if absent)."""
    text = _fetch(f"{mirror}/dists/{suite}/InRelease")
    with tempfile.NamedTemporaryFile(suffix=".InRelease") as f:
        f.write(text)
        f.flush()
        try:
            r = subprocess.run(
                ["gpgv", "--keyring", str(KEYRING), f.name],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except subprocess.TimeoutExpired as e:
            raise FleetError(f"{mirror}/dists/{suite}/InRelease: gpgv timed out") from e
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


def archive_kernels(release: str) -> list[KernelPin]:
    """Every cloud kernel of a Debian release in the archive whose headers and linux-source
    (same version) are there too, newest first (FleetError if there is none).

    ArchiveUnreachable if an index cannot be fetched.
    """
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
    out = [
        KernelPin(release, line, kr, version)
        for version in sorted(found, key=_version_key, reverse=True)
        if version in sources
        for kr in sorted(found[version])
        if (kr, version) in headers
    ]
    if not out:
        raise FleetError(
            f"{release}: no {FLAVOUR} kernel with matching headers and linux-source-{line} "
            f"in {', '.join(s for _, s in suites(release))}"
        )
    return out


def fetch_deb(release: str, package: str, version: str) -> Path:
    """The .deb of `package`=`version` from the release's suites, sha256-checked against the
    signed index and cached in CACHE/debs (FleetError naming it if no suite has it)."""
    want = re.compile(re.escape(package))
    for mirror, suite in suites(release):
        for st in _stanzas(_packages(mirror, suite, "amd64"), want):
            if st.get("Version") != version:
                continue
            deb = CACHE / "debs" / Path(st["Filename"]).name
            if deb.is_file() and hashlib.sha256(deb.read_bytes()).hexdigest() == st["SHA256"]:
                return deb
            data = _fetch(f"{mirror}/{st['Filename']}")
            if hashlib.sha256(data).hexdigest() != st["SHA256"]:
                raise FleetError(f"{package} {version}: the download does not match its index")
            deb.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=deb.parent, suffix=".part", delete=False) as f:
                f.write(data)
            os.replace(f.name, deb)
            return deb
    raise FleetError(
        f"{package}={version} is not in {release} ({', '.join(s for _, s in suites(release))})"
    )


def headers_in_archive(pin: KernelPin) -> bool:
    """Whether the release's indexes list the pin's headers package at exactly its version."""
    pat = re.compile(
        rf"^Package: {re.escape(pin.headers_package)}\n(?:.+\n)*?"
        rf"Version: {re.escape(pin.version)}$",
        re.M,
    )
    return any(pat.search(_packages(m, s, "amd64")) for m, s in suites(pin.release))


def resolve_kernel(release: str) -> KernelPin:
    """The newest cloud kernel of a Debian release whose headers and linux-source exist
    (what `ipvs-fleet pins update` locks). Builds and lab images use `pinned_kernel`."""
    return archive_kernels(release)[0]


# --- the pins lock -------------------------------------------------------------------------

LOCK_COMMENT = (
    "Kernel pins of the lab images and module builds, one per Debian release. Written by "
    "`ipvs-fleet pins update` (newest kernel in the archive); do not edit by hand."
)


def lock_path() -> Path:
    """The pins lock in use: $IPVS_FLEET_PINS_LOCK, else the one shipped with the package."""
    env = os.environ.get(PINS_LOCK_ENV)
    return Path(env) if env else PINS_LOCK


def locked_pins(path: Path | None = None) -> dict[str, KernelPin]:
    """Release -> locked pin, as the lock file says (no network). ConfigError naming the file
    if it is missing or malformed."""
    path = path or lock_path()
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(
            f"{path}: cannot read the kernel pins lock ({e.strerror}); run `ipvs-fleet pins update`"
        ) from e
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    pins = doc.get("pins") if isinstance(doc, dict) else None
    if not isinstance(pins, dict):
        raise ConfigError(f"{path}: no `pins` mapping of release to kernel")
    out: dict[str, KernelPin] = {}
    for release, entry in pins.items():
        check_release(release, f"{path}: pins")
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) and entry.get(k) for k in ("kernel_release", "version")
        ):
            raise ConfigError(f"{path}: pins.{release}: needs kernel_release and version")
        pin = pin_from_release(entry["kernel_release"], entry["version"])
        if pin.release != release:
            raise ConfigError(
                f"{path}: pins.{release}: {entry['kernel_release']} is not a {release} kernel "
                f"(line {pin.line}, {release} has {RELEASES[release]})"
            )
        if entry.get("line", pin.line) != pin.line:
            raise ConfigError(
                f"{path}: pins.{release}: line {entry['line']!r} does not match "
                f"{pin.kernel_release} (line {pin.line})"
            )
        out[release] = pin
    return out


def locked_pin(release: str) -> KernelPin:
    """The locked pin of one release (no network)."""
    check_release(release)
    pins = locked_pins()
    if release not in pins:
        raise ConfigError(
            f"{lock_path()}: no kernel pin for {release}; run `ipvs-fleet pins update`"
        )
    return pins[release]


def lock_text(pins: Mapping[str, KernelPin]) -> str:
    """The lock file's content for these pins (releases in RELEASES order, stable)."""
    entries = {
        r: {"line": p.line, "kernel_release": p.kernel_release, "version": p.version}
        for r in RELEASES
        if (p := pins.get(r)) is not None
    }
    return json.dumps({"comment": LOCK_COMMENT, "pins": entries}, indent=2) + "\n"


def write_lock(pins: Mapping[str, KernelPin], path: Path | None = None) -> Path:
    """Write the lock (atomically: a reader never sees half a file); its path."""
    path = path or lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(lock_text(pins))
    os.replace(f.name, path)
    return path


def strict_pins() -> bool:
    """Whether a locked pin missing from the archive is an error ($IPVS_FLEET_STRICT_PINS)."""
    return os.environ.get(STRICT_PINS_ENV, "").strip().lower() not in ("", "0", "no", "false")


def _describe(pin: KernelPin) -> str:
    return f"{pin.kernel_release} ({pin.version})"


def vanished_message(locked: KernelPin, newest: KernelPin) -> str:
    return (
        f"{locked.release}: locked kernel {_describe(locked)} is no longer in the Debian "
        f"archive; the newest is {_describe(newest)}"
    )


_warned: set[tuple[KernelPin, KernelPin]] = set()
_warned_lock = threading.Lock()


def _warn(msg: str) -> None:
    print(f"ipvs-fleet: warning: {msg}", file=sys.stderr, flush=True)


def pinned_kernel(
    release: str,
    *,
    strict: bool | None = None,
    offline_ok: bool = True,
    warn: Callable[[str], None] = _warn,
) -> KernelPin:
    """The kernel the builds and lab images use for a release: its locked pin.

    Checked against the archive: when the locked version is gone (Debian keeps only the
    current kernel of a suite), the newest kernel of the release is used instead, with a
    one-line warning (once per process) naming both; with `strict` (default:
    $IPVS_FLEET_STRICT_PINS) that is a FleetError. When the archive cannot be reached, the
    locked pin is returned as it is (a cached build or image of it works offline), or, with
    offline_ok=False, ArchiveUnreachable is raised.
    """
    locked = locked_pin(release)
    try:
        available = archive_kernels(release)
    except ArchiveUnreachable:
        if offline_ok:
            return locked
        raise
    if locked in available:
        return locked
    newest = available[0]
    msg = vanished_message(locked, newest)
    if strict_pins() if strict is None else strict:
        raise FleetError(
            f"{msg} (strict pins: run `ipvs-fleet pins update` to lock it, or drop "
            f"--strict-pins/{STRICT_PINS_ENV} to build for the newest)"
        )
    with _warned_lock:
        first = (locked, newest) not in _warned
        _warned.add((locked, newest))
    if first:
        warn(
            f"{msg}: using {newest.kernel_release} (run `ipvs-fleet pins update` to lock it; "
            f"--strict-pins or {STRICT_PINS_ENV}=1 makes this an error)"
        )
    return newest


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
