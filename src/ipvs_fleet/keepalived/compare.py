"""keepalived's configuration against what the director runs.

Each function returns findings: a failure (the host is not what keepalived was configured to
make it) or a note (worth reading, not a failure: a real server keepalived took out of the
table because its health check fails, as it is meant to).
"""

from __future__ import annotations

from dataclasses import dataclass

from ipvs_fleet.keepalived.config import IPAddress, KeepalivedConfig, VirtualServer
from ipvs_fleet.keepalived.live import LiveService, LiveSyncDaemon, ServiceKey

ROLES = ("MASTER", "BACKUP")


@dataclass(frozen=True)
class Finding:
    failure: bool
    text: str


def fail(text: str) -> Finding:
    return Finding(True, text)


def note(text: str) -> Finding:
    return Finding(False, text)


def _ep(addr: IPAddress | int, port: int) -> str:
    return f"[{addr}]:{port}" if getattr(addr, "version", 4) == 6 else f"{addr}:{port}"


def _svc(key: ServiceKey) -> str:
    proto, addr, port = key
    return f"fwmark {addr}" if proto == "FWM" else f"{proto} {_ep(addr, port)}"


def _one_service(vs: VirtualServer, live: LiveService) -> list[Finding]:
    out: list[Finding] = []
    name = _svc(vs.key)
    if live.scheduler != vs.lb_algo:
        out.append(fail(f"{name}: scheduler {live.scheduler}, configured lb_algo {vs.lb_algo}"))
    if live.persistence_timeout != vs.persistence_timeout:
        out.append(
            fail(
                f"{name}: persistence {live.persistence_timeout or 'none'}, configured "
                f"persistence_timeout {vs.persistence_timeout or 'none'}"
            )
        )
    configured = {(r.address, r.port): r for r in vs.real_servers}
    sorry = vs.sorry_server
    for (addr, port), r in configured.items():
        lr = live.reals.get((addr, port))
        rs = f"{name}: real server {_ep(addr, port)}"
        if lr is None:
            out.append(note(f"{rs} not in the table (its health check fails?)"))
            continue
        if lr.lb_kind != r.lb_kind:
            out.append(fail(f"{rs}: forwarding {lr.lb_kind}, configured lb_kind {r.lb_kind}"))
        if lr.weight == 0 and r.weight != 0 and r.inhibit_on_failure:
            out.append(note(f"{rs} at weight 0 (inhibit_on_failure: its health check fails?)"))
        elif lr.weight != r.weight:
            out.append(fail(f"{rs}: weight {lr.weight}, configured weight {r.weight}"))
    for addr, port in sorted(set(live.reals) - set(configured), key=str):
        if sorry is not None and (addr, port) == (sorry.address, sorry.port):
            out.append(note(f"{name}: sorry server {_ep(addr, port)} in the table"))
        else:
            out.append(fail(f"{name}: real server {_ep(addr, port)} in the table, not configured"))
    return out


def compare_table(cfg: KeepalivedConfig, table: dict[ServiceKey, LiveService]) -> list[Finding]:
    """Configured virtual servers vs the live IPVS table."""
    out = [fail(f"not supported by the check: {u}") for u in cfg.unsupported]
    configured: dict[ServiceKey, VirtualServer] = {vs.key: vs for vs in cfg.virtual_servers}
    for key, vs in configured.items():
        live = table.get(key)
        if live is None:
            out.append(fail(f"{_svc(key)} ({vs.where}) not in the IPVS table"))
        else:
            out += _one_service(vs, live)
    if not any("virtual_server_group" in u or "fwmark" in u for u in cfg.unsupported):
        for key in sorted(set(table) - set(configured), key=str):
            out.append(fail(f"{_svc(key)} in the IPVS table, not in keepalived's configuration"))
    return out


def vrrp_roles(
    cfg: KeepalivedConfig, own: dict[str, str], addresses: dict[IPAddress, str]
) -> tuple[dict[str, str], list[Finding]]:
    """(each instance's role, findings): MASTER or BACKUP, never FAULT; a MASTER holds all
    its VIPs, a BACKUP none. The role is keepalived's own (its journal, `own`); where that
    is unknown, the one the addresses show."""
    roles: dict[str, str] = {}
    out: list[Finding] = []
    for inst in cfg.instances:
        held = [v for v in inst.vips if v in addresses]
        missing = [str(v) for v in inst.vips if v not in addresses]
        state = own.get(inst.name)
        if state is None:
            if missing and held:
                out.append(
                    fail(
                        f"VRRP {inst.name}: state unknown, holds {', '.join(map(str, held))} "
                        f"but not {', '.join(missing)}"
                    )  # fmt: skip
                )
                continue
            state = "BACKUP" if missing or not inst.vips else "MASTER"
            out.append(
                note(f"VRRP {inst.name}: keepalived's state not logged; by its VIPs {state}")
            )
        roles[inst.name] = state
        if state not in ROLES:
            out.append(fail(f"VRRP {inst.name}: {state}, not MASTER or BACKUP"))
        elif state == "MASTER" and missing:
            out.append(fail(f"VRRP {inst.name}: MASTER without its VIPs {', '.join(missing)}"))
        elif state == "BACKUP" and held:
            out.append(fail(f"VRRP {inst.name}: BACKUP holding VIPs {', '.join(map(str, held))}"))
    return roles, out


def sync_daemon(
    cfg: KeepalivedConfig, roles: dict[str, str], daemons: list[LiveSyncDaemon]
) -> list[Finding]:
    """The sync daemon keepalived runs for its sync instance's role (keepalived 2.2: the
    master daemon on the VRRP master, the backup daemon on a backup), on the configured
    interface with the configured sync id."""
    sd = cfg.sync_daemon
    if sd is None:
        return [note("no lvs_sync_daemon configured")]
    want_id = cfg.sync_id()
    role = roles.get(sd.instance)
    if role not in ROLES:
        return [fail(f"sync daemon: VRRP {sd.instance} is {role or 'unknown'}: no role to sync")]
    want = "master" if role == "MASTER" else "backup"
    mine = [d for d in daemons if d.role == want]
    if not mine:
        running = ", ".join(f"{d.role} (syncid {d.syncid})" for d in daemons) or "none"
        return [fail(f"sync daemon: no {want} daemon on the VRRP {role} (running: {running})")]
    out = []
    for d in mine:
        if d.syncid != want_id:
            out.append(fail(f"sync daemon: {want} syncid {d.syncid}, configured id {want_id}"))
        if d.interface != sd.interface:
            out.append(fail(f"sync daemon: {want} on {d.interface}, configured {sd.interface}"))
    return out
