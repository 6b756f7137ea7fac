"""Uploads under /var/lib/ipvs-fleet/incoming: each run's own name, in both engines.

Two controllers deploying one host at once (the host lock serialises their installs) shared
one upload path: the first one's install removed the archive the second was about to check,
and the second failed "does not match the sha256 ... nothing installed" (seen in CI,
tests/lab/test_activation_faults.py::test_two_deploys_at_once_both_converge_the_host).
"""

from __future__ import annotations

import re
import subprocess

from ipvs_fleet.deploy import commands

NAME = "ipvs-fleet-modules-6.1.0-57-cloud-amd64.tar.gz"


def test_each_run_uploads_to_a_name_of_its_own() -> None:
    paths = {commands.incoming(NAME) for _ in range(50)}
    assert len(paths) == 50
    for p in paths:
        assert re.fullmatch(rf"{re.escape(commands.INCOMING)}/{re.escape(NAME)}\.[0-9a-f]{{12}}", p)


def test_the_install_checks_and_removes_only_its_own_upload() -> None:
    a, b = commands.incoming(NAME), commands.incoming(NAME)
    text = commands.install("/lib/modules/x/updates/ipvs-fleet", "x", a, "0" * 64, {}, 5)
    assert a in text and b not in text


def test_the_upload_folder_drops_uploads_older_than_a_day(tmp_path) -> None:
    """The cleanup part of upload_dir, run under sh against a folder of its own."""
    inc = tmp_path / "incoming"
    inc.mkdir()
    (inc / "old").write_text("x")
    (inc / "new").write_text("x")
    subprocess.run(["touch", "-d", "2 days ago", str(inc / "old")], check=True, timeout=60)
    line = commands.upload_dir(f"{commands.INCOMING}/{NAME}.abc")
    cleanup = line.split(" && ", 2)[2].replace(commands.INCOMING, str(inc))
    subprocess.run(["sh", "-c", cleanup], check=True, timeout=60)
    assert sorted(p.name for p in inc.iterdir()) == ["new"]
    # other uploads (a managed file's staged copy) leave INCOMING alone
    assert "find" not in commands.upload_dir("/var/lib/ipvs-fleet/staging/x/etc/f.conf")
