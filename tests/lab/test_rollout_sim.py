"""Rollout on the simulated fleet: 50 SSH hosts in one VM, waves [1, 10%, 50%, 100%].
Faults: the controller killed (SIGKILL) mid-wave and resumed (each host deployed exactly once,
as the hosts' own depmod logs show); a host that fails its gate and a host that goes
unreachable mid-wave (the wave halts and is rolled back, later waves untouched).

Cost: one TCG VM (the lab's bookworm image and artifact, shared with the other lab tests), 50
hosts, one rollout with its resume. The gate runs every check on every host but the latency
probe on one host per wave (src/ipvs_fleet/simfleet/rollout.yml).
"""

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

from ipvs_fleet.build.build import build_for
from ipvs_fleet.debian import pinned_kernel
from ipvs_fleet.simfleet.fleet import RELEASE, ROLLOUT_CONFIG, SimFleet, host_name
from tests.fixtures.artifacts import artifacts_dir

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ipvs-fleet")
SIZE = 50
pytestmark = [pytest.mark.lab, pytest.mark.destructive, pytest.mark.slow]


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    # Only the bookworm artifact: the same cache folder as the `artifacts` fixture, so a full
    # session builds it once, and this test alone does not build the other releases.
    art = build_for(pinned_kernel(RELEASE), artifacts_dir())  # the kernel the sim image boots
    d = os.environ.get("IPVS_FLEET_TEST_SIM_DIR")
    fleet = SimFleet(Path(d) if d else tmp_path_factory.mktemp("simfleet"))
    try:
        kept = fleet.is_running() and fleet.state().get("size", 0) >= SIZE
        fleet.up(SIZE)
        if kept:
            fleet.reset()  # a kept fleet (IPVS_FLEET_KEEP_SIM=1) starts from scratch too
        fleet.kernel_modules(art.path.parent)
        fleet.art_dir = art.path.parent  # type: ignore[attr-defined]
        yield fleet
    finally:
        if os.environ.get("IPVS_FLEET_KEEP_SIM") != "1":
            fleet.down()


