#!/usr/bin/env python3
"""The reuse scenarios of DOMAIN.md inside one VM (standard library only, Python 3.9+, root).

Copied to a lab VM next to probe.py and run there: `python3 scenario.py run < plan.json`.
Each run builds a fresh topology of network namespaces (fresh names: a deleted netns whose
orphaned sockets still retransmit keeps its devices for a while):

    client 10.10.1.2 -> director (VIP 10.10.9.1 on lo, IPVS NAT, rr; 10.10.1.1, .2.1, .3.1)
                     -> rs1 10.10.2.2, rs2 10.10.3.2 (probe.py serve, answer with identity)

The director netns gets `vs.conntrack=1`, `conn_reuse_mode=1`, `expire_nodest_conn=1` (and the
knob when the plan sets it: IPVS sysctls are per netns) and a conntrack rule in FORWARD:
`-m conntrack --ctstate INVALID -j DROP` (kube-proxy style) or `-j ACCEPT`.

Scenarios (each attempt uses its own source port P; the second connect from P is measured):
  A   server answers and aborts with RST; client reconnects from P at once
  B   client vanishes (its RST dropped in its netns), old real server weight 0, reconnect
  B2  as B but the old real server deleted
  C1  server closes first (FIN), reconnect (control)
  C2  client aborts with RST, reconnect (control)

Plan (JSON on stdin), every key optional:
  {"rule": "drop", "knob": 1, "scenarios": {"A": 200, "B": 200}, "ordinary": 10000,
   "ftp": false, "conntrack_check": true, "timeout": 5, "deadline": 600}
Result: JSON on stdout (see `run_plan`).

`python3 scenario.py modules stock|DIR` swaps the loaded IPVS modules (stock from the
kernel's own tree, or the `*.ko` files in DIR) and prints which set is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import ftplib
import glob
import hashlib
import json
import os
import re
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

try:
    from ipvs_fleet.probe import probe
except ImportError:  # on a guest: probe.py is a sibling file, not part of a package
    import probe  # type: ignore[no-redef]

HERE = os.path.dirname(os.path.abspath(__file__))
VIP = "10.10.9.1"
PORT = 8080
FTP_PORT = 21
CLIENT_IP = "10.10.1.2"
REAL_SERVERS = {"rs1": "10.10.2.2", "rs2": "10.10.3.2"}
VANISH_MARK = 0x1D  # client sockets whose FIN/RST never leave the client netns
SCENARIOS = ("A", "B", "B2", "C1", "C2")
SYSCTLS = {"conntrack": 1, "conn_reuse_mode": 1, "expire_nodest_conn": 1}
KNOB = "conn_reuse_old_conntrack"
PORT_BASE = 10000  # scenario k uses source ports PORT_BASE + k * PORT_SPAN + i
PORT_SPAN = 2000
# How each scenario's first connection from a port ends (probe.connect_once arguments).
FIRST_CONNECT: dict[str, dict[str, Any]] = {
    "A": {"mode": "rst", "close": "wait"},  # server aborts with RST
    "B": {"mode": "hold", "close": "rst", "mark": VANISH_MARK},  # client vanishes
    "B2": {"mode": "hold", "close": "rst", "mark": VANISH_MARK},
    "C1": {"mode": "fin", "close": "wait"},  # server FIN first
    "C2": {"mode": "hold", "close": "rst"},  # client RST
}
CLONE_NEWNET = 0x40000000
# Legacy IPVS sockopt interface (include/uapi/linux/ip_vs.h): one raw socket, no fork per edit.
IP_VS_BASE_CTL = 64 + 1024 + 64
IP_VS_SO_SET_ADDDEST = IP_VS_BASE_CTL + 7
IP_VS_SO_SET_DELDEST = IP_VS_BASE_CTL + 8
IP_VS_SO_SET_EDITDEST = IP_VS_BASE_CTL + 9
IPVS_MODULES = ("ip_vs", "ip_vs_rr", "ip_vs_ftp")
# Kernel log lines that are expected when out-of-tree modules load.
BENIGN_KMSG = re.compile(
    r"taints kernel|module verification failed|IPVS:|loading out-of-tree|veth|"
    r"entered (promiscuous|disabled|forwarding|blocking)|link becomes ready|NETDEV_CHANGE"
)
WARN_KMSG = re.compile(
    r"WARNING:|BUG:|Call Trace|general protection|RIP:|refcount_t|list_(add|del) corruption|"
    r"Oops|KASAN|UBSAN|kernel BUG|stack-protector|soft lockup|hung_task"
)


class Failed(Exception):
    """A setup step failed; the message says which command and why."""


def sh(cmd: str, check: bool = True, timeout: float = 60) -> str:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise Failed(f"`{cmd}` exited {r.returncode}: {r.stderr.strip()[-800:]}")
    return r.stdout


# --- network namespaces --------------------------------------------------------------------

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


def netstat_synretrans() -> int | None:
    # /proc/thread-self follows setns; /proc/net may be resolved for the process's first netns.
    return probe.syn_retrans("/proc/thread-self/net/netstat")


# --- IPVS control (legacy sockopt) ---------------------------------------------------------


class IpvsControl:
    """Edit real servers of the director's TCP service without forking ipvsadm per change."""

    def __init__(self, netns: str, vip: str, port: int) -> None:
        with in_netns(netns_path(netns)):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        # struct ip_vs_service_user: protocol, addr, port, fwmark, sched_name, flags,
        # timeout, netmask (44 bytes on Linux, natural alignment)
        self.svc = struct.pack("=H2x4s2sxxI16sIII", socket.IPPROTO_TCP, socket.inet_aton(vip),
                               struct.pack("!H", port), 0, b"", 0, 0, 0xFFFFFFFF)

    def _dest(self, cmd: int, ip: str, port: int, weight: int) -> None:
        # struct ip_vs_dest_user: addr, port, conn_flags (0 = masquerading), weight, thresholds
        dest = struct.pack("=4s2sxxIiII", socket.inet_aton(ip), struct.pack("!H", port), 0,
                           weight, 0, 0)
        self.sock.setsockopt(socket.IPPROTO_IP, cmd, self.svc + dest)

    def set_weight(self, ip: str, port: int, weight: int) -> None:
        self._dest(IP_VS_SO_SET_EDITDEST, ip, port, weight)

    def delete(self, ip: str, port: int) -> None:
        self._dest(IP_VS_SO_SET_DELDEST, ip, port, 0)

    def add(self, ip: str, port: int, weight: int = 1) -> None:
        self._dest(IP_VS_SO_SET_ADDDEST, ip, port, weight)

    def close(self) -> None:
        self.sock.close()


