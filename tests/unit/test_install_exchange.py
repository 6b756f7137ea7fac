"""The install's swap-in of a module set (operations.swap_in), run in sh on this machine: the
live set is exchanged with the staged one, so `updates/ipvs-fleet` never goes missing while
modules.dep points into it. Both engines and the DKMS script use the same text."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ipvs_fleet.deploy.commands import EXCHANGE, install, swap_in

REPO = Path(__file__).resolve().parents[2]
ROLE = REPO / "roles/ipvs_fleet"


def sets(tmp_path: Path, live: bool = True) -> tuple[Path, Path]:
    staging, dest = tmp_path / "ipvs-fleet.new", tmp_path / "ipvs-fleet"
    staging.mkdir()
    (staging / "ip_vs.ko").write_text("new")
    if live:
        dest.mkdir()
        (dest / "ip_vs.ko").write_text("old")
        (dest / "ip_vs_old_only.ko").write_text("old")
    return staging, dest


def run(script: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-ec", script], capture_output=True, text=True, timeout=60, env=env
    )


def test_a_live_set_is_exchanged_whole(tmp_path):
    staging, dest = sets(tmp_path)
    inode = dest.stat().st_ino
    r = run(swap_in(str(staging), str(dest)))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["ip_vs.ko"]
    assert (dest / "ip_vs.ko").read_text() == "new"
    assert dest.stat().st_ino != inode  # the staged directory itself, renamed over
    assert not staging.exists() and not (tmp_path / "ipvs-fleet.old").exists()


def test_a_first_install_is_a_rename(tmp_path):
    staging, dest = sets(tmp_path, live=False)
    r = run(swap_in(str(staging), str(dest)))
    assert r.returncode == 0, r.stderr
    assert (dest / "ip_vs.ko").read_text() == "new" and not staging.exists()


def test_without_an_exchange_two_renames_and_it_says_so(tmp_path):
    """Where renameat2 is unknown (here: an architecture it has no number for), the set is
    still swapped in, by two renames, and stderr says so."""
    staging, dest = sets(tmp_path)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "uname").write_text("#!/bin/sh\necho sparc64\n")
    (bin_ / "uname").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}")
    r = run(swap_in(str(staging), str(dest)), env)
    assert r.returncode == 0, r.stderr
    assert "no renameat2 number for sparc64" in r.stderr
    assert "no atomic exchange here: two renames" in r.stderr
    assert sorted(p.name for p in dest.iterdir()) == ["ip_vs.ko"]
    assert not staging.exists() and not (tmp_path / "ipvs-fleet.old").exists()


def test_the_install_command_and_the_dkms_script_use_the_exchange():
    """The install command (both engines run it) exchanges the staged folder in; the DKMS
    host script, which installs on the host, uses the same exchange."""
    dest = "/lib/modules/k/updates/ipvs-fleet"
    assert swap_in(dest + ".new", dest) in install(dest, "k", "/t.tgz", "0" * 64, {"a.ko": "1"}, 5)
    dkms = ROLE / "files" / "ipvs-dkms-install.sh"
    assert EXCHANGE in dkms.read_text()
