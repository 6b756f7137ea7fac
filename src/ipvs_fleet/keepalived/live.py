"""What a director runs, read from command output: the IPVS table (`ipvsadm -Sn`), the sync
daemons (`ipvsadm -Ln --daemon`), the host's addresses (`ip -o addr`) and keepalived's own
VRRP states (its journal since its last start: `(VI_1) Entering MASTER STATE`)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ipvs_fleet.keepalived.config import IPAddress

# ipvsadm's forwarding flags -> keepalived's lb_kind
FORWARD = {"-m": "NAT", "--masquerading": "NAT", "-g": "DR", "--gatewaying": "DR",
           "-i": "TUN", "--ipip": "TUN"}  # fmt: skip
PROTO_FLAGS = {"-t": "TCP", "--tcp-service": "TCP", "-u": "UDP", "--udp-service": "UDP",
               "--sctp-service": "SCTP", "-f": "FWM", "--fwmark-service": "FWM"}  # fmt: skip
# (protocol, address, port) or ("FWM", mark, 0)
ServiceKey = tuple[str, IPAddress | int, int]


@dataclass
class LiveReal:
    lb_kind: str
    weight: int


@dataclass
class LiveService:
    scheduler: str
    persistence_timeout: int | None
    reals: dict[tuple[IPAddress, int], LiveReal] = field(default_factory=dict)


@dataclass(frozen=True)
class LiveSyncDaemon:
    role: str  # master or backup
    interface: str
    syncid: int


def _endpoint(text: str) -> tuple[IPAddress, int]:
    """`10.0.9.100:80` or `[2001:db8::1]:80`."""
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


def _service(proto: str, value: str) -> ServiceKey:
    if proto == "FWM":
        return ("FWM", int(value, 0), 0)
    addr, port = _endpoint(value)
    return (proto, addr, port)


def parse_table(output: str) -> dict[ServiceKey, LiveService]:
    """The IPVS table from `ipvsadm -Sn` (ipvsadm-save) output. ValueError on a line it
    cannot read."""
    table: dict[ServiceKey, LiveService] = {}
    for n, line in enumerate(output.splitlines(), 1):
        w = line.split()
        if not w:
            continue
        try:
            opts = _options(w[1:])
            proto = next(PROTO_FLAGS[k] for k in opts if k in PROTO_FLAGS)
            key = _service(proto, next(v for k, v in opts.items() if k in PROTO_FLAGS))
            if w[0] == "-A":
                p = opts.get("-p", opts.get("--persistent"))
                table[key] = LiveService(opts.get("-s", "wlc"), int(p) if p else None)
            elif w[0] == "-a":
                kind = next((FORWARD[k] for k in opts if k in FORWARD), "DR")
                real = _endpoint(opts.get("-r") or opts["--real-server"])
                weight = int(opts.get("-w") or opts.get("--weight") or 1)
                table.setdefault(key, LiveService("?", None)).reals[real] = LiveReal(kind, weight)
            else:
                raise ValueError(f"unknown command {w[0]}")
        except (StopIteration, KeyError, ValueError) as e:
            raise ValueError(f"ipvsadm -Sn line {n}: {line.strip()!r}: {e}") from None
    return table


def _options(words: list[str]) -> dict[str, str]:
    """`-t 1.2.3.4:80 -s rr -m` -> {"-t": "1.2.3.4:80", "-s": "rr", "-m": ""}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        k = words[i]
        if "=" in k and k.startswith("--"):
            k, _, v = k.partition("=")
            out[k] = v
        elif i + 1 < len(words) and not words[i + 1].startswith("-"):
            out[k] = words[i + 1]
            i += 1
        else:
            out[k] = ""
        i += 1
    return out


_DAEMON = re.compile(r"^(master|backup) sync daemon \((?P<opts>[^)]*)\)")


def parse_daemons(output: str) -> list[LiveSyncDaemon]:
    """`master sync daemon (mcast=eth1, syncid=51, maxlen=1472, ...)` lines."""
    out = []
    for line in output.splitlines():
        m = _DAEMON.match(line.strip())
        if not m:
            continue
        opts = dict(p.strip().partition("=")[::2] for p in m.group("opts").split(",") if "=" in p)
        out.append(LiveSyncDaemon(m.group(1), opts.get("mcast", "?"), int(opts.get("syncid", -1))))
    return out


def parse_addresses(output: str) -> dict[IPAddress, str]:
    """address -> interface, from `ip -o addr` lines."""
    out: dict[IPAddress, str] = {}
    for line in output.splitlines():
        w = line.split()
        if len(w) >= 4 and w[2] in ("inet", "inet6"):
            try:
                out[ipaddress.ip_interface(w[3]).ip] = w[1].split("@", 1)[0]
            except ValueError:
                continue
    return out


_ENTERING = re.compile(r"\((?P<name>[^)]+)\) entering (?P<state>[a-z]+) state", re.IGNORECASE)


def parse_vrrp_states(journal: str) -> dict[str, str]:
    """Each VRRP instance's last state keepalived logged (MASTER, BACKUP, FAULT, ...)."""
    states: dict[str, str] = {}
    for line in journal.splitlines():
        m = _ENTERING.search(line)
        if m:
            states[m.group("name")] = m.group("state").upper()
    return states
