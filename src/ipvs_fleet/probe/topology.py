"""A cell's topology on the guest (standard library only): network namespaces and veths,
the director's sysctls, rules and IPVS services, the forked test servers; `Topology.up`
builds it, `down` removes it.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any

try:
    from ipvs_fleet.probe import cells, kernel, modules, probe, rules
except ImportError:  # on a guest: sibling files, not a package
    import cells  # type: ignore[no-redef]
    import kernel  # type: ignore[no-redef]
    import modules  # type: ignore[no-redef]
    import probe  # type: ignore[no-redef]
    import rules  # type: ignore[no-redef]


class Forked:
    """A child forked from this process, with the part of Popen's interface `down` uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rc: int | None = None

    def poll(self) -> int | None:
        if self.rc is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.rc = os.waitstatus_to_exitcode(status)
        return self.rc

    def _signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return rc


def serve_forked(
    netns: str, bind: str, port: int, identity: str, hold: float, wait: float = 30.0
) -> Forked:
    """A real server (probe.serve, TCP `port` and UDP_PORT) in a child forked into `netns`.

    A fork, not `python3 probe.py serve`: a new interpreter and its imports cost about 1 s
    of CPU under QEMU TCG, twice per topology. The child writes to a pipe of its own, so
    it never holds this process's output (an SSH channel) open.
    """
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(r)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(w, 1)
            os.dup2(w, 2)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            kernel.setns(kernel.netns_path(netns))
            probe.serve(bind, port, identity, hold, cells.UDP_PORT)
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported to the parent, then exit
            with contextlib.suppress(OSError):
                os.write(2, f"real server {identity}: {e!r}\n".encode())
        finally:
            os._exit(code)
    os.close(w)
    child, seen = Forked(pid), b""
    try:
        end = time.monotonic() + wait
        while time.monotonic() < end and b"\n" not in seen:
            ready, _, _ = select.select([r], [], [], 0.5)
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                seen += chunk
    finally:
        os.close(r)
    if not seen.startswith(b"listening"):
        child.kill()
        raise cells.Failed(
            f"real server {identity} in {netns} did not start (rc {child.poll()}): "
            f"{seen.decode(errors='replace').strip()[-400:]}"
        )
    return child


