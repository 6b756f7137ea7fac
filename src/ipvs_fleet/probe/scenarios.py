"""The reuse scenarios (A, B, B2, C1, C2, U), the conntrack check, the FTP transfer and
`run_plan`, which builds a topology, runs what a plan asks and tears it down.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import time
from typing import Any

try:
    from ipvs_fleet.probe import cells, kernel, modules, probe, rules, topology
except ImportError:  # on a guest: sibling files, not a package
    import cells  # type: ignore[no-redef]
    import kernel  # type: ignore[no-redef]
    import modules  # type: ignore[no-redef]
    import probe  # type: ignore[no-redef]
    import rules  # type: ignore[no-redef]
    import topology  # type: ignore[no-redef]


# --- scenarios ------------------------------------------------------------------------------


def run_scenario(
    topo: topology.Topology,
    name: str,
    count: int,
    timeout: float,
    deadline: float,
    settle: float = 0.0,
    hold_flush: bool = False,
) -> dict[str, Any]:
    """`count` attempts of one scenario; the measured connect is the same-port reconnect.

    + settle: seconds between the real-server edit of B/B2 and the reconnect (0: at once,
      as earlier results were measured; on 5.9+ a deleted destination's connections are
      flushed by work queued at the deletion, so B2's drop needs the reconnect to race it)
    + hold_flush: B2 deletes the server without queueing that flush
      (`Topology.remove_server_flush_held`), so the reconnect meets the old connection
      every time instead of racing the flush
    `old_conn_met` counts the attempts whose old connection was still in the IPVS table
    right before the reconnect: the reconnects the fix module can act on (None for a racing
    B2, where reading the table first would change the race).
    """
    lay = topo.lay
    dst, dport = lay.target.vip, lay.target.port
    base = cells.PORT_BASE + cells.SCENARIOS.index(name) * cells.PORT_SPAN
    if count > cells.PORT_SPAN:
        raise cells.Failed(f"at most {cells.PORT_SPAN} attempts per scenario")
    first_kw = cells.FIRST_CONNECT[name]
    report = probe.Report(cells.hostport(dst, dport))
    report.retrans_before = kernel.netstat_synretrans()
    end = time.monotonic() + deadline
    setup_errors = moved = stale = old_met = 0
    held = hold_flush and name == "B2"
    track_old = held or name != "B2"
    for i in range(count):
        if time.monotonic() > end:
            report.extra["stopped"] = f"deadline of {deadline} s reached"
            break
        src = (lay.client_ip, base + i)
        first = probe.connect_once(
            dst, dport, src=src, timeout=timeout, index=i, peer=True, **first_kw
        )
        if first.error or first.server not in lay.real_servers:
            setup_errors += 1
            continue
        if name == "B":
            topo.set_weight(first.server, 0)
        elif held:
            topo.remove_server_flush_held(first.server)
        elif name == "B2":
            topo.remove_server(first.server)
        if settle and name in ("B", "B2"):
            time.sleep(settle)
        if track_old:
            old_met += topo.ipvs_conns_from_port(src[1]) > 0
        a = probe.connect_once(dst, dport, src=src, timeout=timeout, index=i, peer=True)
        if name == "B":
            topo.set_weight(first.server, 1)
        elif name == "B2":
            topo.add_server(first.server)
        report.add(a)
        if a.error is None:
            moved += a.server != first.server
            # B/B2: the old server is out of service; an answer from it is not a live one
            stale += name in ("B", "B2") and a.server == first.server
            stale += a.server not in lay.real_servers
    res = report.result()
    res["syn_retrans_delta"] = _delta(report.retrans_before, kernel.netstat_synretrans())
    res.update(
        scenario=name,
        setup_errors=setup_errors,
        moved=moved,
        answered_by_live=res["ok"] - stale,
        stale_answers=stale,
        settle_s=settle,
        flush_held=held,
        old_conn_met=old_met if track_old else None,
    )
    res.update(rules.peer_summary(lay, report.attempts))
    return res


def _udp_ask(
    s: socket.socket, dst: tuple[str, int], req: str, wait: float
) -> tuple[str | None, dict[str, str]]:
    """Send `req`, wait up to `wait` s for the answer to it (answers to others are skipped).

    A datagram that netfilter drops on a local sender's own path (the host client: IPVS at
    LOCAL_OUT) fails with EPERM at once; the wait is kept, as a remote sender's would be.
    """
    end = time.monotonic() + wait
    try:
        s.sendto(f"{req} peer\n".encode(), dst)
    except OSError as e:
        time.sleep(max(0.0, end - time.monotonic()))
        return None, {"error": f"send: {probe._errname(e)}"}
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return None, {}
        s.settimeout(left)
        try:
            data = s.recv(probe.MAX_LINE)
        except OSError as e:  # socket.timeout is no TimeoutError before 3.10
            if isinstance(e, socket.timeout):
                return None, {}
            return None, {"error": probe._errname(e)}  # ICMP unreachable, reported late
        server, kv = probe.parse_identity(data.decode(errors="replace"))
        if kv.get("req") == req:
            return server, kv


def run_udp(
    topo: topology.Topology,
    count: int,
    timeout: float,
    deadline: float,
    settle: float = 0.0,
    hold_flush: bool = False,
) -> dict[str, Any]:
    """Scenario U: the answering real server X is deleted between two datagrams from one port.

    Measured: the time from the second datagram to the first answer (second, or the third
    sent after UDP_RETRY_S without one); `slow` counts attempts that needed the third.
    + hold_flush: X deleted without queueing IPVS's flush of its connections, as B2 does:
      the second datagram meets the old connection every time (`old_conn_met`), where stock
      IPVS drops it (its conntrack entry is the old one) and the fix module (knob 1) kills
      that entry first
    """
    lay = topo.lay
    svc = lay.udp_target
    dst = (svc.vip, svc.port)
    base = cells.PORT_BASE + cells.SCENARIOS.index("U") * cells.PORT_SPAN
    if count > cells.PORT_SPAN:
        raise cells.Failed(f"at most {cells.PORT_SPAN} attempts per scenario")
    report = probe.Report(f"udp {cells.hostport(svc.vip, svc.port)}")
    end = time.monotonic() + deadline
    setup_errors = old_met = 0
    details: list[dict[str, Any]] = []
    for i in range(count):
        if time.monotonic() > end:
            report.extra["stopped"] = f"deadline of {deadline} s reached"
            break
        s = socket.socket(probe.family_of(svc.vip), socket.SOCK_DGRAM)
        try:
            s.bind((lay.client_ip, base + i))
            first, _ = _udp_ask(s, dst, "q1", timeout)
            if first not in lay.real_servers:
                setup_errors += 1
                continue
            if hold_flush:
                topo.remove_server_flush_held(first, "udp")
            else:
                topo.remove_server(first, "udp")
            try:
                time.sleep(settle)
                if hold_flush:  # racing the flush, a read first would change the race
                    old_met += topo.ipvs_conns_from_port(base + i, "udp") > 0
                t0 = time.monotonic()
                second, kv2 = _udp_ask(s, dst, "q2", cells.UDP_RETRY_S)
                third, kv3 = (None, {}) if second else _udp_ask(s, dst, "q3", cells.UDP_RETRY_S)
                t1 = time.monotonic()
            finally:
                topo.add_server(first, "udp")
        finally:
            s.close()
        server = second or third
        kv = kv2 if second else kv3
        ms = round((t1 - t0) * 1000.0, 3)
        pport = kv.get("pport", "")
        report.add(
            probe.Attempt(
                i,
                base + i,
                ms,
                ms,
                server,
                None if server else "no answer",
                peer=kv.get("peer"),
                peer_port=int(pport) if pport.isdigit() else None,
            )
        )
        details.append(
            {
                "first": first,
                "second": second,
                "third": third,
                "second_error": kv2.get("error"),
                "third_error": kv3.get("error"),
            }
        )
    res = report.result()
    res["slow"] = sum(1 for d in details if d["second"] is None)
    res.update(
        scenario="U",
        setup_errors=setup_errors,
        udp=details,
        settle_s=settle,
        flush_held=hold_flush,
        old_conn_met=old_met if hold_flush else None,
        second_answered=sum(1 for d in details if d["second"]),
        third_answered=sum(1 for d in details if d["third"]),
        answered_by_deleted=sum(1 for d in details if d["first"] in (d["second"], d["third"])),
    )
    res["answered_by_live"] = res["ok"] - res["answered_by_deleted"]
    res["moved"] = res["answered_by_live"]
    res.update(rules.peer_summary(lay, report.attempts))
    return res


def _delta(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else b - a


def conntrack_after_reuse(topo: topology.Topology, name: str, timeout: float) -> dict[str, Any]:
    """One reuse of scenario `name` (A or B) on a fresh port, then the director's conntrack."""
    lay = topo.lay
    dst, dport = lay.target.vip, lay.target.port
    port = cells.PORT_BASE + len(cells.SCENARIOS) * cells.PORT_SPAN + (0 if name == "A" else 1)
    src = (lay.client_ip, port)
    first = probe.connect_once(dst, dport, src=src, timeout=timeout, **cells.FIRST_CONNECT[name])
    if first.error or first.server not in lay.real_servers:
        return {"scenario": name, "error": f"first connect: {first.error or first.server}"}
    if name == "B":
        topo.set_weight(first.server, 0)
    # hold: the reconnect stays open while conntrack is read, as a live connection would
    s = socket.socket(probe.family_of(dst), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(src)
    s.settimeout(timeout)
    t0 = time.monotonic()
    try:
        s.connect((dst, dport))
        ms = (time.monotonic() - t0) * 1000
        s.sendall(b"hold peer\n")
        server, kv = probe.parse_identity(probe._read_line(s))
        view = kernel.conntrack_view(
            kernel.conntrack_entries(topo.ns["d"], lay.family),
            lay.client_ip,
            port,
            lay.real_servers.get(server, "?"),
        )
        view.update(
            scenario=name,
            old_server=first.server,
            new_server=server,
            connect_ms=round(ms, 3),
            peer=kv.get("peer"),
            peer_kind=lay.peer_kind(kv.get("peer")),
        )
        return view
    except OSError as e:
        view = kernel.conntrack_view(
            kernel.conntrack_entries(topo.ns["d"], lay.family), lay.client_ip, port, "?"
        )
        view.update(scenario=name, old_server=first.server, error=f"reconnect: {e}")
        return view
    finally:
        s.close()
        if name == "B":
            topo.set_weight(first.server, 1)


def ftp_transfer(
    topo: topology.Topology, size: int = 256 * 1024, timeout: float = 20
) -> dict[str, Any]:
    """Passive FTP download through an IPVS FTP service (ip_vs_ftp) to vsftpd on rs1."""

    # Root writes here: a fresh directory of its own (mkdtemp: unpredictable, 0700, never an
    # existing path or a symlink planted in /tmp), removed after the transfer.
    work = tempfile.mkdtemp(prefix="ipvsp-ftp-")
    try:
        return _ftp_transfer(topo, work, size, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _ftp_transfer(topo: topology.Topology, work: str, size: int, timeout: float) -> dict[str, Any]:
    import ftplib  # here only: it imports ssl, ~0.3 s at every probe start under TCG

    root = os.path.join(work, "pub")
    os.mkdir(root, mode=0o755)
    os.chmod(work, 0o711)  # vsftpd's anonymous session (user ftp) reads pub/
    os.makedirs("/var/run/vsftpd/empty", exist_ok=True)
    data = os.urandom(size)
    with open(os.path.join(root, "probe.bin"), "wb") as f:
        f.write(data)
    conf = os.path.join(work, "vsftpd.conf")
    with open(conf, "w") as f:
        f.write(
            "\n".join(
                [
                    "listen=YES",
                    "listen_ipv6=NO",
                    "background=NO",
                    "anonymous_enable=YES",
                    "local_enable=NO",
                    "write_enable=NO",
                    f"anon_root={root}",
                    "pasv_enable=YES",
                    "pasv_min_port=30000",
                    "pasv_max_port=30100",
                    "seccomp_sandbox=NO",
                    "secure_chroot_dir=/var/run/vsftpd/empty",
                    "xferlog_enable=NO",
                    "connect_from_port_20=NO",
                    "",
                ]
            )
        )
    d = f"ip netns exec {topo.ns['d']}"
    vip = topo.lay.target.vip
    rs1 = topo.lay.real_servers["rs1"]
    kernel.sh(
        f"{d} ipvsadm -A -t {vip}:{cells.FTP_PORT} -s rr && "
        f"{d} ipvsadm -a -t {vip}:{cells.FTP_PORT} -r {rs1}:{cells.FTP_PORT} -m -w 1"
    )
    topo.spawn([*topo.exec("r1"), "vsftpd", conf], None)
    out: dict[str, Any] = {"size": size}
    t0 = time.monotonic()
    try:
        for _ in range(50):  # vsftpd has no readiness line: poll its port
            try:
                ftp = ftplib.FTP(timeout=timeout)
                ftp.connect(vip, cells.FTP_PORT)
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
        out.update(
            pasv_reply=pasv,
            received=len(got),
            ok=hashlib.sha256(got).digest() == hashlib.sha256(data).digest(),
        )
    except (OSError, ftplib.Error, EOFError) as e:
        out.update(ok=False, error=f"{type(e).__name__}: {e}")
    out["elapsed_s"] = round(time.monotonic() - t0, 3)
    return out


def _counter_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: b[k] - a.get(k, 0) for k in b}


def run_plan(plan: dict[str, Any]) -> dict[str, Any]:
    """Build the topology, run what the plan asks, tear down; the result as a dict.

    Keys: plan, modules, run_id, stale_removed, sysctls, cell (ruleset, backend, client,
    family, rule, layout, masquerade_demanded, target, client_ip, the rules applied),
    setup_s, scenarios {name: probe.Report result + scenario keys, rule_counters, new_conns,
    peer_sources, peer_kinds, masq_mismatch, killed_tcp, killed_udp}, conntrack, ordinary
    (with killed_tcp, killed_udp), ftp, reuse_counters (/proc/net/ip_vs_reuse of the director
    at the end, None without the fix module), kmsg_new, kernel_warnings, elapsed_s.
    Plan key `ipvs_edits` (diagnostics): how real servers are edited (IpvsControl: sockopt,
    netlink, ipvsadm).
    """
    t_start = time.monotonic()
    cell = cells.Cell.from_plan(plan)
    if plan.get("ftp") and (cell.ruleset, cell.family) != ("minimal", 4):
        raise cells.Failed("ftp needs the minimal ruleset over IPv4")
    for name in plan.get("scenarios", {}):
        if name not in cells.SCENARIOS:
            raise cells.Failed(f"unknown scenario {name!r} (known: {', '.join(cells.SCENARIOS)})")
    stale = modules.cleanup_stale()
    kmsg_before = kernel.kmsg_lines()
    timeout = float(plan.get("timeout", 5))
    deadline = float(plan.get("deadline", 600))
    settle = float(plan.get("settle", 0.0))
    hold_flush = bool(plan.get("hold_flush", False))
    topo = topology.Topology(
        cell,
        plan.get("knob"),
        float(plan.get("hold", 10)),
        plan.get("ipvs_edits", "sockopt"),
        plan.get("ipvs_sysctls") or {},
    )
    out: dict[str, Any] = {
        "plan": plan,
        "modules": modules.module_status(),
        "run_id": topo.rid,
        "stale_removed": stale,
    }
    end = time.monotonic() + deadline
    try:
        topo.up()
        out["sysctls"] = topo.sysctls
        out["cell"] = topo.describe()
        out["setup_s"] = round(time.monotonic() - t_start, 3)
        lay = topo.lay
        with kernel.in_netns(kernel.netns_path(topo.client_ns)):
            out["scenarios"] = {}
            for name, count in plan.get("scenarios", {}).items():
                left = max(1.0, end - time.monotonic())
                before = topo.counters()
                killed_before = topo.reuse_counters()
                if name == "U":
                    res = run_udp(topo, int(count), timeout, left, settle, hold_flush)
                else:
                    res = run_scenario(topo, name, int(count), timeout, left, settle, hold_flush)
                res.update(modules.killed_delta(killed_before, topo.reuse_counters()))
                res["rule_counters"] = _counter_delta(before, topo.counters())
                res["new_conns"] = res["rule_counters"].get("new")
                out["scenarios"][name] = res
            if plan.get("conntrack_check"):
                out["conntrack"] = {n: conntrack_after_reuse(topo, n, timeout) for n in "AB"}
            if plan.get("ordinary"):
                left = max(1.0, end - time.monotonic())
                before_rt = kernel.netstat_synretrans()
                killed_before = topo.reuse_counters()
                samples: list[float] = []
                res = probe.run_probe(
                    lay.target.vip,
                    lay.target.port,
                    int(plan["ordinary"]),
                    reuse=False,
                    timeout=timeout,
                    deadline=left,
                    with_attempts=False,
                    on_attempt=lambda a: samples.append(a.total_ms),
                )
                res["syn_retrans_delta"] = _delta(before_rt, kernel.netstat_synretrans())
                res.update(modules.killed_delta(killed_before, topo.reuse_counters()))
                res["samples_ms"] = [round(x, 2) for x in samples]  # compact, for plots
                out["ordinary"] = res
            if plan.get("ftp"):
                out["ftp"] = ftp_transfer(topo)
        out["reuse_counters"] = topo.reuse_counters()
    finally:
        topo.down()
    new = kernel.kmsg_lines()[len(kmsg_before) :]
    out["kmsg_new"] = [ln for ln in new if not kernel.BENIGN_KMSG.search(ln)][-50:]
    out["kernel_warnings"] = kernel.kernel_warnings(new)
    out["elapsed_s"] = round(time.monotonic() - t_start, 3)
    return out
