"""The keepalived director pair (lab/fleet-pair.yml): a rollout through the pair and a forced
VRRP failover in the middle of it break none of the client connections held through the VIP;
keepalived's table is the same before and after (the fix module touches no table); a real
server killed during the rollout leaves the table within its health check's interval; a
same-port reconnect to the VIP is not delayed where the class sets the knob to 1
(lvs_director) and is delayed as stock where it sets 0 (ftp).

The clients run on the lab_only host `lan` (10.0.9.50), the real servers in its network
namespaces rs1 and rs2 behind the directors' gateway VIP (LVS-NAT). Port 80: the echo servers
the held connections talk to; port 81: the probe's identity servers, for the reconnects and
the killed real server. `make test` runs this on the pair lab after the main lab's tests.

Cost on 2 cores (TCG): the pair's rollout with 100 connections held and a failover
(~1.5 min), the ftp class's rollout and the rollback (~1.5 min).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvs_fleet.probe.inflight import held
from tests.fixtures.inventory import inventory_with

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ipvs-fleet")
PROBE = REPO / "src" / "ipvs_fleet" / "probe" / "probe.py"
pytestmark = [pytest.mark.lab, pytest.mark.destructive, pytest.mark.pair_lab]

DIRECTORS = ("lvs-a", "lvs-b")
VIP, ECHO, PROBE_PORT = "10.0.9.100", 80, 81
KILLED = "10.0.10.22:8081"  # rs2's probe server, killed during the rollout
# keepalived's TCP_CHECK on the pair (lab/pair/director.sh): delay_loop 2, connect_timeout 1
CHECK_INTERVAL_S = 2 + 1
HELD = 100


def holds_vip(lab, host: str) -> bool:
    return f"inet {VIP}/" in lab.run(host, "ip -o -4 addr show dev eth1").stdout


def master(lab) -> str:
    masters = [h for h in DIRECTORS if holds_vip(lab, h)]
    assert len(masters) == 1, f"VIP {VIP} held by {masters}"
    return masters[0]


def wait_for(what: str, cond, timeout: float, every: float = 0.2) -> float:
    """Seconds until cond() held; fails the test after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return time.monotonic() - t0


def table(lab, host: str) -> str:
    """The IPVS services and real servers, sorted (ipvsadm -Sn)."""
    return "\n".join(sorted(lab.run(host, "ipvsadm -Sn").stdout.splitlines()))


def reconnects(lab, count: int) -> dict:
    """Same-port reconnects from `lan` to the VIP's probe service, the real server aborting
    with RST (scenario A of DOMAIN.md)."""
    out = lab.run(
        "lan",
        f"python3 /usr/local/lib/ipvs-fleet-lab/probe.py connect {VIP}:{PROBE_PORT} "
        f"-n {count} --mode rst --summary",
        timeout=180,
    ).stdout
    doc: dict = json.loads(out)
    return doc