def rollout(sim: SimFleet, journal: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, IPVS_FLEET_SIM_DIR=str(sim.dir), IPVS_FLEET_ARTIFACTS=str(sim.art_dir))  # type: ignore[attr-defined]
    return subprocess.Popen(
        [
            str(CLI),
            "rollout",
            str(sim.inventory_path),
            "--config",
            str(ROLLOUT_CONFIG),
            "--waves",
            "1,10%,50%,100%",
            "--journal",
            str(journal),
            *args,
        ],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def journal_states(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line torn by the kill
        if rec.get("event") == "host":
            out[rec["host"]] = rec["state"]
    return out


def planned_waves(path: Path) -> list[list[str]]:
    first = json.loads(path.read_text().splitlines()[0])
    return [hosts for _, hosts in first["waves"]]


def test_kill_9_mid_wave_then_resume_deploys_each_host_once(sim: SimFleet) -> None:
    journal = sim.dir / "journal.jsonl"
    journal.unlink(missing_ok=True)
    p = rollout(sim, journal)
    # Wait until wave 3 (25 hosts) is being deployed and its first host has installed the set
    # (its own depmod log says so), then kill the controller outright: mid-wave, hosts changed.
    deadline = time.monotonic() + 1200
    wave3: list[str] = []
    while time.monotonic() < deadline and p.poll() is None:
        if not wave3 and journal.exists():
            states = journal_states(journal)
            if sum(1 for s in states.values() if s == "deploying") >= 25:
                wave3 = planned_waves(journal)[2]
        if wave3 and any(sim.install_counts()[h] for h in wave3):
            break
        time.sleep(1)
    assert p.poll() is None, p.stdout.read() if p.stdout else ""
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    if p.stdout:
        p.stdout.close()
    t_kill = time.monotonic()
    waves = planned_waves(journal)
    assert [len(w) for w in waves] == [1, 5, 25, 19]
    before = journal_states(journal)
    assert sorted(h for h, s in before.items() if s == "verified") == sorted(waves[0] + waves[1])
    assert {before[h] for h in waves[2]} == {"deploying"}
    # The hosts say the same: waves 1-2 installed once, the last wave never touched.
    counts = sim.install_counts()
    assert all(counts[h] == 1 for h in waves[0] + waves[1]), counts
    assert all(counts[h] == 0 for h in waves[3]), counts
    assert all(counts[h] <= 1 for h in waves[2]), counts
    print(f"killed with {sum(counts[h] for h in waves[2])}/25 wave-3 hosts installed")

    report = sim.dir / "report.json"
    r = rollout(sim, journal, "--resume", "--json", str(report))
    out, _ = r.communicate(timeout=1800)
    assert r.returncode == 0, out[-4000:]
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "completed"
    assert doc["counts"] == {"new-verified": SIZE}
    # Verified hosts were skipped on resume; the killed wave was finished, not restarted.
    assert doc["waves"][0]["skipped_verified"] == waves[0]
    assert doc["waves"][1]["skipped_verified"] == waves[1]
    counts = sim.install_counts()
    assert len(counts) == SIZE
    assert set(counts.values()) == {1}, {h: n for h, n in counts.items() if n != 1}
    # The class's values are live in each host's own network namespace (spot check).
    for h in (waves[0][0], waves[2][-1], waves[3][-1]):
        live = sim.host_run(
            h, "cat /proc/sys/net/ipv4/vs/conntrack /proc/sys/net/ipv4/vs/conn_reuse_old_conntrack"
        ).stdout.split()
        assert live == ["1", "1"], (h, live)
    print(
        f"resume took {time.monotonic() - t_kill:.0f} s; per wave: "
        + ", ".join(f"{w['index']}: {w['seconds']}" for w in doc["waves"])
    )


def test_failed_gate_and_unreachable_host_halt_the_wave_and_later_waves_stay_untouched(
    sim: SimFleet,
) -> None:
    sim.reset()
    journal, report = sim.dir / "faults.jsonl", sim.dir / "faults.json"
    journal.unlink(missing_ok=True)
    # Wave 2 is sim-02..sim-06 (inventory order). Its first host runs the wave's latency probe
    # (simfleet/rollout.yml) and gets a budget no host can meet; its last host crashes while
    # the wave is being deployed.
    budget_host, victim = host_name(2), host_name(6)
    hostdata = sim.dir / "hostdata.json"
    hostdata.write_text(json.dumps({budget_host: {"ipvs_latency_budget": {"p99_ms": 0}}}))
    try:
        p = rollout(sim, journal, "--json", str(report))
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and p.poll() is None:
            if journal.exists() and journal_states(journal).get(victim) == "deploying":
                sim.kill_host(victim)
                break
            time.sleep(0.5)
        out, _ = p.communicate(timeout=1500)
    finally:
        hostdata.unlink(missing_ok=True)
    waves = planned_waves(journal)
    assert waves[1] == [host_name(i) for i in range(2, 7)]
    assert p.returncode == 1, out[-4000:]
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "halted" and doc["halted_at_wave"] == 2, out[-4000:]
    assert len(doc["waves"]) == 2  # wave 3 never started
    hosts = doc["hosts"]
    assert hosts[waves[0][0]]["state"] == "new-verified"
    assert "latency" in hosts[budget_host]["detail"]
    # The crashed host cannot be rolled back: the record says its state is not known.
    assert hosts[victim]["state"] == "failed-unknown", hosts[victim]
    for h in waves[1]:
        if h != victim:
            assert hosts[h]["state"] == "rolled-back", (h, hosts[h])
    for h in waves[2] + waves[3]:
        assert hosts[h]["state"] == "old", (h, hosts[h])
    # What the hosts themselves logged: the canary installed once and kept it; the reachable
    # wave-2 hosts installed and removed the set once each; later waves have no event at all.
    ev = sim.events()
    assert [e.split()[2] for e in ev[waves[0][0]]] == ["install"], ev[waves[0][0]]
    for h in waves[1]:
        if h != victim:
            assert [e.split()[2] for e in ev[h]] == ["install", "remove"], (h, ev[h])
    assert all(not ev[h] for h in waves[2] + waves[3]), {h: ev[h] for h in waves[2] + waves[3]}
    sim.revive_host(victim)
    assert sim.host_run(victim, "true").ok  # the fleet is whole again for later tests