# --- conntrack ------------------------------------------------------------------------------


def parse_conntrack(text: str) -> list[dict[str, Any]]:
    """`conntrack -L` (or /proc/net/nf_conntrack) lines as dicts with orig/reply tuples.

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
                tuples[side][k] = v
            elif w.isupper() and w.replace("_", "").isalpha() and state is None:
                state = w
        if tuples[0] and tuples[1]:
            out.append({"proto": "tcp", "state": state, "orig": tuples[0], "reply": tuples[1],
                        "flags": [w.strip("[]") for w in words if w.startswith("[")]})
    return out


def conntrack_entries(netns: str) -> list[dict[str, Any]]:
    r = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-p", "tcp"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode == 0:
        return parse_conntrack(r.stdout)
    with in_netns(netns_path(netns)), open("/proc/thread-self/net/nf_conntrack") as f:
        return parse_conntrack(f.read())


def conntrack_view(entries: list[dict[str, Any]], client_ip: str, sport: int,
                   new_server_ip: str) -> dict[str, Any]:
    """The entries of one client connection and whether conntrack is consistent after reuse.

    Consistent: exactly one entry, its reply side from the real server that now answers.
    """
    mine = [e for e in entries
            if (e["orig"].get("src") == client_ip and e["orig"].get("sport") == str(sport))
            or (e["reply"].get("dst") == client_ip and e["reply"].get("dport") == str(sport))]
    ok = len(mine) == 1 and mine[0]["reply"].get("src") == new_server_ip
    return {"sport": sport, "new_server_ip": new_server_ip, "entries": mine, "consistent": ok}


# --- kernel log -----------------------------------------------------------------------------


def kmsg_lines() -> list[str]:
    return sh("dmesg", check=False).splitlines()


def kernel_warnings(lines: list[str]) -> list[str]:
    return [ln for ln in lines if WARN_KMSG.search(ln)]


# --- modules --------------------------------------------------------------------------------


def loaded_ipvs_modules() -> list[str]:
    with open("/proc/modules") as f:
        return [ln.split()[0] for ln in f if re.fullmatch(r"ip_vs(_\w+)?|xt_ipvs", ln.split()[0])]


NETNS_PREFIX = "ipvsp"


def cleanup_stale() -> list[str]:
    """Remove topologies an interrupted run left behind (their IPVS services pin the modules)."""
    gone = []
    for name in sh("ip netns list", check=False).split():
        if not name.startswith(NETNS_PREFIX):
            continue
        pids = sh(f"ip netns pids {name}", check=False).split()
        if pids:
            sh(f"kill -9 {' '.join(pids)}", check=False)
        sh(f"ip netns exec {name} ipvsadm -C", check=False)
        sh(f"ip netns del {name}", check=False)
        gone.append(name)
    return gone


def unload_ipvs() -> None:
    """Unload every IPVS module (dependents first); fails if an IPVS service holds them."""
    cleanup_stale()
    for _ in range(10):
        mods = loaded_ipvs_modules()
        if not mods:
            return
        # ip_vs last: every other IPVS module depends on it
        for m in sorted(mods, key=lambda m: m == "ip_vs"):
            sh(f"rmmod {m}", check=False)
        time.sleep(0.3)  # netns teardown (and its IPVS flush) is asynchronous
    left = loaded_ipvs_modules()
    if left:
        raise Failed(f"cannot unload {', '.join(left)} (IPVS services still use them?)")


def stock_module_path(name: str) -> str:
    rel = os.uname().release
    hits = glob.glob(f"/lib/modules/{rel}/kernel/net/netfilter/ipvs/{name}.ko*")
    if not hits:
        raise Failed(f"no stock {name} in /lib/modules/{rel}/kernel")
    return hits[0]


LOADED_RECORD = "/run/ipvs-probe-modules.json"


def load_modules(source: str) -> dict[str, Any]:
    """Load ip_vs, ip_vs_rr, ip_vs_ftp from the kernel's tree (`stock`) or from a dir of .ko.

    Loads by path (insmod), so what is installed under /lib/modules is not touched; which
    set was loaded is recorded in LOADED_RECORD for `module_status`.
    """
    unload_ipvs()
    files = []
    for name in IPVS_MODULES:
        path = stock_module_path(name) if source == "stock" else os.path.join(source,
                                                                              name + ".ko")
        if not os.path.exists(path):
            raise Failed(f"{path} missing")
        deps = sh(f"modinfo -F depends {path}").strip()
        for dep in filter(None, deps.split(",")):
            if not dep.startswith("ip_vs"):
                sh(f"modprobe {dep}")
        sh(f"insmod {path}")
        files.append(path)
    record = {"source": source, "files": files,
              "set_id": sh(f"modinfo -F ipvs_fleet {files[0]}").strip() or None,
              "reuse_design": sh(f"modinfo -F ipvs_fleet_reuse {files[0]}").strip() or None}
    with open(LOADED_RECORD, "w") as f:
        json.dump(record, f)
    return module_status()


def restore_modules(modules: list[str]) -> dict[str, Any]:
    """Back to the host's own state: the given modules by modprobe, sysctl.d re-applied."""
    unload_ipvs()
    with contextlib.suppress(OSError):
        os.unlink(LOADED_RECORD)
    for m in modules:
        sh(f"modprobe {m}")
    sh("sysctl -q --system", check=False)
    return module_status()


