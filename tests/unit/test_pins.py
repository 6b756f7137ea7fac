"""The kernel pins lock: what it holds, `ipvs-fleet pins`, and which kernel the builds and
lab images take when the archive still has the locked one, has moved on, or is unreachable.
All against a fake archive (`fake_archive`) and a lock of the test's own (`pins_lock`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ipvs_fleet import cli, debian
from ipvs_fleet.build import build
from ipvs_fleet.build import cli as build_cli
from ipvs_fleet.debian import RELEASES, KernelPin
from ipvs_fleet.errors import ConfigError, FleetError
from ipvs_fleet.lab import image
from tests.fixtures.pins import FakeArchive

LockWriter = Callable[[dict[str, KernelPin]], Path]
Capsys = pytest.CaptureFixture[str]

OLD = {
    "bullseye": KernelPin("bullseye", "5.10", "5.10.0-46-cloud-amd64", "5.10.262-1"),
    "bookworm": KernelPin("bookworm", "6.1", "6.1.0-56-cloud-amd64", "6.1.192-2"),
    "trixie": KernelPin("trixie", "6.12", "6.12.118+deb13-cloud-amd64", "6.12.118-1"),
    "sid": KernelPin("sid", "7.2", "7.2.13+deb14-cloud-amd64", "7.2.13-1"),
}
# The releases of the default lab fleet (lab/fleet.yml): what `build --all-lab` builds.
LAB = ("bullseye", "bookworm", "trixie")
# Debian's next upload of bookworm's kernel (an ABI bump: a new kernel release).
NEW_BOOKWORM = KernelPin("bookworm", "6.1", "6.1.0-57-cloud-amd64", "6.1.193-1")


@pytest.fixture
def archive(fake_archive: FakeArchive, pins_lock: LockWriter) -> FakeArchive:
    """Every OLD kernel locked and in the archive (bookworm's in -security, as they are)."""
    for pin in OLD.values():
        fake_archive.publish(pin, f"{pin.release}-security" if pin.release == "bookworm" else None)
    pins_lock(OLD)
    return fake_archive


def test_shipped_lock_pins_every_release_of_its_line(shipped_pins: dict[str, KernelPin]) -> None:
    assert list(shipped_pins) == list(RELEASES)
    for release, pin in shipped_pins.items():
        assert (pin.release, pin.line) == (release, RELEASES[release])
        assert pin.kernel_release.startswith(pin.line + ".")
        assert pin.kernel_release.endswith("-" + debian.FLAVOUR)
        assert pin.version.startswith(pin.line + ".")
    # It is what `pins update` writes (so an update diff is only the pins that moved).
    assert debian.PINS_LOCK.read_text() == debian.lock_text(shipped_pins)


def test_shipped_lock_is_package_data() -> None:
    import tomllib

    conf = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    data = conf["tool"]["setuptools"]["package-data"]["ipvs_fleet"]
    assert debian.PINS_LOCK.name in data
    assert debian.PINS_LOCK.parent == Path(debian.__file__).parent


def test_locked_pin_is_used_while_the_archive_has_it(archive: FakeArchive, capsys: Capsys) -> None:
    archive.publish(NEW_BOOKWORM, "bookworm-security")  # a newer upload does not move the pin
    assert debian.pinned_kernel("bookworm") == OLD["bookworm"]
    assert debian.resolve_kernel("bookworm") == NEW_BOOKWORM
    assert capsys.readouterr().err == ""


def test_vanished_pin_falls_back_to_the_newest_with_one_warning(
    archive: FakeArchive, capsys: Capsys
) -> None:
    archive.publish(NEW_BOOKWORM, "bookworm-security")
    archive.remove(OLD["bookworm"])
    assert debian.pinned_kernel("bookworm") == NEW_BOOKWORM
    assert debian.pinned_kernel("bookworm") == NEW_BOOKWORM
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err  # once per process, one line
    assert err[0].startswith("ipvs-fleet: warning: bookworm: locked kernel 6.1.0-56-cloud-amd64 ")
    assert "(6.1.192-2) is no longer in the Debian archive" in err[0]
    assert "using 6.1.0-57-cloud-amd64" in err[0] and "ipvs-fleet pins update" in err[0]
    assert "IPVS_FLEET_STRICT_PINS=1" in err[0]


@pytest.mark.parametrize("how", ["env", "argument"])
def test_strict_pins_make_a_vanished_pin_an_error(
    archive: FakeArchive, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    archive.publish(NEW_BOOKWORM, "bookworm-security")
    archive.remove(OLD["bookworm"])
    if how == "env":
        monkeypatch.setenv(debian.STRICT_PINS_ENV, "1")
    with pytest.raises(FleetError) as e:
        debian.pinned_kernel("bookworm", strict=True if how == "argument" else None)
    msg = str(e.value)
    assert "locked kernel 6.1.0-56-cloud-amd64 (6.1.192-2) is no longer" in msg
    assert "the newest is 6.1.0-57-cloud-amd64 (6.1.193-1)" in msg
    assert "ipvs-fleet pins update" in msg
    # The other releases are unaffected.
    assert debian.pinned_kernel("trixie") == OLD["trixie"]


def test_strict_pins_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, strict in [("", False), ("0", False), ("no", False), ("1", True), ("yes", True)]:
        monkeypatch.setenv(debian.STRICT_PINS_ENV, value)
        assert debian.strict_pins() is strict


def test_offline_uses_the_locked_pin_or_says_unreachable(archive: FakeArchive) -> None:
    archive.offline()
    assert debian.pinned_kernel("bullseye") == OLD["bullseye"]
    with pytest.raises(debian.ArchiveUnreachable, match="cannot fetch"):
        debian.pinned_kernel("bullseye", offline_ok=False)


def test_incomplete_upload_is_not_a_candidate(
    archive: FakeArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An image whose headers are not published yet cannot be built for: the lock stays.
    text = archive.packages
    half = KernelPin("trixie", "6.12", "6.12.120+deb13-cloud-amd64", "6.12.120-1")

    def packages(mirror: str, suite: str, arch: str) -> str:
        extra = f"\nPackage: {half.image_package}\nVersion: {half.version}\n"
        return text(mirror, suite, arch) + (extra if suite == "trixie" else "")

    monkeypatch.setattr(debian, "_packages", packages)
    assert debian.archive_kernels("trixie") == [OLD["trixie"]]


def test_lock_errors_name_the_file(
    pins_lock: LockWriter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = pins_lock({"bullseye": OLD["bullseye"]})
    with pytest.raises(ConfigError, match=r"no kernel pin for trixie; run `ipvs-fleet pins upd"):
        debian.locked_pin("trixie")
    doc = json.loads(path.read_text())
    doc["pins"]["bookworm"] = {"kernel_release": "5.10.0-46-cloud-amd64", "version": "5.10.262-1"}
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=r"pins.bookworm: 5.10.0-46-cloud-amd64 is not a bookw"):
        debian.locked_pins()
    doc["pins"] = {"buster": {"kernel_release": "4.19.0-27-cloud-amd64", "version": "4.19.316-1"}}
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="unknown Debian release 'buster'"):
        debian.locked_pins()
    path.write_text("{")
    with pytest.raises(ConfigError, match=f"{path}: not valid JSON"):
        debian.locked_pins()
    monkeypatch.setenv(debian.PINS_LOCK_ENV, str(tmp_path / "absent.json"))
    with pytest.raises(ConfigError, match="absent.json: cannot read the kernel pins lock"):
        debian.locked_pins()


def test_pins_update_shows_old_to_new_and_writes_the_lock(
    archive: FakeArchive, capsys: Capsys
) -> None:
    archive.publish(NEW_BOOKWORM, "bookworm-security")
    archive.remove(OLD["bookworm"])
    lock = debian.lock_path()
    before = lock.read_text()
    assert cli.main(["pins", "update", "--dry"]) == 0
    out = capsys.readouterr().out
    assert lock.read_text() == before
    assert "bookworm  6.1.0-56-cloud-amd64 6.1.192-2 -> 6.1.0-57-cloud-amd64 6.1.193-1" in out
    assert "bullseye  5.10.0-46-cloud-amd64 5.10.262-1 (unchanged)" in out
    assert "1 of 4 pins would change (dry run" in out
    assert cli.main(["pins", "update"]) == 0
    assert f"wrote {lock}: 1 of 4 pins changed" in capsys.readouterr().out
    assert debian.locked_pins() == {**OLD, "bookworm": NEW_BOOKWORM}
    assert cli.main(["pins", "update"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["pins", "show"]) == 0
    assert "bookworm  6.1.0-57-cloud-amd64 6.1.193-1" in capsys.readouterr().out


def test_pins_update_creates_a_missing_lock_but_keeps_a_broken_one(
    archive: FakeArchive, capsys: Capsys
) -> None:
    lock = debian.lock_path()
    lock.unlink()
    assert cli.main(["pins", "update"]) == 0
    assert "bullseye  (none) -> 5.10.0-46-cloud-amd64 5.10.262-1" in capsys.readouterr().out
    assert debian.locked_pins() == OLD
    lock.write_text("not json")
    assert cli.main(["pins", "update"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert lock.read_text() == "not json"


def test_pins_check_exit_code_says_whether_a_pin_is_gone(
    archive: FakeArchive, capsys: Capsys
) -> None:
    archive.publish(NEW_BOOKWORM, "bookworm-security")
    assert cli.main(["pins", "check"]) == 0
    out = capsys.readouterr().out
    assert "6.1.192-2: in the archive; newer: 6.1.0-57-cloud-amd64 6.1.193-1" in out
    archive.remove(OLD["bookworm"])
    assert cli.main(["pins", "check"]) == 1
    out = capsys.readouterr().out
    assert "GONE from the archive; builds and images use 6.1.0-57-cloud-amd64" in out


def test_builds_take_the_locked_pins(archive: FakeArchive, capsys: Capsys) -> None:
    archive.publish(NEW_BOOKWORM, "bookworm-security")
    args = cli.parser().parse_args(["build", "--all-lab"])
    assert build_cli.targets(args) == [OLD[r] for r in LAB]
    assert build.pin_for("bookworm", None, None) == OLD["bookworm"]
    assert build.pin_for("bookworm", OLD["bookworm"].kernel_release, None) == OLD["bookworm"]
    # The newer upload is still buildable when named with its version.
    assert build.pin_for("bookworm", NEW_BOOKWORM.kernel_release, NEW_BOOKWORM.version) == (
        NEW_BOOKWORM
    )
    archive.remove(OLD["bookworm"])
    assert build_cli.targets(args)[1] == NEW_BOOKWORM
    assert "warning: bookworm: locked kernel" in capsys.readouterr().err


def test_all_lab_builds_the_releases_of_the_fleet_in_use(
    archive: FakeArchive, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`build --all-lab` follows the fleet file: the 7.2 lab (sid alone) builds only 7.2, and
    the default lab does not build it (CI's time)."""
    args = cli.parser().parse_args(["build", "--all-lab"])
    assert OLD["sid"] not in build_cli.targets(args)
    monkeypatch.setenv("IPVS_FLEET_FLEET", str(Path(__file__).parents[2] / "lab/fleet-7.2.yml"))
    assert build_cli.targets(args) == [OLD["sid"]]


def test_build_strict_pins_flag(
    archive: FakeArchive, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: Capsys
) -> None:
    monkeypatch.setenv(debian.STRICT_PINS_ENV, "0")  # restored after the CLI sets it
    archive.remove(OLD["trixie"])
    archive.publish(KernelPin("trixie", "6.12", "6.12.120+deb13-cloud-amd64", "6.12.120-1"))
    out = tmp_path / "out"
    rc = cli.main(["build", "--release", "trixie", "--strict-pins", "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "trixie: locked kernel 6.12.118+deb13-cloud-amd64 (6.12.118-1) is no longer" in err
    assert not out.exists()


def test_unknown_kernel_release_is_a_clear_error(archive: FakeArchive) -> None:
    with pytest.raises(ConfigError, match="not bookworm's pinned kernel"):
        build.pin_for("bookworm", "6.1.0-99-cloud-amd64", None)
    with pytest.raises(ConfigError, match="not in the bookworm registry"):
        build.pin_for("bookworm", "6.1.0-99-cloud-amd64", "6.1.999-1")
    with pytest.raises(ConfigError, match="line 4.19 is not supported"):
        build.pin_for("bookworm", "4.19.0-27-cloud-amd64", "4.19.316-1")
    with pytest.raises(ConfigError, match="is not a bookworm kernel"):
        build.pin_for("bookworm", OLD["trixie"].kernel_release, OLD["trixie"].version)


@pytest.fixture
def images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(image, "cache_dir", lambda: tmp_path)
    return tmp_path


def cached_image(root: Path, pin: KernelPin, **kw: object) -> Path:
    d = root / image.image_key(pin, image.image_packages(pin, **kw))  # type: ignore[arg-type]
    d.mkdir(parents=True)
    info = {"kernel_release": pin.kernel_release, "kernel_version": pin.version}
    (d / "image.json").write_text(json.dumps(info))
    return d


def test_lab_images_take_the_locked_pin(archive: FakeArchive, images: Path) -> None:
    archive.publish(NEW_BOOKWORM, "bookworm-security")
    d = cached_image(images, OLD["bookworm"])
    img = image.build_image("bookworm")
    assert (img.pin, img.dir) == (OLD["bookworm"], d)
    tools = cached_image(images, OLD["bookworm"], build_tools=True)
    assert image.build_image("bookworm", build_tools=True).dir == tools


def test_lab_image_of_a_vanished_pin_is_the_newest_kernel(
    archive: FakeArchive, images: Path, capsys: Capsys
) -> None:
    cached_image(images, OLD["bookworm"])
    new = cached_image(images, NEW_BOOKWORM)
    archive.publish(NEW_BOOKWORM, "bookworm-security")
    archive.remove(OLD["bookworm"])
    img = image.build_image("bookworm")
    assert (img.pin, img.dir) == (NEW_BOOKWORM, new)
    assert "warning: bookworm: locked kernel 6.1.0-56-cloud-amd64" in capsys.readouterr().err


def test_lab_image_offline_is_the_locked_pins_cached_image(
    archive: FakeArchive, images: Path
) -> None:
    locked = cached_image(images, OLD["bullseye"])
    older = KernelPin("bullseye", "5.10", "5.10.0-45-cloud-amd64", "5.10.261-1")
    other = cached_image(images, older)
    os.utime(other / "image.json", (time.time() + 60, time.time() + 60))  # the newest cached
    archive.offline()
    assert image.build_image("bullseye").dir == locked
    # Without an image of the locked pin: the newest cached one, as before the lock.
    shutil.rmtree(locked)
    logs: list[str] = []
    assert image.build_image("bullseye", log=logs.append).dir == other
    assert "cannot fetch" in logs[0] and f"using cached image {other.name}" in logs[0]
    with pytest.raises(debian.ArchiveUnreachable):
        image.build_image("trixie")  # nothing cached: the reason, not a half-made image


def test_releases_file_gives_each_release_its_line_suites_and_apt_options() -> None:
    """kernel/releases.yml: the stable releases search the release, -updates and -security;
    sid (unstable) only itself, and its roots accept an InRelease past its Valid-Until."""
    from ipvs_fleet import rootfs

    assert debian.RELEASES == {
        "bullseye": "5.10",
        "bookworm": "6.1",
        "trixie": "6.12",
        "sid": "7.2",
    }
    assert [s for _, s in debian.suites("trixie")] == [
        "trixie",
        "trixie-updates",
        "trixie-security",
    ]
    assert [s for _, s in debian.suites("sid")] == ["sid"]
    assert rootfs.sources("sid") == [f"deb {debian.MIRROR} sid main"]
    # apt.conf syntax: a bare `Name=value` is no option to apt (seen: sid's expired InRelease)
    assert rootfs.apt_options("sid") == ['--aptopt=Acquire::Check-Valid-Until "false"']
    assert rootfs.apt_options("bookworm") == []


def test_sid_images_carry_mount_the_stable_ones_are_unchanged() -> None:
    """sid's required set has no `mount`: its lab images add it (releases.yml lab_packages),
    and only its: a stable release's image key stays what it was."""
    from ipvs_fleet.lab import image

    sid = debian.locked_pin("sid")
    assert "mount" in image.image_packages(sid)
    assert image.image_packages(sid).count("mount") == 1
    assert "mount" in image.image_packages(sid, [*image.LAB_PACKAGES, "socat"])
    for release in ("bullseye", "bookworm", "trixie"):
        pin = debian.locked_pin(release)
        assert image.image_packages(pin) == [
            *image.LAB_PACKAGES,
            f"{pin.image_package}={pin.version}",
        ]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("sid: {line: 7.2}\n", "needs `line"),  # a float, not the quoted line
        ("sid: {line: '7.2', suites: [release, backports]}\n", "sid.suites"),
        ("sid: {line: '7.2', apt_options: [Check-Valid-Until]}\n", "sid.apt_options"),
        ("sid: {line: '7.2', codename: unstable}\n", "unknown keys"),
        ("sid: {line: '7.2', lab_packages: mount}\n", "sid.lab_packages"),
        ("a: {line: '7.2'}\nb: {line: '7.2'}\n", "two releases share a kernel line"),
        ("- sid\n", "expected a mapping"),
    ],
)
def test_bad_releases_file_names_the_file_and_release(
    tmp_path: Path, text: str, words: str
) -> None:
    path = tmp_path / "releases.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(path))) as e:
        debian.load_releases(path)
    assert words in str(e.value)
