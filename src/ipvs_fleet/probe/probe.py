#!/usr/bin/env python3
"""Short-connection latency probe through an IPVS virtual service (standard library only).

Runs as a single file copied to a host (`python3 probe.py connect ...`, Python 3.9+) and as
`ipvs-fleet probe connect ...`. Each attempt connects to VIP:port (by default always from the
same source port: explicit bind with SO_REUSEADDR), sends one request line, reads the answering
real server's identity line and closes. The result (JSON) counts attempts, errors and slow
connects (at or above the SYN-retransmit threshold), gives p50/p90/p99/max of the connect and of
the whole request, which real server answered, and the TcpExtTCPSynRetrans delta of the probe's
network namespace.

The test server (`probe.py serve`) answers each request line with its identity and then closes
as the request's first word asks:

- `fin`:  server closes first (FIN), the ordinary case
- `rst`:  server aborts with RST (SO_LINGER {1, 0}), scenario A of DOMAIN.md
- `hold`: server keeps the connection until the client closes or `--hold` seconds pass, then
  aborts; the client decides how it ends (scenarios B, B2, C2)

A request whose second word is `peer` (`rst peer`) gets the address the server saw appended to
the identity: `rs1 peer=10.244.1.1 pport=40312` (after masquerade: the node's address; without:
the client's own). Without `peer` the answer is the bare identity line, as before. With
`--udp-port` the server also answers every UDP datagram with that long form plus the
datagram's first word (`req=q2`). IPv6 works the
same way (bind `::`).

>>> r = run_probe("10.10.9.1", 8080, count=100)
>>> r["slow"], r["connect_ms"]["p99"], r["servers"]
(0, 3.1, {'rs1': 50, 'rs2': 50})
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SLOW_MS = 900.0  # the first SYN retransmission comes after 1 s; anything near it is a drop
MODES = ("fin", "rst", "hold")
CLOSES = ("wait", "rst", "fin")
MAX_COUNT = 100_000
MAX_LINE = 256


@dataclass
class Attempt:
    """One connect + request + response."""

    index: int
    src_port: int
    connect_ms: float
    total_ms: float
    server: str | None = None
    error: str | None = None
    local_waits: int = 0  # retries while the local 4-tuple was still busy (no packet sent)
    peer: str | None = None  # source address the real server saw (answers to `peer` requests)
    peer_port: int | None = None


def family_of(addr: str) -> socket.AddressFamily:
    """AF_INET6 for an IPv6 literal, else AF_INET."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def parse_identity(line: str) -> tuple[str, dict[str, str]]:
    """An answer line as (identity, {key: value}): `rs1 peer=10.0.0.1 pport=5` or bare `rs1`.

    A bare identity (servers before `peer` existed) gives an empty dict.
    """
    words = line.split()
    if not words:
        return "", {}
    kv = {}
    for w in words[1:]:
        k, eq, v = w.partition("=")
        if eq:
            kv[k] = v
    return words[0], kv


def connect_once(
    dst: str,
    port: int,
    *,
    mode: str = "fin",
    src: tuple[str, int] | None = None,
    timeout: float = 5.0,
    close: str = "wait",
    mark: int | None = None,
    index: int = 0,
    busy_wait: float = 2.0,
    peer: bool = False,
) -> Attempt:
    """Connect (optionally from `src`), send `mode`, read the identity line, close.

    + mode: what the server does after answering (fin, rst, hold)
    + close: wait (read until the server closes), rst (abort with SO_LINGER {1, 0}),
      fin (plain close right after the answer)
    + mark: SO_MARK for this socket (lets a netfilter rule drop this socket's FIN/RST)
    + busy_wait: seconds to wait while the previous connection from `src` still holds the
      4-tuple locally (LAST_ACK after a server-first close: connect() says EADDRNOTAVAIL
      before sending anything); the time measured starts with the connect that goes out
    + peer: ask the server which source address it saw (Attempt.peer, Attempt.peer_port)
    """
    end = time.monotonic() + busy_wait
    waits = 0
    while True:
        a = _connect_once(dst, port, mode, src, timeout, close, mark, index, peer)
        if a.error != "connect: EADDRNOTAVAIL" or src is None or time.monotonic() > end:
            a.local_waits = waits
            return a
        waits += 1
        time.sleep(0.02)


