"""Builds and artifacts: bad input gives a clear error and leaves nothing behind; the artifact
API checks what the deploy relies on. Builds run in the real (cached) bookworm builder root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.build.artifact import load_artifact
from ipvs_fleet.build.build import build_for, pin_for
from ipvs_fleet.build.dkms import dkms_build, make_dkms_tree
from ipvs_fleet.debian import KernelPin
from ipvs_fleet.errors import ConfigError, FleetError


def test_cached_artifacts_load_and_verify(artifacts, lab_pins) -> None:
    for pin in lab_pins.values():
        art = artifacts[pin.kernel_release]
        again = load_artifact(art.path.parent, pin.kernel_release)
        assert again.manifest == art.manifest
        m = art.manifest
        assert (m["kernel_release"], m["source_version"], m["release"]) == (
            pin.kernel_release,
            pin.version,
            pin.release,
        )
        assert m["vermagic"].startswith(pin.kernel_release + " ")
        assert {"ip_vs.ko", "ip_vs_rr.ko", "ip_vs_ftp.ko", "xt_ipvs.ko"} <= set(art.modules)
        assert art.set_id == kernel.set_id(kernel.series(pin.line))
        assert art.reuse_design == "handback"
        # Same inputs: the cache answers without rebuilding (same manifest, same tarball).
        assert build_for(pin, art.path.parent).manifest == m


def test_missing_artifact_names_the_kernel(tmp_path: Path) -> None:
    with pytest.raises(FleetError, match="no module artifact for kernel 6.1.0-99-cloud-amd64"):
        load_artifact(tmp_path, "6.1.0-99-cloud-amd64")


def test_tampered_tarball_is_refused(artifacts, tmp_path: Path) -> None:
    art = next(iter(artifacts.values()))
    copy = tmp_path / art.kernel_release
    shutil.copytree(art.path, copy)
    with (copy / art.tarball.name).open("ab") as f:
        f.write(b"x")
    with pytest.raises(FleetError, match="sha256 .* does not match the manifest"):
        load_artifact(tmp_path, art.kernel_release)


def test_unknown_kernel_release_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="not bookworm's pinned kernel"):
        pin_for("bookworm", "6.1.0-99-cloud-amd64", None)
    with pytest.raises(ConfigError, match="not in the bookworm registry"):
        pin_for("bookworm", "6.1.0-99-cloud-amd64", "6.1.999-1")
    with pytest.raises(ConfigError, match="line 4.19 is not supported"):
        pin_for("bookworm", "4.19.0-27-cloud-amd64", "4.19.316-1")


def test_patch_that_does_not_apply_names_file_and_hunk(lab_pins, tmp_path: Path) -> None:
    pin: KernelPin = lab_pins["bookworm"]
    broken = []
    for p in kernel.series(pin.line):
        shutil.copy(p, tmp_path / p.name)
        broken.append(tmp_path / p.name)
    # Make the reschedule hunk's context name something the source does not have.
    text = broken[1].read_text().replace(" \t\tif (resched) {", " \t\tif (resched_x) {", 1)
    broken[1].write_text(text)
    out = tmp_path / "out"
    with pytest.raises(FleetError) as e:
        build_for(pin, out, patches=broken)
    msg = str(e.value)
    assert broken[1].name in msg and "ip_vs_core.c hunk #3" in msg, msg
    leftovers = [p.name for p in out.iterdir() if p.name != "logs"] if out.exists() else []
    assert leftovers == []


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


def test_dkms_build_succeeds(lab_pins, artifacts, tmp_path: Path) -> None:
    """`dkms add` + `dkms build` of the DKMS tree, for the bookworm kernel, in its builder
    root (the same builder root the artifacts were built in)."""
    pin = lab_pins["bookworm"]
    modules = sorted(name.removesuffix(".ko") for name in artifacts[pin.kernel_release].modules)
    tree = make_dkms_tree(pin.line, tmp_path, modules)
    dkms_build(pin, tree)  # raises FleetError with dkms's make.log on failure
