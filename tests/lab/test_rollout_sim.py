"""Rollout on the simulated fleet: 50 SSH hosts in one VM, waves [1, 10%, 50%, 100%],
the controller killed (SIGKILL) mid-wave and resumed; each host deployed exactly once, as the
hosts' own depmod logs show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_fleet.simfleet.fleet import SimFleet

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ipvs-fleet")
pytestmark = [pytest.mark.lab, pytest.mark.destructive]


@pytest.fixture(scope="module")
def sim(tmp_path_factory, artifacts) -> Iterator[SimFleet]:
    d = tmp_path_factory.mktemp("simfleet")
    fleet = SimFleet(d)
    fleet.up(50)
    art_dir = next(iter(artifacts.values())).path.parent
    fleet.kernel_modules(art_dir)
    fleet.art_dir = art_dir  # type: ignore[attr-defined]
    yield fleet
    fleet.down()


def rollout(sim: SimFleet, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, IPVS_FLEET_SIM_DIR=str(sim.dir),
               IPVS_FLEET_ARTIFACTS=str(sim.art_dir))  # type: ignore[attr-defined]
    return subprocess.Popen(
        [str(CLI), "rollout", str(sim.inventory_path), "--waves", "1,10%,50%,100%",
         "--journal", str(sim.dir / "journal.jsonl"), *args],
        cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def journal_states(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "host":
            out[rec["host"]] = rec["state"]
    return out


def test_kill_9_mid_wave_then_resume_deploys_each_host_once(sim: SimFleet) -> None:
    journal = sim.dir / "journal.jsonl"
    p = rollout(sim)
    # Wait until wave 3 (25 hosts) is being deployed, then kill the controller outright.
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and p.poll() is None:
        if journal.exists() and sum(
            1 for h, s in journal_states(journal).items() if s == "deploying"
        ) >= 25:
            time.sleep(5)  # mid-wave: pyinfra is changing hosts
            break
        time.sleep(1)
    assert p.poll() is None, p.stdout.read() if p.stdout else ""
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = journal_states(journal)
    assert sum(1 for s in before.values() if s == "verified") == 6  # waves 1 and 2
    report = sim.dir / "report.json"
    r = rollout(sim, "--resume", "--json", str(report))
    out, _ = r.communicate(timeout=1800)
    assert r.returncode == 0, out[-4000:]
    doc = json.loads(report.read_text())
    assert doc["counts"] == {"new-verified": 50}
    counts = sim.install_counts()
    assert len(counts) == 50
    assert set(counts.values()) == {1}, {h: n for h, n in counts.items() if n != 1}
