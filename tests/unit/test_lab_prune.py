"""`ipvs-fleet lab prune`: which cached images go, on a cache laid out in a temp dir."""

from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest

from ipvs_fleet.debian import KernelPin
from ipvs_fleet.errors import FleetError
from ipvs_fleet.lab import image

PINS = {
    "bullseye": KernelPin("bullseye", "5.10", "5.10.0-46-cloud-amd64", "5.10.262-1"),
    "bookworm": KernelPin("bookworm", "6.1", "6.1.0-56-cloud-amd64", "6.1.192-2"),
}


def fake_image(root: Path, name: str, pin: KernelPin, done: bool = True) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (root / f"{name}.lock").touch()
    if done:
        info = {"kernel_release": pin.kernel_release, "kernel_version": pin.version}
        (d / "image.json").write_text(json.dumps(info))
    return d


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(image, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(image, "images_in_use", set)

    def resolve(release: str) -> KernelPin:
        if release not in PINS:
            raise FleetError(f"{release}: mirror unreachable")
        return PINS[release]

    monkeypatch.setattr(image, "resolve_kernel", resolve)
    return tmp_path


def current(pin: KernelPin) -> str:
    return image.image_key(pin, [*image.LAB_PACKAGES, f"{pin.image_package}={pin.version}"])


def test_keeps_current_and_in_use_removes_superseded_and_unfinished(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bw = PINS["bookworm"]
    keep = fake_image(cache, current(bw), bw)
    old = fake_image(cache, "bookworm-6.1.0-56-cloud-amd64-000000000000", bw)
    running = fake_image(cache, "bookworm-6.1.0-55-cloud-amd64-111111111111", bw)
    broken = fake_image(cache, "bullseye-5.10.0-46-cloud-amd64-222222222222", PINS["bullseye"],
                        done=False)  # fmt: skip
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
    pin = KernelPin("trixie", "6.12", "6.12.118+deb13-cloud-amd64", "6.12.118-1")
    fake_image(cache, "trixie-6.12.118+deb13-cloud-amd64-aaaaaaaaaaaa", pin)
    newest = fake_image(cache, "trixie-6.12.118+deb13-cloud-amd64-bbbbbbbbbbbb", pin)
    removed = {p.name for p, _ in image.prune_images()}
    assert newest.exists() and newest.name not in removed
    assert "trixie-6.12.118+deb13-cloud-amd64-aaaaaaaaaaaa" in removed


def test_an_image_being_built_stays(cache: Path) -> None:
    d = fake_image(cache, "bookworm-6.1.0-56-cloud-amd64-333333333333", PINS["bookworm"],
                   done=False)  # fmt: skip
    with (cache / f"{d.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another lab is building it now
        assert image.prune_images() == []
    assert d.exists()
