"""The upstream series' kselftest (`kernel/upstream/0003`, ipvs_conn_reuse.sh) in the lab VM of
the series' kernel line (kernel.UPSTREAM_LINE, 7.2: lab/fleet-7.2.yml, `make test-7.2`).

The selftest is taken from the series itself: its patch is applied to the selftests folder of
the pinned linux-source (from the builder root), and the folder (the test, netfilter/lib.sh,
net/lib.sh and what that sources) is copied to the VM and run as root there, once against a
module set built from the series' own IPVS patch (the `upstream` build variant: bit 3 of
conn_reuse_mode kills the stale conntrack entry before conntrack) and once against the
kernel's stock modules. ksft exit codes: 0 pass, 1 fail, 4 skip. Patched: exit 0, every case
PASS, the drop shown before bit 3 is set and after it is cleared. Stock: exit 1, the drop
shown the same way, and every case with bit 3 FAIL (the bit means nothing to a stock kernel,
which also takes values with undefined bits), but the duplicated-SYN case, which may pass on
stock (the SYN's copy acts as its retransmission), so it is only recorded.
A skip fails both tests: the lab image must carry what the selftest needs (socat, nftables:
lab/fleet-7.2.yml).
Skipped where the lab fleet has no host on the series' line (lab/fleet.yml).
"""

from __future__ import annotations

import base64
import io
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.build.artifact import Artifact
from ipvs_fleet.build.build import apply_series, build_for
from ipvs_fleet.build.builder import builder_root
from ipvs_fleet.debian import RELEASES, KernelPin
from ipvs_fleet.lab.fleet import load_fleet
from ipvs_fleet.probe.harness import Guest
from tests.fixtures.artifacts import artifacts_dir

LINE = kernel.UPSTREAM_LINE
RELEASE = next((r for r in load_fleet().releases() if RELEASES[r] == LINE), None)

pytestmark = [
    pytest.mark.lab,
    pytest.mark.destructive,
    pytest.mark.skipif(
        RELEASE is None,
        reason=f"the lab fleet has no {LINE} host: the series' "
        "selftest needs that kernel; run it with make test-7.2",
    ),
]

SELFTESTS = "tools/testing/selftests"
# The selftest and what it sources (netfilter/lib.sh -> ../lib.sh -> lib/sh/defer.sh), and the
# files its patch changes besides.
MEMBERS = [
    f"{SELFTESTS}/net/netfilter/Makefile",
    f"{SELFTESTS}/net/netfilter/config",
    f"{SELFTESTS}/net/netfilter/lib.sh",
    f"{SELFTESTS}/net/lib.sh",
    f"{SELFTESTS}/net/lib/sh",
]
SCRIPT = "ipvs_conn_reuse.sh"
GUEST_DIR = "/root/kselftest"
# Cases run with bit 3 (the selftest's own names): each must PASS patched; the NEW ones, where
# a stock kernel always drops the reconnect's first packet (or takes an undefined bit), must
# FAIL stock.
NEW = [
    "undefined bits of conn_reuse_mode",
    "IPv4, weight 0, invalid drop",
    "IPv4, removed server, invalid drop",
    "IPv4 UDP, removed server, invalid drop",
    "IPv6, weight 0, invalid drop",
    "IPv4, weight 0, mark masquerade",
    "IPv4, director's client (LOCAL_OUT), masquerade",
    "IPv6, weight 0, mark masquerade",
    "IPv6, director's client (LOCAL_OUT), masquerade",
]
CASES = [*NEW, "IPv4, duplicated SYN, masquerade"]
# The drop itself, on either kernel: before bit 3 is set, and after it is cleared again.
CONTROLS = [
    "PASS: without bit 3 the reconnect waits",
    "PASS: with bit 3 cleared the reconnect waits",
]
KSFT_PASS, KSFT_FAIL = 0, 1


def selftest_patch() -> Path:
    """The series' patch that adds the selftest."""
    hits = [
        p
        for p in sorted(kernel.UPSTREAM.glob("[0-9][0-9][0-9][0-9]-*.patch"))
        if f"+++ b/{SELFTESTS}/net/netfilter/{SCRIPT}" in p.read_text()
    ]
    assert len(hits) == 1, f"the selftest patch in {kernel.UPSTREAM}: {hits}"
    return hits[0]