def module_status() -> dict[str, Any]:
    def read(p: str) -> str | None:
        try:
            with open(p) as f:
                return f.read().strip()
        except OSError:
            return None

    loaded = loaded_ipvs_modules()
    record = json.loads(read(LOADED_RECORD) or "null") if "ip_vs" in loaded else None
    return {
        "kernel_release": os.uname().release,
        "loaded": loaded,
        "ip_vs_taint": read("/sys/module/ip_vs/taint"),
        "knob_present": os.path.exists(f"/proc/sys/net/ipv4/vs/{KNOB}"),
        "loaded_by_probe": record,
    }


# --- topology -------------------------------------------------------------------------------


class Topology:
    """Client, director and two real servers in fresh network namespaces."""

    def __init__(self, rule: str, knob: int | None, hold: float = 10.0) -> None:
        if rule not in ("drop", "accept"):
            raise Failed(f"rule must be drop or accept, not {rule!r}")
        self.rid = f"{os.getpid() % 1000:03d}{int(time.time() * 10) % 10000:04d}"
        self.rule, self.knob, self.hold = rule, knob, hold
        self.ns = {k: f"{NETNS_PREFIX}{self.rid}{k}" for k in ("c", "d", "r1", "r2")}
        self.procs: list[subprocess.Popen[str]] = []
        self.ipvs: IpvsControl | None = None

    def up(self) -> None:
        n, r = self.ns, self.rid
        cmds = [f"ip netns add {v}" for v in n.values()]
        cmds += [f"ip -n {v} link set lo up" for v in n.values()]
        for leaf, peer in (("c", "c"), ("r1", "1"), ("r2", "2")):
            cmds.append(f"ip link add v{leaf}{r} netns {n[leaf]} type veth "
                        f"peer name d{peer}{r} netns {n['d']}")
        cmds += [
            f"ip -n {n['c']} addr add {CLIENT_IP}/24 dev vc{r}",
            f"ip -n {n['c']} link set vc{r} up",
            f"ip -n {n['c']} route add default via 10.10.1.1",
            f"ip -n {n['d']} addr add 10.10.1.1/24 dev dc{r}",
            f"ip -n {n['d']} addr add 10.10.2.1/24 dev d1{r}",
            f"ip -n {n['d']} addr add 10.10.3.1/24 dev d2{r}",
            f"ip -n {n['d']} addr add {VIP}/32 dev lo",
        ]
        cmds += [f"ip -n {n['d']} link set {d}{r} up" for d in ("dc", "d1", "d2")]
        for i, ip in enumerate(REAL_SERVERS.values(), 1):
            ns = n[f"r{i}"]
            cmds += [f"ip -n {ns} addr add {ip}/24 dev vr{i}{r}",
                     f"ip -n {ns} link set vr{i}{r} up",
                     f"ip -n {ns} route add default via 10.10.{i + 1}.1"]
        sh(" && ".join(cmds))
        d = f"ip netns exec {n['d']}"
        sysctls = dict(SYSCTLS)
        if self.knob is not None:
            if not os.path.exists(f"/proc/sys/net/ipv4/vs/{KNOB}"):
                raise Failed(f"knob={self.knob} asked, but the loaded ip_vs has no {KNOB}")
            sysctls[KNOB] = self.knob
        sets = ["echo 1 > /proc/sys/net/ipv4/ip_forward"]
        sets += [f"echo {v} > /proc/sys/net/ipv4/vs/{k}" for k, v in sysctls.items()]
        verdict = "DROP" if self.rule == "drop" else "ACCEPT"
        c = f"ip netns exec {n['c']}"
        sh(f"{d} sh -c '{' && '.join(sets)}'"
           f" && {d} iptables -w -A FORWARD -m conntrack --ctstate INVALID -j {verdict}"
           f" && {c} iptables -w -A OUTPUT -p tcp --tcp-flags RST RST"
           f" -m mark --mark {VANISH_MARK} -j DROP"
           f" && {c} iptables -w -A OUTPUT -p tcp --tcp-flags FIN FIN"
           f" -m mark --mark {VANISH_MARK} -j DROP"
           f" && {d} ipvsadm -A -t {VIP}:{PORT} -s rr"
           + "".join(f" && {d} ipvsadm -a -t {VIP}:{PORT} -r {ip}:{PORT} -m -w 1"
                     for ip in REAL_SERVERS.values()))
        self.sysctls = {k: int(sh(f"{d} cat /proc/sys/net/ipv4/vs/{k}")) for k in sysctls}
        for i, name in enumerate(REAL_SERVERS, 1):
            self.spawn([*self.exec(f"r{i}"), sys.executable, os.path.join(HERE, "probe.py"),
                        "serve", "--port", str(PORT), "--identity", name,
                        "--hold", str(self.hold)], "listening")
        self.ipvs = IpvsControl(n["d"], VIP, PORT)

    def exec(self, leaf: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[leaf]]

    def spawn(self, argv: list[str], ready: str | None, wait: float = 30.0) -> None:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.procs.append(p)
        if ready is None:
            return
        assert p.stdout is not None
        end = time.monotonic() + wait
        while time.monotonic() < end:
            r, _, _ = select.select([p.stdout], [], [], 0.5)
            if r:
                line = p.stdout.readline()
                if ready in line:
                    return
                if not line:
                    break
        raise Failed(f"{' '.join(argv)} did not start (rc {p.poll()})")

    def down(self) -> None:
        if self.ipvs:
            self.ipvs.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        for v in self.ns.values():
            sh(f"ip netns del {v}", check=False)


