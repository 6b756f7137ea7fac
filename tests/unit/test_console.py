"""Off a terminal (CI logs, pipes) ipvs-fleet's console output keeps each line whole."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ipvs_fleet.rollout.config import Wave
from ipvs_fleet.rollout.report import RichUI

STEP = (
    "Write /etc/modules-load.d/ipvs-fleet.conf, /etc/modprobe.d/ipvs-fleet.conf and "
    "/etc/sysctl.d/90-ipvs-fleet.conf on the wave's hosts (then reload the sysctls)"
)


def test_rollout_progress_line_is_not_wrapped_off_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert len(STEP) > 150
    RichUI().step(Wave(1, "1", ("canary",), 0.0, 0.0), STEP)
    assert capsys.readouterr().err == f"  w1 {STEP}\n"


def test_cli_output_through_a_pipe_is_not_wrapped() -> None:
    # a child with its stdout and stderr on pipes, as in CI; COLUMNS unset
    code = (
        "from ipvs_fleet.console import console\n"
        f"console().print({STEP!r}); console(stderr=True).print({STEP!r})"
    )
    env = {"PATH": "/usr/bin:/bin", "TERM": "xterm"}
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    assert r.stdout == r.stderr == STEP + "\n"
    r = subprocess.run(
        [sys.executable, "-c", "from ipvs_fleet.console import console\nprint(console().width)"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "132"},
        timeout=60,
        check=True,
    )
    assert r.stdout == "132\n"
