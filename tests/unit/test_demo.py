"""`ipvs-fleet demo` boots the lab and builds the modules at the same time, then runs the
rest one step after the other; each command is a stand-in `ipvs-fleet` that logs when it
starts and ends."""

from __future__ import annotations

import argparse
import json
import stat
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ipvs_fleet import demo
from ipvs_fleet.errors import FleetError
from ipvs_fleet.lab.fleet import load_fleet
from ipvs_fleet.resources import data_path

FAKE_CLI = """#!/bin/sh
echo "$1 start $(date +%s.%N)" >> {log}
echo "$1 fleet $IPVS_FLEET_FLEET" >> {log}.fleet
case "$1" in lab|build) sleep 1;; esac
echo "$1 line of output"
echo "$1 end $(date +%s.%N)" >> {log}
exit {rc}
"""


def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rc: int = 0) -> Path:
    """Point the demo at a stand-in ipvs-fleet next to a stand-in python; its log file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    cli = bin_dir / "ipvs-fleet"
    cli.write_text(FAKE_CLI.format(log=log, rc=rc))
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("IPVS_FLEET_LAB_DIR", str(tmp_path / "lab"))
    monkeypatch.setenv("IPVS_FLEET_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.delenv("IPVS_FLEET_FLEET", raising=False)
    monkeypatch.chdir(tmp_path)
    return log


def demo_args(tmp_path: Path, fleet: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(reports=str(tmp_path / "reports"), skip=[], fleet=fleet)


def fleets(log: Path) -> dict[str, str]:
    """The $IPVS_FLEET_FLEET each step's command saw."""
    return dict(line.split(" fleet ") for line in Path(f"{log}.fleet").read_text().splitlines())


def spans(log: Path) -> dict[str, tuple[float, float]]:
    times: dict[str, dict[str, float]] = {}
    for line in log.read_text().splitlines():
        cmd, what, when = line.split()
        times.setdefault(cmd, {})[what] = float(when)
    return {cmd: (t["start"], t["end"]) for cmd, t in times.items()}


def test_lab_boot_and_module_build_overlap_then_the_rest_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = fake_cli(tmp_path, monkeypatch)
    assert demo.run(demo_args(tmp_path)) == 0
    s = spans(log)
    assert list(s)[:2] in (["lab", "build"], ["build", "lab"])
    # each sleeps 1 s: started together, they overlap
    assert s["build"][0] < s["lab"][1] and s["lab"][0] < s["build"][1], s
    assert s["rollout"][0] >= max(s["lab"][1], s["build"][1]), s
    assert s["check"][0] >= s["rollout"][1] and s["probe"][0] >= s["check"][1], s
    out = capsys.readouterr().out
    assert "    lab   | lab line of output" in out and "    build | build line of output" in out
    assert "total" in out


def test_a_failed_boot_or_build_stops_the_demo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = fake_cli(tmp_path, monkeypatch, rc=1)
    assert demo.run(demo_args(tmp_path)) == 1
    assert set(spans(log)) == {"lab", "build"}


def test_stages_put_only_boot_and_build_together() -> None:
    plan = [(k, k, [k]) for k in demo.STEPS]
    assert [[k for k, _, _ in st] for st in demo.stages(plan, [])] == [
        ["lab", "build"],
        ["rollout"],
        ["check"],
        ["probe"],
    ]
    assert [[k for k, _, _ in st] for st in demo.stages(plan, ["lab", "check"])] == [
        ["build"],
        ["rollout"],
        ["probe"],
    ]


def test_the_demo_boots_and_builds_the_demo_fleet_unless_told_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every step sees one fleet file: the packaged lab/fleet-demo.yml (two bookworm hosts),
    else the user's own lab/fleet-demo.yml in the current directory, else $IPVS_FLEET_FLEET,
    else --fleet."""
    log = fake_cli(tmp_path, monkeypatch)
    assert demo.run(demo_args(tmp_path)) == 0
    packaged = data_path(demo.DEMO_FLEET)
    assert set(fleets(log).values()) == {str(packaged)}
    hosts = load_fleet(packaged).hosts
    assert {h.release for h in hosts.values()} == {"bookworm"}
    # a canary and a second wave of another class (knob 1, then knob 0), as named in fleet.yml
    assert {n: (h.host_class, h.groups) for n, h in hosts.items()} == {
        "k8s-canary": ("k8s_node", ("k8s_nodes", "canary")),
        "ftp-director": ("ftp", ("ftp_hosts",)),
    }
    assert set(hosts) < set(load_fleet(data_path("lab/fleet.yml")).hosts)

    Path(f"{log}.fleet").unlink()
    (tmp_path / "lab").mkdir(exist_ok=True)
    (tmp_path / demo.DEMO_FLEET).write_text(packaged.read_text())
    assert demo.run(demo_args(tmp_path)) == 0
    assert set(fleets(log).values()) == {str(tmp_path / demo.DEMO_FLEET)}

    Path(f"{log}.fleet").unlink()
    monkeypatch.setenv("IPVS_FLEET_FLEET", "lab/fleet.yml")
    assert demo.run(demo_args(tmp_path)) == 0
    assert set(fleets(log).values()) == {str(tmp_path / "lab/fleet.yml")}

    Path(f"{log}.fleet").unlink()
    assert demo.run(demo_args(tmp_path, fleet="/x/fleet-side.yml")) == 0
    assert set(fleets(log).values()) == {"/x/fleet-side.yml"}
    assert set(fleets(log)) == set(demo.STEPS)


RESET = "ConnectionResetError: [Errno 104] Connection reset by peer"


def held_result(broken: int = 0) -> dict[str, Any]:
    """What the guest script's `down` prints."""
    return {
        "connections": 100,
        "broken": broken,
        "exchanges": 9000,
        "seconds": 41.3,
        "failures": [{"conn": i, "round": 30, "at": 12.8, "error": RESET} for i in range(broken)],
    }