class Topology:
    """Client(s), director (node) and two real servers in fresh network namespaces."""

    def __init__(
        self,
        cell: cells.Cell | str,
        knob: int | None,
        hold: float = 10.0,
        ipvs_edits: str = "sockopt",
        ipvs_sysctls: dict[str, int] | None = None,
    ) -> None:
        if isinstance(cell, str):  # the old signature: the minimal ruleset's rule
            cell = cells.Cell(rule=cell)
        cells.check_cell(cell.ruleset, cell.client, cell.family, cell.backend, cell.rule)
        self.rid = f"{os.getpid() % 1000:03d}{int(time.time() * 10) % 10000:04d}"
        self.cell, self.knob, self.hold = cell, knob, hold
        self.ipvs_edits = ipvs_edits
        self.ipvs_sysctls = dict(ipvs_sysctls or {})
        self.rule = cell.rule
        self.lay = cells.cell_layout(cell.ruleset, cell.client, cell.family, self.rid)
        self.ns = {k: f"{modules.NETNS_PREFIX}{self.rid}{k}" for k in ("c", "p", "d", "r1", "r2")}
        self.procs: list[Forked | subprocess.Popen[str]] = []
        self.ipvs: kernel.IpvsControl | None = None
        self.sysctls: dict[str, int] = {}
        self.rules_text = rules.director_rules(self.lay, cell.rule)
        self.ipset_text = rules.ipset_restore(self.lay)
        self.specs = rules.counter_specs(self.lay)
        six = "6" if cell.family == 6 else ""
        self.restore_cmd = f"ip{six}tables-{cell.backend}-restore"
        self.save_cmd = f"ip{six}tables-{cell.backend}-save"

    @property
    def client_ns(self) -> str:
        return self.ns[self.lay.client_leaf]

    def up(self) -> None:
        lay, n = self.lay, self.ns
        tools = ["ipvsadm", self.restore_cmd, self.save_cmd] + (["ipset"] if lay.k8s else [])
        for tool in tools:
            if shutil.which(tool) is None:
                raise cells.Failed(f"`{tool}` is missing in the guest (lab image without it?)")
        six = "-6 " if lay.family == 6 else ""
        nodad = " nodad" if lay.family == 6 else ""
        # `ip -batch`: one process for the namespaces and veth pairs, then one per namespace
        # (a process start costs ~70 ms of CPU under QEMU TCG; one `ip` per line made ~35).
        # The director's side first: a leaf's route then goes via a peer that is up.
        top = [f"netns add {v}" for v in n.values()]
        per_ns: dict[str, list[str]] = {v: ["link set lo up"] for v in n.values()}
        leaves: list[str] = []
        for ln in lay.links.values():
            leaf_ns = n[ln.leaf]
            top.append(
                f"link add {ln.peer_dev} netns {leaf_ns} type veth "
                f"peer name {ln.dev} netns {n['d']}"
            )
            per_ns[n["d"]] += [
                f"addr add {ln.node_ip}/{ln.plen} dev {ln.dev}{nodad}",
                f"link set {ln.dev} up",
            ]
            via = "default" if ln.leaf in ("c", "p") else lay.rs_routes
            per_ns[leaf_ns] += [
                f"addr add {ln.leaf_ip}/{ln.plen} dev {ln.peer_dev}{nodad}",
                f"link set {ln.peer_dev} up",
                f"route add {via} via {ln.node_ip}",
            ]
            leaves.append(leaf_ns)
        hl = cells.ADDRS[lay.family]["host_len"]
        if lay.vip_dev != "lo":  # kube-ipvs0: a dummy device, left down as kube-proxy does
            per_ns[n["d"]].append(f"link add {lay.vip_dev} type dummy")
        per_ns[n["d"]] += [f"addr add {v}/{hl} dev {lay.vip_dev}{nodad}" for v in lay.vips]
        kernel.sh("ip -batch -", input="\n".join(top) + "\n")
        for ns in [n["d"], *(v for v in n.values() if v != n["d"])]:
            kernel.sh(f"ip {six}-n {ns} -batch -", input="\n".join(per_ns[ns]) + "\n")
        sysctls = {**(cells.K8S_SYSCTLS if lay.k8s else cells.SYSCTLS), **self.ipvs_sysctls}
        missing = [k for k in self.ipvs_sysctls if not os.path.exists(f"/proc/sys/net/ipv4/vs/{k}")]
        if missing:
            raise cells.Failed(f"ipvs_sysctls: net.ipv4.vs.{missing[0]} does not exist here")
        if self.knob is not None:
            if not os.path.exists(f"/proc/sys/net/ipv4/vs/{cells.KNOB}"):
                raise cells.Failed(
                    f"knob={self.knob} asked, but {cells.KNOB} is missing "
                    f"({modules.FIX_MODULE}, the fix module, not loaded?)"
                )
            sysctls[cells.KNOB] = self.knob
        sets = {"/proc/sys/net/ipv4/ip_forward": 1}
        if lay.family == 6:
            sets["/proc/sys/net/ipv6/conf/all/forwarding"] = 1
        sets.update({f"/proc/sys/net/ipv4/vs/{k}": v for k, v in sysctls.items()})
        # the director's sysctls from this thread, moved into its netns (no process)
        with kernel.in_netns(kernel.netns_path(n["d"])):
            for path, v in sets.items():
                with open(path, "w") as f:
                    f.write(f"{v}\n")
        if self.ipset_text:
            kernel.run_in_netns(n["d"], ["ipset", "restore"], input=self.ipset_text)
        kernel.run_in_netns(n["d"], [self.restore_cmd, "-w"], input=self.rules_text)
        for leaf in ("c", "p"):
            kernel.run_in_netns(n[leaf], [self.restore_cmd, "-w"], input=rules.client_rules(lay))
        kernel.run_in_netns(n["d"], ["ipvsadm", "-R"], input=cells.ipvsadm_restore(lay))
        with kernel.in_netns(kernel.netns_path(n["d"])):
            self.sysctls = {k: int(kernel.read_text(f"/proc/sys/net/ipv4/vs/{k}")) for k in sysctls}
            liberal = kernel.read_text("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")
        if liberal.isdigit():
            self.sysctls["nf_conntrack_tcp_be_liberal"] = int(liberal)
        bind = "::" if lay.family == 6 else "0.0.0.0"
        for i, name in enumerate(lay.real_servers, 1):
            self.procs.append(serve_forked(n[f"r{i}"], bind, lay.rs_port, name, self.hold))
        self.ipvs = kernel.IpvsControl(n["d"], lay.family, self.ipvs_edits)

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
        raise cells.Failed(f"{' '.join(argv)} did not start (rc {p.poll()})")

    # real-server edits, on every service of the protocol (as kube-proxy does for an endpoint)
    def _each(self, proto: str) -> list[cells.Service]:
        return [s for s in self.lay.services if s.proto == proto]

    def _rport(self, proto: str) -> int:
        return self.lay.rs_port if proto == "tcp" else cells.UDP_PORT

    def set_weight(self, server: str, weight: int, proto: str = "tcp") -> None:
        assert self.ipvs is not None
        for svc in self._each(proto):
            self.ipvs.set_weight(svc, self.lay.real_servers[server], self._rport(proto), weight)

    def remove_server(self, server: str, proto: str = "tcp") -> None:
        assert self.ipvs is not None
        for svc in self._each(proto):
            self.ipvs.delete(svc, self.lay.real_servers[server], self._rport(proto))

    def add_server(self, server: str, proto: str = "tcp") -> None:
        assert self.ipvs is not None
        for svc in self._each(proto):
            self.ipvs.add(svc, self.lay.real_servers[server], self._rport(proto), 1)

    def remove_server_flush_held(self, server: str, proto: str = "tcp") -> None:
        """Delete a real server without queueing IPVS's flush of its connections.

        The kernel (5.9+, 04231e52d355) queues that flush only when `expire_nodest_conn` is 1
        at the deletion; a packet's own check reads it on arrival. So: 0 around the deletion,
        then the director's value back: the old connection stays until a packet meets it,
        as any packet does that arrives before the flush has run.
        """
        value = self.sysctls["expire_nodest_conn"]
        self.set_vs_sysctl("expire_nodest_conn", 0)
        try:
            self.remove_server(server, proto)
        finally:
            self.set_vs_sysctl("expire_nodest_conn", value)

    def set_vs_sysctl(self, key: str, value: int) -> None:
        """net.ipv4.vs.<key> of the director netns (no fork: setns in this thread)."""
        with (
            kernel.in_netns(kernel.netns_path(self.ns["d"])),
            open(f"/proc/sys/net/ipv4/vs/{key}", "w") as f,
        ):
            f.write(f"{value}\n")

    def ipvs_conns_from_port(self, port: int, proto: str = "tcp") -> int:
        """How many connections of `proto` in the director's IPVS table come from source port
        `port` (thread-self: /proc/net is the thread group leader's netns)."""
        with (
            kernel.in_netns(kernel.netns_path(self.ns["d"])),
            open("/proc/thread-self/net/ip_vs_conn") as f,
        ):
            return kernel.ipvs_conns_from_port(f.read(), port, proto)

    def reuse_counters(self) -> dict[str, int] | None:
        """The fix module's counters in the director netns (where IPVS runs); None without
        the module."""
        with kernel.in_netns(kernel.netns_path(self.ns["d"])):
            return modules.parse_reuse_counters(
                kernel.read_text(f"/proc/thread-self/net/{modules.REUSE_PROC}")
            )

    def counters(self) -> dict[str, int]:
        """Packet counts of the watched rules (counter_specs) in the director netns."""
        text = kernel.sh(f"ip netns exec {self.ns['d']} {self.save_cmd} -c")
        return rules.parse_counters(text, self.specs)

    def describe(self) -> dict[str, Any]:
        return {
            **asdict(self.cell),
            "layout": self.lay.to_dict(),
            "masquerade_demanded": self.lay.masquerade_demanded,
            "target": cells.hostport(self.lay.target.vip, self.lay.target.port),
            "udp_target": cells.hostport(self.lay.udp_target.vip, self.lay.udp_target.port),
            "client_ip": self.lay.client_ip,
            "iptables_restore": self.rules_text,
            "ipset_restore": self.ipset_text,
        }

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
        kernel.sh(
            "ip -force -batch -",
            check=False,
            input="".join(f"netns del {v}\n" for v in self.ns.values()),
        )
