"""keepalived.conf as the checks need it: VRRP instances, virtual servers, the sync daemon.

The text is read as keepalived reads it: words per line, comments from `#` or `!` to the end of
the line, blocks in `{ }` (a `{` may open on the next line), `include GLOB` anywhere, its files
read through a caller-given reader (the checks read the host's files over their connection).
What this module does not model but what changes the IPVS table (virtual_server_group, fwmark
services, conditional `@` lines, `$` definitions) lands in `unsupported`, never an exception.
Defaults are keepalived 2.2's: protocol TCP, lb_algo wlc, lb_kind NAT, weight 1, the sync id
the sync instance's virtual_router_id.
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# A glob pattern (absolute) -> the files it matches, sorted, as (path, text).
Reader = Callable[[str], list[tuple[str, str]]]
MAX_INCLUDE_DEPTH = 8
LB_KINDS = {"NAT": "NAT", "DR": "DR", "TUN": "TUN"}
PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass
class Stmt:
    """One statement: its words and, for a block, the statements inside."""

    words: list[str]
    where: str  # file:line
    children: list[Stmt] | None = None

    @property
    def key(self) -> str:
        return self.words[0] if self.words else ""

    def args(self) -> list[str]:
        return self.words[1:]


@dataclass(frozen=True)
class RealServer:
    address: IPAddress
    port: int
    weight: int = 1
    lb_kind: str = "NAT"
    inhibit_on_failure: bool = False
    where: str = ""


@dataclass(frozen=True)
class VirtualServer:
    address: IPAddress
    port: int
    protocol: str = "TCP"
    lb_algo: str = "wlc"
    lb_kind: str = "NAT"
    persistence_timeout: int | None = None
    real_servers: tuple[RealServer, ...] = ()
    sorry_server: RealServer | None = None
    where: str = ""

    @property
    def key(self) -> tuple[str, IPAddress, int]:
        return (self.protocol, self.address, self.port)


@dataclass(frozen=True)
class VrrpInstance:
    name: str
    interface: str
    virtual_router_id: int
    priority: int
    state: str  # the configured start state (MASTER or BACKUP)
    vips: tuple[IPAddress, ...]
    where: str = ""


@dataclass(frozen=True)
class SyncDaemon:
    """global_defs `lvs_sync_daemon <iface> <instance> [id N]`."""

    interface: str
    instance: str
    syncid: int | None  # None: not given (keepalived takes the instance's virtual_router_id)
    where: str = ""


@dataclass
class KeepalivedConfig:
    instances: list[VrrpInstance] = field(default_factory=list)
    virtual_servers: list[VirtualServer] = field(default_factory=list)
    sync_daemon: SyncDaemon | None = None
    # What this parser does not model and what matters to the table or the checks.
    unsupported: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def instance(self, name: str) -> VrrpInstance | None:
        return next((i for i in self.instances if i.name == name), None)

    def sync_id(self) -> int | None:
        """The sync id keepalived gives its sync daemon (None: no sync daemon configured)."""
        sd = self.sync_daemon
        if sd is None:
            return None
        if sd.syncid is not None:
            return sd.syncid
        inst = self.instance(sd.instance)
        return inst.virtual_router_id if inst else None


class _Bad(Exception):
    """A value this parser cannot read: becomes an `unsupported` entry naming its line."""


def _strip_comment(line: str) -> str:
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c in "#!" and not quoted:
            return line[:i]
    return line


def _words(line: str) -> list[str]:
    out: list[str] = []
    cur = ""
    quoted = False
    for c in line:
        if c == '"':
            quoted = not quoted
            continue
        if not quoted and (c.isspace() or c in "{}"):
            if cur:
                out.append(cur)
                cur = ""
            if c in "{}":
                out.append(c)
            continue
        cur += c
    if cur:
        out.append(cur)
    return out


class _Lines:
    """The (words, where) of every line, includes expanded in place."""

    def __init__(self, reader: Reader | None, problems: list[str], files: list[str]) -> None:
        self.reader = reader
        self.problems = problems
        self.files = files

    def of(self, path: str, text: str, depth: int = 0) -> Iterator[tuple[list[str], str]]:
        self.files.append(path)
        for n, raw in enumerate(text.splitlines(), 1):
            where = f"{path}:{n}"
            words = _words(_strip_comment(raw))
            if not words:
                continue
            if words[0] == "include":
                yield from self._include(path, words, where, depth)
            else:
                if words[0][0] in "@$~":
                    # Its braces still nest: the statement stays, under a key nothing reads.
                    what = "conditional or defined config"
                    self.problems.append(f"{where}: `{words[0]}...` ({what})")
                yield words, where

    def _include(
        self, path: str, words: list[str], where: str, depth: int
    ) -> Iterator[tuple[list[str], str]]:
        if len(words) < 2:
            self.problems.append(f"{where}: include without a file")
            return
        if self.reader is None or depth >= MAX_INCLUDE_DEPTH:
            self.problems.append(f"{where}: include {words[1]} (not read)")
            return
        # keepalived resolves a relative include against the including file's directory.
        pattern = posixpath.join(posixpath.dirname(path), words[1])
        try:
            found = self.reader(pattern)
        except OSError as e:
            self.problems.append(f"{where}: include {words[1]}: {e}")
            return
        for sub, text in found:
            yield from self.of(sub, text, depth + 1)


def parse_tree(
    text: str, path: str = "keepalived.conf", reader: Reader | None = None
) -> tuple[list[Stmt], list[str], list[str]]:
    """(top-level statements, problems, files read) of a keepalived.conf text."""
    problems: list[str] = []
    files: list[str] = []
    root: list[Stmt] = []
    stack: list[list[Stmt]] = [root]
    opened: list[str] = []
    for words, where in _Lines(reader, problems, files).of(path, text):
        cur: list[str] = []
        for w in [*words, "\n"]:
            if w in ("{", "}", "\n") and cur:
                stack[-1].append(Stmt(cur, where))
                cur = []
            if w == "{":
                block = stack[-1]
                if not block or block[-1].children is not None:
                    problems.append(f"{where}: `{{` opens no block")
                    block.append(Stmt(["?"], where))
                block[-1].children = []
                stack.append(block[-1].children)  # type: ignore[arg-type]  # set just above
                opened.append(where)
            elif w == "}":
                if len(stack) == 1:
                    problems.append(f"{where}: `}}` closes no block")
                else:
                    stack.pop()
                    opened.pop()
            elif w != "\n":
                cur.append(w)
    for where in opened:
        problems.append(f"{where}: block not closed")
    return root, problems, files


def _int(stmt: Stmt, i: int = 1) -> int:
    try:
        return int(stmt.words[i])
    except (IndexError, ValueError):
        raise _Bad(f"{stmt.where}: `{' '.join(stmt.words)}`: not a number") from None


def _addr(text: str, where: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.split("/", 1)[0])
    except ValueError:
        raise _Bad(f"{where}: {text!r} is not an IP address") from None


def _instance(s: Stmt) -> VrrpInstance:
    if len(s.words) < 2:
        raise _Bad(f"{s.where}: vrrp_instance without a name")
    vals: dict[str, Stmt] = {c.key: c for c in s.children or [] if c.children is None}
    vips: list[IPAddress] = []
    for c in s.children or []:
        if c.key in ("virtual_ipaddress", "virtual_ipaddress_excluded") and c.children:
            vips += [_addr(v.words[0], v.where) for v in c.children]
    for need in ("interface", "virtual_router_id"):
        if need not in vals or len(vals[need].words) < 2:
            raise _Bad(f"{s.where}: vrrp_instance {s.words[1]}: no {need}")
    return VrrpInstance(
        name=s.words[1],
        interface=vals["interface"].words[1],
        virtual_router_id=_int(vals["virtual_router_id"]),
        priority=_int(vals["priority"]) if "priority" in vals else 100,
        state=vals["state"].words[1].upper() if "state" in vals else "BACKUP",
        vips=tuple(vips),
        where=s.where,
    )


def _real(s: Stmt, vs_port: int, lb_kind: str) -> RealServer:
    if len(s.words) < 2:
        raise _Bad(f"{s.where}: {s.key} without an address")
    vals = {c.key: c for c in s.children or [] if c.children is None}
    kind = vals.get("lvs_method") or vals.get("lb_kind")
    return RealServer(
        address=_addr(s.words[1], s.where),
        port=_int(s, 2) if len(s.words) > 2 else vs_port,
        weight=_int(vals["weight"]) if "weight" in vals else 1,
        lb_kind=_lb_kind(kind) if kind else lb_kind,
        inhibit_on_failure="inhibit_on_failure" in vals,
        where=s.where,
    )


def _lb_kind(s: Stmt) -> str:
    v = s.words[1].upper() if len(s.words) > 1 else ""
    if v not in LB_KINDS:
        raise _Bad(f"{s.where}: `{' '.join(s.words)}`: lb_kind is NAT, DR or TUN")
    return LB_KINDS[v]


def _virtual_server(s: Stmt) -> VirtualServer:
    if len(s.words) >= 2 and s.words[1] in ("fwmark", "group"):
        raise _Bad(f"{s.where}: virtual_server {s.words[1]} (fwmark/group services)")
    if len(s.words) < 3:
        raise _Bad(f"{s.where}: virtual_server needs an address and a port")
    vals = {c.key: c for c in s.children or [] if c.children is None}
    port = _int(s, 2)
    proto = vals["protocol"].words[1].upper() if "protocol" in vals else "TCP"
    if proto not in PROTOCOLS:
        raise _Bad(f"{s.where}: protocol {proto} (TCP, UDP or SCTP)")
    algo = vals.get("lb_algo") or vals.get("lvs_sched")
    kind_stmt = vals.get("lb_kind") or vals.get("lvs_method")
    kind = _lb_kind(kind_stmt) if kind_stmt else "NAT"
    persist = vals.get("persistence_timeout")
    reals = [_real(c, port, kind) for c in s.children or [] if c.key == "real_server" and c.words]
    sorry = vals.get("sorry_server")
    return VirtualServer(
        address=_addr(s.words[1], s.where),
        port=port,
        protocol=proto,
        lb_algo=algo.words[1] if algo and len(algo.words) > 1 else "wlc",
        lb_kind=kind,
        # keepalived's default when the keyword has no value: 360 s.
        persistence_timeout=(_int(persist) if len(persist.words) > 1 else 360) if persist else None,
        real_servers=tuple(reals),
        sorry_server=_real(sorry, port, kind) if sorry else None,
        where=s.where,
    )


def _sync_daemon(s: Stmt) -> SyncDaemon:
    a = s.args()
    if len(a) < 2:
        raise _Bad(f"{s.where}: lvs_sync_daemon needs an interface and a VRRP instance")
    syncid = None
    if "id" in a[2:]:
        i = a.index("id", 2)
        try:
            syncid = int(a[i + 1])
        except (IndexError, ValueError):
            raise _Bad(f"{s.where}: lvs_sync_daemon id: not a number") from None
    return SyncDaemon(a[0], a[1], syncid, s.where)


def parse(
    text: str, path: str = "keepalived.conf", reader: Reader | None = None
) -> KeepalivedConfig:
    """The configuration of keepalived.conf `text` read from `path` (includes through
    `reader`); what cannot be read is in `unsupported`, each naming file and line."""
    tree, problems, files = parse_tree(text, path, reader)
    cfg = KeepalivedConfig(unsupported=problems, files=files)
    for s in tree:
        try:
            if s.key == "vrrp_instance" and s.children is not None:
                cfg.instances.append(_instance(s))
            elif s.key == "virtual_server" and s.children is not None:
                cfg.virtual_servers.append(_virtual_server(s))
            elif s.key == "virtual_server_group":
                cfg.unsupported.append(f"{s.where}: virtual_server_group")
            elif s.key == "global_defs":
                for g in s.children or []:
                    if g.key == "lvs_sync_daemon":
                        cfg.sync_daemon = _sync_daemon(g)
                    elif g.key == "lvs_sync_daemon_interface":
                        cfg.unsupported.append(f"{g.where}: lvs_sync_daemon_interface (old form)")
        except _Bad as e:
            cfg.unsupported.append(str(e))
    sd = cfg.sync_daemon
    if sd is not None and cfg.instance(sd.instance) is None:
        cfg.unsupported.append(f"{sd.where}: lvs_sync_daemon names no vrrp_instance {sd.instance}")
    return cfg
