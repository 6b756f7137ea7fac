"""Connections held open through an IPVS NAT service on a host while it is changed.

Guest side, standard library only, run as root on the host (copied there by
`ipvs_fleet.probe.harness.Guest`). `up N` builds a private topology: a dummy device with a
VIP in the host's own network namespace (where kube-proxy's and keepalived's services live),
an IPVS NAT service on it, a real server netns and a client netns joined by veth pairs; the
client opens N TCP connections through the VIP and keeps every one talking (a line each
`--every` seconds, the echo awaited) in a detached process until `down`, which stops it, tears
the topology down and prints the JSON result: how many connections broke (reset, timed out,
wrong echo) and when. `status` prints the running counts. `rate SECONDS` instead measures how
many new connections per second the client completes through the service (connect, close;
each SYN crosses every hook on the path, the fix module's included), for bench/.

Every address is inside the host (a /30 per veth, the VIP on a dummy device); names and
addresses are this tool's own (`ifl*`, 10.253.0.0/16), so a run never touches the host's
other services. `INFLIGHT_SLOT=N` (0-9, default 0) gives a run names, addresses and state of
its own, so runs in different slots share a host: the demo's and the lab tests' (slot 0)
and the rollout's held-connections gate's (slot 1, `ipvs_fleet.rollout.held`).

    python3 inflight.py up 100 && <change the host> && python3 inflight.py down

Controller side: `held(lab, host, 100)` around a change, in the lab tests and the demo.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# The run's slot, inherited by its detached children (the environment goes with them).
SLOT = int(os.environ.get("INFLIGHT_SLOT") or 0)
if not 0 <= SLOT <= 9:
    raise SystemExit(f"inflight: INFLIGHT_SLOT={SLOT}: must be 0..9")
_SUFFIX, _NET = (f"-{SLOT}" if SLOT else ""), f"10.253.{10 * SLOT}"
STATE_PREFIX = "/run/ipvs-fleet-inflight"  # + "-<slot>" for slots 1..9
STATE = f"{STATE_PREFIX}{_SUFFIX}"
VIP, PORT = f"{_NET}.1", 7311
CLIENT_NS, SERVER_NS = (f"iflc{SLOT}", f"ifls{SLOT}") if SLOT else ("iflc", "ifls")
DUMMY, CLIENT_DEV, SERVER_DEV = f"ifl{SLOT}", f"iflc{SLOT}", f"ifls{SLOT}"
# (host side, netns side) of each veth /30
CLIENT_NET = (f"10.253.{10 * SLOT + 1}.1", f"10.253.{10 * SLOT + 1}.2")
SERVER_NET = (f"10.253.{10 * SLOT + 2}.1", f"10.253.{10 * SLOT + 2}.2")
# INFLIGHT_TARGET=ADDR:PORT: hold the connections to a service that exists already (the pair
# lab's VIP, whose real servers echo each line), from the host's own network namespace; no
# topology of this file's own is made or removed.
_TARGET = os.environ.get("INFLIGHT_TARGET", "")
TARGET = (_TARGET.rpartition(":")[0], int(_TARGET.rpartition(":")[2])) if _TARGET else None


def sh(cmd: str, check: bool = True) -> str:
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise SystemExit(f"inflight: `{cmd}` failed: {r.stderr.strip()}")
    return r.stdout


def topology_up() -> None:
    topology_down()
    for ns, (host_ip, ns_ip), dev in (
        (CLIENT_NS, CLIENT_NET, CLIENT_DEV),
        (SERVER_NS, SERVER_NET, SERVER_DEV),
    ):
        sh(f"ip netns add {ns} && ip link add {dev} type veth peer name eth0 netns {ns}")
        sh(f"ip addr add {host_ip}/30 dev {dev} && ip link set {dev} up")
        sh(
            f"ip -n {ns} addr add {ns_ip}/30 dev eth0 && ip -n {ns} link set eth0 up && "
            f"ip -n {ns} link set lo up && ip -n {ns} route add default via {host_ip}"
        )
    sh(
        f"ip link add {DUMMY} type dummy && ip link set {DUMMY} up && "
        f"ip addr add {VIP}/32 dev {DUMMY} && sysctl -qw net.ipv4.ip_forward=1"
    )
    sh(
        f"ipvsadm -A -t {VIP}:{PORT} -s rr && "
        f"ipvsadm -a -t {VIP}:{PORT} -r {SERVER_NET[1]}:{PORT} -m"
    )


def topology_down() -> None:
    sh(f"ipvsadm -D -t {VIP}:{PORT}", check=False)
    for ns in (CLIENT_NS, SERVER_NS):
        pids = sh(f"ip netns pids {ns} 2>/dev/null", check=False).split()
        if pids:
            sh(f"kill -9 {' '.join(pids)}", check=False)
        sh(f"ip netns del {ns}", check=False)
    sh(
        f"ip link del {DUMMY} 2>/dev/null; ip link del {CLIENT_DEV} 2>/dev/null; "
        f"ip link del {SERVER_DEV} 2>/dev/null",
        check=False,
    )


def serve() -> None:
    """The real server: an echo server on PORT (run in the server netns)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", PORT))
    srv.listen(1024)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is srv:
                conn, _ = srv.accept()
                sel.register(conn, selectors.EVENT_READ)
                continue
            c: Any = key.fileobj
            try:
                data = c.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(c)
                c.close()
                continue
            c.sendall(data)


