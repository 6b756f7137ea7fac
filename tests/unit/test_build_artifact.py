"""Artifacts and the DKMS tree without building: the artifact API checks what the deploy
relies on, a matching artifact is reused without a builder root, bad input is a clear error.
The real builds are in tests/builds (marker `build`)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.build import build
from ipvs_fleet.build.artifact import FORMAT, MANIFEST, Artifact, load_artifact
from ipvs_fleet.build.dkms import make_dkms_tree
from ipvs_fleet.debian import KernelPin
from ipvs_fleet.errors import FleetError
from tests.fixtures.pins import FakeArchive

PIN = KernelPin("bookworm", "6.1", "6.1.0-56-cloud-amd64", "6.1.192-2")


def fake_artifact(out: Path, pin: KernelPin = PIN) -> Artifact:
    """An artifact as `build_for` lays it out for `pin` and the shipped series (fake .ko)."""
    files = kernel.series(pin.line)
    d = out / pin.kernel_release
    d.mkdir(parents=True)
    mods = {ko: f"{ko} for {pin.kernel_release}".encode() for ko in ("ip_vs.ko", "xt_ipvs.ko")}
    name = f"ipvs-fleet-modules-{pin.kernel_release}.tar.gz"
    with gzip.GzipFile(d / name, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        for ko, data in mods.items():
            info = tarfile.TarInfo(ko)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sid = kernel.set_id(files)
    manifest = {
        "format": FORMAT, "kernel_release": pin.kernel_release, "release": pin.release,
        "line": pin.line, "source_version": pin.version, "recipe": build.RECIPE,
        "patchset_hash": kernel.patchset_hash(files), "patches": [p.name for p in files],
        "variant": None, "reuse_design": kernel.reuse_design(files),
        "modinfo": {kernel.MODINFO_SET: sid}, "vermagic": f"{pin.kernel_release} SMP mod_unload",
        "modules": {ko: hashlib.sha256(data).hexdigest() for ko, data in mods.items()},
        "tarball": name, "tarball_sha256": hashlib.sha256((d / name).read_bytes()).hexdigest(),
    }  # fmt: skip
    (d / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return load_artifact(out, pin.kernel_release)


def test_missing_artifact_names_the_kernel(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="no module artifact for kernel 6.1.0-99-cloud-amd64"):
        load_artifact(tmp_path, "6.1.0-99-cloud-amd64")


def test_tampered_tarball_is_refused(tmp_path: Path) -> None:
    art = fake_artifact(tmp_path / "good")
    copy = tmp_path / art.kernel_release
    shutil.copytree(art.path, copy)
    with (copy / art.tarball.name).open("ab") as f:
        f.write(b"x")
    with pytest.raises(FleetError, match="sha256 .* does not match the manifest"):
        load_artifact(tmp_path, art.kernel_release)


def test_artifact_for_another_kernel_is_refused(tmp_path: Path) -> None:
    art = fake_artifact(tmp_path)
    art.path.rename(tmp_path / "6.1.0-57-cloud-amd64")
    with pytest.raises(FleetError, match="is for kernel 6.1.0-56-cloud-amd64, not 6.1.0-57"):
        load_artifact(tmp_path, "6.1.0-57-cloud-amd64")


def test_matching_artifact_is_reused_without_a_builder_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    art = fake_artifact(tmp_path)

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("rebuilt although the artifact matches")

    monkeypatch.setattr(build, "builder_root", no_build)
    assert build.build_for(PIN, tmp_path).manifest == art.manifest
    # Another package version of the same kernel release, or --force: a rebuild.
    other = KernelPin(PIN.release, PIN.line, PIN.kernel_release, "6.1.192-3")
    for pin, force in ((other, False), (PIN, True)):
        with pytest.raises(AssertionError, match="rebuilt"):
            build.build_for(pin, tmp_path, force=force)


def test_dkms_tree_is_complete(tmp_path: Path) -> None:
    tree = make_dkms_tree("6.12", tmp_path, ["ip_vs", "ip_vs_rr", "ip_vs_twos", "xt_ipvs"])
    conf = (tree / "dkms.conf").read_text()
    assert 'AUTOINSTALL="yes"' in conf
    assert 'BUILT_MODULE_NAME[2]="ip_vs_twos"' in conf
    assert sorted(p.name for p in (tree / "patches").iterdir()) == [
        p.name for p in kernel.series("6.12")
    ]
    assert "ipvs_fleet" in (tree / "ipvs_fleet_id.h").read_text()
    assert "linux-source-$line" in (tree / "dkms-make.sh").read_text()
    script = (tree / "dkms-make.sh").read_text()
    assert not any(f"{{{k}}}" in script for k in ("line", "members", "objs", "id_header"))


def test_build_shows_each_step_of_each_kernel_line_as_it_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fake_archive: FakeArchive,
    shipped_pins: dict[str, KernelPin],
) -> None:
    """`ipvs-fleet build` says what it is doing before each long step, per kernel line."""
    from ipvs_fleet.cli import main

    pin = fake_archive.publish(shipped_pins["bookworm"])
    seen: list[str] = []

    def stop_in_builder_root(*args: object, **kwargs: object) -> None:
        seen.append(capsys.readouterr().out)  # printed before the step's minutes
        raise FleetError("stopped in the builder root")

    monkeypatch.setattr(build, "builder_root", stop_in_builder_root)
    assert main(["build", "--release", "bookworm", "--out", str(tmp_path)]) == 2
    assert seen and seen[0].startswith(
        f"[1/1] {pin.line} {pin.kernel_release}: builder root of bookworm"
    ), seen
    fake_artifact(tmp_path, pin)
    assert main(["build", "--release", "bookworm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"[1/1] {pin.line} {pin.kernel_release}: cached"), out