@pytest.fixture(scope="module")
def pin(lab_pins: dict[str, KernelPin]) -> KernelPin:
    assert RELEASE is not None
    return lab_pins[RELEASE]


@pytest.fixture(scope="module")
def upstream_artifact(pin: KernelPin) -> Artifact:
    return build_for(pin, artifacts_dir(), variant="upstream")


@pytest.fixture(scope="module")
def selftest_tar(pin: KernelPin, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A tar of `net/` holding the patched selftest and its libraries, from the pinned source."""
    root = builder_root(pin, source=True)
    tarball = root / "usr/src" / f"linux-source-{pin.line}.tar.xz"
    top = tmp_path_factory.mktemp("selftest-src")
    prefix = f"linux-source-{pin.line}/"
    subprocess.run(
        ["tar", "-xJf", str(tarball), "-C", str(top), "--strip-components=1"]
        + [prefix + m for m in MEMBERS],
        check=True,
        capture_output=True,
        timeout=600,
    )
    apply_series([selftest_patch()], top)  # FleetError naming the hunk if it does not apply
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(top / SELFTESTS / "net", arcname="net")
    return buf.getvalue()


def run_selftest(g: Guest, tar: bytes) -> tuple[int, str]:
    """(exit code, output) of the selftest run as root in the VM."""
    g.sh(
        f"rm -rf {GUEST_DIR} && mkdir -p {GUEST_DIR} && base64 -d | tar -xf - -C {GUEST_DIR}",
        input=base64.b64encode(tar).decode(),
    )
    r = g.lab.run(
        g.host,
        f"cd {GUEST_DIR}/net/netfilter && bash ./{SCRIPT} 2>&1",
        check=False,
        timeout=600,
    )
    out = str(r.stdout)
    print(f"--- {SCRIPT} on {g.host} ({g.kernel_release}): exit {r.rc}\n{out}")
    return r.rc, out


def outcomes(out: str) -> dict[str, str]:
    """Case name -> PASS/FAIL, from the selftest's `PASS: name: ...` lines."""
    res: dict[str, str] = {}
    for ln in out.splitlines():
        for verdict in ("PASS", "FAIL"):
            if ln.startswith(f"{verdict}: "):
                name = ln[len(verdict) + 2 :].split(":", 1)[0]
                res.setdefault(name, verdict)
    return res


def _host(lab: Any) -> str:
    return sorted(n for n, h in lab.hosts.items() if h.release == RELEASE)[0]


def test_selftest_passes_on_the_upstream_patch(
    lab: Any, upstream_artifact: Artifact, selftest_tar: bytes
) -> None:
    g = Guest(lab, _host(lab))
    before = g.status()
    try:
        st = g.load_modules(upstream_artifact, knob=False)
        assert st["loaded_by_probe"]["set_id"] == upstream_artifact.set_id, st
        rc, out = run_selftest(g, selftest_tar)
    finally:
        g.restore(before)
    assert rc == KSFT_PASS, f"ksft exit {rc}:\n{out}"
    assert all(c in out for c in CONTROLS), out
    res = outcomes(out)
    assert {c: res.get(c) for c in CASES} == dict.fromkeys(CASES, "PASS"), out
    assert out.rstrip().endswith(f"{SCRIPT}: PASS"), out


def test_selftest_fails_on_the_stock_modules(lab: Any, selftest_tar: bytes) -> None:
    g = Guest(lab, _host(lab))
    before = g.status()
    try:
        g.load_modules(None)
        rc, out = run_selftest(g, selftest_tar)
    finally:
        g.restore(before)
    assert rc == KSFT_FAIL, f"ksft exit {rc}:\n{out}"
    # the drop the series removes is there, and every case with bit 3 meets it
    assert all(c in out for c in CONTROLS), out
    res = outcomes(out)
    assert {c: res.get(c) for c in NEW} == dict.fromkeys(NEW, "FAIL"), out
    assert all(res.get(c) in ("PASS", "FAIL") for c in CASES), out
    assert out.rstrip().endswith(f"{SCRIPT}: FAIL"), out
