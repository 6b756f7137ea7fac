"""Real module builds in the (cached) builder roots: mmdebstrap roots of the pinned kernels'
headers (and linux-source, for the test-only `upstream` variant) from the Debian archive, so
root, network and minutes on a cold cache. Marked `build` (and `lab`, so the hermetic unit
tier `-m 'not lab'` leaves them out); `make test` runs them after the module artifacts are
built, `pytest -m build` alone."""

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
        # one module, loaded beside the distro's own ip_vs: no IPVS module of ours
        assert set(art.modules) == {"ip_vs_reuse.ko"}
        assert art.set_id == kernel.set_id(kernel.module_sources())
        assert art.reuse_design == "prekill"
        assert m["modinfo"] == {kernel.MODINFO_SET: art.set_id, kernel.MODINFO_REUSE: "prekill"}
        # Same inputs: the cache answers without rebuilding (same manifest, same tarball).
        assert build_for(pin, art.path.parent).manifest == m


def test_source_that_does_not_compile_names_the_error_and_leaves_no_artifact(
    lab_pins: dict[str, KernelPin], tmp_path: Path
) -> None:
    pin = lab_pins["bookworm"]
    src = tmp_path / "src"
    src.mkdir()
    broken = []
    for p in kernel.module_sources():
        shutil.copy(p, src / p.name)
        broken.append(src / p.name)
    c = src / f"{kernel.MODULE_NAME}.c"
    text = c.read_text()
    assert "\trn->enabled = 0;" in text
    c.write_text(text.replace("\trn->enabled = 0;", "\trn->enabled = ipvs_fleet_no_such_knob;", 1))
    out = tmp_path / "out"
    with pytest.raises(FleetError) as e:
        build_for(pin, out, inputs=broken)
    msg = str(e.value)
    assert "make failed" in msg and "error: 'ipvs_fleet_no_such_knob' undeclared" in msg, msg
    leftovers = [p.name for p in out.iterdir() if p.name != "logs"] if out.exists() else []
    assert leftovers == []


@pytest.mark.slow  # make test-dkms builds and installs on a VM, make test-full here
@pytest.mark.usefixtures("artifacts")  # the builder root the artifacts were built in
def test_dkms_build_succeeds(lab_pins: dict[str, KernelPin], tmp_path: Path) -> None:
    """`dkms add` + `dkms build` of the DKMS tree (the fix module, from the headers), for the
    bookworm kernel, in its builder root."""
    pin = lab_pins["bookworm"]
    tree = make_dkms_tree(tmp_path)
    dkms_build(pin, tree)  # raises FleetError with dkms's make.log on failure
