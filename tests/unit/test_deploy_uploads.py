"""The check each root use of an upload runs first (`unchanged_or_refused`), run by a real
shell on real files: the bytes the controller sent pass and stay; other bytes (or none) are
refused naming the file, and removed. On hosts: tests/lab/test_root_uploads.py."""

from __future__ import annotations

import hashlib
import subprocess
from io import StringIO
from pathlib import Path

from ipvs_fleet.deploy.commands import unchanged_or_refused
from ipvs_fleet.deploy.operations import DKMS_SCRIPT, sha256_of


def run(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", text + " && echo used"], capture_output=True, text=True, timeout=30
    )


def test_the_sent_bytes_pass_and_stay(tmp_path: Path) -> None:
    f = tmp_path / "staged"
    f.write_text("softdep ip_vs post: ip_vs_reuse\n")
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    r = run(unchanged_or_refused(str(f), sha, "/etc/modprobe.d/x.conf", "not installed"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "used\n", "")
    assert f.is_file()


def test_other_bytes_or_none_are_refused_and_removed(tmp_path: Path) -> None:
    f = tmp_path / "it's staged"  # a quote in the path: the words are quoted
    f.write_text("softdep ip_vs post: ip_vs_reuse\n")
    sha = hashlib.sha256(f.read_bytes()).hexdigest()
    f.write_text("softdep ip_vs post: ip_vs_reuse\ninstall x /bin/touch /root/x\n")
    check = unchanged_or_refused(str(f), sha, "/etc/modprobe.d/x.conf", "not installed")
    r = run(check)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (
        f"ipvs-fleet: /etc/modprobe.d/x.conf: the staged copy does not match "
        f"the sha256 the controller sent ({sha}): not installed\n"
    )
    assert not f.exists()
    r = run(check)  # gone (or never there): refused too
    assert r.returncode == 1 and r.stdout == "" and "does not match the sha256" in r.stderr


def test_the_sha256_is_of_the_bytes_sent() -> None:
    assert sha256_of(DKMS_SCRIPT) == hashlib.sha256(DKMS_SCRIPT.read_bytes()).hexdigest()
    text = StringIO("a\n")
    assert sha256_of(text) == hashlib.sha256(b"a\n").hexdigest()
    assert text.read() == "a\n"  # still whole for the upload
