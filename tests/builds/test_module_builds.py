"""Real module builds in the (cached) builder roots: mmdebstrap roots of the pinned kernels'
headers and linux-source from the Debian archive, so root, network and minutes on a cold
cache. Marked `build` (and `lab`, so the hermetic unit tier `-m 'not lab'` leaves them out);
`make test` runs them after the module artifacts are built, `pytest -m build` alone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.build.artifact import Artifact, load_artifact
from ipvs_fleet.build.build import build_for
from ipvs_fleet.build.dkms import dkms_build, make_dkms_tree
from ipvs_fleet.debian import KernelPin
from ipvs_fleet.errors import FleetError

pytestmark = [pytest.mark.lab, pytest.mark.build]


def test_cached_artifacts_load_and_verify(
    artifacts: dict[str, Artifact], lab_pins: dict[str, KernelPin]
) -> None:
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


def test_patch_that_does_not_apply_names_file_and_hunk(
    lab_pins: dict[str, KernelPin], tmp_path: Path
) -> None:
    pin = lab_pins["bookworm"]
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


@pytest.mark.slow  # ~75 s; make test-dkms builds and installs on a VM, make test-full here
def test_dkms_build_succeeds(
    lab_pins: dict[str, KernelPin], artifacts: dict[str, Artifact], tmp_path: Path
) -> None:
    """`dkms add` + `dkms build` of the DKMS tree, for the bookworm kernel, in its builder
    root (the same builder root the artifacts were built in)."""
    pin = lab_pins["bookworm"]
    modules = sorted(name.removesuffix(".ko") for name in artifacts[pin.kernel_release].modules)
    tree = make_dkms_tree(pin.line, tmp_path, modules)
    dkms_build(pin, tree)  # raises FleetError with dkms's make.log on failure