def hold(count: int, every: float, timeout: float) -> None:
    """The client: `count` connections, each sending a numbered line every `every` s and
    waiting up to `timeout` s for its echo; writes STATE/status.json once a second and
    STATE/result.json when STATE/stop appears (run in the client netns)."""
    started = time.time()
    conns: list[socket.socket | None] = []
    for _ in range(count):
        c = socket.create_connection(TARGET or (VIP, PORT), timeout=timeout)
        c.settimeout(timeout)
        conns.append(c)
    broken: list[dict[str, Any]] = []
    exchanges = 0
    last_status = 0.0
    n = 0
    while not os.path.exists(f"{STATE}/stop"):
        n += 1
        t0 = time.monotonic()
        for i, s in enumerate(conns):
            if s is None:
                continue
            line = f"{i} {n}\n".encode()
            try:
                s.sendall(line)
                got = b""
                while not got.endswith(b"\n"):
                    chunk = s.recv(64)
                    if not chunk:
                        raise ConnectionError("closed by the peer")
                    got += chunk
                if got != line:
                    raise ConnectionError(f"echo {got!r}, sent {line!r}")
                exchanges += 1
            except (OSError, ConnectionError) as e:
                broken.append(
                    {
                        "conn": i,
                        "round": n,
                        "at": round(time.time() - started, 2),
                        "error": f"{type(e).__name__}: {e}",
                    }
                )
                s.close()
                conns[i] = None
        if time.monotonic() - last_status >= 1:
            last_status = time.monotonic()
            write("status.json", summary(count, broken, exchanges, started))
        time.sleep(max(0.0, every - (time.monotonic() - t0)))
    for s in conns:
        if s is not None:
            s.close()
    write("result.json", summary(count, broken, exchanges, started))


def summary(
    count: int, broken: list[dict[str, Any]], exchanges: int, started: float
) -> dict[str, Any]:
    return {
        "connections": count,
        "broken": len(broken),
        "exchanges": exchanges,
        "seconds": round(time.time() - started, 1),
        "failures": broken[:20],
    }


def write(name: str, doc: dict[str, Any]) -> None:
    tmp = f"{STATE}/.{name}"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, f"{STATE}/{name}")