def _connect_once(
    dst: str,
    port: int,
    mode: str,
    src: tuple[str, int] | None,
    timeout: float,
    close: str,
    mark: int | None,
    index: int,
    peer: bool = False,
) -> Attempt:
    s = socket.socket(family_of(dst), socket.SOCK_STREAM)
    src_port = 0
    t0 = time.monotonic()
    t_conn = t0
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if mark is not None:
            s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
        if src is not None:
            s.bind(src)
        s.settimeout(timeout)
        t0 = time.monotonic()
        s.connect((dst, port))
        t_conn = time.monotonic()
        src_port = s.getsockname()[1]
        s.sendall(mode.encode() + (b" peer\n" if peer else b"\n"))
        server, kv = parse_identity(_read_line(s))
        t_done = time.monotonic()
        if close == "wait":
            _drain(s)
        elif close == "rst":
            # ACK the answer first: an unacknowledged answer is retransmitted by the server,
            # and the client's kernel then resets the connection without our mark, so a
            # "vanished" client would close the old connection after all.
            s.setsockopt(socket.IPPROTO_TCP, getattr(socket, "TCP_QUICKACK", 12), 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pport = kv.get("pport", "")
        return Attempt(
            index,
            src_port or (src[1] if src else 0),
            _ms(t0, t_conn),
            _ms(t0, t_done),
            server or None,
            None if server else "no answer",
            peer=kv.get("peer"),
            peer_port=int(pport) if pport.isdigit() else None,
        )
    except OSError as e:
        t_err = time.monotonic()
        connected = t_conn > t0
        name = "timeout" if isinstance(e, socket.timeout) else _errname(e)
        return Attempt(
            index,
            src_port or (src[1] if src else 0),
            _ms(t0, t_conn if connected else t_err),
            _ms(t0, t_err),
            None,
            ("" if connected else "connect: ") + name,
        )
    finally:
        s.close()


def _read_line(s: socket.socket) -> str:
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_LINE:
        chunk = s.recv(MAX_LINE)
        if not chunk:
            break
        buf += chunk
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()


def _drain(s: socket.socket) -> None:
    try:
        while s.recv(MAX_LINE):
            pass
    except ConnectionResetError:
        pass  # the server aborted, as `rst` asks


def _ms(a: float, b: float) -> float:
    return round((b - a) * 1000.0, 3)


def _errname(e: OSError) -> str:
    import errno

    return errno.errorcode.get(e.errno or 0, type(e).__name__)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of a list of milliseconds."""
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
        "mean": round(sum(values) / len(values), 3) if values else None,
    }


def syn_retrans(path: str = "/proc/net/netstat") -> int | None:
    """TcpExt TCPSynRetrans of the calling thread's network namespace (None if unreadable)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return parse_netstat(lines).get("TcpExt", {}).get("TCPSynRetrans")


def parse_netstat(lines: Sequence[str]) -> dict[str, dict[str, int]]:
    """/proc/net/netstat as {"TcpExt": {"TCPSynRetrans": 3, ...}, ...}."""
    out: dict[str, dict[str, int]] = {}
    for head, vals in zip(lines[0::2], lines[1::2]):  # noqa: B905 (strict= is 3.10+)
        hk, _, names = head.partition(":")
        vk, _, nums = vals.partition(":")
        if hk != vk:
            continue
        try:
            out[hk] = dict(zip(names.split(), map(int, nums.split())))  # noqa: B905
        except ValueError:
            continue
    return out


@dataclass
class Report:
    """Collects attempts and renders the JSON result."""

    target: str
    slow_ms: float = SLOW_MS
    attempts: list[Attempt] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    retrans_before: int | None = field(default_factory=syn_retrans)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, a: Attempt) -> None:
        self.attempts.append(a)

    def result(self, with_attempts: bool = True) -> dict[str, Any]:
        after = syn_retrans()
        ok = [a for a in self.attempts if a.error is None]
        servers: dict[str, int] = {}
        for a in ok:
            servers[a.server or "?"] = servers.get(a.server or "?", 0) + 1
        errors: dict[str, int] = {}
        for a in self.attempts:
            if a.error is not None:
                errors[a.error] = errors.get(a.error, 0) + 1
        delta = None
        if self.retrans_before is not None and after is not None:
            delta = after - self.retrans_before
        out: dict[str, Any] = {
            "target": self.target,
            "count": len(self.attempts),
            "ok": len(ok),
            "errors": len(self.attempts) - len(ok),
            "error_kinds": errors,
            "slow_ms": self.slow_ms,
            "slow": sum(1 for a in self.attempts if a.connect_ms >= self.slow_ms),
            "connect_ms": summarize([a.connect_ms for a in ok]),
            "latency_ms": summarize([a.total_ms for a in ok]),
            "servers": servers,
            "syn_retrans_delta": delta,
            "local_waits": sum(a.local_waits for a in self.attempts),
            "elapsed_s": round(time.monotonic() - self.started, 3),
        }
        out.update(self.extra)
        if with_attempts:
            out["attempts"] = [asdict(a) for a in self.attempts]
        return out