def rollout(lab, env, tmp_path: Path, name: str, inventory: Path | None = None):
    journal = tmp_path / f"{name}.jsonl"
    return subprocess.Popen(
        [
            str(CLI),
            "rollout",
            str(inventory or lab.inventory_path),
            "--waves",
            "1,1",
            "--journal",
            str(journal),
            "--json",
            str(tmp_path / f"{name}.json"),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finished(p: subprocess.Popen[str], tmp_path: Path, name: str) -> dict:
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    doc: dict = json.loads((tmp_path / f"{name}.json").read_text())
    return doc


@pytest.fixture(scope="module")
def pair(lab, artifacts):
    """The pair with the probe's identity servers up on both real servers and lvs-a
    master; the environment a rollout on it needs."""
    lab.run("lan", "cat > /usr/local/lib/ipvs-fleet-lab/probe.py", input=PROBE.read_text())
    lab.run("lan", "systemctl start lab-probe@rs1 lab-probe@rs2 lab-rs@rs1 lab-rs@rs2")
    for h in DIRECTORS:
        # no drain, and no ip_vs_ftp (left by an ftp-class run; lvs_director refuses knob 1
        # beside it)
        lab.run(h, "echo 0 > /etc/keepalived/drain; modprobe -r ip_vs_ftp")
    wait_for("lvs-a master", lambda: holds_vip(lab, "lvs-a"), 30)
    wait_for(
        "both real servers in the table",
        lambda: table(lab, "lvs-a").count(":808") == 4,
        30,
    )
    env = {
        **os.environ,
        "IPVS_FLEET_LAB_DIR": str(lab.dir),
        "IPVS_FLEET_ARTIFACTS": str(next(iter(artifacts.values())).path.parent),
    }
    return env


def test_rollout_through_the_pair_with_a_failover_breaks_no_connection(lab, pair, tmp_path):
    """100 connections held from `lan` through the VIP across the pair's rollout, a VRRP
    failover forced in its middle (the master drained through keepalived's track file) and
    the failback; rs2's probe server killed during it leaves the table within the check
    interval; afterwards the knob is 1 on both and a same-port reconnect is never slow."""
    before = {h: table(lab, h) for h in DIRECTORS}
    pids = {h: lab.run(h, "systemctl show -p MainPID --value keepalived").stdout for h in DIRECTORS}
    events: dict[str, float] = {}
    with held(lab, "lan", HELD, f"{VIP}:{ECHO}") as h:
        t0 = time.monotonic()
        p = rollout(lab, pair, tmp_path, "pair")
        journal = tmp_path / "pair.jsonl"

        def first_wave_done() -> bool:
            return journal.exists() and '"state": "verified"' in journal.read_text()

        wait_for("the first director verified", first_wave_done, 600, every=1)
        was = master(lab)
        other = next(d for d in DIRECTORS if d != was)
        lab.run(was, "echo -100 > /etc/keepalived/drain")  # the failover, mid-rollout
        events["failover_s"] = wait_for(
            f"the VIP on {other}", lambda: holds_vip(lab, other) and not holds_vip(lab, was), 30
        )
        events["failover_at_s"] = time.monotonic() - t0
        lab.run("lan", "systemctl kill -s KILL lab-probe@rs2")
        events["removed_s"] = wait_for(
            f"{KILLED} out of {other}'s table",
            lambda: KILLED not in lab.run(other, "ipvsadm -Ln").stdout,
            30,
        )
        doc = finished(p, tmp_path, "pair")
        lab.run(was, "echo 0 > /etc/keepalived/drain")  # failback: lvs-a has the priority
        events["failback_s"] = wait_for(
            "the VIP back on lvs-a", lambda: holds_vip(lab, "lvs-a"), 30
        )
        time.sleep(2)  # a few exchanges after the failback
        mid = h.status()
    result = h.result
    lab.run("lan", "systemctl start lab-probe@rs2")
    wait_for(f"{KILLED} back", lambda: KILLED in lab.run("lvs-a", "ipvsadm -Ln").stdout, 30)
    after = {h: table(lab, h) for h in DIRECTORS}
    order = sorted(doc["hosts"], key=lambda n: doc["hosts"][n]["wave"])
    probe = reconnects(lab, 20)
    print(
        f"pair rollout ({' then '.join(order)}): {result.get('broken')} of {HELD} connections "
        f"broken ({result.get('exchanges')} exchanges, {result.get('seconds')} s); failover "
        f"{events['failover_s']:.1f} s at {events['failover_at_s']:.0f} s, failback "
        f"{events['failback_s']:.1f} s; killed real server out of the table in "
        f"{events['removed_s']:.1f} s (check interval {CHECK_INTERVAL_S} s); knob 1 reconnects: "
        f"{probe['slow']} slow, {probe['errors']} failed of {probe['count']}, connect max "
        f"{probe['connect_ms']['max']} ms"
    )
    assert {x["state"] for x in doc["hosts"].values()} == {"new-verified"}, doc["hosts"]
    assert mid["broken"] == 0 and result["broken"] == 0, result
    assert result["connections"] == HELD and result["exchanges"] > HELD * 10, result
    assert events["removed_s"] <= CHECK_INTERVAL_S + 1
    assert before == after, "keepalived's IPVS table changed across the rollout"
    pids_after = {
        h: lab.run(h, "systemctl show -p MainPID --value keepalived").stdout for h in DIRECTORS
    }
    assert pids == pids_after, "keepalived was restarted"
    for d in DIRECTORS:
        knob = lab.run(d, "sysctl -n net.ipv4.vs.conn_reuse_old_conntrack").stdout.strip()
        assert knob == "1", d
    assert probe["slow"] == 0 and probe["errors"] == 0, probe


def test_the_ftp_class_keeps_the_stock_delay_and_the_rollback_restores_the_pair(
    lab, pair, tmp_path
):
    """The pair rolled out as the ftp class (knob 0): a same-port reconnect to the VIP waits
    for the SYN's retransmission as on a stock director; then the rollback, connections held,
    leaves the pair as before the first rollout (no fix module, no knob)."""
    # the class comes with the host's data, as a user's inventory gives it; the lab's raised
    # p99 budget of lvs_director (lab_class_data) does not go with it: ftp budgets no p99
    ftp = {
        d: {"ipvs_host_class": "ftp", "ipvs_latency_budget": {"p99_ms": None}} for d in DIRECTORS
    }
    inventory = inventory_with(lab.inventory_path, tmp_path / "ftp_pair.py", ftp)
    doc = finished(rollout(lab, pair, tmp_path, "ftp", inventory), tmp_path, "ftp")
    assert {x["state"] for x in doc["hosts"].values()} == {"new-verified"}, doc["hosts"]
    knobs = {
        d: lab.run(d, "sysctl -n net.ipv4.vs.conn_reuse_old_conntrack").stdout.strip()
        for d in DIRECTORS
    }
    stock = reconnects(lab, 3)
    print(
        f"ftp class (knob {knobs}): {stock['slow']} slow of {stock['count']} same-port "
        f"reconnects, connect max {stock['connect_ms']['max']} ms"
    )
    assert set(knobs.values()) == {"0"}
    assert stock["slow"] >= 1 and stock["connect_ms"]["max"] >= 900, stock
    with held(lab, "lan", HELD, f"{VIP}:{ECHO}") as h:
        r = subprocess.run(
            ["pyinfra", "-y", str(lab.inventory_path), "deploy/rollback.py"],
            cwd=REPO,
            env={**pair, "PATH": f"{CLI.parent}:{pair['PATH']}"},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert h.result["broken"] == 0, h.result
    for d in DIRECTORS:
        assert not re.search(r"^ip_vs_reuse ", lab.run(d, "lsmod").stdout, re.M), d
        # the ftp class loaded the distro's ip_vs_ftp, which the rollback leaves (not the
        # fix module's); the deploy of the class lvs_director refuses knob 1 beside it
        lab.run(d, "modprobe -r ip_vs_ftp")
