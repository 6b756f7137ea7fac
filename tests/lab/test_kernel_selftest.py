"""The kernel's own IPVS selftest (`ipvs.sh`: DR, NAT and tunnel through a director netns)
on every lab line, with the fix module loaded and knob=1 in the director's netns.

The script comes from the pinned kernel's own `linux-source` (its .deb from the Debian
archive, sha256-checked: `debian.fetch_deb`), as it is: only one line is added where each
case creates its virtual service, setting net.ipv4.vs.conn_reuse_old_conntrack=1 in the
director netns (`|| exit 1`: the run fails if the knob is not there, i.e. the module is not
loaded). 5.10 and 6.1 keep it in selftests/netfilter/ and use nc; 6.12 and later in
selftests/net/netfilter/ with its lib.sh and socat. ksft exit codes: 0 pass, 1 fail, 4 skip
(a skip fails the test: the lab image must carry what the script needs).
"""

from __future__ import annotations

import base64
import io
import re
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet.build.artifact import Artifact
from ipvs_fleet.debian import KernelPin, fetch_deb
from ipvs_fleet.kernel import MODULE_NAME
from ipvs_fleet.lab.fleet import load_fleet
from ipvs_fleet.probe.harness import Guest

pytestmark = [pytest.mark.lab, pytest.mark.destructive]

GUEST_DIR = "/root/kselftest-ipvs"
KNOB = "net.ipv4.vs.conn_reuse_old_conntrack"
# Where each line keeps ipvs.sh, and what it sources (6.12+: lib.sh -> ../lib.sh, and on
# 7.x -> lib/sh/), as tar wildcards.
OLD_LAYOUT = ["*/selftests/netfilter/ipvs.sh"]
NEW_LAYOUT = [
    "*/selftests/net/netfilter/ipvs.sh",
    "*/selftests/net/netfilter/lib.sh",
    "*/selftests/net/lib*",
]


def members(line: str) -> list[str]:
    major, minor = (int(x) for x in line.split("."))
    return OLD_LAYOUT if (major, minor) < (6, 8) else NEW_LAYOUT


def with_knob(script: str) -> str:
    """ipvs.sh with the knob set to 1 in the director netns before each virtual service."""
    out, n = re.subn(
        r'^(\s*)(ip netns exec (ns1|"\$\{ns1\}") ipvsadm -A .*)$',
        rf"\1ip netns exec \3 sysctl -qw {KNOB}=1 || exit 1\n\1\2",
        script,
        flags=re.M,
    )
    assert n >= 3, f"ipvs.sh creates its services differently now ({n} found)"
    return out


def selftest_tar(pin: KernelPin, tmp: Path) -> bytes:
    """A tar of the selftest folder(s) from the pin's linux-source, ipvs.sh with the knob."""
    deb = fetch_deb(pin.release, pin.source_package, pin.version)
    with (tmp / "src.tar").open("wb") as f:
        subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, timeout=600, stdout=f)
    inner = f"./usr/src/linux-source-{pin.line}.tar.xz"
    subprocess.run(
        ["tar", "-xf", str(tmp / "src.tar"), "-C", str(tmp), inner], check=True, timeout=600
    )
    subprocess.run(
        ["tar", "-xJf", str(tmp / inner), "-C", str(tmp), "--wildcards", *members(pin.line)],
        check=True,
        timeout=900,
    )
    top = tmp / f"linux-source-{pin.line}/tools/testing/selftests"
    script = next(top.glob("**/ipvs.sh"))
    script.write_text(with_knob(script.read_text()))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(top, arcname="selftests")
    return buf.getvalue()


@pytest.mark.parametrize("release", load_fleet().releases())
def test_kernel_ipvs_selftest_passes_with_the_fix_module_and_knob_1(
    lab: Any,
    artifacts: dict[str, Artifact],
    lab_pins: dict[str, KernelPin],
    release: str,
    tmp_path: Path,
) -> None:
    host = sorted(n for n, h in lab.hosts.items() if h.release == release)[0]
    pin = lab_pins[release]
    tar = selftest_tar(pin, tmp_path)
    g = Guest(lab, host)
    before = g.status()
    try:
        st = g.load_modules(artifacts[pin.kernel_release], knob=False)
        assert st["fix_module"]["version"] == artifacts[pin.kernel_release].set_id, st
        g.sh(
            f"rm -rf {GUEST_DIR} && mkdir -p {GUEST_DIR} && base64 -d | tar -xf - -C {GUEST_DIR}",
            input=base64.b64encode(tar).decode(),
        )
        r = lab.run(
            host,
            f"cd $(dirname $(find {GUEST_DIR} -name ipvs.sh)) && bash ./ipvs.sh 2>&1",
            check=False,
            timeout=600,
        )
        loaded = lab.run(host, f"test -d /sys/module/{MODULE_NAME} && echo yes", check=False)
    finally:
        g.restore(before)
    out = str(r.stdout)
    print(
        f"--- ipvs.sh on {host} ({pin.kernel_release}), {MODULE_NAME} loaded, knob=1: "
        f"exit {r.rc}\n{out}"
    )
    assert loaded.stdout.strip() == "yes", "the fix module was not loaded during the run"
    assert r.rc == 0, f"ksft exit {r.rc}:\n{out}"
    # each mode ran (a case that fails returns an error count; the run then says FAIL)
    for mode in ("DR", "NAT", "Tunnel"):
        assert f"Testing {mode} mode..." in out, (mode, out)
    assert re.search(r"ipvs\.sh: \S*PASS", out), out
