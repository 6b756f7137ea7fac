"""A host whose kernel is locked down: the kernel really refuses our unsigned modules, and the
deploy refuses that host up front, naming it and the reason, and changes nothing on it.

Cost: one more bookworm VM (the lab's cached image, booted with `lockdown=integrity`) in its
own lab dir next to the session's lab, and one pyinfra run that stops in its preflight.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_fleet.kernel import MODULE_NAME
from ipvs_fleet.lab import Lab
from tests.fixtures.lab import one_host_lab

REPO = Path(__file__).resolve().parents[2]
PYINFRA = Path(sys.executable).with_name("pyinfra")
HOST = "locked-node"
pytestmark = [pytest.mark.lab, pytest.mark.side_lab]
# Everything a deploy would touch on the host, with change times.
FINGERPRINT = (
    "kr=$(uname -r); for p in /lib/modules/$kr/updates /lib/modules/$kr/modules.dep "
    "/etc/sysctl.d /etc/modules-load.d /etc/modprobe.d /var/lib/ipvs-fleet; do "
    '[ -e "$p" ] && find "$p" -printf "%p %s %C@\\n" || echo "$p absent"; done; '
    "ls -d /sys/module/ip_vs* 2>/dev/null; true"
)


@pytest.fixture(scope="module")
def locked_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with one_host_lab(tmp_path_factory, HOST, kernel_args=["lockdown=integrity"]) as lab:
        yield lab


def test_locked_down_host_is_refused_before_anything_changes(locked_lab, artifacts):  # type: ignore[no-untyped-def]
    lab = locked_lab
    kr = lab.hosts[HOST].kernel_release
    art = artifacts[kr]
    assert "[integrity]" in lab.run(HOST, "cat /sys/kernel/security/lockdown").stdout
    # The reason for the refusal is real: this kernel loads the distro's signed ip_vs and
    # rejects the unsigned fix module that goes on top of it.
    tarball = base64.b64encode(art.tarball.read_bytes()).decode()
    lab.run(HOST, "mkdir -p /tmp/t && base64 -d | tar -xzf - -C /tmp/t", input=tarball)
    lab.run(HOST, "modprobe ip_vs")
    ins = lab.run(HOST, f"insmod /tmp/t/{MODULE_NAME}.ko", check=False)
    assert not ins.ok and "Operation not permitted" in ins.stderr, ins
    dmesg = lab.run(HOST, "dmesg").stdout
    assert "insmod: unsigned module loading is restricted" in dmesg, dmesg[-2000:]
    lab.run(HOST, "rm -rf /tmp/t && modprobe -r ip_vs")
    before = lab.run(HOST, FINGERPRINT).stdout
    env = dict(
        os.environ, IPVS_FLEET_LAB_DIR=str(lab.dir), IPVS_FLEET_ARTIFACTS=str(art.path.parent)
    )
    r = subprocess.run(
        [str(PYINFRA), "-y", str(lab.inventory_path), "deploy.py"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert f"host {HOST} (kernel {kr}): kernel lockdown is integrity" in out, out[-3000:]
    assert lab.run(HOST, FINGERPRINT).stdout == before
