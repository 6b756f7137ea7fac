"""Artifacts and the DKMS tree without building: the artifact API checks what the deploy
relies on, a matching artifact is reused without a builder root, bad input is a clear error,
and the build's steps (with the compiler and modinfo faked) lay out the one-module artifact.
The real builds are in tests/builds (marker `build`)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.build import build, dkms
from ipvs_fleet.build.artifact import FORMAT, MANIFEST, Artifact, load_artifact
from ipvs_fleet.build.build import ID_HEADER, id_header_text
from ipvs_fleet.build.dkms import dkms_bundle, make_dkms_tree
from ipvs_fleet.debian import KernelPin
from ipvs_fleet.errors import FleetError
from tests.fixtures.pins import FakeArchive

PIN = KernelPin("bookworm", "6.1", "6.1.0-56-cloud-amd64", "6.1.192-2")


def fake_artifact(out: Path, pin: KernelPin = PIN) -> Artifact:
    """An artifact as `build_for` lays it out for `pin` and the shipped module (fake .ko)."""
    files = kernel.module_sources()
    d = out / pin.kernel_release
    d.mkdir(parents=True)
    mods = {"ip_vs_reuse.ko": f"ip_vs_reuse.ko for {pin.kernel_release}".encode()}
    name = f"ipvs-fleet-modules-{pin.kernel_release}.tar.gz"
    with gzip.GzipFile(d / name, "wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tf:
        for ko, data in mods.items():
            info = tarfile.TarInfo(ko)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    sid = kernel.set_id(files)
    manifest = {
        "format": FORMAT,
        "kernel_release": pin.kernel_release,
        "release": pin.release,
        "line": pin.line,
        "source_version": pin.version,
        "recipe": build.RECIPE,
        "patchset_hash": kernel.patchset_hash(files),
        "sources": [p.name for p in files],
        "variant": None,
        "reuse_design": kernel.reuse_design(files),
        "modinfo": {kernel.MODINFO_SET: sid},
        "vermagic": f"{pin.kernel_release} SMP mod_unload",
        "modules": {ko: hashlib.sha256(data).hexdigest() for ko, data in mods.items()},
        "tarball": name,
        "tarball_sha256": hashlib.sha256((d / name).read_bytes()).hexdigest(),
    }
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


class FakeCompiler:
    """The builder root's `make`, `strip` and `modinfo`, faked: `make` of a module folder
    leaves a .ko per `obj-m` of its Kbuild, which carries the set id of the header the build
    wrote there and declares prekill unless compiled with the `nodesign` define."""

    def __init__(self, fail: str = "", log_line: str = "") -> None:
        self.makes: list[list[str]] = []
        self.fail, self.log_line = fail, log_line

    def chroot(self, root: Path, cmd: list[str], log: Path) -> None:
        if cmd[0] == "make":
            self.makes.append(cmd)
            moddir = root / next(a for a in cmd if a.startswith("M="))[3:].lstrip("/")
            if self.fail:
                raise FleetError(f"make failed in builder root (exit 2; log {log}):\n{self.fail}")
            with log.open("a") as f:
                f.write(self.log_line)
            for obj in re.findall(r"obj-m \+= (\w+)\.o", (moddir / "Kbuild").read_text()):
                (moddir / f"{obj}.ko").write_bytes(f"{obj} {cmd}".encode())

    def modinfo(self, root: Path, ko: Path, field: str) -> str:
        if field == "vermagic":
            return f"{PIN.kernel_release} SMP preempt mod_unload modversions"
        if field == kernel.MODINFO_SET:
            header = (ko.parent / ID_HEADER).read_text()
            m = re.search(r'MODULE_INFO\(ipvs_fleet, "([^"]+)"\)', header)
            return m.group(1) if m else ""
        if field == kernel.MODINFO_REUSE:
            return "" if "IP_VS_REUSE_TEST_NO_DESIGN" in str(self.makes[-1]) else "prekill"
        return ""


@pytest.fixture
def fake_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCompiler:
    root = tmp_path / "root"
    (root / "tmp").mkdir(parents=True)
    cc = FakeCompiler()
    monkeypatch.setattr(build, "builder_root", lambda *a, **k: root)
    monkeypatch.setattr(build, "_chroot", lambda *a: cc.chroot(*a))
    monkeypatch.setattr(build, "_modinfo", lambda *a: cc.modinfo(*a))
    return cc


def test_build_makes_one_module_from_the_headers(
    tmp_path: Path, fake_compiler: FakeCompiler
) -> None:
    out = tmp_path / "out"
    art = build.build_for(PIN, out)
    sid = kernel.set_id(kernel.module_sources())
    assert art.path == out / PIN.kernel_release
    assert set(art.modules) == {"ip_vs_reuse.ko"}
    assert (art.set_id, art.reuse_design) == (sid, "prekill")
    assert art.manifest["sources"] == ["Kbuild", "ip_vs_reuse.c"]
    assert art.manifest["modinfo"] == {"ipvs_fleet": sid, "ipvs_fleet_reuse": "prekill"}
    with tarfile.open(art.tarball) as tf:
        assert tf.getnames() == ["ip_vs_reuse.ko"]
    # Out of tree against the pinned headers: no linux-source, no header of ours winning.
    [make] = fake_compiler.makes
    assert make[:3] == ["make", "-C", f"/usr/src/linux-headers-{PIN.kernel_release}"]
    assert not [a for a in make if "NOSTDINC" in a or "ccflags" in a]
    assert build.build_for(PIN, out).manifest == art.manifest  # cached: no second make
    assert len(fake_compiler.makes) == 1


def test_test_variant_builds_with_its_define_beside_the_shipped_one(
    tmp_path: Path, fake_compiler: FakeCompiler
) -> None:
    art = build.build_for(PIN, tmp_path, variant="nodesign")
    assert art.path == tmp_path / "variants/nodesign" / PIN.kernel_release
    assert "ccflags-y=-DIP_VS_REUSE_TEST_NO_DESIGN" in fake_compiler.makes[-1]
    assert art.set_id == kernel.set_id(kernel.module_sources(), "nodesign")
    assert art.reuse_design == "none"
    assert not (tmp_path / PIN.kernel_release).exists()


def test_a_failed_or_warning_build_leaves_no_artifact(
    tmp_path: Path, fake_compiler: FakeCompiler
) -> None:
    fake_compiler.fail = "ip_vs_reuse.c:120:9: error: 'cp' undeclared"
    with pytest.raises(FleetError, match="error: 'cp' undeclared"):
        build.build_for(PIN, tmp_path / "a")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["logs"]
    fake_compiler.fail = ""
    fake_compiler.log_line = "ip_vs_reuse.c:88:5: warning: unused variable 'x'\n"
    with pytest.raises(FleetError, match="has warnings .*unused variable"):
        build.build_for(PIN, tmp_path / "b")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["logs"]
    assert list((tmp_path / "root/tmp").iterdir()) == []  # the work folders went too


def test_dkms_tree_builds_the_module_from_the_hosts_headers(tmp_path: Path) -> None:
    sources = kernel.module_sources()
    sid = kernel.set_id(sources)
    tree = make_dkms_tree(tmp_path)
    assert tree == tmp_path / f"ipvs-fleet-{sid}"
    assert sorted(p.name for p in tree.iterdir()) == sorted(
        ["dkms.conf", ID_HEADER, *(p.name for p in sources)]
    )
    for p in sources:
        assert (tree / p.name).read_bytes() == p.read_bytes()
    assert (tree / ID_HEADER).read_text() == id_header_text(sid)
    conf = (tree / "dkms.conf").read_text().splitlines()
    assert f'PACKAGE_VERSION="{sid}"' in conf and 'AUTOINSTALL="yes"' in conf
    assert [c for c in conf if c.startswith("BUILT_MODULE_NAME")] == [
        'BUILT_MODULE_NAME[0]="ip_vs_reuse"'
    ]
    [make] = [c for c in conf if c.startswith("MAKE[0]=")]
    assert "make -C ${kernel_source_dir} M=" in make and make.endswith(' modules"')
    assert "linux-source" not in "".join(p.read_text() for p in tree.iterdir())
    again = make_dkms_tree(tmp_path, autoinstall=False)
    assert 'AUTOINSTALL="no"' in (again / "dkms.conf").read_text()


def test_dkms_bundle_is_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deploy's build mode uploads the same bytes for the same sources, named by them."""
    monkeypatch.setattr(dkms, "CACHE", tmp_path)
    a, b = dkms_bundle(), dkms_bundle()
    assert a == b and a.tarball.is_file()
    assert hashlib.sha256(a.tarball.read_bytes()).hexdigest() == a.tarball_sha256
    assert (a.set_id, a.reuse_design, a.modules) == (
        kernel.set_id(kernel.module_sources()),
        "prekill",
        ["ip_vs_reuse"],
    )
    with tarfile.open(a.tarball) as tf:
        names = tf.getnames()
    assert f"ipvs-fleet-{a.set_id}/dkms.conf" in names
    assert f"ipvs-fleet-{a.set_id}/ip_vs_reuse.c" in names


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


def test_build_writes_one_dkms_tree_for_every_kernel(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    fake_archive: FakeArchive,
    shipped_pins: dict[str, KernelPin],
) -> None:
    """`ipvs-fleet build --dkms DIR`: the module's DKMS tree, the same for every line."""
    from ipvs_fleet.cli import main

    pin = fake_archive.publish(shipped_pins["bookworm"])
    fake_artifact(tmp_path / "out", pin)
    dest = tmp_path / "dkms"
    assert (
        main(
            ["build", "--release", "bookworm", "--out", str(tmp_path / "out"), "--dkms", str(dest)]
        )
        == 0
    )
    [tree] = dest.iterdir()
    assert tree.name == f"ipvs-fleet-{kernel.set_id(kernel.module_sources())}"
    assert f"DKMS source tree {tree}" in capsys.readouterr().out
