"""What the deploy runs or installs as root is what the controller sent, on a host reached as
`fleet` with sudo: pyinfra uploads through SFTP as the SSH user to a file of its own under
/tmp, then copies it in with sudo, so the SSH user (or whoever has taken it over) can rewrite
the file in between. Here a `sudo` wrapper does exactly that, as `fleet`, right before each
sudo command: it appends an `install` line (root code at the next modprobe) to a staged
modprobe.d file and replaces a staged DKMS host script with one that leaves a marker. Each
tampered upload must be refused as root before use, naming the file, and no root-owned file
may appear under /tmp during the run."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from ipvs_fleet.build.dkms import dkms_bundle
from ipvs_fleet.deploy.operations import MODPROBE_FILE
from tests.fixtures.deploy import REPO, Deployer

pytestmark = [pytest.mark.lab, pytest.mark.side_lab, pytest.mark.destructive]

HOST = "k8s-canary"
SUDO_INVENTORY = REPO / "inventory" / "lab_sudo.py"
WRAPPER = "/usr/local/bin/sudo"  # before /usr/bin in the PATH sshd gives `fleet`
MARKER = "/root/ipvs-fleet-tampered"
STAMP = "/root/ipvs-fleet-upload-stamp"
TAMPER = f"""#!/bin/sh
# test only: the SSH user's own process, between pyinfra's SFTP upload and its sudo copy
if [ "$(id -un)" = fleet ]; then
    for f in /tmp/pyinfra-*; do
        [ -f "$f" ] && [ -O "$f" ] || continue
        if grep -q '^install ip_vs_reuse ' "$f"; then
            echo 'install ipvs_fleet_tamper /bin/touch {MARKER}' >>"$f"
        elif grep -q '^# Managed by ipvs-fleet. Build mode' "$f"; then
            printf '#!/bin/sh\\ntouch {MARKER}\\n' >"$f"
        fi
    done
fi
exec /usr/bin/sudo "$@"
"""
# Root-owned files under /tmp changed since the stamp (none may appear).
ROOT_IN_TMP = f"find /tmp -xdev -mindepth 1 -user root -newer {STAMP} -print"
# A deploy that runs only the build mode's upload-and-run of its host script.
DKMS_DEPLOY = '''"""The build mode's host script step alone (tests/lab/test_root_uploads.py)."""
import os

from ipvs_fleet.build.dkms import dkms_bundle
from ipvs_fleet.deploy.operations import modules_built_on_host

