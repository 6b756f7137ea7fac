"""Kernel interfaces of the guest (standard library only): shell and network namespaces,
IPVS control (sockopt, generic netlink, ipvsadm), conntrack, the kernel log, the SNMP
counters.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

try:
    from ipvs_fleet.probe import cells, probe
except ImportError:  # on a guest: sibling files, not a package
    import cells  # type: ignore[no-redef]
    import probe  # type: ignore[no-redef]


CLONE_NEWNET = 0x40000000
# Legacy IPVS sockopt interface (include/uapi/linux/ip_vs.h): one raw socket, no fork per edit.
IP_VS_BASE_CTL = 64 + 1024 + 64
IP_VS_SO_SET_ADDDEST = IP_VS_BASE_CTL + 7
IP_VS_SO_SET_DELDEST = IP_VS_BASE_CTL + 8
IP_VS_SO_SET_EDITDEST = IP_VS_BASE_CTL + 9
# Kernel log lines that are expected when out-of-tree modules load.
BENIGN_KMSG = re.compile(
    r"taints kernel|module verification failed|IPVS:|loading out-of-tree|veth|"
    r"entered (promiscuous|disabled|forwarding|blocking)|link becomes ready|NETDEV_CHANGE"
)
WARN_KMSG = re.compile(
    r"WARNING:|BUG:|Call Trace|general protection|RIP:|refcount_t|list_(add|del) corruption|"
    r"Oops|KASAN|UBSAN|kernel BUG|stack-protector|soft lockup|hung_task"
)


# --- shell and network namespaces -----------------------------------------------------------


def sh(cmd: str, check: bool = True, timeout: float = 60, input: str | None = None) -> str:
    r = subprocess.run(
        ["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and r.returncode != 0:
        raise cells.Failed(f"`{cmd}` exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return r.stdout


_libc = ctypes.CDLL(None, use_errno=True)


def setns(path: str) -> None:
    """Move this (single-threaded) process into the network namespace at `path`."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def in_netns(path: str) -> Iterator[None]:
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(path)
        yield
    finally:
        if _libc.setns(back, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        os.close(back)


def netns_path(name: str) -> str:
    return f"/run/netns/{name}"


def read_text(path: str) -> str:
    """A file's stripped content, "" if it cannot be read (a sysctl the kernel lacks)."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def run_in_netns(name: str, argv: list[str], timeout: float = 30, input: str | None = None) -> str:
    """Run argv in netns `name` (setns in the child: one fork, no `ip netns exec`)."""
    path = netns_path(name)
    r = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        preexec_fn=lambda: setns(path),
    )
    if r.returncode != 0:
        raise cells.Failed(
            f"`{' '.join(argv)}` in {name} exited {r.returncode}: {r.stderr.strip()[-800:]}"
        )
    return r.stdout


def netstat_synretrans() -> int | None:
    # /proc/thread-self follows setns; /proc/net may be resolved for the process's first netns.
    return probe.syn_retrans("/proc/thread-self/net/netstat")


# --- IPVS control ---------------------------------------------------------------------------


class IpvsNetlink:
    """IPVS generic netlink (include/uapi/linux/ip_vs.h), what ipvsadm speaks, without a fork:
    dest add / edit / delete for services of either family."""

    GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID, CTRL_ATTR_FAMILY_NAME = 16, 3, 1, 2
    CMD = {"add": 5, "edit": 6, "delete": 7}  # IPVS_CMD_NEW_DEST, SET_DEST, DEL_DEST
    ATTR_SERVICE, ATTR_DEST = 1, 2  # IPVS_CMD_ATTR_*
    NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR = 1, 4, 2

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 16)  # NETLINK_GENERIC
        self.sock.bind((0, 0))
        self.seq = 0
        reply = self._request(
            self.GENL_ID_CTRL,
            self.CTRL_CMD_GETFAMILY,
            self._attr(self.CTRL_ATTR_FAMILY_NAME, b"IPVS\0"),
        )
        attrs = self._parse_attrs(reply[4:])  # after the genlmsghdr
        if (
            self.CTRL_ATTR_FAMILY_ID not in attrs
            or attrs.get(self.CTRL_ATTR_FAMILY_NAME, b"").rstrip(b"\0") != b"IPVS"
        ):
            raise cells.Failed("no IPVS generic netlink family (ip_vs not loaded?)")
        self.family_id = struct.unpack("=H", attrs[self.CTRL_ATTR_FAMILY_ID][:2])[0]

    @staticmethod
    def _attr(typ: int, payload: bytes) -> bytes:
        n = 4 + len(payload)
        return struct.pack("=HH", n, typ) + payload + b"\0" * ((4 - n % 4) % 4)

    @staticmethod
    def _parse_attrs(data: bytes) -> dict[int, bytes]:
        out, i = {}, 0
        while i + 4 <= len(data):
            n, typ = struct.unpack_from("=HH", data, i)
            if n < 4:
                break
            out[typ & 0x3FFF] = data[i + 4 : i + n]
            i += (n + 3) & ~3
        return out

    def _request(self, typ: int, cmd: int, payload: bytes, version: int = 1) -> bytes:
        self.seq += 1
        body = struct.pack("=BBH", cmd, version, 0) + payload
        msg = (
            struct.pack(
                "=IHHII", 16 + len(body), typ, self.NLM_F_REQUEST | self.NLM_F_ACK, self.seq, 0
            )
            + body
        )
        self.sock.send(msg)
        answer = b""
        while True:
            data = self.sock.recv(65536)
            i = 0
            while i + 16 <= len(data):
                n, mtype, _, seq, _ = struct.unpack_from("=IHHII", data, i)
                if seq == self.seq:
                    if mtype == self.NLMSG_ERROR:
                        err = struct.unpack_from("=i", data, i + 16)[0]
                        if err:
                            raise OSError(-err, os.strerror(-err))
                        return answer
                    answer = data[i + 16 : i + n]  # genlmsghdr + attributes
                i += (n + 3) & ~3

    @staticmethod
    def _addr(ip: str) -> tuple[int, bytes]:
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        raw = socket.inet_pton(fam, ip)
        return fam, raw + b"\0" * (16 - len(raw))  # union nf_inet_addr

    def dest(self, op: str, svc: cells.Service, ip: str, port: int, weight: int = 0) -> None:
        fam, vaddr = self._addr(svc.vip)
        proto = socket.IPPROTO_TCP if svc.proto == "tcp" else socket.IPPROTO_UDP
        service = (
            self._attr(1, struct.pack("=H", fam))  # IPVS_SVC_ATTR_AF
            + self._attr(2, struct.pack("=H", proto))  # PROTOCOL
            + self._attr(3, vaddr)  # ADDR
            + self._attr(4, struct.pack("!H", svc.port))
        )  # PORT (network order)
        dfam, daddr = self._addr(ip)
        dest = (
            self._attr(1, daddr)  # IPVS_DEST_ATTR_ADDR
            + self._attr(2, struct.pack("!H", port))
        )  # PORT
        if op != "delete":  # full entry: masquerading, weight, no thresholds
            dest += (
                self._attr(3, struct.pack("=I", 0))
                + self._attr(4, struct.pack("=I", weight))
                + self._attr(5, struct.pack("=I", 0))
                + self._attr(6, struct.pack("=I", 0))
                + self._attr(11, struct.pack("=H", dfam))
            )  # ADDR_FAMILY
        self._request(
            self.family_id,
            self.CMD[op],
            self._attr(self.ATTR_SERVICE | 0x8000, service)  # NLA_F_NESTED
            + self._attr(self.ATTR_DEST | 0x8000, dest),
        )

    def close(self) -> None:
        self.sock.close()


class IpvsControl:
    """Edit real servers of the director's services without forking ipvsadm per change.

    how: sockopt (default; IPv4: the legacy sockopt interface, IPv6: generic netlink, as
    the sockopt structs hold IPv4 addresses only), netlink (both families), ipvsadm (a fork
    per edit, tens of ms under TCG: later than the kernel's work that flushes a deleted
    destination's connections, see `settle`).
    """

    def __init__(self, netns: str, family: int = 4, how: str = "sockopt") -> None:
        if how not in ("sockopt", "netlink", "ipvsadm"):
            raise cells.Failed(f"ipvs_edits must be sockopt, netlink or ipvsadm, not {how!r}")
        self.netns, self.family, self.how = netns, family, how
        self.sock: socket.socket | None = None
        self.nl: IpvsNetlink | None = None
        with in_netns(netns_path(netns)):  # a socket stays in the netns it was made in
            if how == "sockopt" and family == 4:
                self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            elif how != "ipvsadm":
                self.nl = IpvsNetlink()

    def _dest(self, cmd: int, svc: cells.Service, ip: str, port: int, weight: int) -> None:
        op = {
            IP_VS_SO_SET_EDITDEST: "edit",
            IP_VS_SO_SET_DELDEST: "delete",
            IP_VS_SO_SET_ADDDEST: "add",
        }[cmd]
        if self.nl is not None:
            self.nl.dest(op, svc, ip, port, weight)
            return
        if self.sock is None:
            flag = {"edit": "-e", "delete": "-d", "add": "-a"}[op]
            argv = ["ipvsadm", flag, *svc.ipvsadm().split(), "-r", cells.hostport(ip, port)]
            if op != "delete":
                argv += ["-m", "-w", str(weight)]
            run_in_netns(self.netns, argv)
            return
        proto = socket.IPPROTO_TCP if svc.proto == "tcp" else socket.IPPROTO_UDP
        # struct ip_vs_service_user: protocol, addr, port, fwmark, sched_name, flags,
        # timeout, netmask (44 bytes on Linux, natural alignment)
        service = struct.pack(
            "=H2x4s2sxxI16sIII",
            proto,
            socket.inet_aton(svc.vip),
            struct.pack("!H", svc.port),
            0,
            b"",
            0,
            0,
            0xFFFFFFFF,
        )
        # struct ip_vs_dest_user: addr, port, conn_flags (0 = masquerading), weight, thresholds
        dest = struct.pack(
            "=4s2sxxIiII", socket.inet_aton(ip), struct.pack("!H", port), 0, weight, 0, 0
        )
        self.sock.setsockopt(socket.IPPROTO_IP, cmd, service + dest)

    def set_weight(self, svc: cells.Service, ip: str, port: int, weight: int) -> None:
        self._dest(IP_VS_SO_SET_EDITDEST, svc, ip, port, weight)

    def delete(self, svc: cells.Service, ip: str, port: int) -> None:
        self._dest(IP_VS_SO_SET_DELDEST, svc, ip, port, 0)

    def add(self, svc: cells.Service, ip: str, port: int, weight: int = 1) -> None:
        self._dest(IP_VS_SO_SET_ADDDEST, svc, ip, port, weight)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        if self.nl is not None:
            self.nl.close()


def ipvs_conns_from_port(text: str, port: int, proto: str = "tcp") -> int:
    """Rows of /proc/net/ip_vs_conn of `proto` whose client port (FPrt, 4 hex digits) is
    `port`."""
    rows = [line.split() for line in text.splitlines()[1:]]
    return sum(1 for r in rows if len(r) > 2 and r[0] == proto.upper() and int(r[2], 16) == port)


# --- conntrack ------------------------------------------------------------------------------


def parse_conntrack(text: str) -> list[dict[str, Any]]:
    """`conntrack -L` (or /proc/net/nf_conntrack) lines as dicts with orig/reply tuples.

    Addresses come out canonical (IPv6 compressed), whichever source printed them.

    >>> parse_conntrack("tcp 6 119 TIME_WAIT src=10.10.1.2 dst=10.10.9.1 sport=10000 "
    ...     "dport=8080 src=10.10.3.2 dst=10.10.1.2 sport=8080 dport=10000 [ASSURED] use=1")
    [{'proto': 'tcp', 'state': 'TIME_WAIT', 'orig': {...}, 'reply': {...}, ...}]
    """
    out = []
    for line in text.splitlines():
        words = line.split()
        if "tcp" not in words:
            continue
        tuples: list[dict[str, str]] = [{}, {}]
        side = 0
        state = None
        for w in words:
            k, eq, v = w.partition("=")
            if eq and k in ("src", "dst", "sport", "dport"):
                if k in tuples[side]:
                    side = 1
                tuples[side][k] = cells.norm_ip(v) if k in ("src", "dst") else v
            elif w.isupper() and w.replace("_", "").isalpha() and state is None:
                state = w
        if tuples[0] and tuples[1]:
            out.append(
                {
                    "proto": "tcp",
                    "state": state,
                    "orig": tuples[0],
                    "reply": tuples[1],
                    "flags": [w.strip("[]") for w in words if w.startswith("[")],
                }
            )
    return out


def conntrack_entries(netns: str, family: int = 4) -> list[dict[str, Any]]:
    fam = ["-f", "ipv6"] if family == 6 else []
    r = subprocess.run(
        ["ip", "netns", "exec", netns, "conntrack", "-L", *fam, "-p", "tcp"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if r.returncode == 0:
        return parse_conntrack(r.stdout)
    with in_netns(netns_path(netns)), open("/proc/thread-self/net/nf_conntrack") as f:
        return parse_conntrack(f.read())


def conntrack_view(
    entries: list[dict[str, Any]], client_ip: str, sport: int, new_server_ip: str
) -> dict[str, Any]:
    """The entries of one client connection and whether conntrack is consistent after reuse.

    An entry belongs to the connection when its original tuple starts at the client's address
    and port (the reply tuple's destination is the node's address once masqueraded).
    Consistent: exactly one entry, its reply side from the real server that now answers.
    """
    cip = cells.norm_ip(client_ip)
    mine = [
        e for e in entries if e["orig"].get("src") == cip and e["orig"].get("sport") == str(sport)
    ]
    ok = len(mine) == 1 and mine[0]["reply"].get("src") == cells.norm_ip(new_server_ip)
    return {"sport": sport, "new_server_ip": new_server_ip, "entries": mine, "consistent": ok}


# --- kernel log -----------------------------------------------------------------------------


def kmsg_lines() -> list[str]:
    return sh("dmesg", check=False).splitlines()


def kernel_warnings(lines: list[str]) -> list[str]:
    return [ln for ln in lines if WARN_KMSG.search(ln)]
