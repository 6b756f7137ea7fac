"""A DKMS source tree of the fix module ip_vs_reuse, for hosts that build it themselves.

A headers-only out-of-tree module is what DKMS is for: the tree carries the module's source,
the header naming the build and a dkms.conf; `dkms build` compiles it against the host's
`linux-headers` of the target kernel (no kernel source, no patched ip_vs). With AUTOINSTALL
the host rebuilds it on every kernel upgrade.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ipvs_fleet import kernel
from ipvs_fleet.build.build import ID_HEADER, id_header_text
from ipvs_fleet.build.builder import builder_root
from ipvs_fleet.debian import CACHE, KernelPin
from ipvs_fleet.errors import FleetError

PACKAGE = "ipvs-fleet"
MODULES = [kernel.MODULE_NAME]


def make_dkms_tree(dest_dir: Path, autoinstall: bool = True) -> Path:
    """Write `dest_dir/ipvs-fleet-<set id>/` (dkms.conf, the module's source); its path.

    + dest_dir: where the tree goes (copy it to /usr/src/ on the host, then `dkms add`)
    + autoinstall: let dkms build and install it for every new kernel (off for the deploy's
      build mode, which installs the build itself and is re-run for a new kernel)
    """
    files = kernel.module_sources()
    sid = kernel.set_id(files)
    tree = Path(dest_dir) / f"{PACKAGE}-{sid}"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    for p in files:
        shutil.copy(p, tree / p.name)
    (tree / ID_HEADER).write_text(id_header_text(sid))
    conf = [
        f'PACKAGE_NAME="{PACKAGE}"',
        f'PACKAGE_VERSION="{sid}"',
        'MAKE[0]="make -C ${kernel_source_dir} M=${dkms_tree}/${PACKAGE_NAME}/${PACKAGE_VERSION}'
        '/build modules"',
        'CLEAN="make -C ${kernel_source_dir} M=${dkms_tree}/${PACKAGE_NAME}/${PACKAGE_VERSION}'
        '/build clean"',
        f'AUTOINSTALL="{"yes" if autoinstall else "no"}"',
    ]
    for i, m in enumerate(MODULES):
        conf += [f'BUILT_MODULE_NAME[{i}]="{m}"', f'DEST_MODULE_LOCATION[{i}]="/updates/dkms"']
    (tree / "dkms.conf").write_text("\n".join(conf) + "\n")
    return tree


def dkms_build(pin: KernelPin, tree: Path) -> None:
    """`dkms add` + `dkms build` of the tree for `pin` in its builder root (FleetError if not)."""
    root = builder_root(pin)
    name = tree.name
    version = name[len(PACKAGE) + 1 :]
    target = root / "usr/src" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(tree, target)
    shutil.rmtree(root / "var/lib/dkms" / PACKAGE, ignore_errors=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
    for cmd in (
        ["dkms", "add", "-m", PACKAGE, "-v", version],
        ["dkms", "build", "-m", PACKAGE, "-v", version, "-k", pin.kernel_release],
    ):
        r = subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            log = (
                root
                / "var/lib/dkms"
                / PACKAGE
                / version
                / pin.kernel_release
                / "x86_64/log/make.log"
            )
            tail = log.read_text()[-2000:] if log.is_file() else ""
            raise FleetError(
                f"{' '.join(cmd)} failed for {pin.kernel_release}: {r.stdout[-1000:]}{r.stderr}"
                f"\n{tail}"
            )


@dataclass(frozen=True)
class DkmsBundle:
    """The DKMS tree as the deploy uploads it (build mode)."""

    set_id: str
    reuse_design: str
    modules: list[str]
    tarball: Path  # ipvs-fleet-<set id>/ at the top, reproducible bytes
    tarball_sha256: str


def dkms_bundle() -> DkmsBundle:
    """The module's DKMS tree as a reproducible tar.gz in the cache, named by its sha256."""
    files = kernel.module_sources()
    sid = kernel.set_id(files)
    with tempfile.TemporaryDirectory() as tmp:
        tree = make_dkms_tree(Path(tmp), autoinstall=False)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for p in sorted([tree, *tree.rglob("*")]):
                info = tar.gettarinfo(str(p), str(p.relative_to(tmp)))
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = 0
                if p.is_file():
                    with p.open("rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    data = gzip.compress(buf.getvalue(), mtime=0)
    digest = hashlib.sha256(data).hexdigest()
    out = CACHE / "dkms" / f"{PACKAGE}-{sid}-{digest[:12]}.tar.gz"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_suffix(f".{os.getpid()}.part")
        part.write_bytes(data)
        part.rename(out)
    return DkmsBundle(sid, kernel.reuse_design(files), list(MODULES), out, digest)