def spawn(ns: str, target: str, *args: str) -> None:
    """Run this file's `target` in netns `ns`, detached (its own session: an SSH session
    may end)."""
    netns = ["ip", "netns", "exec", ns] if ns else []
    with open(f"{STATE}/{target}.log", "w") as log:
        subprocess.Popen(
            [*netns, sys.executable, os.path.abspath(__file__), target, *args],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def connect_rate(seconds: float) -> None:
    """New connections through the VIP as fast as one client goes, for `seconds`; prints
    {"connections", "seconds", "per_second", "errors"} (run in the client netns). A FIN close
    keeps each port in TIME_WAIT, so no SYN reuses a port: the stock reuse drop stays out of
    the measurement."""
    sh("sysctl -qw net.ipv4.ip_local_port_range='1024 65000'")
    n = errors = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        try:
            socket.create_connection((VIP, PORT), timeout=2).close()
            n += 1
        except OSError:
            errors += 1
    took = time.monotonic() - t0
    print(
        json.dumps(
            {
                "connections": n,
                "seconds": round(took, 3),
                "per_second": round(n / took, 1),
                "errors": errors,
            }
        )
    )


def rate(seconds: float) -> dict[str, Any]:
    sh(f"rm -rf {STATE} && mkdir -p {STATE}")
    topology_up()
    try:
        spawn(SERVER_NS, "_serve")
        time.sleep(0.5)
        out = sh(
            f"ip netns exec {CLIENT_NS} {sys.executable} {os.path.abspath(__file__)} "
            f"_rate {seconds}"
        )
        doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return doc
    finally:
        topology_down()


def up(count: int, every: float, timeout: float) -> dict[str, Any]:
    sh(f"rm -rf {STATE} && mkdir -p {STATE}")
    if TARGET is None:
        topology_up()
        spawn(SERVER_NS, "_serve")
        time.sleep(0.5)
    spawn("" if TARGET else CLIENT_NS, "_hold", str(count), str(every), str(timeout))
    deadline = time.monotonic() + 30 + count * 0.1
    while not os.path.exists(f"{STATE}/status.json"):
        if time.monotonic() > deadline or os.path.exists(f"{STATE}/result.json"):
            with open(f"{STATE}/_hold.log") as f:
                log = f.read()[-2000:]
            down()
            raise SystemExit(f"inflight: the client did not start: {log}")
        time.sleep(0.2)
    return status()


def status() -> dict[str, Any]:
    with open(f"{STATE}/status.json") as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def down() -> dict[str, Any]:
    os.makedirs(STATE, exist_ok=True)
    open(f"{STATE}/stop", "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(f"{STATE}/result.json") and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        with open(f"{STATE}/result.json") as f:
            doc: dict[str, Any] = json.load(f)
    except OSError:
        doc = {"error": "no result: the client had died or never started"}
    if TARGET is None:
        topology_down()
    return doc


# --- controller side (runs on the controller; `lab` is an ipvs_fleet.lab.lab.Lab) -------------

GUEST_PATH = "/root/ipvs-fleet-inflight.py"


class Held:
    """The connections held on one host: `result` once the block has ended."""

    def __init__(self, lab: Any, host: str, target: str = "") -> None:
        self.lab, self.host = lab, host
        self.env = [f"INFLIGHT_TARGET={target}"] if target else []
        self.result: dict[str, Any] = {}

    def guest(self, *args: str) -> dict[str, Any]:
        argv = [*(["env", *self.env] if self.env else []), "python3", GUEST_PATH, *args]
        out = self.lab.run(self.host, argv, timeout=120).stdout
        doc: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return doc

    def status(self) -> dict[str, Any]:
        return self.guest("status")


def install(lab: Any, host: str) -> None:
    """Copy this file to GUEST_PATH on `host`."""
    with open(os.path.abspath(__file__)) as f:
        lab.run(host, f"cat > {GUEST_PATH}", input=f.read())


@contextmanager
def held(lab: Any, host: str, count: int = 100, target: str = "") -> Iterator[Held]:
    """`count` connections held open through an IPVS NAT service on `host` for the block;
    `Held.result` then says how many broke (the topology is removed either way).

    + target: "ADDR:PORT" of a service `host` reaches (its real servers echoing each line),
      held from `host`'s own namespace instead of a private topology
    """
    install(lab, host)
    h = Held(lab, host, target)
    h.guest("up", str(count))
    try:
        yield h
    finally:
        h.result = h.guest("down")


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    cmd = argv[0] if argv else ""
    if cmd == "up":
        count = int(argv[1]) if len(argv) > 1 else 100
        print(
            json.dumps(
                up(
                    count,
                    every=float(os.environ.get("INFLIGHT_EVERY", "0.5")),
                    timeout=float(os.environ.get("INFLIGHT_TIMEOUT", "5")),
                )
            )
        )
    elif cmd == "status":
        print(json.dumps(status()))
    elif cmd == "down":
        print(json.dumps(down()))
    elif cmd == "rate":
        print(json.dumps(rate(float(argv[1]) if len(argv) > 1 else 5.0)))
    elif cmd == "_rate":
        connect_rate(float(argv[1]))
    elif cmd == "_serve":
        serve()
    elif cmd == "_hold":
        hold(int(argv[1]), float(argv[2]), float(argv[3]))
    else:
        print("usage: inflight.py up [N] | status | down | rate [SECONDS]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
