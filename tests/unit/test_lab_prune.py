"""`ipvs-fleet lab prune`: which cached images go, on a cache laid out in a temp dir."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest

from ipvs_fleet.debian import KernelPin
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.lab import image
from tests.fixtures.pins import FakeArchive

PINS = {
    "bullseye": KernelPin("bullseye", "5.10", "5.10.0-46-cloud-amd64", "5.10.262-1"),
    "bookworm": KernelPin("bookworm", "6.1", "6.1.0-56-cloud-amd64", "6.1.192-2"),
    "sid": KernelPin("sid", "7.2", "7.2.13+deb14-cloud-amd64", "7.2.13-1"),
}
TRIXIE = KernelPin("trixie", "6.12", "6.12.118+deb13-cloud-amd64", "6.12.118-1")


def fake_image(root: Path, name: str, pin: KernelPin, done: bool = True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (root / f"{name}.lock").touch()
    if done:
        info = {"kernel_release": pin.kernel_release, "kernel_version": pin.version}
        (d / "image.json").write_text(json.dumps(info))
    return d


@pytest.fixture
def cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_archive: FakeArchive, pins_lock
) -> Path:
    """Every release locked; the archive has bullseye's and bookworm's, trixie's is offline."""
    pins_lock({**PINS, "trixie": TRIXIE})
    for pin in PINS.values():
        fake_archive.publish(pin)
    fake_archive.offline("trixie")
    root = tmp_path / "lab-images"
    root.mkdir()
    monkeypatch.setattr(image, "cache_dir", lambda: root)
    monkeypatch.setattr(image, "images_in_use", set)
    return root


def current(pin: KernelPin) -> str:
    return image.image_key(pin, [*image.LAB_PACKAGES, f"{pin.image_package}={pin.version}"])


def test_keeps_current_and_in_use_removes_superseded_and_unfinished(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bw = PINS["bookworm"]
    keep = fake_image(cache, current(bw), bw)
    old = fake_image(cache, "bookworm-6.1.0-56-cloud-amd64-000000000000", bw)
    running = fake_image(cache, "bookworm-6.1.0-55-cloud-amd64-111111111111", bw)
    broken = fake_image(
        cache, "bullseye-5.10.0-46-cloud-amd64-222222222222", PINS["bullseye"], done=False
    )
    monkeypatch.setattr(image, "images_in_use", lambda: {running})
    dry = image.prune_images(dry_run=True)
    assert {(p.name, why) for p, why in dry} == {
        (old.name, "superseded image"),
        (old.name + ".lock", "stale lock"),
        (broken.name, "unfinished build"),
        (broken.name + ".lock", "stale lock"),
    }
    assert old.exists() and broken.exists()  # a dry run removes nothing
    assert image.prune_images() == dry
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [keep.name, keep.name + ".lock", running.name, running.name + ".lock"]
    )


def test_offline_keeps_the_newest_image_of_a_release(cache: Path) -> None:
    pin = TRIXIE
    fake_image(cache, "trixie-6.12.118+deb13-cloud-amd64-aaaaaaaaaaaa", pin)
    newest = fake_image(cache, "trixie-6.12.118+deb13-cloud-amd64-bbbbbbbbbbbb", pin)
    removed = {p.name for p, _ in image.prune_images()}
    assert newest.exists() and newest.name not in removed
    assert "trixie-6.12.118+deb13-cloud-amd64-aaaaaaaaaaaa" in removed


def test_an_image_being_built_stays(cache: Path) -> None:
    d = fake_image(
        cache, "bookworm-6.1.0-56-cloud-amd64-333333333333", PINS["bookworm"], done=False
    )
    with (cache / f"{d.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another lab is building it now
        assert image.prune_images() == []
    assert d.exists()


def test_a_vanished_pin_keeps_the_locked_and_the_newest_image(
    cache: Path, fake_archive: FakeArchive
) -> None:
    bw = PINS["bookworm"]
    new = KernelPin("bookworm", "6.1", "6.1.0-57-cloud-amd64", "6.1.193-1")
    fake_archive.remove(bw)
    fake_archive.publish(new, "bookworm-security")
    locked = fake_image(cache, current(bw), bw)
    newest = fake_image(cache, current(new), new)
    tools_key = image.image_key(new, image.image_packages(new, build_tools=True))
    tools = fake_image(cache, tools_key, new)
    older = fake_image(cache, "bookworm-6.1.0-55-cloud-amd64-444444444444", bw)
    assert {p.name for p, _ in image.prune_images()} == {older.name, older.name + ".lock"}
    assert locked.exists() and newest.exists() and tools.exists()


def fleet_image(pin: KernelPin, packages: tuple[str, ...], build_tools: bool = False) -> str:
    """The key of the image a fleet host with these extra packages boots."""
    return image.image_key(
        pin,
        image.image_packages(
            pin, [*image.LAB_PACKAGES, *packages] if packages else None, build_tools
        ),
    )


def test_keeps_the_images_of_every_lab_fleet_file_and_of_the_fleet_in_use(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """lab/fleet-7.2.yml's sid image (nftables) is kept though lab/fleet.yml has no
    sid host, and so is the image of $IPVS_FLEET_FLEET's host; a superseded one goes."""
    sid, bw = PINS["sid"], PINS["bookworm"]
    sid_fleet = fake_image(cache, fleet_image(sid, ("nftables",)), sid)
    mine = tmp_path / "fleet.yml"
    mine.write_text(
        "hosts:\n  x:\n    release: bookworm\n    host_class: k8s_node\n"
        "    packages: [socat]\n    build_tools: true\n"
    )
    monkeypatch.setenv("IPVS_FLEET_FLEET", str(mine))
    own = fake_image(cache, fleet_image(bw, ("socat",), build_tools=True), bw)
    old = fake_image(cache, "sid-7.2.12+deb14-cloud-amd64-555555555555", sid)
    assert {p.name for p, _ in image.prune_images()} == {old.name, old.name + ".lock"}
    assert sid_fleet.exists() and own.exists()


def test_a_broken_fleet_file_removes_nothing(
    cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old = fake_image(cache, "sid-7.2.12+deb14-cloud-amd64-555555555555", PINS["sid"])
    bad = tmp_path / "fleet.yml"
    bad.write_text("hosts:\n  x:\n    release: potato\n    host_class: k8s_node\n")
    monkeypatch.setenv("IPVS_FLEET_FLEET", str(bad))
    with pytest.raises(ConfigError, match="potato"):
        image.prune_images()
    assert old.exists()