def pick_port(ip: str = "0.0.0.0") -> int:
    """A free local TCP port to reuse as the fixed source port."""
    with socket.socket(family_of(ip), socket.SOCK_STREAM) as s:
        s.bind((ip, 0))
        port: int = s.getsockname()[1]
        return port


def run_probe(
    dst: str,
    port: int,
    count: int = 100,
    *,
    src_ip: str = "0.0.0.0",
    src_port: int | None = None,
    reuse: bool = True,
    mode: str = "fin",
    timeout: float = 5.0,
    deadline: float = 120.0,
    slow_ms: float = SLOW_MS,
    pause: float = 0.0,
    with_attempts: bool = True,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> dict[str, Any]:
    """`count` short connections to dst:port, bounded by `deadline` seconds in all.

    + reuse: every connect from the same source port (`src_port`, or one picked now);
      False: ephemeral ports (ordinary short connections)
    + mode: the request (fin: server closes first; rst: server aborts with RST)
    """
    if not 0 < count <= MAX_COUNT:
        raise ValueError(f"count must be 1..{MAX_COUNT}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if reuse and not src_port:
        src_port = pick_port(src_ip)
    report = Report(f"{dst}:{port}", slow_ms)
    report.extra.update(mode=mode, reuse=reuse, src_port=src_port if reuse else None)
    end = time.monotonic() + deadline
    for i in range(count):
        left = end - time.monotonic()
        if left <= 0:
            report.extra["stopped"] = f"deadline of {deadline} s reached"
            break
        src = (src_ip, src_port or 0) if reuse else None
        a = connect_once(
            dst, port, mode=mode, src=src, timeout=min(timeout, left), close="wait", index=i
        )
        report.add(a)
        if on_attempt:
            on_attempt(a)
        if pause:
            time.sleep(pause)
    return report.result(with_attempts)


def evaluate_budget(result: dict[str, Any], budget: dict[str, Any]) -> list[str]:
    """Violations of a host class's latency budget by a probe result ([] = within budget).

    + budget: {slow_ms, max_slow, max_errors, p99_ms}; a None limit is not budgeted

    >>> evaluate_budget({"count": 10, "slow": 1, "errors": 0, ...}, {"max_slow": 0, ...})
    ['1 connects at or above 900 ms (allowed 0)']
    """
    out: list[str] = []
    if not result.get("count"):
        return ["no connection attempted"]
    slow_ms = budget.get("slow_ms")
    slow = result.get("slow", 0)
    if slow_ms is not None and slow_ms != result.get("slow_ms"):
        # The budget's threshold differs from the probe's: recount from the attempts.
        attempts = result.get("attempts")
        if attempts is None:
            out.append(
                f"probe used slow_ms={result.get('slow_ms')}, budget wants {slow_ms} "
                "and the result has no per-attempt times to recount"
            )
        else:
            slow = sum(1 for a in attempts if a["connect_ms"] >= slow_ms)
    max_slow = budget.get("max_slow")
    if max_slow is not None and slow > max_slow:
        out.append(
            f"{slow} connects at or above {slow_ms or result.get('slow_ms')} ms "
            f"(allowed {max_slow})"
        )
    max_errors = budget.get("max_errors")
    if max_errors is not None and result.get("errors", 0) > max_errors:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(result.get("error_kinds", {}).items()))
        out.append(
            f"{result['errors']} failed connections (allowed {max_errors})"
            + (f" [{kinds}]" if kinds else "")
        )
    p99_limit = budget.get("p99_ms")
    p99 = (result.get("latency_ms") or {}).get("p99")
    if p99_limit is not None:
        if p99 is None:
            out.append("no successful connection to measure p99 on")
        elif p99 > p99_limit:
            out.append(f"p99 {p99:.1f} ms above {p99_limit} ms")
    return out


# --- the identity server ------------------------------------------------------------------


class IdentityServer:
    """Answers every request line with `identity`, then closes as the request asks.

    One thread, non-blocking sockets: a threaded server adds scheduler noise (the GIL's 5 ms
    switch interval) to exactly the latencies the probe measures.
    + udp_port: also answer UDP datagrams there (identity plus the peer address)
    """

    def __init__(
        self, addr: tuple[str, int], identity: str, hold: float = 30.0, udp_port: int | None = None
    ) -> None:
        self.name = identity
        self.identity = identity.encode() + b"\n"
        self.hold = hold
        self.sel = selectors.DefaultSelector()
        fam = family_of(addr[0])
        self.lsock = socket.socket(fam, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(addr)
        self.lsock.listen(512)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.usock: socket.socket | None = None
        if udp_port is not None:
            self.usock = socket.socket(fam, socket.SOCK_DGRAM)
            self.usock.bind((addr[0], udp_port))
            self.usock.setblocking(False)
            self.sel.register(self.usock, selectors.EVENT_READ, "udp")
        # socket -> [received bytes, deadline, holding?, peer (ip, port)]
        self.conns: dict[socket.socket, list[Any]] = {}
        self.stopped = False

    def _long_identity(self, peer: tuple[Any, ...], req: str | None = None) -> bytes:
        tail = f" req={req}" if req else ""
        return f"{self.name} peer={peer[0]} pport={peer[1]}{tail}\n".encode()

    def serve_forever(self, poll: float = 1.0) -> None:
        """Serve until `stop()` (noticed within `poll` seconds)."""
        while not self.stopped:
            now = time.monotonic()
            for key, _ in self.sel.select(timeout=poll):
                if key.data is None:
                    self._accept()
                elif key.data == "udp":
                    self._datagram()
                else:
                    self._read(key.fileobj)  # type: ignore[arg-type]
            for c, st in list(self.conns.items()):
                if st[1] < now:
                    self._close(c, abort=True)  # idle or vanished client

    def _accept(self) -> None:
        try:
            c, peer = self.lsock.accept()
        except OSError:
            return
        c.setblocking(False)
        self.conns[c] = [b"", time.monotonic() + self.hold, False, peer]
        self.sel.register(c, selectors.EVENT_READ, True)

    def _datagram(self) -> None:
        assert self.usock is not None
        try:
            data, peer = self.usock.recvfrom(MAX_LINE)
            words = data.split()
            req = words[0].decode(errors="replace") if words else None
            self.usock.sendto(self._long_identity(peer, req), peer)
        except OSError:
            pass

    def _read(self, c: socket.socket) -> None:
        st = self.conns[c]
        try:
            data = c.recv(MAX_LINE)
        except OSError:
            return self._close(c, abort=False)
        if not data:
            return self._close(c, abort=False)
        if st[2]:
            return  # holding: ignore anything else the client sends
        st[0] += data
        if b"\n" not in st[0] and len(st[0]) < MAX_LINE:
            return
        words = st[0].split(b"\n", 1)[0].split()
        mode = words[0] if words else b""
        answer = self._long_identity(st[3]) if b"peer" in words[1:] else self.identity
        try:
            c.send(answer)  # one short line always fits the send buffer
        except OSError:
            return self._close(c, abort=False)
        if mode == b"rst":
            self._close(c, abort=True)
        elif mode == b"hold":
            st[2] = True
        else:
            self._close(c, abort=False)

    def _close(self, c: socket.socket, abort: bool) -> None:
        self.conns.pop(c, None)
        self.sel.unregister(c)
        if abort:
            with contextlib.suppress(OSError):
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        for c in list(self.conns):
            self._close(c, abort=True)
        self.sel.close()
        self.lsock.close()
        if self.usock is not None:
            self.usock.close()


def serve(
    ip: str, port: int, identity: str, hold: float = 30.0, udp_port: int | None = None
) -> None:
    srv = IdentityServer((ip, port), identity, hold, udp_port)
    udp = f" (udp {udp_port})" if udp_port is not None else ""
    print(f"listening on {ip}:{port}{udp} as {identity}", flush=True)
    try:
        srv.serve_forever()
    finally:
        srv.close()


# --- command line ---------------------------------------------------------------------------


def _plain_alias(p: argparse.ArgumentParser, *old: str, new: str, dest: str, **kwargs: Any) -> None:
    """A hidden old spelling of an option (a copied probe.py has no ipvs_fleet.cliopts)."""
    p.add_argument(*old, dest=dest, help=argparse.SUPPRESS, **kwargs)


def add_arguments(sub: Any, alias: Callable[..., None] = _plain_alias) -> None:
    """Add the `connect` and `serve` subcommands to an argparse subparsers object; `alias`
    adds an option's old spelling (`ipvs-fleet` passes one that prints a deprecation note)."""
    c = sub.add_parser("connect", help="short connections to VIP:port, JSON result")
    c.add_argument("target", help="VIP:port")
    c.add_argument("-n", "--count", type=int, default=100)
    c.add_argument("--source-ip", default="0.0.0.0")
    c.add_argument(
        "--source-port", type=int, default=0, help="fixed source port to reuse (default: pick one)"
    )
    c.add_argument(
        "--ephemeral", action="store_true", help="no source-port reuse: ordinary short connections"
    )
    c.add_argument(
        "--mode",
        choices=MODES[:2],
        default="fin",
        help="fin: server closes first; rst: server aborts with RST",
    )
    c.add_argument("--timeout", type=float, default=5.0, help="per connection, seconds")
    c.add_argument("--deadline", type=float, default=120.0, help="whole run, seconds")
    c.add_argument("--slow-ms", type=float, default=SLOW_MS)
    c.add_argument("--summary", action="store_true", help="leave out per-attempt times")
    c.add_argument("--json", metavar="PATH", help="write the JSON result here (default: stdout)")
    alias(c, "-o", "--output", new="--json", dest="json", metavar="PATH")
    c.set_defaults(func=_cmd_connect)
    s = sub.add_parser("serve", help="identity server for probe requests")
    s.add_argument("--bind", default="0.0.0.0", help="address to listen on (:: for IPv6)")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--udp-port", type=int, help="also answer UDP datagrams on this port")
    s.add_argument("--identity", default=socket.gethostname())
    s.add_argument(
        "--hold", type=float, default=30.0, help="seconds a 'hold' connection may stay idle"
    )
    s.set_defaults(func=_cmd_serve)


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target must be IP:port, not {target!r}")
    return host, int(port)


def _cmd_connect(args: argparse.Namespace) -> int:
    dst, port = split_target(args.target)
    result = run_probe(
        dst,
        port,
        args.count,
        src_ip=args.source_ip,
        src_port=args.source_port or None,
        reuse=not args.ephemeral,
        mode=args.mode,
        timeout=args.timeout,
        deadline=args.deadline,
        slow_ms=args.slow_ms,
        with_attempts=not args.summary,
    )
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0 if result["errors"] == 0 else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    with contextlib.suppress(KeyboardInterrupt):
        serve(args.bind, args.port, args.identity, args.hold, args.udp_port)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="probe.py", description=__doc__.split("\n")[0])
    add_arguments(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        rc: int = args.func(args)
    except ValueError as e:
        print(f"probe: error: {e}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