# --- scenarios ------------------------------------------------------------------------------


def run_scenario(topo: Topology, name: str, count: int, timeout: float,
                 deadline: float) -> dict[str, Any]:
    """`count` attempts of one scenario; the measured connect is the same-port reconnect."""
    assert topo.ipvs is not None
    base = PORT_BASE + SCENARIOS.index(name) * PORT_SPAN
    if count > PORT_SPAN:
        raise Failed(f"at most {PORT_SPAN} attempts per scenario")
    first_kw = FIRST_CONNECT[name]
    report = probe.Report(f"{VIP}:{PORT}")
    report.retrans_before = netstat_synretrans()
    end = time.monotonic() + deadline
    setup_errors = moved = stale = 0
    for i in range(count):
        if time.monotonic() > end:
            report.extra["stopped"] = f"deadline of {deadline} s reached"
            break
        src = (CLIENT_IP, base + i)
        first = probe.connect_once(VIP, PORT, src=src, timeout=timeout, index=i, **first_kw)
        if first.error or first.server not in REAL_SERVERS:
            setup_errors += 1
            continue
        old_ip = REAL_SERVERS[first.server]
        if name == "B":
            topo.ipvs.set_weight(old_ip, PORT, 0)
        elif name == "B2":
            topo.ipvs.delete(old_ip, PORT)
        a = probe.connect_once(VIP, PORT, src=src, timeout=timeout, index=i)
        if name == "B":
            topo.ipvs.set_weight(old_ip, PORT, 1)
        elif name == "B2":
            topo.ipvs.add(old_ip, PORT, 1)
        report.add(a)
        if a.error is None:
            moved += a.server != first.server
            # B/B2: the old server is out of service; an answer from it is not a live one
            stale += name in ("B", "B2") and a.server == first.server
            stale += a.server not in REAL_SERVERS
    res = report.result()
    res["syn_retrans_delta"] = _delta(report.retrans_before, netstat_synretrans())
    res.update(scenario=name, setup_errors=setup_errors, moved=moved,
               answered_by_live=res["ok"] - stale, stale_answers=stale)
    return res


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def conntrack_after_reuse(topo: Topology, name: str, timeout: float) -> dict[str, Any]:
    """One reuse of scenario `name` (A or B) on a fresh port, then the director's conntrack."""
    assert topo.ipvs is not None
    port = PORT_BASE + len(SCENARIOS) * PORT_SPAN + (0 if name == "A" else 1)
    src = (CLIENT_IP, port)
    first = probe.connect_once(VIP, PORT, src=src, timeout=timeout, **FIRST_CONNECT[name])
    if first.error or first.server not in REAL_SERVERS:
        return {"scenario": name, "error": f"first connect: {first.error or first.server}"}
    old_ip = REAL_SERVERS[first.server]
    if name == "B":
        topo.ipvs.set_weight(old_ip, PORT, 0)
    # hold: the reconnect stays open while conntrack is read, as a live connection would
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(src)
    s.settimeout(timeout)
    t0 = time.monotonic()
    try:
        s.connect((VIP, PORT))
        ms = (time.monotonic() - t0) * 1000
        s.sendall(b"hold\n")
        server = probe._read_line(s)
        view = conntrack_view(conntrack_entries(topo.ns["d"]), CLIENT_IP, port,
                              REAL_SERVERS.get(server, "?"))
        view.update(scenario=name, old_server=first.server, new_server=server,
                    connect_ms=round(ms, 3))
        return view
    except OSError as e:
        view = conntrack_view(conntrack_entries(topo.ns["d"]), CLIENT_IP, port, "?")
        view.update(scenario=name, old_server=first.server, error=f"reconnect: {e}")
        return view
    finally:
        s.close()
        if name == "B":
            topo.ipvs.set_weight(old_ip, PORT, 1)


