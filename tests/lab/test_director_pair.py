"""The keepalived director pair (lab/fleet-pair.yml): a rollout through the pair and a forced
VRRP failover in the middle of it break none of the client connections held through the VIP;
keepalived's table is the same before and after (the fix module touches no table); a real
server killed during the rollout leaves the table within its health check's interval; a
same-port reconnect to the VIP is not delayed where the class sets the knob to 1
(lvs_director) and is delayed as stock where it sets 0 (ftp), whose FTP service (keepalived's,
with ip_vs_ftp) carries passive transfers through the VIP and refuses knob 1 beside it.

The clients run on the lab_only host `lan` (10.0.9.50), the real servers in its network
namespaces rs1 and rs2 behind the directors' gateway VIP (LVS-NAT). Port 80: the echo servers
the held connections talk to; port 81: the probe's identity servers, for the reconnects and
the killed real server; port 21: vsftpd, on the ftp class only. `make test` runs this on the
pair lab after the side lab's tests.

Cost on 2 cores (TCG): the pair's rollout with 100 connections held and a failover
(~1.5 min), the ftp class's rollout, the refused one and the rollback (~2 min).
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


def rollout(
    lab, env, tmp_path: Path, name: str, inventory: Path | None = None, *data: str
) -> subprocess.Popen[str]:
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
            *(a for d in data for a in ("--data", d)),
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
        # no drain, no FTP service and no ip_vs_ftp (left by an interrupted ftp-class run;
        # lvs_director refuses knob 1 beside them), which FTP connections' entries hold for
        # IPVS's TIME_WAIT
        lab.run(
            h,
            "echo 0 > /etc/keepalived/drain; rm -f /etc/keepalived/conf.d/ftp.conf; "
            "systemctl reload keepalived; "
            "timeout 150 sh -c 'until modprobe -r ip_vs_ftp; do sleep 2; done'",
            timeout=180,
        )
    wait_for("lvs-a master", lambda: holds_vip(lab, "lvs-a"), 30)
    # On both directors: the test compares their tables before and after the rollout, and
    # keepalived adds the probe servers just started at its next check (in CI lvs-b's table
    # was read a check before it had rs2:8081, and "changed" across the rollout).
    wait_for(
        "both real servers in both tables",
        lambda: all(table(lab, d).count(":808") == 4 for d in DIRECTORS),
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
    wait_for(
        f"{KILLED} back in both tables",
        lambda: all(KILLED in lab.run(d, "ipvsadm -Ln").stdout for d in DIRECTORS),
        30,
    )
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


def ftp_get(lab) -> dict:
    """A passive FTP download of probe.bin from `lan` through the VIP, the data connection to
    the address the 227 reply names (ip_vs_ftp rewrites the real server's to the VIP)."""
    doc: dict = json.loads(lab.run("lan", ["python3", "-c", FTP_GET, VIP], timeout=60).stdout)
    return doc


# The client aborts its sockets at the end (RST): IPVS then forgets the connections within
# 10 s (its CLOSE state) instead of 2 min (TIME_WAIT; an unused PASV entry as long), and with
# them ip_vs_ftp is free to unload for the later tests, whose class refuses knob 1 beside it.
FTP_GET = """
import ftplib, hashlib, json, socket, struct, sys, time
t0, out = time.monotonic(), {}
ftp = ftplib.FTP(timeout=5)
ftp.trust_server_pasv_ipv4_address = True
abort = struct.pack("ii", 1, 0)
try:
    ftp.connect(sys.argv[1], 21)
    ftp.login()
    ftp.voidcmd("TYPE I")
    send = ftp.sendcmd  # the transfer's own PASV: another would leave an unused entry
    ftp.sendcmd = lambda cmd: out.setdefault(cmd.lower(), send(cmd))
    data = bytearray()
    with ftp.transfercmd("RETR probe.bin") as conn:
        while chunk := conn.recv(65536):
            data += chunk
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, abort)
    ftp.voidresp()
    out.update(ok=True, size=len(data), sha256=hashlib.sha256(data).hexdigest())
except (OSError, ftplib.Error, EOFError) as e:
    out.update(ok=False, error=f"{type(e).__name__}: {e}")
finally:
    if ftp.sock is not None:
        ftp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, abort)
    ftp.close()
out["seconds"] = round(time.monotonic() - t0, 3)
print(json.dumps(out))
"""


def ftp_service(lab, on: bool) -> None:
    """The operator's FTP service (lab/pair/director.sh's ftp.conf.lab) added to or removed
    from keepalived's configuration on both directors, keepalived reloaded."""
    conf = "/etc/keepalived/conf.d/ftp.conf"
    edit = f"cp /etc/keepalived/ftp.conf.lab {conf}" if on else f"rm -f {conf}"
    for d in DIRECTORS:
        lab.run(d, f"{edit} && keepalived --config-test && systemctl reload keepalived")
    want = 2 if on else 0
    wait_for(
        f"the FTP service with {want} real servers on both directors",
        lambda: all(len(re.findall(r" -r \S+:21 ", table(lab, d))) == want for d in DIRECTORS),
        30,
    )


def test_the_ftp_class_serves_ftp_keeps_the_stock_delay_and_refuses_knob_1(lab, pair, tmp_path):
    """The operator's FTP service on the pair (keepalived, :21 to vsftpd on rs1 and rs2):
    without ip_vs_ftp the passive reply names an unreachable real server; rolled out as the
    ftp class (knob 0, ip_vs_ftp among its modules) the transfer works through the VIP and a
    same-port reconnect waits for the SYN's retransmission as on a stock director; the
    lvs_director class (knob 1) is then refused beside the FTP service before any director
    changes; pyinfra's rollback of both directors in one run is refused (one failure domain);
    the rollback one director at a time, connections held, leaves the pair as before (no fix
    module, no knob) and FTP working."""
    ftp_service(lab, on=True)
    try:
        _ftp_class(lab, pair, tmp_path)
    finally:
        ftp_service(lab, on=False)
        for d in DIRECTORS:
            # the class's ip_vs_ftp, which the rollback leaves (not the fix module's); the
            # deploy of lvs_director refuses knob 1 beside it. The FTP connections' entries
            # hold it until IPVS forgets them.
            lab.run(
                d, "timeout 40 sh -c 'until modprobe -r ip_vs_ftp; do sleep 2; done'", timeout=60
            )


def _ftp_class(lab, pair, tmp_path: Path) -> None:
    want = lab.run("lan", "sha256sum /srv/lab-ftp/probe.bin").stdout.split()[0]
    before = ftp_get(lab)
    assert not before["ok"] and "10,0,10,2" in before.get("pasv", ""), before
    # the class comes with the rollout's --data, which the gate's checks judge the
    # directors by too (knob 0); the lab's raised p99 budget of lvs_director (host data,
    # lab_class_data) is taken off in the inventory: ftp budgets no p99
    no_p99 = {d: {"ipvs_latency_budget": {"p99_ms": None}} for d in DIRECTORS}
    inventory = inventory_with(lab.inventory_path, tmp_path / "ftp_pair.py", no_p99)
    p = rollout(lab, pair, tmp_path, "ftp", inventory, "ipvs_host_class=ftp")
    doc = finished(p, tmp_path, "ftp")
    assert {x["state"] for x in doc["hosts"].values()} == {"new-verified"}, doc["hosts"]
    knobs = {
        d: lab.run(d, "sysctl -n net.ipv4.vs.conn_reuse_old_conntrack").stdout.strip()
        for d in DIRECTORS
    }
    got = [ftp_get(lab) for _ in range(2)]  # rr: one transfer from each real server
    stock = reconnects(lab, 3)
    print(
        f"ftp class (knob {knobs}): FTP through the VIP before the rollout (no ip_vs_ftp): "
        f"{before.get('pasv')} {before.get('error')}; after: "
        + "; ".join(f"{g.get('pasv')} {g.get('size')} bytes in {g['seconds']} s" for g in got)
        + f"; {stock['slow']} slow of {stock['count']} same-port reconnects, connect max "
        f"{stock['connect_ms']['max']} ms"
    )
    assert set(knobs.values()) == {"0"}
    for g in got:
        assert g["ok"] and g["sha256"] == want and "10,0,9,100," in g["pasv"], g
    assert stock["slow"] >= 1 and stock["connect_ms"]["max"] >= 900, stock

    # the lab's own inventory gives the directors lvs_director: knob 1 beside the FTP service
    refused = rollout(lab, pair, tmp_path, "knob1")
    out, _ = refused.communicate(timeout=900)
    flat = " ".join(out.split())
    print(f"lvs_director beside the FTP service: exit {refused.returncode}; {flat[-600:]}")
    assert refused.returncode == 1, out[-4000:]
    assert "refused: host uses ftp" in flat and "10.0.9.100:21" in flat, out[-4000:]
    doc = json.loads((tmp_path / "knob1.json").read_text())
    assert doc["halted_at_wave"] == 1, doc
    first = doc["plan"][0]["hosts"][0]
    # the refused director stays on its old, working state: not rolled back (to stock)
    assert doc["hosts"][first]["journal_state"] == "refused", doc["hosts"]
    assert {x["state"] for x in doc["hosts"].values()} == {"old"}, doc["hosts"]
    for d in DIRECTORS:
        knob = lab.run(d, "sysctl -n net.ipv4.vs.conn_reuse_old_conntrack").stdout.strip()
        assert knob == "0", f"{d}: the refused rollout changed the knob to {knob}"
        assert re.search(r"^ip_vs_reuse ", lab.run(d, "lsmod").stdout, re.M), d
    assert ftp_get(lab)["ok"]

    def rollback(*limit: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["pyinfra", "-y", str(lab.inventory_path), "deploy/rollback.py", *limit],
            cwd=REPO,
            env={**pair, "PATH": f"{CLI.parent}:{pair['PATH']}"},
            capture_output=True,
            text=True,
            timeout=900,
        )

    # pyinfra on both directors at once would drain and unload them together: refused
    r = rollback()
    flat = " ".join(r.stderr.split())
    assert r.returncode != 0 and "ipvs_failure_domain director_pair: this run" in flat, flat
    for d in DIRECTORS:
        assert re.search(r"^ip_vs_reuse ", lab.run(d, "lsmod").stdout, re.M), d
    with held(lab, "lan", HELD, f"{VIP}:{ECHO}") as h:
        for d in ("lvs-b", "lvs-a"):  # one member per run, the backup first
            r = rollback("--limit", d)
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert h.result["broken"] == 0, h.result
    for d in DIRECTORS:
        assert not re.search(r"^ip_vs_reuse ", lab.run(d, "lsmod").stdout, re.M), d
    # the rollback's drain hooks moved the VIPs; a connection opened while they move back
    # meets a director without its entry (not yet synced) and is reset, as on any failover
    wait_for(
        "lvs-a master again",
        lambda: holds_vip(lab, "lvs-a") and not holds_vip(lab, "lvs-b"),
        30,
    )
    time.sleep(2)
    after = ftp_get(lab)
    assert after["ok"] and after["sha256"] == want, after
