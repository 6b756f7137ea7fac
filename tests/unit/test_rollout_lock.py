"""One controller per journal: a second `ipvs-fleet rollout` on a journal that a running
rollout holds refuses at once (exit 2) naming the holder; the lock dies with its holder, so
the lock file a killed controller leaves behind blocks nothing.

Both controllers are real processes (`ipvs-fleet rollout`); their pyinfra is a stand-in
script (the first one's hangs in its deploy, as a long wave does).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from ipvs_fleet.rollout.journal import read_journal

INVENTORY = 'k8s_nodes = [("a", {"ipvs_host_class": "k8s_node"})]\n'
# `ipvs-fleet rollout` with R.PYINFRA replaced: argv: pyinfra, inventory, journal, more args
CONTROLLER = """
import sys
from pathlib import Path
from ipvs_fleet.rollout import runner as R
R.PYINFRA = Path(sys.argv[1])
from ipvs_fleet.cli import main
sys.exit(main(["rollout", sys.argv[2], "--journal", sys.argv[3], "--waves", "100%",
               *sys.argv[4:]]))
"""


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def controller(pyinfra: Path, inv: Path, journal: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CONTROLLER, str(pyinfra), str(inv), str(journal), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def test_a_second_controller_refuses_at_once_naming_the_holder_and_a_dead_one_blocks_nothing(
    tmp_path,
):
    inv = tmp_path / "inv.py"
    inv.write_text(INVENTORY)
    journal = tmp_path / "j.jsonl"
    hang = script(tmp_path / "pyinfra-hangs", "exec sleep 120")
    fail = script(tmp_path / "pyinfra-fails", "echo 'pyinfra error: no' >&2; exit 1")
    first = controller(hang, inv, journal, "--data", "_sudo_password=lock-Pw-9")
    try:
        deadline = time.monotonic() + 60
        while "deploying" not in (journal.read_text() if journal.exists() else ""):
            assert first.poll() is None, first.communicate(timeout=10)
            assert time.monotonic() < deadline, "the first rollout never started its deploy"
            time.sleep(0.2)
        t0 = time.monotonic()
        second = controller(fail, inv, journal, "--resume")
        _, err = second.communicate(timeout=60)
        took = time.monotonic() - t0
        assert second.returncode == 2, err[-2000:]
        assert f"pid {first.pid}" in err and socket.gethostname() in err, err
        assert "started" in err and "rollout" in err and str(journal) in err, err
        assert "lock-Pw-9" not in err  # the holder's command line is shown masked
        assert took < 20, f"refused after {took:.1f} s"
        assert read_journal(journal).runs == 1  # the second wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    # the killed controller's lock file is still there, and blocks nothing
    [lock] = [p for p in tmp_path.iterdir() if p.name.startswith("j.jsonl") and "lock" in p.name]
    assert lock.stat().st_size > 0
    third = controller(fail, inv, journal, "--resume")
    _, err = third.communicate(timeout=120)
    assert third.returncode == 1, err[-2000:]  # ran, and halted on its failing deploy
    assert read_journal(journal).runs == 2
    assert oct(os.stat(lock).st_mode & 0o777) == oct(0o600)