def ftp_transfer(topo: Topology, size: int = 256 * 1024, timeout: float = 20) -> dict[str, Any]:
    """Passive FTP download through an IPVS FTP service (ip_vs_ftp) to vsftpd on rs1."""
    root = f"/tmp/ipvsp-ftp-{topo.rid}"
    os.makedirs(root, mode=0o755)
    os.makedirs("/var/run/vsftpd/empty", exist_ok=True)
    data = os.urandom(size)
    with open(os.path.join(root, "probe.bin"), "wb") as f:
        f.write(data)
    conf = os.path.join(root + ".conf")
    with open(conf, "w") as f:
        f.write("\n".join([
            "listen=YES", "listen_ipv6=NO", "background=NO", "anonymous_enable=YES",
            "local_enable=NO", "write_enable=NO", f"anon_root={root}", "pasv_enable=YES",
            "pasv_min_port=30000", "pasv_max_port=30100", "seccomp_sandbox=NO",
            "secure_chroot_dir=/var/run/vsftpd/empty", "xferlog_enable=NO",
            "connect_from_port_20=NO", "",
        ]))
    d = f"ip netns exec {topo.ns['d']}"
    rs1 = REAL_SERVERS["rs1"]
    sh(f"{d} ipvsadm -A -t {VIP}:{FTP_PORT} -s rr && "
       f"{d} ipvsadm -a -t {VIP}:{FTP_PORT} -r {rs1}:{FTP_PORT} -m -w 1")
    topo.spawn([*topo.exec("r1"), "vsftpd", conf], None)
    out: dict[str, Any] = {"size": size}
    t0 = time.monotonic()
    try:
        for _ in range(50):  # vsftpd has no readiness line: poll its port
            try:
                ftp = ftplib.FTP(timeout=timeout)
                ftp.connect(VIP, FTP_PORT)
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise OSError("vsftpd not reachable through the VIP")
        # Use the address of the 227 reply: it must have been rewritten to the VIP.
        setattr(ftp, "trust_server_pasv_ipv4_address", True)  # noqa: B010 (3.9.3+ only)
        ftp.login()
        pasv = ftp.sendcmd("PASV")
        chunks: list[bytes] = []
        ftp.retrbinary("RETR probe.bin", chunks.append)
        ftp.quit()
        got = b"".join(chunks)
        out.update(pasv_reply=pasv, received=len(got),
                   ok=hashlib.sha256(got).digest() == hashlib.sha256(data).digest())
    except (OSError, ftplib.Error, EOFError) as e:
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
    out["elapsed_s"] = round(time.monotonic() - t0, 3)
    return out