class FakeLab:
    """Stands in for the demo's Lab: answers the guest script (inflight.py) as a host would,
    and logs when its connections went up and down in the fake CLI's log ("held")."""

    def __init__(self, log: Path, broken: int = 0, up_fails: str = "") -> None:
        self.log, self.broken, self.up_fails = log, broken, up_fails
        self.hosts_run: list[str] = []

    def run(self, host: str, cmd: Any, **kw: Any) -> SimpleNamespace:
        self.hosts_run.append(host)
        if isinstance(cmd, str):  # the upload of the guest script
            assert kw["input"].startswith('"""Connections held open')
            return SimpleNamespace(stdout="")
        verb = cmd[2]
        if verb == "up" and self.up_fails:
            raise FleetError(self.up_fails)
        with self.log.open("a") as f:
            f.write(f"held {'start' if verb == 'up' else 'end'} {time.time()}\n")
        doc = held_result(self.broken) if verb == "down" else {"connections": 100, "broken": 0}
        return SimpleNamespace(stdout=json.dumps(doc) + "\n")


def test_connections_are_held_on_the_canary_through_the_whole_rollout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = fake_cli(tmp_path, monkeypatch)
    lab = FakeLab(log)
    monkeypatch.setattr(demo, "Lab", lambda labdir: lab)
    assert demo.run(demo_args(tmp_path)) == 0
    s = spans(log)
    assert s["held"][0] <= s["rollout"][0] and s["rollout"][1] <= s["held"][1] <= s["check"][0]
    assert set(lab.hosts_run) == {demo.CANARY}
    out = capsys.readouterr().out
    assert (
        "    held     100 connections through a private IPVS service on k8s-canary, 41 s "
        "through the rollout: 0 broke\n"
    ) in out
    saved = json.loads((tmp_path / "reports" / "held.json").read_text())
    assert saved["result"]["broken"] == 0 and saved["host"] == demo.CANARY


def test_a_broken_connection_fails_the_demo_and_the_summary_says_which_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = fake_cli(tmp_path, monkeypatch)
    monkeypatch.setattr(demo, "Lab", lambda labdir: FakeLab(log, broken=3))
    assert demo.run(demo_args(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"on k8s-canary, 41 s through the rollout: 3 broke (first at 12.8 s: {RESET})" in out


def test_held_connections_that_cannot_be_set_up_are_said_and_the_demo_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = fake_cli(tmp_path, monkeypatch)
    why = "k8s-canary: `python3 /root/ipvs-fleet-inflight.py up 100` failed with exit 1: x"
    monkeypatch.setattr(demo, "Lab", lambda labdir: FakeLab(log, up_fails=why))
    assert demo.run(demo_args(tmp_path)) == 0
    assert set(spans(log)) == set(demo.STEPS)  # every step ran
    out = capsys.readouterr().out
    assert f"    held connections on k8s-canary could not be set up: {why}; going on" in out
    assert f"    held     connections on k8s-canary could not be set up: {why}\n" in out


def test_without_a_lab_the_demo_says_so_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real Lab of an empty lab dir: no canary to hold connections on."""
    fake_cli(tmp_path, monkeypatch)
    assert demo.run(demo_args(tmp_path)) == 0
    assert "held     connections on k8s-canary could not be set up: k8s-canary: not a host" in (
        capsys.readouterr().out
    )


def test_the_held_line() -> None:
    h = demo.Held("c", 100, held_result(broken=2))
    assert demo.held_line(h) == (
        "    held     100 connections through a private IPVS service on c, 41 s through the "
        f"rollout: 2 broke (first at 12.8 s: {RESET})"
    )
    assert demo.held_line(demo.Held("c", 100, error="gave no result: gone")) == (
        "    held     connections on c gave no result: gone"
    )
    no_result = demo.Held("c", 100, {"error": "no result: the client had died"})
    assert demo.held_line(no_result) == (
        "    held     connections on c gave no result (no result: the client had died)"
    )