b = dkms_bundle()
modules_built_on_host(
    name="Build the fix module on the host",
    kernel_release=os.environ["TEST_KERNEL_RELEASE"],
    tarball=str(b.tarball),
    tarball_sha256=os.environ.get("TEST_TARBALL_SHA256") or b.tarball_sha256,
    set_id="test-root-uploads",  # never the installed set: the step always runs
    modules=b.modules,
)
'''


@pytest.fixture
def tampering(lab, deployer, deployed):
    """The host converged (an earlier side-lab test may have rolled it back), then the sudo
    wrapper in place and a fresh stamp; afterwards both gone, with the marker."""
    deployer.run("deploy.py", "--limit", HOST)
    lab.run(
        HOST,
        f"rm -f {MARKER} && touch {STAMP} && cat >{WRAPPER} && chmod 755 {WRAPPER}",
        input=TAMPER,
    )
    try:
        yield
    finally:
        lab.run(HOST, f"rm -f {WRAPPER} {MARKER} {STAMP} /tmp/pyinfra-*")


def fleet(deployer, **env: str) -> Deployer:
    return Deployer(SUDO_INVENTORY, dict(deployer.env, IPVS_FLEET_LAB_SUDO_USER="fleet", **env))


def test_a_tampered_modprobe_file_is_refused_before_it_is_installed(lab, deployer, tampering):
    q = shlex.quote(MODPROBE_FILE)
    good = lab.run(HOST, f"cat {q}").stdout
    lab.run(HOST, f"rm {q}")  # something for the deploy to write
    try:
        r = fleet(deployer).run("deploy.py", "--limit", HOST, check=False)
        out = r.stdout + r.stderr
        now = lab.run(HOST, f"cat {q} 2>/dev/null || true").stdout
        assert "ipvs_fleet_tamper" not in now, f"the tampered {MODPROBE_FILE} was installed"
        assert r.rc != 0, out[-3000:]
        assert f"{MODPROBE_FILE}: the staged copy does not match the sha256" in out, out[-3000:]
        assert now == "", f"{MODPROBE_FILE} was written"
        assert lab.run(HOST, ROOT_IN_TMP).stdout == ""
        # untouched, the same upload passes its check and is installed
        lab.run(HOST, f"rm {WRAPPER}")
        fleet(deployer).run("deploy.py", "--limit", HOST)
        assert lab.run(HOST, f"cat {q}").stdout == good
    finally:
        if lab.run(HOST, f"cmp -s {q} -", input=good, check=False).rc != 0:
            lab.run(HOST, f"cat >{q} && chmod 644 {q}", input=good)


def test_a_tampered_host_script_is_refused_before_it_runs(lab, deployer, tmp_path: Path):
    deploy = tmp_path / "dkms_step.py"
    deploy.write_text(DKMS_DEPLOY)
    kr = lab.run(HOST, "uname -r").stdout.strip()
    incoming = f"/var/lib/ipvs-fleet/incoming/{dkms_bundle().tarball.name}"  # + "." + token
    try:
        # untouched, the script runs (and stops at its own check of the archive: the sha256
        # given here is wrong, so nothing is built or installed)
        r = fleet(deployer, TEST_KERNEL_RELEASE=kr, TEST_TARBALL_SHA256="0" * 64).run(
            str(deploy), "--limit", HOST, check=False
        )
        assert (
            "ipvs-dkms: " in r.stdout + r.stderr and "does not match sha256" in r.stdout + r.stderr
        ), (r.stdout + r.stderr)[-3000:]
        lab.run(
            HOST,
            f"rm -f {MARKER} && touch {STAMP} && cat >{WRAPPER} && chmod 755 {WRAPPER}",
            input=TAMPER,
        )
        r = fleet(deployer, TEST_KERNEL_RELEASE=kr).run(str(deploy), "--limit", HOST, check=False)
        out = r.stdout + r.stderr
        ran = lab.run(HOST, f"test -e {MARKER}", check=False).rc == 0
        assert not ran, "the tampered host script ran as root"
        assert r.rc != 0
        assert "ipvs-dkms-install.sh: the staged copy does not match the sha256" in out, out[-3000:]
        assert lab.run(HOST, ROOT_IN_TMP).stdout == ""
    finally:
        lab.run(
            HOST,
            f"rm -f {WRAPPER} {MARKER} {STAMP} /tmp/pyinfra-* {shlex.quote(incoming)}.* "
            "/var/lib/ipvs-fleet/ipvs-dkms-install.sh",
        )


PROBE_TAMPER = f"""#!/bin/sh
# test only: the SSH user's own process, between the checks' SFTP staging and their sudo copy
if [ "$(id -un)" = fleet ]; then
    f="$HOME/.ipvs-fleet-check/scenario.py"
    if [ -f "$f" ] && [ -O "$f" ] && ! grep -q tampered "$f"; then
        sed -i '/^from __future__ import annotations$/a open("{MARKER}", "w")  # tampered' "$f"
    fi
fi
exec /usr/bin/sudo "$@"
"""


def test_a_tampered_probe_is_not_run_as_root_by_the_checks(lab, deployer, deployed):
    """The latency check stages the probe in the SSH user's home, then copies it in with
    sudo and runs it as root: a copy changed in between is refused, not run."""
    from ipvs_fleet.compliance.latency import PROBE_REFUSED
    from tests.lab.test_sudo import check

    deployer.run("deploy.py", "--limit", HOST)  # knob 1: the probe with 100 connects runs
    lab.run(HOST, f"rm -f {MARKER} && cat >{WRAPPER} && chmod 755 {WRAPPER}", input=PROBE_TAMPER)
    try:
        r = check(dict(deployer.env, IPVS_FLEET_LAB_SUDO_USER="fleet"), str(SUDO_INVENTORY))
        marker = lab.run(HOST, f"test -e {MARKER} && echo present || echo absent").stdout
    finally:
        lab.run(HOST, f"rm -f {WRAPPER} {MARKER}")
    out = r.stdout + r.stderr
    assert "present" not in marker, "the tampered probe ran as root"
    assert r.returncode != 0 and PROBE_REFUSED in out, out[-3000:]