def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Build the topology, run what the plan asks, tear down; the result as a dict."""
    t_start = time.monotonic()
    stale = cleanup_stale()
    kmsg_before = kmsg_lines()
    timeout = float(plan.get("timeout", 5))
    deadline = float(plan.get("deadline", 600))
    topo = Topology(plan.get("rule", "drop"), plan.get("knob"), float(plan.get("hold", 10)))
    out: dict[str, Any] = {"plan": plan, "modules": module_status(), "run_id": topo.rid,
                           "stale_removed": stale}
    end = time.monotonic() + deadline
    try:
        topo.up()
        out["sysctls"] = topo.sysctls
        out["setup_s"] = round(time.monotonic() - t_start, 3)
        with in_netns(netns_path(topo.ns["c"])):
            out["scenarios"] = {}
            for name, count in plan.get("scenarios", {}).items():
                if name not in SCENARIOS:
                    raise Failed(f"unknown scenario {name!r} (known: {', '.join(SCENARIOS)})")
                left = max(1.0, end - time.monotonic())
                out["scenarios"][name] = run_scenario(topo, name, int(count), timeout, left)
            if plan.get("conntrack_check"):
                out["conntrack"] = {n: conntrack_after_reuse(topo, n, timeout) for n in "AB"}
            if plan.get("ordinary"):
                left = max(1.0, end - time.monotonic())
                before = netstat_synretrans()
                samples: list[float] = []
                res = probe.run_probe(VIP, PORT, int(plan["ordinary"]), reuse=False,
                                      timeout=timeout, deadline=left, with_attempts=False,
                                      on_attempt=lambda a: samples.append(a.total_ms))
                res["syn_retrans_delta"] = _delta(before, netstat_synretrans())
                res["samples_ms"] = [round(x, 2) for x in samples]  # compact, for plots
                out["ordinary"] = res
            if plan.get("ftp"):
                out["ftp"] = ftp_transfer(topo)
    finally:
        topo.down()
    new = kmsg_lines()[len(kmsg_before):]
    out["kmsg_new"] = [ln for ln in new if not BENIGN_KMSG.search(ln)][-50:]
    out["kernel_warnings"] = kernel_warnings(new)
    out["elapsed_s"] = round(time.monotonic() - t_start, 3)
    return out


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "run":
        plan = json.load(sys.stdin)
        try:
            result = run_plan(plan)
        except Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        print(json.dumps(result))
        return 0
    if len(argv) == 2 and argv[0] == "modules":
        try:
            print(json.dumps(load_modules(argv[1])))
        except Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        return 0
    if len(argv) >= 1 and argv[0] == "restore":
        try:
            print(json.dumps(restore_modules(argv[1:])))
        except Failed as e:
            print(json.dumps({"error": str(e)}))
            return 2
        return 0
    if argv == ["status"]:
        print(json.dumps(module_status()))
        return 0
    print("usage: scenario.py run < plan.json | modules stock|DIR | restore [MODULE...] | status",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
